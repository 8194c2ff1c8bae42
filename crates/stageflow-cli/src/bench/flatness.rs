//! Flatness: the cost of a completion in stages of growing size (it should not grow with them).

use std::sync::Arc;

use serde_json::json;

use super::clients::{clients, in_parallel};
use super::jobs::{run_id, submit};
use crate::{connect, CliError};

/// Microseconds per completion (at n clients) in stages of `size` tasks, over `sample` completions,
/// in the psql form (no worker id, no lease token). The jobs are submitted and the tasks claimed
/// first, then the databases settled (`quiet`, as before every line), so that the autovacuum a
/// large submission sets off and the flushing of its pages do not fall into one stage's timing.
pub(super) async fn completion_cost(
    url: &str,
    n: usize,
    sync: bool,
    size: i64,
    sample: usize,
    quiet: &[&tokio_postgres::Client],
) -> Result<f64, CliError> {
    let setup = connect(url).await?;
    let jobs = ((sample as i64 + size - 1) / size).max(1);
    let mut ids: Vec<String> = Vec::new();
    let mut job_ids = Vec::new();
    for _ in 0..jobs {
        job_ids.push(submit(setup.raw(), "bench_flat", json!({"n": size, "run": run_id()})).await?);
    }
    while ids.len() < sample {
        let want = (sample - ids.len()).min(5000) as i32;
        let claimed: Vec<String> = setup
            .api()
            .claim_tasks("flat", want, 600, Some("bench"))
            .await?
            .into_iter()
            .map(|task| task.task_id)
            .collect();
        if claimed.is_empty() {
            break;
        }
        ids.extend(claimed);
    }
    let count = ids.len();
    super::settle(quiet).await?;
    let queue = Arc::new(std::sync::Mutex::new(ids));
    let (elapsed, _) = in_parallel(clients(url, n, sync).await?, |client| {
        let queue = queue.clone();
        async move {
            let complete = client.prepare("SELECT stageflow.complete_task_and_check_stage($1, '{}')").await?;
            loop {
                // A poisoned lock means another client panicked: its ids are as good as ever.
                let next = queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop();
                match next {
                    Some(id) => {
                        client.query_one(&complete, &[&id]).await?;
                    }
                    None => return Ok(client),
                }
            }
        }
    })
    .await?;
    for job_id in job_ids {
        setup.api().cancel_job(&job_id).await?;
    }
    Ok(elapsed.as_secs_f64() * 1e6 / count as f64)
}
