//! The benchmark's job types, and the submission every line makes raw (the fan-out line times it).

use serde_json::{json, Value};
use tokio_postgres::Client;

use crate::CliError;

const BENCH_TYPE: &str = r#"{
    "description": "stageflow bench: N no-op tasks, then one per task",
    "parameters": {"type": "object", "properties": {"n": {"type": "integer"}, "run": {"type": "string"}, "ms": {"type": "integer"}}},
    "stages": [{"name": "first", "handler": "debug.sleep", "queue": "bench", "fan_out": "count", "param": "n"},
               {"name": "second", "handler": "debug.sleep", "queue": "bench", "fan_out": "lineage"}]
}"#;

pub(super) async fn register_bench_types(client: &stageflow_client::Client) -> Result<(), CliError> {
    let api = client.api();
    let two: Value = serde_json::from_str(BENCH_TYPE).expect("valid");
    api.register_job_type("bench", &two).await?;
    // The same on a queue of its own, for the pgbench line (whose leftover tasks it cancels).
    let mut pgbench = two.clone();
    for stage in pgbench["stages"].as_array_mut().into_iter().flatten() {
        stage["queue"] = json!("pgbench");
    }
    api.register_job_type("bench_pgbench", &pgbench).await?;
    let one = json!({"stages": [{"name": "only", "handler": "debug.sleep", "queue": "flat", "fan_out": "count", "param": "n"}],
                     "parameters": {"type": "object", "properties": {"n": {"type": "integer"}, "run": {"type": "string"}}}});
    api.register_job_type("bench_flat", &one).await?;
    let hop = json!({"stages": [{"name": "a", "handler": "debug.sleep", "queue": "hop"}, {"name": "b", "handler": "debug.sleep", "queue": "hop"}],
                     "parameters": {"type": "object", "properties": {"run": {"type": "string"}}}});
    api.register_job_type("bench_hop", &hop).await?;
    Ok(())
}

/// Unique per call: a submission's `run` param, so that each one is a new job.
pub(super) fn run_id() -> String {
    format!("{}-{}", std::process::id(), chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default())
}

/// Raw: the fan-out line times this statement.
pub(super) async fn submit(client: &Client, job_type: &str, params: Value) -> Result<String, CliError> {
    Ok(client.query_one("SELECT stageflow.submit_job($1, $2)", &[&job_type, &params]).await?.get(0))
}
