//! Latency with an idle worker woken by NOTIFY: a stage's last completion committed -> the next
//! stage's task claimed, and submit -> the first task claimed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use stageflow_worker::tasks::{listen, TaskApi};
use tokio::sync::Notify;

use super::clients::clients;
use super::jobs::{run_id, submit};
use crate::CliError;

/// Claims one task of the `hop` queue, sleeping until a notification while the queue is empty;
/// returns it with the instant it was claimed.
async fn claim_when_woken(worker: &TaskApi, wake: &Notify) -> Result<(String, Instant), stageflow_client::Error> {
    loop {
        let tasks = worker.claim("hop", 1, 60, "bench-idle").await?;
        if let Some(task) = tasks.into_iter().next() {
            return Ok((task.task_id, Instant::now()));
        }
        // The poll fallback (5 s) is far beyond any latency measured here.
        let _ = tokio::time::timeout(Duration::from_secs(5), wake.notified()).await;
    }
}

/// (stage advance, submit -> first claim) latencies in milliseconds, with an idle worker woken by NOTIFY;
/// the driver completes in the psql form.
pub(super) async fn latencies(url: &str, sync: bool, rounds: usize) -> Result<(Vec<f64>, Vec<f64>), CliError> {
    let driver = clients(url, 1, sync).await?.remove(0);
    let wake = Arc::new(Notify::new());
    let ended = Arc::new(Notify::new());
    let _listener = listen(url, wake.clone(), ended).await?;
    let worker = TaskApi::connect(url).await?;
    let mut advance = Vec::new();
    let mut first_claim = Vec::new();
    for _ in 0..rounds {
        let pending = claim_when_woken(&worker, &wake);
        tokio::pin!(pending);
        // Let the idle worker find the queue empty and wait before the work arrives.
        tokio::select! {
            _ = &mut pending => return Err(CliError::Setup("the hop queue was not empty".into())),
            _ = tokio::time::sleep(Duration::from_millis(5)) => {}
        }
        let job_id = submit(&driver, "bench_hop", json!({"run": run_id()})).await?;
        let submitted = Instant::now();
        let (task_id, claimed) = pending.await?;
        first_claim.push((claimed - submitted).as_secs_f64() * 1000.0);

        let pending = claim_when_woken(&worker, &wake);
        tokio::pin!(pending);
        tokio::select! {
            _ = &mut pending => return Err(CliError::Setup("stage b appeared before stage a completed".into())),
            _ = tokio::time::sleep(Duration::from_millis(5)) => {}
        }
        // Raw, as the timed completions elsewhere: the latency is counted from its commit.
        driver.query_one("SELECT stageflow.complete_task_and_check_stage($1, '{}')", &[&task_id]).await?;
        let committed = Instant::now();
        let (task_id, claimed) = pending.await?;
        advance.push((claimed - committed).as_secs_f64() * 1000.0);
        driver.query_one("SELECT stageflow.complete_task_and_check_stage($1, '{}')", &[&task_id]).await?;
        let state: String = driver.query_one("SELECT stageflow.job_status($1) ->> 'status'", &[&job_id]).await?.get(0);
        if state != "completed" {
            return Err(CliError::Setup(format!("latency job ended {state}")));
        }
    }
    Ok((advance, first_claim))
}
