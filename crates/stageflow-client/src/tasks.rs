//! A worker's calls: claim, complete, fail, heartbeat, release. Each report passes the claim's
//! worker id and lease token, and is refused with 55000 ([`Error::WrongState`]) once that lease is
//! no longer the task's current one.

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_postgres::{GenericClient, Row};

use crate::{column, Api, Error, Refusal};

const CLAIM: &str = "SELECT task_id, job_id, job_type, stage, stage_name, handler, task_key, params, predecessor, \
                            inputs, attempt, lease_expires_at, timeout_seconds, lease_token, effective_lease_seconds \
                       FROM stageflow.claim_tasks($1, $2, $3, $4)";
const COMPLETE: &str = "SELECT stageflow.complete_task_and_check_stage($1, $2, $3, $4)";
const COMPLETE_UNREPORTED: &str = "SELECT stageflow.complete_task_and_check_stage($1, $2, $3, $4, false)";
const COMPLETE_MANY: &str = "SELECT stageflow.complete_tasks($1, $2, $3)";
const FAIL: &str = "SELECT stageflow.fail_task($1, $2, $3, $4, $5)";
const HEARTBEAT: &str = "SELECT task_id, lease_expires_at FROM stageflow.heartbeat($1, $2, $3, $4)";
const RELEASE: &str = "SELECT stageflow.release_tasks($1, $2, $3)";

/// The statements of a worker's calls, for [`crate::Client::prepare`].
pub const TASK_CALLS: &[&str] = &[CLAIM, COMPLETE, COMPLETE_UNREPORTED, COMPLETE_MANY, FAIL, HEARTBEAT, RELEASE];

/// A claimed task, as `stageflow.claim_tasks` returns it.
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimedTask {
    pub task_id: String,
    pub job_id: String,
    pub job_type: String,
    pub stage: i32,
    pub stage_name: String,
    pub handler: String,
    pub task_key: String,
    /// The job's params overlaid with the task's own.
    pub params: Value,
    /// The predecessor's result, for a `lineage` stage.
    pub predecessor: Option<Value>,
    /// The previous stage's results in task order, for a `fan_in` stage.
    pub inputs: Option<Value>,
    pub attempt: i32,
    pub lease_expires_at: DateTime<Utc>,
    /// The stage's handler timeout, when its definition sets one.
    pub timeout_seconds: Option<i32>,
    /// This claim's lease: pass it with every report of the task.
    pub lease_token: i64,
    /// How long the lease lasts without a heartbeat: the stage's own `lease_seconds`, else the claim's.
    pub effective_lease_seconds: i32,
}

impl ClaimedTask {
    fn from_row(row: &Row) -> Result<Self, Error> {
        Ok(ClaimedTask {
            task_id: column(row, "task_id")?,
            job_id: column(row, "job_id")?,
            job_type: column(row, "job_type")?,
            stage: column(row, "stage")?,
            stage_name: column(row, "stage_name")?,
            handler: column(row, "handler")?,
            task_key: column(row, "task_key")?,
            params: column(row, "params")?,
            predecessor: column(row, "predecessor")?,
            inputs: column(row, "inputs")?,
            attempt: column(row, "attempt")?,
            lease_expires_at: column(row, "lease_expires_at")?,
            timeout_seconds: column(row, "timeout_seconds")?,
            lease_token: column(row, "lease_token")?,
            effective_lease_seconds: column(row, "effective_lease_seconds")?,
        })
    }
}

/// What `complete_task_and_check_stage` reports (one element of `complete_tasks`' answer too).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CompletionReport {
    pub task_id: String,
    pub task_status: String,
    pub stage: i32,
    /// This completion ended its stage.
    pub stage_completed: bool,
    pub next_stage: Option<i32>,
    pub job_id: String,
    pub job_status: String,
    pub current_stage: i32,
    pub total_stages: i32,
}

/// One task of a `complete_tasks` batch.
#[derive(Debug, Clone, Copy)]
pub struct Completion<'a> {
    pub task_id: &'a str,
    pub result: &'a Value,
    pub lease_token: Option<i64>,
}

/// One task's outcome in a `complete_tasks` batch: its report, or why it was not completed (a
/// refusal of its own, which did not stop the others).
#[derive(Debug)]
pub struct BatchCompletion {
    pub task_id: String,
    pub outcome: Result<CompletionReport, Error>,
}

/// One task's outcome in a `complete_tasks` batch called without reports: accepted, or why not.
#[derive(Debug)]
pub struct BatchOutcome {
    pub task_id: String,
    pub outcome: Result<(), Error>,
}

/// What `fail_task` reports.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct FailReport {
    pub task_id: String,
    /// `queued` (retried), `failed` (permanent) or `dead` (attempts ran out).
    pub task_status: String,
    pub attempt: i32,
    pub max_attempts: i32,
    pub category: Option<String>,
    /// When retried: the wait before the next attempt.
    pub retry_in_seconds: Option<f64>,
    /// The error as stored (when it ended the task).
    pub error: Option<Value>,
    pub job_id: String,
    pub job_status: String,
}

/// A task whose lease a heartbeat extended.
#[derive(Debug, Clone, PartialEq)]
pub struct ExtendedLease {
    pub task_id: String,
    pub lease_expires_at: DateTime<Utc>,
}

impl<C: GenericClient + Sync> Api<'_, C> {
    /// Claims up to `max_tasks` tasks of `queue` for `lease_seconds` (SQL defaults: 1, 300) as
    /// `worker_id`.
    pub async fn claim_tasks(
        &self,
        queue: &str,
        max_tasks: i32,
        lease_seconds: i32,
        worker_id: Option<&str>,
    ) -> Result<Vec<ClaimedTask>, Error> {
        self.rows(CLAIM, &[&queue, &max_tasks, &lease_seconds, &worker_id], ClaimedTask::from_row).await
    }

    /// Completes a task with `result`: under the lease `lease_token` held by `worker_id` (without
    /// either, whichever lease it is on: the psql form, for repairs by hand).
    pub async fn complete_task_and_check_stage(
        &self,
        task_id: &str,
        result: Option<&Value>,
        worker_id: Option<&str>,
        lease_token: Option<i64>,
    ) -> Result<CompletionReport, Error> {
        self.document(COMPLETE, &[&task_id, &result, &worker_id, &lease_token]).await
    }

    /// The same completion without its report (`report => false`), for a caller that does not
    /// read it: accepted, or refused as [`Api::complete_task_and_check_stage`] is. Building the
    /// report was 7 % of the server's work for a claim and a completion of one task
    /// (bench/README.md).
    pub async fn complete_task_unreported(
        &self,
        task_id: &str,
        result: Option<&Value>,
        worker_id: Option<&str>,
        lease_token: Option<i64>,
    ) -> Result<(), Error> {
        let _: Value = self.document(COMPLETE_UNREPORTED, &[&task_id, &result, &worker_id, &lease_token]).await?;
        Ok(())
    }

    /// Completes several tasks in one transaction as `worker_id`; one outcome per task, in order.
    pub async fn complete_tasks(
        &self,
        completions: &[Completion<'_>],
        worker_id: Option<&str>,
    ) -> Result<Vec<BatchCompletion>, Error> {
        let reports: Vec<Value> = self.document(COMPLETE_MANY, &[&batch(completions), &worker_id, &true]).await?;
        reports.into_iter().map(batch_completion).collect()
    }

    /// The same completions without the reports of the accepted ones (`reports => false`): each
    /// task accepted, or why not, in order. For a caller that does not read the reports (the
    /// worker runtime): building them was a fifth of the batched benchmark line.
    pub async fn complete_tasks_unreported(
        &self,
        completions: &[Completion<'_>],
        worker_id: Option<&str>,
    ) -> Result<Vec<BatchOutcome>, Error> {
        let entries: Vec<Value> = self.document(COMPLETE_MANY, &[&batch(completions), &worker_id, &false]).await?;
        Ok(entries
            .into_iter()
            .map(|entry| BatchOutcome {
                task_id: entry["task_id"].as_str().unwrap_or_default().to_owned(),
                outcome: refusal(&entry).map_or(Ok(()), Err),
            })
            .collect())
    }

    /// Fails a task with `error` (`{"type", "message", "category", "retry_after_seconds"}`),
    /// retried if `retryable` (the SQL default) and its category allows.
    pub async fn fail_task(
        &self,
        task_id: &str,
        error: &Value,
        retryable: bool,
        worker_id: Option<&str>,
        lease_token: Option<i64>,
    ) -> Result<FailReport, Error> {
        self.document(FAIL, &[&task_id, error, &retryable, &worker_id, &lease_token]).await
    }

    /// Extends the leases of `task_ids` (`lease_tokens` parallel to them) by `lease_seconds`, or a
    /// task's stage's own; the tasks extended (one missing is no longer under that lease).
    pub async fn heartbeat(
        &self,
        task_ids: &[String],
        lease_seconds: i32,
        worker_id: Option<&str>,
        lease_tokens: Option<&[i64]>,
    ) -> Result<Vec<ExtendedLease>, Error> {
        self.rows(HEARTBEAT, &[&task_ids, &lease_seconds, &worker_id, &lease_tokens], |row| {
            Ok(ExtendedLease { task_id: column(row, 0)?, lease_expires_at: column(row, 1)? })
        })
        .await
    }

    /// Gives back `task_ids` for delivery again at once, their attempts not counted; how many
    /// were released (a task whose lease is lost is skipped).
    pub async fn release_tasks(
        &self,
        task_ids: &[String],
        worker_id: Option<&str>,
        lease_tokens: Option<&[i64]>,
    ) -> Result<i32, Error> {
        self.value(RELEASE, &[&task_ids, &worker_id, &lease_tokens]).await
    }
}

/// `complete_tasks`' argument: the completions as `[{"task_id", "result", "lease_token"}, ...]`.
fn batch(completions: &[Completion<'_>]) -> Value {
    completions
        .iter()
        .map(|c| json!({"task_id": c.task_id, "result": c.result, "lease_token": c.lease_token}))
        .collect()
}

/// The refusal an element of `complete_tasks`' answer carries (`{"task_id", "error":
/// {"sqlstate", "message", "hint"}}`), if any.
fn refusal(entry: &Value) -> Option<Error> {
    let error = entry.get("error")?;
    Some(Error::refused(Refusal {
        sqlstate: error["sqlstate"].as_str().unwrap_or_default().to_owned(),
        message: error["message"].as_str().unwrap_or_default().to_owned(),
        hint: error["hint"].as_str().map(str::to_owned),
        detail: None,
    }))
}

/// One element of `complete_tasks`' answer: a completion report, or a refusal.
fn batch_completion(report: Value) -> Result<BatchCompletion, Error> {
    let task_id = report["task_id"].as_str().unwrap_or_default().to_owned();
    let outcome = match refusal(&report) {
        Some(error) => Err(error),
        None => Ok(crate::from_document(report)?),
    };
    Ok(BatchCompletion { task_id, outcome })
}
