//! The worker's only way into the database: the extension's task functions through
//! [`stageflow_client`], prepared once per connection. No other SQL is issued, but for the
//! transactions of transactional handlers ([`TaskApi::transaction`], [`complete_in`]) and what
//! those handlers write in them.

use std::sync::Arc;

use futures_util::StreamExt;
use serde_json::Value;
use stageflow_client::{BatchOutcome, Completion, CompletionReport, Error, FailReport, TASK_CALLS};
use tokio::sync::Notify;
use tokio_postgres::{AsyncMessage, Client};

use crate::handlers::Task;

/// The channel `stageflow` notifies when tasks become claimable; the payload is the queue name.
pub const CHANNEL: &str = "stageflow_tasks";

/// A database connection with the task functions prepared.
pub struct TaskApi {
    client: stageflow_client::Client,
}

impl TaskApi {
    /// Connects and prepares the task calls (a database without the extension fails here).
    pub async fn connect(url: &str) -> Result<Self, Error> {
        let client = stageflow_client::connect(url).await?;
        client.prepare(TASK_CALLS).await?;
        Ok(TaskApi { client })
    }

    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// Starts a transaction on this connection, for a transactional handler and its completion
    /// ([`complete_in`]); rolled back if dropped uncommitted.
    pub async fn transaction(&mut self) -> Result<stageflow_client::Transaction<'_>, Error> {
        self.client.transaction().await
    }

    pub async fn claim(
        &self,
        queue: &str,
        max_tasks: i32,
        lease_seconds: i32,
        worker_id: &str,
    ) -> Result<Vec<Task>, Error> {
        let claimed = self.client.api().claim_tasks(queue, max_tasks, lease_seconds, Some(worker_id)).await?;
        Ok(claimed.into_iter().map(Task::from).collect())
    }

    /// Completes a task under the lease `lease_token` held by `worker_id`; refused with SQLSTATE
    /// 55000 ([`Error::WrongState`]) once that lease is no longer the task's current one.
    pub async fn complete(
        &self,
        task_id: &str,
        result: &Value,
        worker_id: &str,
        lease_token: i64,
    ) -> Result<CompletionReport, Error> {
        self.client.api().complete_task_and_check_stage(task_id, Some(result), Some(worker_id), Some(lease_token)).await
    }

    /// Completes several tasks, each `(task_id, lease_token, result)` under its lease held by
    /// `worker_id`, in one transaction; one outcome per task, in order (a task that could not be
    /// completed has its own error, [`Error::WrongState`] for a lost lease). Without the reports of
    /// the accepted ones: the worker does not read them.
    /// One task alone goes through `complete_task_and_check_stage` without its report: a claim
    /// and `complete_tasks` of one cost the server 2.52 million instructions, a claim and this
    /// 2.08 million (bench/README.md). Its refusal of the task (unknown, not under that lease, a
    /// malformed plan: what `complete_tasks` answers in the task's element) is the task's outcome;
    /// any other error is the call's, as it is for a batch.
    pub async fn complete_many(
        &self,
        results: &[(String, i64, Value)],
        worker_id: &str,
    ) -> Result<Vec<BatchOutcome>, Error> {
        if let [(task_id, lease_token, result)] = results {
            let outcome = match self
                .client
                .api()
                .complete_task_unreported(task_id, Some(result), Some(worker_id), Some(*lease_token))
                .await
            {
                Ok(()) => Ok(()),
                Err(refused @ (Error::UnknownObject(_) | Error::WrongState(_) | Error::InvalidValue(_))) => {
                    Err(refused)
                }
                Err(error) => return Err(error),
            };
            return Ok(vec![BatchOutcome { task_id: task_id.clone(), outcome }]);
        }
        let completions: Vec<Completion<'_>> = results
            .iter()
            .map(|(task_id, lease_token, result)| Completion { task_id, result, lease_token: Some(*lease_token) })
            .collect();
        self.client.api().complete_tasks_unreported(&completions, Some(worker_id)).await
    }

    /// Fails a task under the lease `lease_token` held by `worker_id` (55000 once the lease is lost).
    pub async fn fail(
        &self,
        task_id: &str,
        error: &Value,
        retryable: bool,
        worker_id: &str,
        lease_token: i64,
    ) -> Result<FailReport, Error> {
        self.client.api().fail_task(task_id, error, retryable, Some(worker_id), Some(lease_token)).await
    }

    /// Extends the leases of `task_ids` (`lease_tokens` parallel to them) by `lease_seconds`, or by
    /// a task's own stage lease; returns the tasks extended. A task missing from the answer is no
    /// longer under that lease.
    pub async fn heartbeat(
        &self,
        task_ids: &[String],
        lease_tokens: &[i64],
        lease_seconds: i32,
        worker_id: &str,
    ) -> Result<Vec<String>, Error> {
        let extended =
            self.client.api().heartbeat(task_ids, lease_seconds, Some(worker_id), Some(lease_tokens)).await?;
        Ok(extended.into_iter().map(|lease| lease.task_id).collect())
    }

    /// Gives back `task_ids` (`lease_tokens` parallel to them) for delivery again at once; returns
    /// how many were released (a task whose lease is lost is skipped).
    pub async fn release(&self, task_ids: &[String], lease_tokens: &[i64], worker_id: &str) -> Result<i32, Error> {
        self.client.api().release_tasks(task_ids, Some(worker_id), Some(lease_tokens)).await
    }
}

/// Completes a task in `transaction` (which the caller then commits) under the lease `lease_token`
/// held by `worker_id`: refused with SQLSTATE 55000 ([`Error::WrongState`]) once that lease is no
/// longer the task's current one. Accepted, it holds the task's row lock until the transaction
/// ends, so no claim takes the task before the commit.
pub async fn complete_in(
    transaction: &stageflow_client::Transaction<'_>,
    task_id: &str,
    result: &Value,
    worker_id: &str,
    lease_token: i64,
) -> Result<CompletionReport, Error> {
    transaction.api().complete_task_and_check_stage(task_id, Some(result), Some(worker_id), Some(lease_token)).await
}

/// Listens on [`CHANNEL`] and wakes `wake` on every notification. Returns the client, which must
/// be kept: dropping it ends the listening connection. `ended` is notified when the connection ends.
pub async fn listen(url: &str, wake: Arc<Notify>, ended: Arc<Notify>) -> Result<Client, Error> {
    let settings = stageflow_client::tls::ConnectConfig::from_url(url)?;
    let (client, mut connection) = settings.config.connect(settings.tls).await?;
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(_)) => wake.notify_one(),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        ended.notify_one();
    });
    client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
    Ok(client)
}
