//! Fan-out: how long submitting a job whose first stage has many tasks takes.

use std::time::Instant;

use serde_json::json;

use super::clients::clients;
use super::jobs::{run_id, submit};
use crate::CliError;

/// Seconds to submit a job of `tasks` first-stage tasks, committed (the job is cancelled after).
pub(super) async fn seconds(url: &str, sync: bool, tasks: i64) -> Result<f64, CliError> {
    let client = clients(url, 1, sync).await?.remove(0);
    let start = Instant::now();
    let job_id = submit(&client, "bench_flat", json!({"n": tasks, "run": run_id()})).await?;
    let elapsed = start.elapsed().as_secs_f64();
    stageflow_client::Api::new(&client).cancel_job(&job_id).await?;
    Ok(elapsed)
}
