//! The worker loop: claim in batches while slots are free, run handlers concurrently, report
//! outcomes, keep long tasks' leases alive, and shut down without losing anything.
//!
//! - Wakes on `NOTIFY stageflow_tasks` and otherwise polls every `poll_interval`: an idle worker
//!   makes one cheap claim call per interval.
//! - A handler's error, panic or timeout becomes `fail_task` with `{"type", "message", "category"}`.
//! - Outcomes are reported by a reporter with its own connection, completions at hand in one
//!   `complete_tasks` call; a lost connection is retried with backoff and the report sent again
//!   (completion is idempotent, so nothing counts twice).
//! - A handler's slot frees when it returns, so claiming goes on while the reporter sends the
//!   outcomes (claims and reports overlap instead of taking turns); at most twice `concurrency`
//!   finished tasks wait for their report, so a slow database slows claiming. A finished task keeps its
//!   lease, extended by heartbeats, until its outcome is in the database.
//! - Every report and heartbeat carries the claim's lease token. A heartbeat runs every third of the
//!   shortest lease in flight (a stage's own `lease_seconds` wins over the worker's); a task it no
//!   longer extends has lost its lease (it expired and the task went to another claim, or its job
//!   ended): its handler runs on, and its report, refused with SQLSTATE 55000, is logged and dropped.
//! - On shutdown: stop claiming, let running handlers finish within `grace_period`, then abort the
//!   rest and release their tasks so they are delivered again at once.
//! - A transactional handler runs in a transaction on a connection of its own (one per such task in
//!   flight, kept for the next), and its task is completed in that transaction before it commits;
//!   only its failures go through the reporter. Heartbeats go on meanwhile on the worker's
//!   connection: the task's row lock is taken by the completion, just before the commit.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use serde_json::Value;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio::time::{sleep, Instant};
use tracing::Instrument;

use crate::handlers::{Handlers, Task, TaskError, TransactionalFn};
use stageflow_client::Error;

use crate::tasks::{complete_in, listen, TaskApi};

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub database_url: String,
    pub queues: Vec<String>,
    /// Handlers running at once.
    pub concurrency: usize,
    /// The most tasks one claim asks for.
    pub batch_size: usize,
    pub lease_seconds: i32,
    /// How often an idle worker looks for work when no notification arrives.
    pub poll_interval: Duration,
    /// A handler running longer fails with a retryable `timeout` error.
    pub task_timeout: Option<Duration>,
    /// How long running handlers may go on after a shutdown request.
    pub grace_period: Duration,
    pub worker_id: String,
}

impl WorkerConfig {
    pub fn new(database_url: impl Into<String>) -> Self {
        let host = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|h| h.trim().to_owned()))
            .unwrap_or_else(|| "worker".to_owned());
        WorkerConfig {
            database_url: database_url.into(),
            queues: vec!["default".to_owned()],
            concurrency: 8,
            batch_size: 8,
            lease_seconds: 60,
            poll_interval: Duration::from_secs(2),
            task_timeout: None,
            grace_period: Duration::from_secs(30),
            worker_id: format!("{host}-{}", std::process::id()),
        }
    }
}

/// What a worker did, for its caller to print.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct WorkerReport {
    pub completed: u64,
    pub failed: u64,
    pub released: u64,
}

#[derive(Default)]
struct Counters {
    completed: AtomicU64,
    failed: AtomicU64,
}

/// A handler's outcome, for the reporter.
enum Outcome {
    /// The task, the lease it ran under, and what its handler returned: to be reported.
    Ran(String, i64, Result<Value, TaskError>),
    /// A transactional handler's task, completed in the handler's transaction (or its completion
    /// refused, or its commit lost with the connection): nothing to report, its slot is free.
    Settled(String),
}

/// A claimed task whose outcome is not yet in the database.
struct InFlight {
    handle: JoinHandle<()>,
    lease_token: i64,
    lease_seconds: i32,
    /// Its handler returned: the outcome is with the reporter, the slot is free.
    finished: bool,
    /// A heartbeat no longer extended the lease: it gets no more heartbeats, and its report will be
    /// refused.
    lost: bool,
}

/// How many tasks a claim may ask for, with `running` handlers running and `waiting` finished
/// tasks waiting for their report: no more than `batch_size`, than the slots of handlers not
/// running, or than the room left in the backlog of finished tasks (at most twice `concurrency`,
/// so that a batch can be claimed and run while the one before is being reported).
fn free_slots(config: &WorkerConfig, running: usize, waiting: usize) -> usize {
    let concurrency = config.concurrency;
    concurrency.saturating_sub(running).min((2 * concurrency).saturating_sub(waiting)).min(config.batch_size)
}

/// Whether a claim of `free` tasks is due: some slot is free and `any_free` says to claim it (the
/// first round, a notification, the poll interval, a slot free for BATCH_WINDOW), or half a batch
/// is free (so that handlers returning one by one do not make a claim each).
fn claim_due(config: &WorkerConfig, free: usize, any_free: bool) -> bool {
    let half_batch = config.batch_size.min(config.concurrency).div_ceil(2);
    free > 0 && (any_free || free >= half_batch)
}

/// How often a lease of `lease_seconds` is extended: three times per its length, so that one late
/// or failed heartbeat does not lose it.
fn heartbeat_period(lease_seconds: i32) -> Duration {
    Duration::from_millis(lease_seconds.max(1) as u64 * 1000 / 3)
}

pub struct Worker {
    config: WorkerConfig,
    handlers: Handlers,
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("cannot install a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// Connects, retrying with exponential backoff (100 ms doubling to 5 s) until it succeeds.
async fn connect_with_retry(url: &str) -> TaskApi {
    let mut delay = Duration::from_millis(100);
    loop {
        match TaskApi::connect(url).await {
            Ok(api) => return api,
            Err(error) => {
                tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "cannot connect to the database");
                sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Runs one handler, turning a panic or a timeout into a [`TaskError`].
async fn run_handler(handlers: Handlers, task: Task, timeout: Option<Duration>) -> Result<Value, TaskError> {
    let task_id = task.task_id.clone();
    guarded(handlers.run(task), &task_id, timeout).await
}

/// Awaits a handler's future, turning a panic or a timeout into a [`TaskError`].
async fn guarded(
    handler: impl Future<Output = Result<Value, TaskError>>,
    task_id: &str,
    timeout: Option<Duration>,
) -> Result<Value, TaskError> {
    let guarded = AssertUnwindSafe(handler).catch_unwind();
    let outcome = match timeout {
        Some(limit) => match tokio::time::timeout(limit, guarded).await {
            Ok(outcome) => outcome,
            Err(_) => return Err(TaskError::retryable("timeout", format!("the handler ran longer than {limit:?}"))),
        },
        None => guarded.await,
    };
    outcome.unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "the handler panicked".to_owned());
        tracing::error!(%task_id, %message, "handler panicked");
        Err(TaskError::permanent("panic", message))
    })
}

/// Reports outcomes on its own connection until the channel closes: completions at hand are sent
/// together with `stageflow.complete_tasks` (waiting at most `BATCH_WINDOW` for more to gather,
/// up to `MAX_BATCH`), failures one by one with `stageflow.fail_task`. It tells the claim loop
/// (`reported`) when a task is off its hands: its outcome is in the database (or was refused), so
/// its lease needs no more heartbeats and it no longer counts against the backlog of finished
/// tasks (`Running::free`).
async fn report_outcomes(
    url: String,
    worker_id: String,
    mut outcomes: mpsc::UnboundedReceiver<Outcome>,
    reported: mpsc::UnboundedSender<String>,
    counters: Arc<Counters>,
) {
    let mut api = connect_with_retry(&url).await;
    while let Some(first) = outcomes.recv().await {
        let mut batch = vec![first];
        let window = tokio::time::sleep(BATCH_WINDOW);
        tokio::pin!(window);
        while batch.len() < MAX_BATCH {
            tokio::select! {
                next = outcomes.recv() => match next {
                    Some(outcome) => batch.push(outcome),
                    None => break,
                },
                _ = &mut window => break,
            }
        }
        let mut completions: Vec<(String, i64, Value)> = Vec::new();
        let mut failures: Vec<(String, i64, TaskError)> = Vec::new();
        for outcome in batch {
            match outcome {
                Outcome::Ran(task_id, lease_token, Ok(result)) => completions.push((task_id, lease_token, result)),
                Outcome::Ran(task_id, lease_token, Err(error)) => failures.push((task_id, lease_token, error)),
                Outcome::Settled(task_id) => {
                    let _ = reported.send(task_id);
                }
            }
        }

        // Completions refused one by one with a conflict (another transaction held the task while
        // the call decided it, 40001: nothing was recorded) are sent again, after a short wait, at
        // most MAX_CONFLICT_RETRIES times.
        let mut element_conflicts = 0;
        while !completions.is_empty() {
            let mut conflicts = 0;
            let reports = loop {
                match api.complete_many(&completions, &worker_id).await {
                    Ok(reports) => break reports,
                    Err(error) if report_again(&error, &mut conflicts, &mut api, &url, "complete_tasks").await => {}
                    Err(error) => {
                        // The whole call was refused. The tasks stay running until their leases
                        // expire and are delivered again; their slots are freed below.
                        tracing::error!(%error, tasks = completions.len(), "complete_tasks refused");
                        for (task_id, _, _) in &completions {
                            let _ = reported.send(task_id.clone());
                        }
                        break Vec::new();
                    }
                }
            };
            let lease_tokens: HashMap<&str, i64> =
                completions.iter().map(|(id, token, _)| (id.as_str(), *token)).collect();
            let mut again: Vec<String> = Vec::new();
            for report in reports {
                let task_id = report.task_id;
                let lease_token = lease_tokens.get(task_id.as_str()).copied().unwrap_or_default();
                match report.outcome {
                    Ok(_) => {
                        counters.completed.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%task_id, lease_token, "completion committed");
                        let _ = reported.send(task_id);
                    }
                    // The database refused the result (a malformed plan): the task fails with why.
                    Err(Error::InvalidValue(refusal)) => {
                        failures.push((task_id, lease_token, TaskError::permanent("invalid_result", refusal.message)))
                    }
                    Err(Error::WrongState(refusal)) => {
                        lost_lease(&task_id, lease_token, &refusal.message, "completion");
                        let _ = reported.send(task_id);
                    }
                    Err(error) if error.is_retryable() && element_conflicts < MAX_CONFLICT_RETRIES => {
                        tracing::info!(%task_id, %error, "completion conflicted with another transaction; reporting again");
                        again.push(task_id);
                    }
                    // Refused for another reason: retrying will not change it.
                    Err(error) => {
                        tracing::info!(%task_id, %error, "completion refused");
                        let _ = reported.send(task_id);
                    }
                }
            }
            completions.retain(|(task_id, _, _)| again.contains(task_id));
            if !completions.is_empty() {
                element_conflicts += 1;
                sleep(Duration::from_millis(20 * element_conflicts)).await;
            }
        }

        for (task_id, lease_token, error) in failures {
            let mut conflicts = 0;
            loop {
                match api.fail(&task_id, &error.to_json(), error.retryable_flag(), &worker_id, lease_token).await {
                    Ok(_) => {
                        counters.failed.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    Err(e) if report_again(&e, &mut conflicts, &mut api, &url, &task_id).await => {}
                    Err(Error::WrongState(refusal)) => {
                        lost_lease(&task_id, lease_token, &refusal.message, "failure");
                        break;
                    }
                    Err(e) => {
                        tracing::info!(%task_id, code = e.sqlstate().unwrap_or_default(), error = %e, "failure report refused");
                        break;
                    }
                }
            }
            let _ = reported.send(task_id);
        }
    }
}

/// Connections for transactional handlers: one per such task in flight (so no more than the
/// worker's concurrency), each kept for the next such task when its transaction is over.
struct Connections {
    url: String,
    idle: std::sync::Mutex<Vec<TaskApi>>,
}

impl Connections {
    fn new(url: &str) -> Self {
        Connections { url: url.to_owned(), idle: std::sync::Mutex::new(Vec::new()) }
    }

    /// An idle connection, or a new one (retrying until the database answers).
    async fn take(&self) -> TaskApi {
        let idle = {
            // A poisoned lock only means a task panicked while pushing or popping: the list is whole.
            let mut idle = self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            idle.retain(|api| !api.is_closed());
            idle.pop()
        };
        match idle {
            Some(api) => api,
            None => connect_with_retry(&self.url).await,
        }
    }

    /// Keeps `api` for the next transactional task (its transaction is over), unless it is closed.
    fn put_back(&self, api: TaskApi) {
        if !api.is_closed() {
            self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(api);
        }
    }
}

/// How long a transactional handler's rollback may take before its connection is given up.
const ROLLBACK_WAIT: Duration = Duration::from_secs(5);
/// The longest a transactional completion's locks are held waiting for its COMMIT.
const COMMIT_WAIT_SQL: &str = "SET LOCAL idle_in_transaction_session_timeout = '10s'";

/// Runs a transactional handler in a transaction of its own and completes its task in that
/// transaction, then commits: the handler's writes commit with the one completion the database
/// accepts, or not at all.
///
/// - The handler fails (an error, a panic, a timeout): rolled back; the failure goes to the reporter
///   (`fail_task`, outside the transaction).
/// - The completion is refused because the lease went to another claim (55000): rolled back and
///   dropped, as the reporter drops such a completion.
/// - A malformed plan (22023): rolled back; the task fails with why, as in the reporter.
/// - A conflict with another transaction (40P01, 40001, 55P03; nothing was recorded): rolled back,
///   and the handler runs again in a new transaction, up to MAX_CONFLICT_RETRIES times.
/// - Any other refusal of the completion, or of the commit (a deferred constraint of the writes):
///   rolled back; the task fails with it, retryably.
/// - The connection breaks before the commit is known: dropped; if nothing was committed, the
///   task comes back when its lease expires. Never run again here: a committed completion repeated
///   by the same lease is accepted again, and the writes would be made twice.
async fn run_transactional(
    handler: TransactionalFn,
    task: Task,
    timeout: Option<Duration>,
    connections: &Connections,
    worker_id: &str,
    counters: &Counters,
) -> Outcome {
    let (task_id, lease_token) = (task.task_id.clone(), task.lease_token);
    let mut conflicts = 0;
    loop {
        let mut api = connections.take().await;
        let transaction = match api.transaction().await {
            Ok(transaction) => transaction,
            Err(error) => {
                tracing::warn!(%error, "cannot start the handler's transaction; reconnecting");
                sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let cancel = transaction.raw().cancel_token();
        let result = match guarded(handler(task.clone(), transaction.raw()), &task_id, timeout).await {
            Ok(result) => result,
            Err(error) => {
                if error.kind == "timeout" {
                    // The handler was dropped, perhaps in the middle of a query that goes on in the
                    // database: stop it, or the rollback would wait behind it.
                    if let Ok(settings) = stageflow_client::tls::ConnectConfig::from_url(&connections.url) {
                        let _ = cancel.cancel_query(settings.tls).await;
                    }
                }
                match tokio::time::timeout(ROLLBACK_WAIT, transaction.rollback()).await {
                    Ok(Ok(())) => connections.put_back(api),
                    _ => {
                        tracing::warn!(%task_id, "the handler's transaction did not roll back in time; its connection is closed")
                    }
                }
                return Outcome::Ran(task_id, lease_token, Err(error));
            }
        };
        // From the completion to the commit the task's row (and, if it ends its stage, the stage's
        // shards) stay locked: should this worker stall there, the server ends the session after
        // COMMIT_WAIT (the writes roll back, the task comes back when its lease expires) instead of
        // holding the locks against other completions.
        let _ = transaction.raw().batch_execute(COMMIT_WAIT_SQL).await;
        let refusal = match complete_in(&transaction, &task_id, &result, worker_id, lease_token).await {
            Ok(_) => match transaction.commit().await {
                Ok(()) => {
                    counters.completed.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%task_id, lease_token, "completion committed");
                    connections.put_back(api);
                    return Outcome::Settled(task_id);
                }
                Err(error) if error.is_connection() => {
                    tracing::error!(%error, "lost the database while committing a completion: if it was not committed, the task comes back when its lease expires");
                    return Outcome::Settled(task_id);
                }
                // Refused at commit (a deferred constraint of the handler's writes): nothing was
                // recorded, the task is still this lease's.
                Err(error) => {
                    connections.put_back(api);
                    return Outcome::Ran(task_id, lease_token, Err(TaskError::retryable("commit", error.to_string())));
                }
            },
            Err(error) if error.is_connection() => {
                tracing::error!(%error, "lost the database while completing: nothing was committed, the task comes back when its lease expires");
                return Outcome::Settled(task_id);
            }
            Err(refusal) => refusal,
        };
        let _ = transaction.rollback().await;
        connections.put_back(api);
        match refusal {
            Error::WrongState(refusal) => {
                lost_lease(&task_id, lease_token, &refusal.message, "completion (its transaction rolled back)");
                return Outcome::Settled(task_id);
            }
            Error::InvalidValue(refusal) => {
                let error = TaskError::permanent("invalid_result", refusal.message);
                return Outcome::Ran(task_id, lease_token, Err(error));
            }
            error if error.is_retryable() && conflicts < MAX_CONFLICT_RETRIES => {
                conflicts += 1;
                tracing::warn!(%error, attempt = conflicts, "a completion conflicted with another transaction; running the handler again");
                sleep(Duration::from_millis(20 * conflicts)).await;
            }
            error => {
                let error = TaskError::retryable("completion_refused", error.to_string());
                return Outcome::Ran(task_id, lease_token, Err(error));
            }
        }
    }
}

/// Logs a report refused with SQLSTATE 55000: the task is no longer under the lease this worker
/// claimed it with (the lease expired and the task was claimed again, or its job ended), so the
/// outcome is dropped and the report not made again.
fn lost_lease(task_id: &str, lease_token: i64, message: &str, what: &str) {
    tracing::warn!(%task_id, lease_token, reason = %message, what, "lost the lease: the report was refused and the outcome dropped");
}

/// After a report call failed, whether to make it again: after reconnecting when the connection was
/// lost, or after a short wait when another transaction was in the way (a deadlock PostgreSQL broke
/// by rolling the call back: nothing was recorded), at most MAX_CONFLICT_RETRIES times. `what`
/// names the report in the log.
async fn report_again(error: &Error, conflicts: &mut u64, api: &mut TaskApi, url: &str, what: &str) -> bool {
    if error.is_connection() {
        tracing::warn!(%error, what, "lost the database while reporting; reconnecting");
        sleep(Duration::from_millis(100)).await;
        *api = connect_with_retry(url).await;
        return true;
    }
    if error.is_retryable() && *conflicts < MAX_CONFLICT_RETRIES {
        *conflicts += 1;
        tracing::warn!(%error, what, attempt = *conflicts, "a report conflicted with another transaction; reporting again");
        sleep(Duration::from_millis(20 * *conflicts)).await;
        return true;
    }
    false
}

/// How long the reporter waits for more outcomes to send together.
const BATCH_WINDOW: Duration = Duration::from_millis(2);
/// The most completions sent in one call.
const MAX_BATCH: usize = 256;
/// How many times a report refused by a conflict with another transaction is made again.
const MAX_CONFLICT_RETRIES: u64 = 5;

impl Worker {
    pub fn new(config: WorkerConfig, handlers: Handlers) -> Self {
        Worker { config, handlers }
    }

    /// Runs until `shutdown` resolves and in-flight tasks are finished or released: claims while
    /// slots are free, then waits for whichever comes first (a shutdown request, reported outcomes,
    /// a notification, the poll interval, the next heartbeat, the end of the grace period).
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> WorkerReport {
        let mut run = Running::start(self.config, self.handlers).await;
        tokio::pin!(shutdown);
        // Set once a shutdown was asked for: when the grace period ends.
        let mut stopping: Option<Instant> = None;
        // Claim whatever slots are free, however few (the first round, a notification, the poll
        // interval, slots free for BATCH_WINDOW); otherwise a claim waits for half a batch.
        let mut any_free = true;
        loop {
            let claimed_any = stopping.is_none() && run.claim_due(any_free) && run.claim().await;
            any_free = false;
            if stopping.is_some() && run.in_flight.is_empty() {
                return run.finish(0).await;
            }
            if claimed_any && run.claim_due(false) {
                continue;
            }
            if stopping.is_none() {
                run.keep_listening().await;
            }
            let deadline = stopping.unwrap_or_else(Instant::now);
            tokio::select! {
                _ = &mut shutdown, if stopping.is_none() => stopping = Some(run.stop_claiming()),
                Some(task_id) = run.reported.recv() => run.reported(task_id),
                Some(done) = run.finished.recv() => run.finished(done),
                _ = run.wake.notified(), if stopping.is_none() => any_free = true,
                _ = run.listener_ended.notified() => run.listener = None,
                _ = sleep(run.config.poll_interval), if stopping.is_none() => any_free = true,
                _ = tokio::time::sleep_until(run.free_since.unwrap_or_else(Instant::now) + BATCH_WINDOW),
                    if stopping.is_none() && run.free_since.is_some() => any_free = true,
                _ = tokio::time::sleep_until(run.heartbeat_at), if !run.in_flight.is_empty() => run.heartbeat().await,
                _ = tokio::time::sleep_until(deadline), if stopping.is_some() => {
                    let released = run.release_unfinished().await;
                    return run.finish(released).await;
                }
            }
        }
    }
}

/// A running worker's state: its connection, the tasks in flight, the reporter and the listener.
struct Running {
    config: WorkerConfig,
    handlers: Handlers,
    api: TaskApi,
    /// Connections for transactional handlers.
    connections: Arc<Connections>,
    counters: Arc<Counters>,
    /// Handlers' outcomes, to the reporter.
    outcomes: mpsc::UnboundedSender<Outcome>,
    /// Tasks whose handler returned (their outcome went to the reporter), with the lease they ran
    /// under: their slots are free.
    finished: mpsc::UnboundedReceiver<(String, i64)>,
    finished_tx: mpsc::UnboundedSender<(String, i64)>,
    /// Task ids whose outcome the reporter has sent: off this worker's hands.
    reported: mpsc::UnboundedReceiver<String>,
    reporter: JoinHandle<()>,
    in_flight: HashMap<String, InFlight>,
    /// Since when a slot has been free without a claim asking for it.
    free_since: Option<Instant>,
    /// When the leases in flight are next extended: a heartbeat period of the shortest of them after
    /// the last heartbeat, or after the claim of a task with a shorter lease.
    heartbeat_at: Instant,
    wake: Arc<Notify>,
    listener_ended: Arc<Notify>,
    listener: Option<tokio_postgres::Client>,
    claim_failures: u32,
}

impl Running {
    /// Starts the reporter and the listener, and connects (retrying until the database answers).
    async fn start(config: WorkerConfig, handlers: Handlers) -> Running {
        let counters = Arc::new(Counters::default());
        let (outcomes, outcome_rx) = mpsc::unbounded_channel::<Outcome>();
        let (reported_tx, reported) = mpsc::unbounded_channel::<String>();
        let (finished_tx, finished) = mpsc::unbounded_channel::<(String, i64)>();
        let reporter = tokio::spawn(report_outcomes(
            config.database_url.clone(),
            config.worker_id.clone(),
            outcome_rx,
            reported_tx,
            counters.clone(),
        ));
        let wake = Arc::new(Notify::new());
        let listener_ended = Arc::new(Notify::new());
        let listener = listen(&config.database_url, wake.clone(), listener_ended.clone()).await.ok();
        let api = connect_with_retry(&config.database_url).await;
        let connections = Arc::new(Connections::new(&config.database_url));
        tracing::info!(worker_id = %config.worker_id, queues = ?config.queues, concurrency = config.concurrency, "worker started");
        Running {
            config,
            handlers,
            api,
            connections,
            counters,
            outcomes,
            finished,
            finished_tx,
            reported,
            reporter,
            in_flight: HashMap::new(),
            free_since: None,
            heartbeat_at: Instant::now(),
            wake,
            listener_ended,
            listener,
            claim_failures: 0,
        }
    }

    /// Claims from each queue while slots are free, starting a handler for every task claimed;
    /// whether any task was claimed. A claim that fails backs off (and reconnects if the
    /// connection was lost).
    async fn claim(&mut self) -> bool {
        self.free_since = None;
        let mut claimed_any = false;
        for queue in self.config.queues.clone() {
            let free = self.free();
            if free == 0 {
                break;
            }
            match self.api.claim(&queue, free as i32, self.config.lease_seconds, &self.config.worker_id).await {
                Ok(tasks) => {
                    self.claim_failures = 0;
                    claimed_any |= !tasks.is_empty();
                    for task in tasks {
                        self.start_handler(task);
                    }
                }
                Err(error) => {
                    self.claim_failures += 1;
                    let delay = Duration::from_millis(100 * 2u64.pow(self.claim_failures.min(6)));
                    if error.is_connection() {
                        tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "lost the database while claiming");
                        sleep(delay).await;
                        self.api = connect_with_retry(&self.config.database_url).await;
                    } else {
                        tracing::error!(%queue, %error, "claim refused");
                        sleep(delay).await;
                    }
                }
            }
        }
        claimed_any
    }

    /// How many tasks a claim may ask for now (see [`free_slots`]).
    fn free(&self) -> usize {
        let running = self.in_flight.values().filter(|task| !task.finished).count();
        free_slots(&self.config, running, self.in_flight.len() - running)
    }

    /// Whether to claim now (see [`claim_due`]).
    fn claim_due(&self, any_free: bool) -> bool {
        claim_due(&self.config, self.free(), any_free)
    }

    /// Slots were freed: if some is free, the claim that takes it is due within BATCH_WINDOW.
    fn slots_freed(&mut self) {
        if self.free_since.is_none() && self.free() > 0 {
            self.free_since = Some(Instant::now());
        }
    }

    /// Runs a claimed task's handler on a tokio task of its own, which sends the outcome to the
    /// reporter and frees the slot; the task is in flight until the reporter says it is reported.
    fn start_handler(&mut self, task: Task) {
        let task_id = task.task_id.clone();
        let (lease_token, lease_seconds) = (task.lease_token, task.lease_seconds);
        let due = Instant::now() + heartbeat_period(lease_seconds);
        if self.in_flight.is_empty() || due < self.heartbeat_at {
            self.heartbeat_at = due;
        }
        let (handlers, outcomes, finished) = (self.handlers.clone(), self.outcomes.clone(), self.finished_tx.clone());
        let transactional = self.handlers.transactional(&task.handler);
        let (connections, counters) = (self.connections.clone(), self.counters.clone());
        let worker_id = self.config.worker_id.clone();
        // The shorter of the worker's and the stage's timeouts.
        let stage_timeout = task.timeout_seconds.map(|s| Duration::from_secs(s.max(1) as u64));
        let timeout = match (self.config.task_timeout, stage_timeout) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let id = task_id.clone();
        let id_for_slot = task_id.clone();
        // Every log line of a handler carries its task, job and handler.
        let span = tracing::info_span!("task", task_id = %task.task_id, job_id = %task.job_id,
                                       handler = %task.handler, attempt = task.attempt);
        let handle = tokio::spawn(
            async move {
                tracing::debug!("started");
                let outcome = match transactional {
                    Some(handler) => {
                        run_transactional(handler, task, timeout, &connections, &worker_id, &counters).await
                    }
                    None => Outcome::Ran(id, lease_token, run_handler(handlers, task, timeout).await),
                };
                match &outcome {
                    Outcome::Ran(_, _, Ok(_)) => tracing::debug!("succeeded"),
                    Outcome::Ran(_, _, Err(error)) => tracing::warn!(%error, "failed"),
                    Outcome::Settled(_) => tracing::debug!("settled in its transaction"),
                }
                let _ = outcomes.send(outcome);
                let _ = finished.send((id_for_slot, lease_token));
            }
            .instrument(span),
        );
        self.in_flight.insert(task_id, InFlight { handle, lease_token, lease_seconds, finished: false, lost: false });
    }

    /// The handler of a task (and perhaps others' meanwhile) returned under the lease named: their
    /// slots are free. (A task already reported is gone from the map, or is in it again under a
    /// later claim's lease, which is left as it is.)
    fn finished(&mut self, done: (String, i64)) {
        let mut next = Some(done);
        while let Some((task_id, lease_token)) = next {
            if let Some(task) = self.in_flight.get_mut(&task_id).filter(|task| task.lease_token == lease_token) {
                task.finished = true;
            }
            next = self.finished.try_recv().ok();
        }
        self.slots_freed();
    }

    /// The reporter sent `task_id`'s outcome (and perhaps others' meanwhile): their slots are free.
    fn reported(&mut self, task_id: String) {
        self.in_flight.remove(&task_id);
        while let Ok(task_id) = self.reported.try_recv() {
            self.in_flight.remove(&task_id);
        }
        self.slots_freed();
    }

    /// Listens for notifications again if the listening connection ended.
    async fn keep_listening(&mut self) {
        if self.listener.is_none() {
            self.listener =
                listen(&self.config.database_url, self.wake.clone(), self.listener_ended.clone()).await.ok();
        }
    }

    /// Extends the leases in flight that are still this worker's, marks those the database no
    /// longer extended as lost, and schedules the next heartbeat.
    async fn heartbeat(&mut self) {
        let (ids, tokens): (Vec<String>, Vec<i64>) = self
            .in_flight
            .iter()
            .filter(|(_, task)| !task.lost)
            .map(|(id, task)| (id.clone(), task.lease_token))
            .unzip();
        if !ids.is_empty() {
            // The server extends a task by its stage's own lease when it has one.
            match self.api.heartbeat(&ids, &tokens, self.config.lease_seconds, &self.config.worker_id).await {
                Ok(extended) => {
                    let extended: HashSet<String> = extended.into_iter().collect();
                    for id in ids.iter().filter(|id| !extended.contains(*id)) {
                        let Some(task) = self.in_flight.get_mut(id) else { continue };
                        task.lost = true;
                        // A finished handler's outcome may have been reported meanwhile; if not, the
                        // reporter logs the refusal.
                        if !task.handle.is_finished() {
                            tracing::info!(task_id = %id, lease_token = task.lease_token,
                                           "lost the lease (the heartbeat did not extend it): the handler runs on, its report will be refused");
                        }
                    }
                }
                Err(error) => tracing::warn!(%error, "heartbeat failed"),
            }
        }
        let shortest = self.in_flight.values().filter(|task| !task.lost).map(|task| task.lease_seconds).min();
        self.heartbeat_at = Instant::now() + heartbeat_period(shortest.unwrap_or(self.config.lease_seconds));
    }

    /// A shutdown was asked for: no more claims; running handlers have the grace period to
    /// finish. Returns when it ends.
    fn stop_claiming(&self) -> Instant {
        tracing::info!(in_flight = self.in_flight.len(), grace = ?self.config.grace_period, "shutting down");
        Instant::now() + self.config.grace_period
    }

    /// The grace period is over: handlers still running are aborted and their tasks released;
    /// those that finished are left to the reporter, which sends their outcomes before it ends.
    /// Returns how many tasks were released.
    async fn release_unfinished(&mut self) -> u64 {
        let (ids, tokens): (Vec<String>, Vec<i64>) = self
            .in_flight
            .iter()
            .filter(|(_, task)| !task.handle.is_finished())
            .map(|(id, task)| (id.clone(), task.lease_token))
            .unzip();
        for task in self.in_flight.values() {
            task.handle.abort();
        }
        self.in_flight.clear();
        let released = loop {
            match self.api.release(&ids, &tokens, &self.config.worker_id).await {
                Ok(n) => break n,
                Err(error) if error.is_connection() => {
                    self.api = connect_with_retry(&self.config.database_url).await;
                }
                Err(error) => {
                    tracing::error!(%error, "release refused; the tasks come back when their leases expire");
                    break 0;
                }
            }
        };
        tracing::info!(released, "released unfinished tasks");
        released as u64
    }

    /// Waits for the reporter to send the outcomes it has, and says what this worker did.
    async fn finish(self, released: u64) -> WorkerReport {
        let Running { outcomes, reporter, counters, listener, .. } = self;
        drop(outcomes);
        let _ = reporter.await;
        drop(listener);
        WorkerReport {
            completed: counters.completed.load(Ordering::Relaxed),
            failed: counters.failed.load(Ordering::Relaxed),
            released,
        }
    }
}

#[cfg(test)]
mod unit {
    use super::*;
    use serde_json::json;

    fn task(handler: &str, params: Value) -> Task {
        Task::standalone(handler, params)
    }

    #[tokio::test]
    async fn a_panic_becomes_a_permanent_error_with_its_message() {
        let error = run_handler(crate::builtin_handlers(), task("debug.panic", json!({})), None).await.unwrap_err();
        assert_eq!(error.kind, "panic");
        assert_eq!(error.category, crate::handlers::Category::Permanent);
        assert!(error.message.contains("asked to panic in task 0000000000000000-s1-0"), "{}", error.message);
    }

    #[tokio::test]
    async fn a_slow_handler_times_out_with_a_retryable_error() {
        let slow = task("debug.sleep", json!({"ms": 5000}));
        let error = run_handler(crate::builtin_handlers(), slow, Some(Duration::from_millis(50))).await.unwrap_err();
        assert_eq!((error.kind.as_str(), error.category.as_str()), ("timeout", "transient"));
    }

    #[tokio::test]
    async fn an_unknown_handler_is_a_permanent_error_naming_the_known_ones() {
        let error = run_handler(crate::builtin_handlers(), task("nope", json!({})), None).await.unwrap_err();
        assert_eq!((error.kind.as_str(), error.category.as_str()), ("unknown_handler", "permanent"));
        assert!(error.message.contains("hello_world.greet"));
    }

    #[tokio::test]
    async fn a_transactional_handler_is_named_but_not_run_without_its_transaction() {
        let handlers = crate::builtin_handlers();
        assert!(handlers.names().contains(&"debug.insert_row".to_owned()));
        assert!(
            handlers.transactional("debug.insert_row").is_some() && handlers.transactional("debug.sleep").is_none()
        );
        let error = run_handler(handlers, task("debug.insert_row", json!({"table": "t"})), None).await.unwrap_err();
        assert_eq!((error.kind.as_str(), error.category.as_str()), ("transactional_handler", "permanent"));
        let replaced = crate::builtin_handlers().register("debug.insert_row", crate::diagnostic::sleep);
        assert!(replaced.transactional("debug.insert_row").is_none(), "registering a name again replaces it");
    }

    #[test]
    fn a_claim_fills_free_slots_while_the_backlog_of_reports_has_room() {
        let config = WorkerConfig { concurrency: 32, batch_size: 64, ..WorkerConfig::new("postgresql://unused") };
        assert_eq!(free_slots(&config, 0, 0), 32, "no more than the handlers that may run");
        assert_eq!(free_slots(&config, 20, 0), 12, "the slots of handlers not running");
        assert_eq!(free_slots(&config, 0, 32), 32, "a batch is claimed while the one before is reported");
        assert_eq!(free_slots(&config, 0, 50), 14, "the backlog of finished tasks holds twice the concurrency");
        assert_eq!(free_slots(&config, 0, 64), 0, "a full backlog stops claiming");
        assert_eq!(free_slots(&config, 32, 64), 0);
        let small = WorkerConfig { concurrency: 8, batch_size: 4, ..config.clone() };
        assert_eq!(free_slots(&small, 0, 0), 4, "no more than a batch");
    }

    #[test]
    fn a_claim_waits_for_half_a_batch_unless_told_to_take_any_free_slot() {
        let config = WorkerConfig { concurrency: 32, batch_size: 64, ..WorkerConfig::new("postgresql://unused") };
        assert!(!claim_due(&config, 0, true), "nothing free, nothing to claim");
        assert!(!claim_due(&config, 15, false), "under half of the 32 a claim can take");
        assert!(claim_due(&config, 16, false));
        assert!(claim_due(&config, 1, true), "a notification, the poll or BATCH_WINDOW claims any free slot");
        let one = WorkerConfig { concurrency: 1, batch_size: 1, ..config };
        assert!(claim_due(&one, 1, false), "a worker of one slot claims as soon as it is free");
    }

    #[test]
    fn heartbeats_come_three_times_per_lease() {
        assert_eq!(heartbeat_period(60), Duration::from_secs(20));
        assert_eq!(heartbeat_period(2), Duration::from_millis(666));
        assert_eq!(heartbeat_period(0), Duration::from_millis(333), "a lease under a second counts as one");
    }

    #[tokio::test]
    async fn hello_world_handlers_greet_and_reply() {
        let handlers = crate::builtin_handlers();
        let greeting =
            run_handler(handlers.clone(), task("hello_world.greet", json!({"message": "hi", "index": 7})), None)
                .await
                .unwrap();
        assert_eq!(greeting, json!({"greeting": "hi #7"}));
        let mut reply = task("hello_world.reply", json!({}));
        reply.predecessor = Some(greeting);
        assert_eq!(run_handler(handlers, reply, None).await.unwrap(), json!({"reply": "reply to hi #7"}));
    }
}
