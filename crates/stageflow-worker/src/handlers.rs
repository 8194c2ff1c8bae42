//! Handlers: async functions from a claimed [`Task`] to a JSON result or a [`TaskError`],
//! registered once in one map keyed by the handler name that job type definitions use.
//!
//! A **transactional** handler ([`Handlers::register_transactional`]) also gets a database
//! transaction, the one its completion will commit: the worker opens it (on a connection of its
//! own) before the handler runs, calls `stageflow.complete_task_and_check_stage` with the handler's
//! result and the claim's lease token in it, and commits. The handler's writes through it therefore
//! commit exactly once, with the one completion the database accepts: if the handler fails, or the
//! completion is refused because the lease went to another claim (SQLSTATE 55000), or the worker
//! dies first, the transaction rolls back and the writes with it (`docs/guarantees.md`, "Database
//! work: exactly-once effects").
//!
//! ```ignore
//! async fn record(task: Task, transaction: &Transaction<'_>) -> Result<Value, TaskError> {
//!     transaction
//!         .execute("INSERT INTO deliveries (task_id) VALUES ($1)", &[&task.task_id])
//!         .await
//!         .map_err(|e| TaskError::retryable("database", e.to_string()))?;
//!     Ok(json!({"recorded": task.task_key}))
//! }
//! let handlers = Handlers::new().register_transactional("deliveries.record", record);
//! ```
//!
//! The transaction is open while the handler runs: keep such handlers short (PostgreSQL's
//! `idle_in_transaction_session_timeout`, if the worker's login has one, must be longer), do not
//! commit or roll it back yourself, and write only what the worker's login may write (it has no
//! rights on `stageflow`'s own tables).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde_json::{json, Value};
pub use tokio_postgres::Transaction;

/// A claimed task, as `stageflow.claim_tasks` returns it.
#[derive(Debug, Clone)]
pub struct Task {
    pub task_id: String,
    pub job_id: String,
    pub job_type: String,
    pub stage: i32,
    pub stage_name: String,
    pub handler: String,
    pub task_key: String,
    /// The job's params overlaid with the task's own (`index`, `item`, a planner entry's params).
    pub params: Value,
    /// The predecessor's result, for a `lineage` stage.
    pub predecessor: Option<Value>,
    /// The previous stage's results in task order, for a `fan_in` stage.
    pub inputs: Option<Value>,
    pub attempt: i32,
    /// The stage's handler timeout, when its definition sets one.
    pub timeout_seconds: Option<i32>,
    /// This claim's lease: every report of the task passes it, and the database refuses a report
    /// (SQLSTATE 55000) once the lease has gone to another claim.
    pub lease_token: i64,
    /// How long the lease lasts without a heartbeat (the claim's `effective_lease_seconds`): the
    /// stage's own `lease_seconds`, else the worker's.
    pub lease_seconds: i32,
}

impl From<stageflow_client::ClaimedTask> for Task {
    fn from(claimed: stageflow_client::ClaimedTask) -> Self {
        Task {
            task_id: claimed.task_id,
            job_id: claimed.job_id,
            job_type: claimed.job_type,
            stage: claimed.stage,
            stage_name: claimed.stage_name,
            handler: claimed.handler,
            task_key: claimed.task_key,
            params: claimed.params,
            predecessor: claimed.predecessor,
            inputs: claimed.inputs,
            attempt: claimed.attempt,
            timeout_seconds: claimed.timeout_seconds,
            lease_token: claimed.lease_token,
            lease_seconds: claimed.effective_lease_seconds,
        }
    }
}

impl Task {
    /// A task that no claim produced, for calling a handler directly (a test, a one-off run):
    /// first attempt of task `0` of stage 1 of a job of all zeros, with these params, and no lease
    /// (token 0: claims number leases from 1).
    pub fn standalone(handler: &str, params: Value) -> Task {
        Task {
            task_id: "0000000000000000-s1-0".into(),
            job_id: "0".repeat(64),
            job_type: "standalone".into(),
            stage: 1,
            stage_name: "standalone".into(),
            handler: handler.into(),
            task_key: "0".into(),
            params,
            predecessor: None,
            inputs: None,
            attempt: 1,
            timeout_seconds: None,
            lease_token: 0,
            lease_seconds: 0,
        }
    }
}

/// Why a handler failed: reported with `stageflow.fail_task` as
/// `{"type", "message", "category", "retry_after_seconds"?}`.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskError {
    pub kind: String,
    pub message: String,
    /// Retried after a backoff, or after `retry_after_seconds`, or never.
    pub category: Category,
    pub retry_after_seconds: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Category {
    Transient,
    Throttling,
    Permanent,
}

impl Category {
    pub fn as_str(self) -> &'static str {
        match self {
            Category::Transient => "transient",
            Category::Throttling => "throttling",
            Category::Permanent => "permanent",
        }
    }
}

impl TaskError {
    fn new(kind: impl Into<String>, message: impl Into<String>, category: Category) -> Self {
        TaskError { kind: kind.into(), message: message.into(), category, retry_after_seconds: None }
    }

    /// A failure worth another attempt after a backoff (a timeout, an unreachable service).
    pub fn retryable(kind: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(kind, message, Category::Transient)
    }

    /// A service asked us to slow down: retry no sooner than `retry_after_seconds`.
    pub fn throttled(kind: impl Into<String>, message: impl Into<String>, retry_after_seconds: f64) -> Self {
        TaskError { retry_after_seconds: Some(retry_after_seconds), ..Self::new(kind, message, Category::Throttling) }
    }

    /// A failure no retry will fix (bad input, a corrupt file).
    pub fn permanent(kind: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(kind, message, Category::Permanent)
    }

    pub fn retryable_flag(&self) -> bool {
        self.category != Category::Permanent
    }

    pub fn to_json(&self) -> Value {
        let mut error = json!({"type": self.kind, "message": self.message, "category": self.category.as_str()});
        if let Some(seconds) = self.retry_after_seconds {
            error["retry_after_seconds"] = json!(seconds);
        }
        error
    }
}

impl std::fmt::Display for TaskError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<Value, TaskError>> + Send>>;
type HandlerFn = Arc<dyn Fn(Task) -> HandlerFuture + Send + Sync>;

/// A transactional handler's future, which borrows the transaction it writes through.
pub type TransactionalFuture<'a> = Pin<Box<dyn Future<Output = Result<Value, TaskError>> + Send + 'a>>;
pub(crate) type TransactionalFn =
    Arc<dyn for<'a> Fn(Task, &'a Transaction<'a>) -> TransactionalFuture<'a> + Send + Sync>;

/// A function that can be registered as a transactional handler: an
/// `async fn(Task, &Transaction<'_>) -> Result<Value, TaskError>` whose future is `Send`. (The
/// future borrows the transaction, which one generic future type cannot say for every lifetime:
/// hence this trait, implemented for every such function.)
pub trait TransactionalHandler<'a>: Fn(Task, &'a Transaction<'a>) -> Self::Future {
    type Future: Future<Output = Result<Value, TaskError>> + Send + 'a;
}

impl<'a, F, Fut> TransactionalHandler<'a> for F
where
    F: Fn(Task, &'a Transaction<'a>) -> Fut,
    Fut: Future<Output = Result<Value, TaskError>> + Send + 'a,
{
    type Future = Fut;
}

/// The handlers a worker can run, by name.
#[derive(Clone, Default)]
pub struct Handlers {
    by_name: HashMap<String, HandlerFn>,
    transactional: HashMap<String, TransactionalFn>,
}

impl Handlers {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `handler` under `name` (replacing one of the same name).
    pub fn register<F, Fut>(mut self, name: &str, handler: F) -> Self
    where
        F: Fn(Task) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Value, TaskError>> + Send + 'static,
    {
        self.transactional.remove(name);
        self.by_name.insert(name.to_owned(), Arc::new(move |task| Box::pin(handler(task))));
        self
    }

    /// Adds the transactional `handler` under `name` (replacing a handler of the same name): it runs
    /// in the transaction its completion commits (see the module doc).
    pub fn register_transactional<F>(mut self, name: &str, handler: F) -> Self
    where
        F: for<'a> TransactionalHandler<'a> + Send + Sync + 'static,
    {
        self.by_name.remove(name);
        self.transactional
            .insert(name.to_owned(), Arc::new(move |task, transaction| Box::pin(handler(task, transaction))));
        self
    }

    /// The transactional handler named `name`, if it is one.
    pub(crate) fn transactional(&self, name: &str) -> Option<TransactionalFn> {
        self.transactional.get(name).cloned()
    }

    /// The handler's future for `task`, or a permanent error when no handler has its name.
    /// A transactional handler needs its transaction: the worker runs it (a permanent error here).
    pub fn run(&self, task: Task) -> HandlerFuture {
        match self.by_name.get(&task.handler) {
            Some(handler) => handler(task),
            None if self.transactional.contains_key(&task.handler) => {
                let error = TaskError::permanent(
                    "transactional_handler",
                    format!("handler {:?} is transactional: it runs in its completion's transaction", task.handler),
                );
                Box::pin(async move { Err(error) })
            }
            None => {
                let error = TaskError::permanent(
                    "unknown_handler",
                    format!("this worker has no handler {:?} (it has: {})", task.handler, self.names().join(", ")),
                );
                Box::pin(async move { Err(error) })
            }
        }
    }

    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.by_name.keys().chain(self.transactional.keys()).cloned().collect();
        names.sort();
        names
    }
}
