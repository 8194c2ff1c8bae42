//! The worker's only way into the database: the extension's task functions, prepared once per
//! connection. No other SQL is issued.

use std::sync::Arc;

use futures_util::StreamExt;
use serde_json::Value;
use tokio::sync::Notify;
use tokio_postgres::{AsyncMessage, Client, NoTls, Statement};

use crate::handlers::Task;

/// The channel `stageflow` notifies when tasks become claimable; the payload is the queue name.
pub const CHANNEL: &str = "stageflow_tasks";

/// A database connection with the task functions prepared.
pub struct TaskApi {
    client: Client,
    claim: Statement,
    complete: Statement,
    complete_many: Statement,
    fail: Statement,
    heartbeat: Statement,
    release: Statement,
}

impl TaskApi {
    pub async fn connect(url: &str) -> Result<Self, tokio_postgres::Error> {
        let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "database connection ended");
            }
        });
        Ok(TaskApi {
            claim: client
                .prepare(
                    "SELECT task_id, job_id, job_type, stage, stage_name, handler, task_key, params, \
                            predecessor, inputs, attempt, timeout_seconds, lease_token, effective_lease_seconds \
                       FROM stageflow.claim_tasks($1, $2, $3, $4)",
                )
                .await?,
            complete: client.prepare("SELECT stageflow.complete_task_and_check_stage($1, $2, $3, $4)").await?,
            complete_many: client.prepare("SELECT stageflow.complete_tasks($1, $2)").await?,
            fail: client.prepare("SELECT stageflow.fail_task($1, $2, $3, $4, $5)").await?,
            heartbeat: client.prepare("SELECT task_id FROM stageflow.heartbeat($1, $2, $3, $4)").await?,
            release: client.prepare("SELECT stageflow.release_tasks($1, $2, $3)").await?,
            client,
        })
    }

    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    pub async fn claim(
        &self,
        queue: &str,
        max_tasks: i32,
        lease_seconds: i32,
        worker_id: &str,
    ) -> Result<Vec<Task>, tokio_postgres::Error> {
        let rows = self.client.query(&self.claim, &[&queue, &max_tasks, &lease_seconds, &worker_id]).await?;
        Ok(rows
            .iter()
            .map(|row| Task {
                task_id: row.get(0),
                job_id: row.get(1),
                job_type: row.get(2),
                stage: row.get(3),
                stage_name: row.get(4),
                handler: row.get(5),
                task_key: row.get(6),
                params: row.get(7),
                predecessor: row.get(8),
                inputs: row.get(9),
                attempt: row.get(10),
                timeout_seconds: row.get(11),
                lease_token: row.get(12),
                lease_seconds: row.get(13),
            })
            .collect())
    }

    /// Completes a task under the lease `lease_token` held by `worker_id`; refused with SQLSTATE
    /// 55000 once that lease is no longer the task's current one.
    pub async fn complete(
        &self,
        task_id: &str,
        result: &Value,
        worker_id: &str,
        lease_token: i64,
    ) -> Result<Value, tokio_postgres::Error> {
        Ok(self.client.query_one(&self.complete, &[&task_id, result, &worker_id, &lease_token]).await?.get(0))
    }

    /// Completes several tasks, each `(task_id, lease_token, result)` under its lease held by
    /// `worker_id`, in one transaction; one report per task, in order (a task that could not be
    /// completed has `{"task_id", "error": {"sqlstate", "message"}}`, sqlstate 55000 for a lost lease).
    pub async fn complete_many(
        &self,
        results: &[(String, i64, Value)],
        worker_id: &str,
    ) -> Result<Vec<Value>, tokio_postgres::Error> {
        let items = Value::Array(
            results
                .iter()
                .map(|(task_id, lease_token, result)| serde_json::json!({"task_id": task_id, "result": result, "lease_token": lease_token}))
                .collect(),
        );
        let reports: Value = self.client.query_one(&self.complete_many, &[&items, &worker_id]).await?.get(0);
        Ok(match reports {
            Value::Array(reports) => reports,
            other => vec![other],
        })
    }

    /// Fails a task under the lease `lease_token` held by `worker_id` (55000 once the lease is lost).
    pub async fn fail(
        &self,
        task_id: &str,
        error: &Value,
        retryable: bool,
        worker_id: &str,
        lease_token: i64,
    ) -> Result<Value, tokio_postgres::Error> {
        Ok(self.client.query_one(&self.fail, &[&task_id, error, &retryable, &worker_id, &lease_token]).await?.get(0))
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
    ) -> Result<Vec<String>, tokio_postgres::Error> {
        let rows = self.client.query(&self.heartbeat, &[&task_ids, &lease_seconds, &worker_id, &lease_tokens]).await?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }

    /// Gives back `task_ids` (`lease_tokens` parallel to them) for delivery again at once; returns
    /// how many were released (a task whose lease is lost is skipped).
    pub async fn release(
        &self,
        task_ids: &[String],
        lease_tokens: &[i64],
        worker_id: &str,
    ) -> Result<i32, tokio_postgres::Error> {
        Ok(self.client.query_one(&self.release, &[&task_ids, &worker_id, &lease_tokens]).await?.get(0))
    }
}

/// Whether an error means the connection is gone (retry on a new one) rather than a refusal by
/// the database (which retrying will not change).
/// Whether the database refused a call only because of another transaction (a deadlock it broke,
/// a serialization failure, a lock it would not wait for): the same call is worth making again.
pub fn is_conflict(error: &tokio_postgres::Error) -> bool {
    error.as_db_error().is_some_and(|db| matches!(db.code().code(), "40001" | "40P01" | "55P03"))
}

pub fn is_connection_error(error: &tokio_postgres::Error) -> bool {
    match error.as_db_error() {
        None => true,
        Some(db) => {
            let code = db.code().code();
            code.starts_with("08") || code.starts_with("57P")
        }
    }
}

/// Listens on [`CHANNEL`] and wakes `wake` on every notification. Returns the client, which must
/// be kept: dropping it ends the listening connection. `ended` is notified when the connection ends.
pub async fn listen(url: &str, wake: Arc<Notify>, ended: Arc<Notify>) -> Result<Client, tokio_postgres::Error> {
    let (client, mut connection) = tokio_postgres::connect(url, NoTls).await?;
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
