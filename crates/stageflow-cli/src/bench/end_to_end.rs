//! Stageflow end to end (`count` N no-op tasks, then `lineage`): claim + complete one at a time, or
//! claim a batch + `complete_tasks`, each completion fenced by its lease as a worker's is, and
//! without the report the worker runtime does not read (`complete_task_and_check_stage(...,
//! report => false)` for one task, `complete_tasks(..., reports => false)` for a batch: what the
//! worker runtime calls).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::clients::{clients, in_parallel, notifications};
use super::jobs::{run_id, submit};
use super::wal::{Meter, PerUnit};
use crate::{connect, CliError};

/// End to end: workers claim and complete until the job is done; returns tasks per second. Each
/// completion passes the worker id and the claim's lease token, as the worker runtime does; a
/// client whose claim finds nothing waits, as the worker runtime does, for a notification on
/// `stageflow_tasks` (the next stage's tasks made) or at most 10 ms (pgflow's worker polls every
/// 10 ms in its line), then checks the job's status in its row. Also the WAL per task.
pub(super) async fn rate(url: &str, n: usize, sync: bool, batch: i32, tasks: i64) -> Result<(f64, PerUnit), CliError> {
    let setup = connect(url).await?;
    let job_id = submit(setup.raw(), "bench", json!({"n": tasks, "run": run_id()})).await?;
    let finished = Arc::new(AtomicBool::new(false));
    let (_listener, woken) = notifications(url).await?;
    let wal = Meter::start(url, &[setup.raw()]).await?;
    let (elapsed, line) = in_parallel(clients(url, n, sync).await?, |client| {
        let (job_id, finished, mut woken) = (job_id.clone(), finished.clone(), woken.clone());
        async move {
            let claim = client.prepare("SELECT task_id, lease_token FROM stageflow.claim_tasks('bench', $1, 60, 'bench')").await?;
            let complete = client.prepare("SELECT stageflow.complete_task_and_check_stage($1, '{}', 'bench', $2, false)").await?;
            let complete_many = client
                .prepare(
                    "SELECT stageflow.complete_tasks((SELECT jsonb_agg(jsonb_build_object('task_id', id, 'lease_token', token)) \
                                                        FROM unnest($1::text[], $2::bigint[]) AS t(id, token)), 'bench', false)",
                )
                .await?;
            let status = client.prepare("SELECT j.status FROM stageflow.jobs AS j WHERE j.job_id = $1").await?;
            loop {
                woken.borrow_and_update();
                let (ids, tokens): (Vec<String>, Vec<i64>) =
                    client.query(&claim, &[&batch]).await?.iter().map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1))).unzip();
                if ids.is_empty() {
                    if finished.load(Ordering::Relaxed) {
                        return Ok(client);
                    }
                    let state: String = client.query_one(&status, &[&job_id]).await?.get(0);
                    if state != "processing" && state != "queued" {
                        finished.store(true, Ordering::Relaxed);
                        return Ok(client);
                    }
                    if tokio::time::timeout(Duration::from_millis(10), woken.changed()).await.is_ok_and(|r| r.is_err()) {
                        // (the listening connection ended: every 10 ms)
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    continue;
                }
                if batch == 1 {
                    client.query_one(&complete, &[&ids[0], &tokens[0]]).await?;
                } else {
                    client.query_one(&complete_many, &[&ids, &tokens]).await?;
                }
            }
        }
    })
    .await?;
    drop(line);
    let done = 2.0 * tasks as f64;
    Ok((done / elapsed.as_secs_f64(), wal.per(done).await?))
}
