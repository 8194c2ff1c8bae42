//! A submitter's and an operator's calls on jobs: submit, status, result, tasks, list, cancel,
//! retry, advance, dead letters.
//!
//! The table functions come in two forms: typed rows, and `*_json`, the rows as `to_jsonb` makes
//! them (PostgreSQL's own rendering of timestamps and numbers), for a caller that passes them on
//! unchanged (the HTTP API).

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::Value;
use tokio_postgres::{GenericClient, Row};

use crate::{column, Api, Error};

/// What `submit_job_outcome` did with a submission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitOutcome {
    /// A new job.
    Created,
    /// Your job of this work, left as it is.
    Exists,
    /// Your failed or cancelled job of this work runs again from the stage it stopped at.
    Resumed,
    /// Identical work of another login or tenant: same id, not yours to read.
    OwnedByAnother,
}

impl SubmitOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            SubmitOutcome::Created => "created",
            SubmitOutcome::Exists => "exists",
            SubmitOutcome::Resumed => "resumed",
            SubmitOutcome::OwnedByAnother => "owned_by_another",
        }
    }

    fn parse(text: &str) -> Result<Self, Error> {
        Ok(match text {
            "created" => SubmitOutcome::Created,
            "exists" => SubmitOutcome::Exists,
            "resumed" => SubmitOutcome::Resumed,
            "owned_by_another" => SubmitOutcome::OwnedByAnother,
            other => return Err(Error::Decode(format!("unknown submission outcome {other:?}"))),
        })
    }
}

/// A submission: the job's id (taken from the work) and what became of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Submission {
    pub job_id: String,
    pub outcome: SubmitOutcome,
    /// The job's status; `None` for another's job (unless the caller is an admin).
    pub job_status: Option<String>,
}

/// A stage in a job's status.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct StageStatus {
    pub stage: i32,
    pub name: String,
    pub handler: Option<String>,
    pub fan_out: Option<String>,
    /// `pending` until the stage is created.
    pub status: String,
    pub task_count: Option<i64>,
    /// Counts by task status, once the stage exists.
    pub tasks: Option<StageTasks>,
    pub created_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct StageTasks {
    pub queued: i64,
    pub running: i64,
    pub completed: i64,
    pub failed: i64,
    pub cancelled: i64,
}

/// A job's status (`stageflow.job_status`), with the document as the function returned it:
/// params and error are read from it ([`JobStatus::params`], ...), not copied. The result is not in
/// it, only how many entries it has ([`JobStatus::result_count`]): read it with
/// [`Api::job_result`].
#[derive(Debug, Clone, PartialEq)]
pub struct JobStatus {
    pub job_id: String,
    pub job_type: String,
    pub status: String,
    pub current_stage: i32,
    pub total_stages: i32,
    /// 0 to 100.
    pub progress: f64,
    pub stages: Vec<StageStatus>,
    pub created_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    /// The number of entries of the job's result ([`Api::job_result`]); `None` until the job is
    /// completed (with errors or not).
    pub result_count: Option<i64>,
    pub owner: Option<String>,
    pub tenant: Option<String>,
    /// The whole document, unchanged.
    pub document: Value,
}

#[derive(Deserialize)]
struct JobStatusFields {
    job_id: String,
    job_type: String,
    status: String,
    current_stage: i32,
    total_stages: i32,
    progress: f64,
    #[serde(default)]
    stages: Option<Vec<StageStatus>>,
    created_at: Option<DateTime<Utc>>,
    started_at: Option<DateTime<Utc>>,
    updated_at: Option<DateTime<Utc>>,
    completed_at: Option<DateTime<Utc>>,
    #[serde(default)]
    result_count: Option<i64>,
    #[serde(default)]
    owner: Option<String>,
    #[serde(default)]
    tenant: Option<String>,
}

impl JobStatus {
    /// Reads the typed fields of a `job_status` document, keeping the document.
    pub fn from_document(document: Value) -> Result<Self, Error> {
        let f = JobStatusFields::deserialize(&document).map_err(|e| Error::Decode(format!("job status: {e}")))?;
        Ok(JobStatus {
            job_id: f.job_id,
            job_type: f.job_type,
            status: f.status,
            current_stage: f.current_stage,
            total_stages: f.total_stages,
            progress: f.progress,
            stages: f.stages.unwrap_or_default(),
            created_at: f.created_at,
            started_at: f.started_at,
            updated_at: f.updated_at,
            completed_at: f.completed_at,
            result_count: f.result_count,
            owner: f.owner,
            tenant: f.tenant,
            document,
        })
    }

    pub fn params(&self) -> &Value {
        &self.document["params"]
    }

    pub fn error(&self) -> &Value {
        &self.document["error"]
    }

    /// Whether the job has ended: completed (with errors or not), failed or cancelled.
    pub fn is_finished(&self) -> bool {
        matches!(self.status.as_str(), "completed" | "completed_with_errors" | "failed" | "cancelled")
    }
}

/// One entry of a job's result: a task of its last stage, by its ordinal (task order).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ResultEntry {
    pub ordinal: i32,
    pub task_key: String,
    pub task_id: String,
    /// The task's result (`null` only for the task of a `single` or `fan_in` last stage that failed
    /// within its stage's failure threshold).
    pub result: Value,
}

/// A page of a job's result (`stageflow.job_result`): the completed tasks of its last stage in task
/// order, or the one task of a `single` or `fan_in` last stage.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct JobResultPage {
    pub job_id: String,
    /// `completed` or `completed_with_errors`: only those jobs have a result.
    pub status: String,
    /// The last stage's fan-out: `single` and `fan_in` give one entry whose result is the job's.
    pub fan_out: String,
    pub entries: Vec<ResultEntry>,
    /// The `after` of the next page; `None` on the last page.
    pub next_after: Option<i32>,
}

impl JobResultPage {
    /// Whether the result is one task's (a `single` or `fan_in` last stage): then
    /// [`JobResultPage::one_result`] is the job's result.
    pub fn is_one_task(&self) -> bool {
        matches!(self.fan_out.as_str(), "single" | "fan_in")
    }

    /// The result of a one-task result's task (`None` for a result of many entries, or an empty page).
    pub fn one_result(&self) -> Option<&Value> {
        self.entries.first().filter(|_| self.is_one_task()).map(|e| &e.result)
    }
}

/// The most entries one call of `stageflow.job_result` returns (its `limit`).
pub const MAX_RESULT_PAGE: i32 = 10000;

/// A row of `stageflow.job_tasks`.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskRow {
    pub task_id: String,
    pub stage: i32,
    pub stage_name: String,
    pub task_key: String,
    pub status: String,
    pub attempt: i32,
    pub max_attempts: i32,
    pub worker_id: Option<String>,
    pub params: Option<Value>,
    pub predecessor_id: Option<String>,
    pub result: Option<Value>,
    pub error: Option<Value>,
    pub errors: Option<Value>,
    pub created_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub next_attempt_at: Option<DateTime<Utc>>,
}

impl TaskRow {
    fn from_row(row: &Row) -> Result<Self, Error> {
        Ok(TaskRow {
            task_id: column(row, "task_id")?,
            stage: column(row, "stage")?,
            stage_name: column(row, "stage_name")?,
            task_key: column(row, "task_key")?,
            status: column(row, "status")?,
            attempt: column(row, "attempt")?,
            max_attempts: column(row, "max_attempts")?,
            worker_id: column(row, "worker_id")?,
            params: column(row, "params")?,
            predecessor_id: column(row, "predecessor_id")?,
            result: column(row, "result")?,
            error: column(row, "error")?,
            errors: column(row, "errors")?,
            created_at: column(row, "created_at")?,
            started_at: column(row, "started_at")?,
            completed_at: column(row, "completed_at")?,
            lease_expires_at: column(row, "lease_expires_at")?,
            next_attempt_at: column(row, "next_attempt_at")?,
        })
    }
}

/// The filters of `stageflow.list_jobs` (`ListJobs::default()`: the 50 newest jobs).
#[derive(Debug, Clone, Copy)]
pub struct ListJobs<'a> {
    pub status: Option<&'a str>,
    pub job_type: Option<&'a str>,
    pub max_rows: i32,
    /// Jobs created before this instant, as text PostgreSQL reads as a timestamptz (an unreadable
    /// one is refused with 22007).
    pub before: Option<&'a str>,
}

impl Default for ListJobs<'_> {
    fn default() -> Self {
        ListJobs { status: None, job_type: None, max_rows: 50, before: None }
    }
}

/// A row of `stageflow.list_jobs`.
#[derive(Debug, Clone, PartialEq)]
pub struct JobSummary {
    pub job_id: String,
    pub job_type: String,
    pub status: String,
    pub current_stage: i32,
    pub total_stages: i32,
    pub current_stage_name: Option<String>,
    pub progress: f64,
    pub created_at: DateTime<Utc>,
    pub updated_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub owner: String,
    pub tenant: Option<String>,
}

/// A row of `stageflow.dead_letters`.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub task_id: String,
    pub job_id: String,
    pub job_type: String,
    pub stage: i32,
    pub stage_name: String,
    pub handler: String,
    pub task_key: String,
    /// `dead` (attempts ran out) or `failed` (a permanent error).
    pub status: String,
    pub attempt: i32,
    pub max_attempts: i32,
    pub error: Option<Value>,
    pub errors: Option<Value>,
    pub failed_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CancelReport {
    pub job_id: String,
    /// This call cancelled it (false: it had already ended).
    pub cancelled: bool,
    pub job_status: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RetryReport {
    pub job_id: String,
    pub retried_tasks: i64,
    pub job_status: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct AdvanceReport {
    pub job_id: String,
    pub advanced: bool,
    pub job_status: String,
    pub current_stage: i32,
    pub total_stages: i32,
}

const SUBMIT: &str = "SELECT stageflow.submit_job($1, $2, $3)";
const SUBMIT_OUTCOME: &str = "SELECT job_id, outcome, job_status FROM stageflow.submit_job_outcome($1, $2, $3)";
const JOB_STATUS: &str = "SELECT stageflow.job_status($1)";
const JOB_RESULT: &str = "SELECT stageflow.job_result($1, $2, $3)";
const JOB_TASKS: &str = "SELECT * FROM stageflow.job_tasks($1)";
const JOB_TASKS_JSON: &str =
    "SELECT coalesce(jsonb_agg(to_jsonb(t)), '[]') FROM stageflow.job_tasks($1, $2, $3::int) AS t";
const LIST_JOBS: &str = "SELECT job_id, job_type, status, current_stage, total_stages, current_stage_name, \
                                progress::float8 AS progress, created_at, updated_at, completed_at, owner::text AS owner, tenant \
                           FROM stageflow.list_jobs($1, $2, $3, $4::text::timestamptz)";
const LIST_JOBS_JSON: &str = "SELECT coalesce(jsonb_agg(to_jsonb(j)), '[]') \
                                FROM stageflow.list_jobs($1, $2, $3, $4::text::timestamptz) AS j";
const CANCEL: &str = "SELECT stageflow.cancel_job($1)";
const RETRY: &str = "SELECT stageflow.retry_job($1)";
const ADVANCE: &str = "SELECT stageflow.advance_stage($1)";
const DEAD_LETTERS: &str = "SELECT * FROM stageflow.dead_letters($1)";
const DEAD_LETTERS_JSON: &str = "SELECT coalesce(jsonb_agg(to_jsonb(d)), '[]') FROM stageflow.dead_letters($1) AS d";

impl<C: GenericClient + Sync> Api<'_, C> {
    /// Submits a job of `job_type` with `params` (the SQL default: `{}`); its id. Identical work
    /// of another login or tenant is refused ([`Error::Taken`]).
    pub async fn submit_job(&self, job_type: &str, params: &Value, webhook_url: Option<&str>) -> Result<String, Error> {
        self.value(SUBMIT, &[&job_type, params, &webhook_url]).await
    }

    /// Submits a job; says whether it is new, yours already, resumed, or another's.
    pub async fn submit_job_outcome(
        &self,
        job_type: &str,
        params: &Value,
        webhook_url: Option<&str>,
    ) -> Result<Submission, Error> {
        let row = self.query_one(SUBMIT_OUTCOME, &[&job_type, params, &webhook_url]).await?;
        Ok(Submission {
            job_id: column(&row, "job_id")?,
            outcome: SubmitOutcome::parse(&column::<String>(&row, "outcome")?)?,
            job_status: column(&row, "job_status")?,
        })
    }

    /// A job's status: for its owner and admins (anyone else: [`Error::UnknownObject`]).
    pub async fn job_status(&self, job_id: &str) -> Result<JobStatus, Error> {
        JobStatus::from_document(self.value(JOB_STATUS, &[&job_id]).await?)
    }

    /// A page of a completed job's result: at most `limit` (1 to [`MAX_RESULT_PAGE`]) entries after
    /// the task ordinal `after` (`None`: from the first); pass the page's `next_after` for the next.
    /// For those who see the job (anyone else: [`Error::UnknownObject`]); a job that is not
    /// completed has no result ([`Error::WrongState`]); a bad limit is [`Error::InvalidValue`].
    pub async fn job_result(&self, job_id: &str, after: Option<i32>, limit: i32) -> Result<JobResultPage, Error> {
        self.document(JOB_RESULT, &[&job_id, &after, &limit]).await
    }

    /// [`Api::job_result`]'s page as the function returned it.
    pub async fn job_result_json(&self, job_id: &str, after: Option<i32>, limit: i32) -> Result<Value, Error> {
        self.value(JOB_RESULT, &[&job_id, &after, &limit]).await
    }

    /// A completed job's whole result: every page of [`Api::job_result`] (of the largest size) in
    /// one, whose `next_after` is `None`. A large result is large: prefer the pages.
    pub async fn job_result_all(&self, job_id: &str) -> Result<JobResultPage, Error> {
        let mut all = self.job_result(job_id, None, MAX_RESULT_PAGE).await?;
        while let Some(after) = all.next_after {
            let page = self.job_result(job_id, Some(after), MAX_RESULT_PAGE).await?;
            all.entries.extend(page.entries);
            all.next_after = page.next_after;
        }
        Ok(all)
    }

    /// A job's tasks.
    pub async fn job_tasks(&self, job_id: &str) -> Result<Vec<TaskRow>, Error> {
        self.rows(JOB_TASKS, &[&job_id], TaskRow::from_row).await
    }

    /// A job's tasks as a JSON array of `to_jsonb` rows.
    pub async fn job_tasks_json(&self, job_id: &str) -> Result<Value, Error> {
        self.job_tasks_page_json(job_id, None, None).await
    }

    /// A page of a job's tasks as a JSON array of `to_jsonb` rows: those after the task
    /// `after_task` (the last task_id of the previous page), at most `max_rows` (1 to 10,000).
    pub async fn job_tasks_page_json(
        &self,
        job_id: &str,
        after_task: Option<&str>,
        max_rows: Option<i32>,
    ) -> Result<Value, Error> {
        self.value(JOB_TASKS_JSON, &[&job_id, &after_task, &max_rows]).await
    }

    /// Jobs, newest first: the session's own (of its tenant, if it names one); every job for an admin.
    pub async fn list_jobs(&self, filter: ListJobs<'_>) -> Result<Vec<JobSummary>, Error> {
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
            [&filter.status, &filter.job_type, &filter.max_rows, &filter.before];
        self.rows(LIST_JOBS, &params, |row| {
            Ok(JobSummary {
                job_id: column(row, "job_id")?,
                job_type: column(row, "job_type")?,
                status: column(row, "status")?,
                current_stage: column(row, "current_stage")?,
                total_stages: column(row, "total_stages")?,
                current_stage_name: column(row, "current_stage_name")?,
                progress: column(row, "progress")?,
                created_at: column(row, "created_at")?,
                updated_at: column(row, "updated_at")?,
                completed_at: column(row, "completed_at")?,
                owner: column(row, "owner")?,
                tenant: column(row, "tenant")?,
            })
        })
        .await
    }

    /// [`Api::list_jobs`] as a JSON array of `to_jsonb` rows.
    pub async fn list_jobs_json(&self, filter: ListJobs<'_>) -> Result<Value, Error> {
        self.value(LIST_JOBS_JSON, &[&filter.status, &filter.job_type, &filter.max_rows, &filter.before]).await
    }

    /// Cancels a job: its queued tasks removed, its running ones' reports refused.
    pub async fn cancel_job(&self, job_id: &str) -> Result<CancelReport, Error> {
        self.document(CANCEL, &[&job_id]).await
    }

    /// [`Api::cancel_job`]'s report as the function returned it.
    pub async fn cancel_job_json(&self, job_id: &str) -> Result<Value, Error> {
        self.value(CANCEL, &[&job_id]).await
    }

    /// Runs a failed or cancelled job again from the stage it stopped at (admin).
    pub async fn retry_job(&self, job_id: &str) -> Result<RetryReport, Error> {
        self.document(RETRY, &[&job_id]).await
    }

    /// [`Api::retry_job`]'s report as the function returned it.
    pub async fn retry_job_json(&self, job_id: &str) -> Result<Value, Error> {
        self.value(RETRY, &[&job_id]).await
    }

    /// Advances a job whose current stage has ended (idempotent: a repair by hand).
    pub async fn advance_stage(&self, job_id: &str) -> Result<AdvanceReport, Error> {
        self.document(ADVANCE, &[&job_id]).await
    }

    /// Tasks that ended without a result, newest first (admin; the SQL default: 100 rows).
    pub async fn dead_letters(&self, max_rows: i32) -> Result<Vec<DeadLetter>, Error> {
        self.rows(DEAD_LETTERS, &[&max_rows], |row| {
            Ok(DeadLetter {
                task_id: column(row, "task_id")?,
                job_id: column(row, "job_id")?,
                job_type: column(row, "job_type")?,
                stage: column(row, "stage")?,
                stage_name: column(row, "stage_name")?,
                handler: column(row, "handler")?,
                task_key: column(row, "task_key")?,
                status: column(row, "status")?,
                attempt: column(row, "attempt")?,
                max_attempts: column(row, "max_attempts")?,
                error: column(row, "error")?,
                errors: column(row, "errors")?,
                failed_at: column(row, "failed_at")?,
            })
        })
        .await
    }

    /// [`Api::dead_letters`] as a JSON array of `to_jsonb` rows.
    pub async fn dead_letters_json(&self, max_rows: i32) -> Result<Value, Error> {
        self.value(DEAD_LETTERS_JSON, &[&max_rows]).await
    }
}
