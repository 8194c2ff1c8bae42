//! The worker runtime (`stageflow_worker::Worker`, in this process) over a large job: its resident
//! memory, its throughput, `job_status` on the job while it runs and once it has completed, and the
//! first page of its result (`job_result`, 1,000 entries).

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use stageflow_worker::{builtin_handlers, Worker, WorkerConfig};

use super::jobs::{run_id, submit};
use super::percentile;
use crate::{connect, CliError};

/// This process's resident memory in KiB (0 when /proc does not say).
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Runs the worker runtime over a job of `tasks` tasks; returns (RSS at start, RSS at end, tasks/s,
/// job_status p50 ms on the finished job, job_result's first page of 1,000 entries p50 ms).
pub(super) async fn worker_runtime(url: &str, n: usize, tasks: i64) -> Result<Value, CliError> {
    // Raw: job_status is timed here as the statement it is (and polled every 200 ms, to see the
    // job end: too seldom to weigh on the line).
    let client = connect(url).await?.into_raw();
    let job_id = submit(&client, "bench", json!({"n": tasks / 2, "ms": 0, "run": run_id()})).await?;
    let mut config = WorkerConfig::new(url);
    config.queues = vec!["bench".into()];
    config.concurrency = n * 4;
    config.batch_size = 64;
    config.poll_interval = Duration::from_millis(100);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let start_rss = rss_kib();
    let start = Instant::now();
    let worker = tokio::spawn(Worker::new(config, builtin_handlers()).run(async {
        let _ = stop_rx.await;
    }));
    let mut peak = start_rss;
    let mut running_status_ms = Vec::new();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        peak = peak.max(rss_kib());
        let state: String = client.query_one("SELECT stageflow.job_status($1) ->> 'status'", &[&job_id]).await?.get(0);
        if state != "processing" && state != "queued" {
            break;
        }
        // job_status of the running job.
        let t = Instant::now();
        client.query_one("SELECT stageflow.job_status($1)", &[&job_id]).await?;
        running_status_ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let _ = stop_tx.send(());
    let report = worker.await.map_err(|e| CliError::Setup(e.to_string()))?;
    // Before this process reads pages of the finished job's result below.
    let end_rss = rss_kib();
    let mut status_ms = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        client.query_one("SELECT stageflow.job_status($1)", &[&job_id]).await?;
        status_ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    // The first page of its result: 1,000 of the last stage's entries, read through tasks_stage_idx.
    let first_page = client.prepare("SELECT stageflow.job_result($1, NULL, 1000)").await?;
    let mut result_ms = Vec::new();
    let mut entries = 0;
    for _ in 0..20 {
        let t = Instant::now();
        let page: Value = client.query_one(&first_page, &[&job_id]).await?.get(0);
        result_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        entries = page["entries"].as_array().map_or(0, Vec::len);
    }
    Ok(json!({
        "tasks": tasks, "completed_by_worker": report.completed, "tasks_per_second": tasks as f64 / elapsed,
        "rss_start_kib": start_rss, "rss_peak_kib": peak, "rss_end_kib": end_rss,
        "job_status_p50_ms": percentile(&mut status_ms, 0.5),
        "job_result_first_page_entries": entries,
        "job_result_first_page_p50_ms": percentile(&mut result_ms, 0.5),
        "job_status_while_running_p50_ms": percentile(&mut running_status_ms, 0.5),
        "job_status_while_running_max_ms": percentile(&mut running_status_ms, 1.0),
    }))
}
