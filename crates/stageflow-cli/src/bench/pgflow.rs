//! pgflow (`@pgflow/core`), the closest peer, in the same run: its published SQL (the migrations
//! inside the npm package, which `scripts/setup.sh` fetches, checks against a pinned sha512 and
//! unpacks) loaded in order into a database of its own, `pgflow_bench`, of the benchmark's
//! cluster, and its worker's path timed over a flow like the Stageflow line's job: a map step over
//! N items, then a single step that receives the map's outputs (so the stage advance is counted,
//! as in Stageflow's `count` -> `lineage`).
//!
//! What its worker (`@pgflow/edge-worker`'s `StepTaskPoller` and `StepTaskExecutor`, through
//! `PgflowSqlClient`) does per poll, each statement its own transaction:
//! `pgmq.read_with_poll(flow, vt 2, batch, max_poll_seconds 2, poll_interval_ms)`, then
//! `pgflow.start_tasks(flow, msg_ids, worker_id)`, then one `pgflow.complete_task(run_id,
//! step_slug, task_index, output)` per task (pgflow has no batch completion). One at a time is a
//! batch of 1 (three transactions per task); its worker's default batch is 10 (1.2 transactions
//! per task). The poll interval is 10 ms instead of its default 100 ms, so that the hand-off from
//! the map step to the single step does not cost pgflow a whole interval. Its workers register in
//! `pgflow.workers` once when they start (here before the clock starts); their heartbeat, every
//! few seconds, is left out.
//!
//! Stubs, the Supabase-only objects its SQL needs, each the least that lets it load and run:
//! - `pgmq` is created first (pgflow's first migration runs `CREATE EXTENSION IF NOT EXISTS pgmq`,
//!   which then does nothing): the same pgmq 1.11.1 Stageflow uses.
//! - `realtime.send(payload, event, topic, private)`, Supabase Realtime's broadcast, which pgflow
//!   calls on every step and run event: here a function that does nothing. In Supabase it inserts
//!   a row into `realtime.messages`, so the stub makes pgflow cheaper here than there.
//!
//! pgflow's migrations grant nothing to Supabase's roles and use no `pg_cron`: no other stubs.
//!
//! One setting: `jit = off` in `pgflow_bench`. With PostgreSQL's default (`jit = on`), once
//! `step_tasks` held some 15,000 completed rows the planner's estimate of `start_tasks`'s statement
//! passed the JIT thresholds and every call compiled it with LLVM: `perf` of a worker's backend
//! was LLVM and malloc, a `start_tasks` of an unknown message id took 4-5 s, and the line fell to
//! a few tasks a second. Stageflow's database keeps the default.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::{json, Value};

use super::clients::{clients, in_parallel};
use super::wal::{Meter, PerUnit};
use crate::{connect, CliError};

/// The version `scripts/setup.sh` pins (with its sha512) and unpacks.
pub(super) const VERSION: &str = "0.8.1";

const STUBS: &str = "
    CREATE EXTENSION pgmq;
    CREATE SCHEMA realtime;
    CREATE FUNCTION realtime.send(payload jsonb, event text, topic text, private boolean DEFAULT true)
        RETURNS void LANGUAGE sql AS 'SELECT';
";

/// The flow: a map step over the run's input array, then a single step that depends on it.
const FLOW: &str = "
    SELECT pgflow.create_flow('bench');
    SELECT pgflow.add_step('bench', 'items', step_type => 'map');
    SELECT pgflow.add_step('bench', 'total', ARRAY['items']);
";

/// Where `scripts/setup.sh` unpacked `@pgflow/core`: `$STAGEFLOW_PGFLOW_DIR` (default
/// `/var/tmp/stageflow-pgflow`), `core-<version>/package`.
pub(super) fn package_dir() -> PathBuf {
    let base = std::env::var("STAGEFLOW_PGFLOW_DIR").unwrap_or_else(|_| "/var/tmp/stageflow-pgflow".into());
    PathBuf::from(base).join(format!("core-{VERSION}")).join("package")
}

/// The worker id of the benchmark's `i`th client, registered in `pgflow.workers`.
fn worker_id(i: usize) -> String {
    format!("00000000-0000-4000-8000-{i:012}")
}

/// Creates `pgflow_bench` on the cluster (dropping an old one), loads the stubs and pgflow's
/// migrations in order, creates the flow and registers `workers` workers. Returns the database's
/// URL and the migrations loaded, or `None` when setup.sh has not fetched pgflow (`why` printed).
pub(super) async fn install(admin_url: &str, workers: usize) -> Result<Option<(String, Vec<String>)>, CliError> {
    let dir = package_dir().join("dist/supabase/migrations");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        println!("pgflow lines skipped: {} is missing (scripts/setup.sh fetches pgflow {VERSION})", dir.display());
        return Ok(None);
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(CliError::Setup(format!("no pgflow migrations in {}", dir.display())));
    }
    let admin = connect(admin_url).await?;
    admin.raw().batch_execute("DROP DATABASE IF EXISTS pgflow_bench WITH (FORCE)").await?;
    admin.raw().batch_execute("CREATE DATABASE pgflow_bench").await?;
    admin.raw().batch_execute("ALTER DATABASE pgflow_bench SET jit = off").await?;
    let url = admin_url
        .rsplit_once('/')
        .map(|(base, _)| format!("{base}/pgflow_bench"))
        .ok_or_else(|| CliError::Setup(format!("the cluster's URL has no database part: {admin_url}")))?;
    let db = connect(&url).await?.into_raw();
    db.batch_execute(STUBS).await?;
    let mut loaded = Vec::new();
    for file in &files {
        let sql = std::fs::read_to_string(file).map_err(|e| CliError::Setup(format!("{}: {e}", file.display())))?;
        // Each migration in its own transaction, as Supabase's migration runner applies them.
        db.batch_execute(&format!("BEGIN;\n{sql}\n;COMMIT;"))
            .await
            .map_err(|e| CliError::Setup(format!("loading pgflow's {}: {e}", file.display())))?;
        loaded.push(file.file_name().unwrap_or_default().to_string_lossy().into_owned());
    }
    db.batch_execute(FLOW).await?;
    for i in 0..workers {
        db.execute(
            "INSERT INTO pgflow.workers (worker_id, queue_name, function_name) VALUES ($1::text::uuid, 'bench', 'stageflow-bench')",
            &[&worker_id(i)],
        )
        .await?;
    }
    Ok(Some((url, loaded)))
}

/// pgflow's worker path over a run of `items` map tasks and one single task, `batch` messages per
/// read: tasks per second (to the run's completion), and the WAL per task.
pub(super) async fn rate(url: &str, n: usize, sync: bool, batch: i32, items: i32) -> Result<(f64, PerUnit), CliError> {
    let setup = connect(url).await?.into_raw();
    let run_id: String = setup
        .query_one(
            "SELECT run_id::text FROM pgflow.start_flow('bench', (SELECT jsonb_agg(i) FROM generate_series(1, $1::int) AS i))",
            &[&items],
        )
        .await?
        .get(0);
    let wal = Meter::start(url, &[&setup]).await?;
    let finished = Arc::new(AtomicBool::new(false));
    let completed_at = Arc::new(Mutex::new(None::<Instant>));
    let next_worker = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let (_, line) = in_parallel(clients(url, n, sync).await?, |client| {
        let (run_id, finished, completed_at) = (run_id.clone(), finished.clone(), completed_at.clone());
        let worker = worker_id(next_worker.fetch_add(1, Ordering::Relaxed));
        async move {
            let read = client.prepare("SELECT msg_id FROM pgmq.read_with_poll('bench', 2, $1, 2, 10)").await?;
            let start = client
                .prepare(
                    "SELECT run_id::text, step_slug, task_index, input \
                       FROM pgflow.start_tasks('bench', $1::bigint[], $2::text::uuid)",
                )
                .await?;
            let complete =
                client.prepare("SELECT pgflow.complete_task($1::text::uuid, $2::text, $3::int, $4::jsonb)").await?;
            let status = client.prepare("SELECT status FROM pgflow.runs WHERE run_id = $1::text::uuid").await?;
            loop {
                let ids: Vec<i64> = client.query(&read, &[&batch]).await?.iter().map(|r| r.get(0)).collect();
                if ids.is_empty() {
                    if finished.load(Ordering::Relaxed) {
                        return Ok(client);
                    }
                    let state: String = client.query_one(&status, &[&run_id]).await?.get(0);
                    if state != "started" {
                        finished.store(true, Ordering::Relaxed);
                        return Ok(client);
                    }
                    continue;
                }
                for task in client.query(&start, &[&ids, &worker]).await? {
                    let (run, step, index, input): (String, String, i32, Value) =
                        (task.get(0), task.get(1), task.get(2), task.get(3));
                    // The handlers: a map task returns its item, the single step a count.
                    let output =
                        if step == "items" { input } else { json!({"items": input["items"].as_array().map(Vec::len)}) };
                    client.query(&complete, &[&run, &step, &index, &output]).await?;
                    if step == "total" {
                        *completed_at.lock().expect("not poisoned") = Some(Instant::now());
                    }
                }
            }
        }
    })
    .await?;
    drop(line);
    let state: String =
        setup.query_one("SELECT status FROM pgflow.runs WHERE run_id = $1::text::uuid", &[&run_id]).await?.get(0);
    let end = *completed_at.lock().expect("not poisoned");
    let (Some(end), "completed") = (end, state.as_str()) else {
        return Err(CliError::Setup(format!("pgflow's run {run_id} ended {state}, not completed by the benchmark")));
    };
    let tasks = items as f64 + 1.0;
    Ok((tasks / (end - started).as_secs_f64(), wal.per(tasks).await?))
}
