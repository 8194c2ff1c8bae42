//! Lease torture: the lease protocol (fencing tokens) under randomized chaos, then the engine's
//! invariants checked on what is left.
//!
//! Per seed, on a database of its own: two job types on one queue `torture`, both with short
//! leases and failure thresholds that let some jobs fail and some complete with errors:
//!
//! - `tort_a`: `fan` (count n) -> `follow` (lineage) -> `gather` (fan_in);
//! - `tort_b`: `plan` (count n, planner tasks) -> `work` (dynamic) -> `collect` (fan_in, with its
//!   own `lease_seconds` of 2, which wins over the claim's).
//!
//! The database's `stageflow.message_window` is 3: a stage of more tasks has messages for 3 of
//! them at a time, the next 3 sent by the claim that reads into the last window sent or
//! finds the queue short, while jobs are cancelled and retried around it.
//!
//! For `STAGEFLOW_TORTURE_SECONDS` (default 20) six workers claim with 1-second leases (a quarter
//! of the claims inside a transaction committed up to 300 ms late), hold each task for a random
//! time, sometimes longer than the lease, then complete it (one by one or with `complete_tasks`,
//! sometimes repeating the completion, sometimes first sending a token never issued), fail it
//! (retryable or not), release it, heartbeat it, or abandon it; every report is fenced with the
//! claim's `lease_token`. Meanwhile one session runs `run_maintenance()` every 100-300 ms and
//! another submits more jobs, cancels running ones and retries failed or cancelled ones. Then the
//! chaos stops, a drain claims and completes everything (fenced too) until every job has ended,
//! and the invariants are checked:
//!
//! 1. every job ended; no stage of an ended job is active; a completed job completed all its
//!    stages, and it is `completed_with_errors` exactly when one of its stages counts failures;
//! 2. every completed task's result came from its last lease holder (the result carries the
//!    worker and token that reported it: they equal the task's `worker_id` and `lease_token`), and
//!    no repeated completion or report under a token never issued changed anything;
//! 3. every stage's counters equal its task rows (open = remaining_tasks, running = started by claims - stopped_tasks,
//!    completed = completed_count, failed + dead = failed_count, open_shards = shards with open
//!    tasks), and exactly the failed and dead tasks carry failed_at (the dead-letter index);
//! 4. after final maintenance rounds (one full reconciler pass), no open task and no message of
//!    the queue belongs to an ended job;
//! 5. the events tell each job's story in a possible order: each stage completed at most once and
//!    in order, never after its job ended; a job ended once per life (a retry revives it); its last
//!    end is its status;
//! 6. each stage's tasks were created once: task_count = its rows = what its fan-out makes of the
//!    previous stage (lineage: the completed predecessors; dynamic: the plans' entries; fan_in:
//!    one task whose inputs are the completed predecessors' results);
//! 7. lease tokens: every claim the test saw got a token no other claim of that task got, and each
//!    task's `lease_token` is the last of them.
//!
//! Checked as they happen: a report refused while its task runs (or, for a completion, is
//! completed) under that very lease; a repeated completion refused; a report under a token never
//! issued accepted; an accepted failure whose answer is not its own outcome (a retry it scheduled
//! on the claim's attempt, or the end it recorded with its error); a claim's effective lease,
//! attempt or token out of place; the reconciler having to re-send a message some path lost; any
//! error other than a refusal (55000) or a deadlock/serialization failure (40P01, 40001: counted
//! and retried), including the errors run_maintenance only counts (their WARNINGs name the
//! SQLSTATE). `STAGEFLOW_TORTURE_SEEDS` is a comma-separated list of seeds (default `1,2,3`); a
//! seed fixes every thread's random choices, not the interleavings.
//!
//! Two small tests at the end make certain what the torture finds by chance: `fail_task` fenced
//! by a lease token is refused once that lease is over, whether the task went back to the queue
//! under the same token (cancelled and retried, or released) or was dead-lettered.

// Test code: a panic (unwrap, expect) is how a test reports a failure.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use postgres::{Client, NoTls, Row};
use serde_json::{json, Value};
use stageflow_tests::*;

const QUEUE: &str = "torture";
const WORKERS: usize = 6;
/// The claim's lease in the chaos phase.
const LEASE: i32 = 1;
/// The lease of `tort_b`'s `collect` stage, which overrides the claim's.
const COLLECT_LEASE: i32 = 2;
/// `stageflow.message_window` in the torture's database.
const MESSAGE_WINDOW: i32 = 3;
const JOBS_AT_START: usize = 12;
const JOBS_DURING_RUN: usize = 24;
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

const TYPE_A: &str = r#"{
    "description": "torture: count -> lineage -> fan_in",
    "parameters": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}, "tag": {"type": "integer"}},
                   "required": ["n", "tag"]},
    "retry": {"max_attempts": 3, "backoff_base_seconds": 0.1, "backoff_max_seconds": 0.4},
    "stages": [
        {"name": "fan", "handler": "torture.fan", "queue": "torture", "fan_out": "count", "param": "n",
         "max_failed_tasks": 1, "max_failure_ratio": 0.25},
        {"name": "follow", "handler": "torture.follow", "queue": "torture", "fan_out": "lineage"},
        {"name": "gather", "handler": "torture.gather", "queue": "torture", "fan_out": "fan_in"}
    ]
}"#;

const TYPE_B: &str = r#"{
    "description": "torture: planners -> dynamic -> fan_in with a lease of its own",
    "parameters": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}, "tag": {"type": "integer"}},
                   "required": ["n", "tag"]},
    "retry": {"max_attempts": 4, "backoff_base_seconds": 0.1, "backoff_max_seconds": 0.4},
    "stages": [
        {"name": "plan", "handler": "torture.plan", "queue": "torture", "fan_out": "count", "param": "n",
         "max_failure_ratio": 0.5},
        {"name": "work", "handler": "torture.work", "queue": "torture", "fan_out": "dynamic",
         "retry": {"max_attempts": 3}, "max_failed_tasks": 2, "max_failure_ratio": 0.2},
        {"name": "collect", "handler": "torture.collect", "queue": "torture", "fan_out": "fan_in",
         "lease_seconds": 2}
    ]
}"#;

/// A stage's attempts per task, as the job types above define them.
fn max_attempts(stage_name: &str) -> i32 {
    match stage_name {
        "plan" | "collect" => 4,
        _ => 3,
    }
}

// Randomness: stageflow_tests::Rng, one stream per (seed, thread).

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

// ---------------------------------------------------------------------------------------------
// What the threads share and count.

#[derive(Default)]
struct Counters(BTreeMap<String, u64>);

impl Counters {
    fn add(&mut self, key: impl Into<String>, n: u64) {
        *self.0.entry(key.into()).or_default() += n;
    }

    fn get(&self, key: &str) -> u64 {
        self.0.get(key).copied().unwrap_or(0)
    }

    /// The sum of the counters whose name starts with `prefix`.
    fn sum(&self, prefix: &str) -> u64 {
        self.0.iter().filter(|(k, _)| k.starts_with(prefix)).map(|(_, v)| v).sum()
    }

    fn merge(&mut self, other: Counters) {
        for (k, v) in other.0 {
            self.add(k, v);
        }
    }
}

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    /// Errors that fail the test: unexpected SQLSTATEs and contract violations seen as they happen.
    errors: Mutex<Vec<String>>,
    /// Every lease token a committed claim returned, per task.
    tokens: Mutex<HashMap<String, Vec<i64>>>,
    /// The token of the last lease a worker handed back (retryable failure, release) per task:
    /// a redelivery after it is not a lease expiry.
    handed_back: Mutex<HashMap<String, i64>>,
    /// The first refusal message seen per operation, for the report.
    samples: Mutex<BTreeMap<String, String>>,
    /// WARNING notices the server sent (run_maintenance logs the errors of its units so and only
    /// counts them in its answer): (session, message).
    warnings: Mutex<Vec<(String, String)>>,
    job_ids: Mutex<Vec<String>>,
}

impl Shared {
    fn error(&self, message: String) {
        let mut errors = self.errors.lock().unwrap();
        if errors.len() < 200 {
            errors.push(message);
        }
    }

    fn sample(&self, op: &str, message: &str) {
        self.samples.lock().unwrap().entry(op.to_owned()).or_insert_with(|| message.to_owned());
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

enum Failure {
    /// 55000: the engine refused a report.
    Refused(String),
    /// 40P01 or 40001: try again.
    Conflict(String),
    Other(String),
}

fn classify(error: &postgres::Error) -> Failure {
    match error.as_db_error() {
        Some(db) => match db.code().code() {
            "55000" => Failure::Refused(db.message().to_owned()),
            "40P01" | "40001" => Failure::Conflict(db.code().code().to_owned()),
            code => Failure::Other(format!(
                "SQLSTATE {code}: {} (hint: {:?}, where: {:?})",
                db.message(),
                db.hint(),
                db.where_()
            )),
        },
        None => Failure::Other(error.to_string()),
    }
}

enum Outcome<T> {
    Done(T),
    Refused(String),
    /// Gave up after conflicts, or an error already recorded.
    Lost,
}

#[derive(Clone, Debug)]
struct Claim {
    task_id: String,
    stage_name: String,
    task_key: String,
    attempt: i32,
    token: i64,
    lease_seconds: i32,
}

const CLAIM_SQL: &str = "SELECT task_id, stage_name, task_key, attempt, lease_token, effective_lease_seconds \
                         FROM stageflow.claim_tasks($1::text, $2::int, $3::int, $4::text)";
const COMPLETE_SQL: &str = "SELECT stageflow.complete_task_and_check_stage($1::text, $2::jsonb, $3::text, $4::bigint)";
const COMPLETE_TASKS_SQL: &str = "SELECT stageflow.complete_tasks($1::jsonb, $2::text)";
const FAIL_SQL: &str = "SELECT stageflow.fail_task($1::text, $2::jsonb, $3::boolean, $4::text, $5::bigint)";
const RELEASE_SQL: &str = "SELECT stageflow.release_tasks($1::text[], $2::text, $3::bigint[])";
const HEARTBEAT_SQL: &str = "SELECT task_id FROM stageflow.heartbeat($1::text[], $2::int, $3::text, $4::bigint[])";

fn claim_late(
    client: &mut Client,
    max: i32,
    lease: i32,
    who: &str,
    delay: Duration,
) -> Result<Vec<Row>, postgres::Error> {
    let mut tx = client.transaction()?;
    let rows = tx.query(CLAIM_SQL, &[&QUEUE, &max, &lease, &who])?;
    thread::sleep(delay);
    tx.commit()?;
    Ok(rows)
}

/// The result a holder reports: who it is, under which lease, for which task; a planner's also
/// carries its plan (0 to 3 entries, decided by the task id, keys unique across the stage).
fn result_for(claim: &Claim, who: &str) -> Value {
    let mut result = json!({"worker": who, "lease_token": claim.token, "task": claim.task_id});
    if claim.stage_name == "plan" {
        let entries = claim.task_id.bytes().fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64)) % 4;
        result["tasks"] = Value::Array(
            (0..entries).map(|i| json!({"key": format!("k{}_{i}", claim.task_key), "params": {"i": i}})).collect(),
        );
    }
    result
}

// ---------------------------------------------------------------------------------------------
// A session: one connection, one random stream, its counters.

struct Session {
    who: String,
    client: Client,
    rng: Rng,
    counters: Counters,
    prefix: &'static str,
    shared: Arc<Shared>,
}

impl Session {
    fn new(url: &str, who: &str, rng: Rng, prefix: &'static str, shared: Arc<Shared>) -> Session {
        let mut config: postgres::Config = url.parse().unwrap_or_else(|e| panic!("{url}: {e}"));
        let (listener, name) = (shared.clone(), who.to_owned());
        config.notice_callback(move |notice| {
            if notice.severity() == "WARNING" {
                listener.warnings.lock().unwrap().push((name.clone(), notice.message().to_owned()));
            }
        });
        let mut client = config.connect(NoTls).unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
        // A lock wait this long means something hangs: better an error with a name than a stuck test.
        client.batch_execute("SET lock_timeout = '30s'; SET statement_timeout = '60s'").unwrap();
        Session { who: who.to_owned(), client, rng, counters: Counters::default(), prefix, shared }
    }

    fn add(&mut self, key: impl AsRef<str>, n: u64) {
        if n == 0 {
            return;
        }
        self.counters.add(format!("{}{}", self.prefix, key.as_ref()), n);
    }

    fn error(&self, message: String) {
        self.shared.error(format!("{}: {message}", self.who));
    }

    /// Runs `f`, again after a deadlock or serialization failure (up to 5 times).
    fn call<T>(
        &mut self,
        op: &str,
        subject: &str,
        mut f: impl FnMut(&mut Client) -> Result<T, postgres::Error>,
    ) -> Outcome<T> {
        for _ in 0..5 {
            match f(&mut self.client) {
                Ok(value) => return Outcome::Done(value),
                Err(e) => match classify(&e) {
                    Failure::Refused(message) => return Outcome::Refused(message),
                    Failure::Conflict(code) => {
                        self.add(format!("conflicts {code} in {op}"), 1);
                        let pause = self.rng.range(5, 40);
                        thread::sleep(ms(pause));
                    }
                    Failure::Other(message) => {
                        self.error(format!("{op} {subject}: {message}"));
                        return Outcome::Lost;
                    }
                },
            }
        }
        self.add(format!("{op} given up after conflicts"), 1);
        Outcome::Lost
    }

    /// Claims up to `max` tasks; `late`: inside a transaction committed that much later.
    fn claim(&mut self, max: i32, lease: i32, late: Option<Duration>) -> Vec<Claim> {
        let who = self.who.clone();
        let result = match late {
            None => self.client.query(CLAIM_SQL, &[&QUEUE, &max, &lease, &who]),
            Some(delay) => claim_late(&mut self.client, max, lease, &who, delay),
        };
        let rows = match result {
            Ok(rows) => rows,
            Err(e) => {
                match classify(&e) {
                    Failure::Conflict(code) => self.add(format!("conflicts {code} in claim"), 1),
                    Failure::Refused(message) => self.error(format!("claim refused with 55000: {message}")),
                    Failure::Other(message) => self.error(format!("claim: {message}")),
                }
                return Vec::new();
            }
        };
        self.add("claim calls", 1);
        if rows.is_empty() {
            return Vec::new();
        }
        if late.is_some() {
            self.add("claims committed late", 1);
        }
        let claims: Vec<Claim> = rows
            .iter()
            .map(|row| Claim {
                task_id: row.get(0),
                stage_name: row.get(1),
                task_key: row.get(2),
                attempt: row.get(3),
                token: row.get(4),
                lease_seconds: row.get(5),
            })
            .collect();
        for claim in &claims {
            self.record_claim(claim, lease);
        }
        claims
    }

    fn record_claim(&mut self, claim: &Claim, lease: i32) {
        self.add("tasks claimed", 1);
        let expected_lease = if claim.stage_name == "collect" { COLLECT_LEASE } else { lease };
        if claim.lease_seconds != expected_lease {
            self.error(format!(
                "claim of {} (stage {}) returned lease_seconds {}, expected {expected_lease}",
                claim.task_id, claim.stage_name, claim.lease_seconds
            ));
        }
        if claim.attempt < 1 || claim.attempt > max_attempts(&claim.stage_name) {
            self.error(format!(
                "claim of {} returned attempt {} of {}",
                claim.task_id,
                claim.attempt,
                max_attempts(&claim.stage_name)
            ));
        }
        if claim.token < 1 {
            self.error(format!("claim of {} returned lease token {}", claim.task_id, claim.token));
        }
        if claim.attempt > 1 {
            self.add("redeliveries (attempt > 1)", 1);
            let handed_back = self.shared.handed_back.lock().unwrap().get(&claim.task_id) == Some(&(claim.token - 1));
            if !handed_back {
                self.add("lease expiries observed (redelivered after a lease that was not handed back)", 1);
            }
        }
        self.shared.tokens.lock().unwrap().entry(claim.task_id.clone()).or_default().push(claim.token);
    }

    /// After a refusal of a report under lease `given`: why, from the task row. A task still
    /// running under that very lease (or completed by it, for a completion) must not have been
    /// refused: that is a failure. (Once it is not running under a lease, a task can only run
    /// again under a new token, so what is seen here was already so when the report was refused.)
    fn diagnose(&mut self, op: &str, task_id: &str, given: i64, message: &str) -> Option<String> {
        let row = match self
            .client
            .query_opt("SELECT status, lease_token FROM stageflow.tasks WHERE task_id = $1", &[&task_id])
        {
            Ok(Some(row)) => row,
            Ok(None) => {
                self.error(format!("{op} of {task_id} was refused ({message}) and the task does not exist"));
                return None;
            }
            Err(e) => {
                self.error(format!("reading task {task_id} after a refusal: {e}"));
                return None;
            }
        };
        let (status, current): (String, i64) = (row.get(0), row.get(1));
        if current != given {
            return Some(
                if current > given { "lease superseded (claimed again)" } else { "token not issued yet" }.to_owned(),
            );
        }
        let violation = match status.as_str() {
            "running" => true,
            "completed" => true, // a completion repeated by its own lease is accepted; nothing else of ours reports after completing
            "failed" => true,    // we never report a task after failing it
            _ => false,
        };
        if violation {
            self.error(format!(
                "{op} of {task_id} under lease {given} was refused ({message}) but the task is {status} under that very lease"
            ));
            return None;
        }
        Some(match status.as_str() {
            "cancelled" => "task cancelled (its job ended)".to_owned(),
            "dead" => "task dead-lettered (its last lease expired)".to_owned(),
            "queued" => "task queued again under the same token (retry_job after it ended)".to_owned(),
            other => format!("task {other}"),
        })
    }

    fn refused(&mut self, op: &str, claim: &Claim, given: i64, message: &str) {
        self.shared.sample(op, message);
        if let Some(kind) = self.diagnose(op, &claim.task_id, given, message) {
            self.add(format!("refused {op}: {kind}"), 1);
        }
    }

    fn complete_one(&mut self, claim: &Claim, result: &Value, repeat: bool) {
        let who = self.who.clone();
        let op = if repeat { "repeated complete" } else { "complete" };
        match self.call(op, &claim.task_id, |c| {
            c.query_one(COMPLETE_SQL, &[&claim.task_id, result, &who, &claim.token]).map(|r| r.get::<_, Value>(0))
        }) {
            Outcome::Done(report) => {
                if report["task_status"] != json!("completed") || report["task_id"] != json!(claim.task_id) {
                    self.error(format!("completion of {} accepted with the report {report}", claim.task_id));
                }
                if repeat {
                    self.add("repeated completions accepted (idempotent)", 1);
                } else {
                    self.add("completions accepted", 1);
                    if report["stage_completed"] == json!(true) {
                        self.add("stage advances reported", 1);
                    }
                    if self.rng.chance(0.15) {
                        let mut again = result.clone();
                        again["repeat"] = json!(true);
                        self.complete_one(claim, &again, true);
                    }
                }
            }
            Outcome::Refused(message) if repeat => {
                self.error(format!(
                    "a repeated completion of {} under the lease that completed it was refused: {message}",
                    claim.task_id
                ));
            }
            Outcome::Refused(message) => self.refused(op, claim, claim.token, &message),
            Outcome::Lost => {}
        }
    }

    /// A completion naming a lease token never issued: must be refused and change nothing.
    fn bogus_report(&mut self, claim: &Claim) {
        let who = self.who.clone();
        let bogus = claim.token + 1_000_000;
        let mut result = result_for(claim, &who);
        result["lease_token"] = json!(bogus);
        result["bogus"] = json!(true);
        match self.call("bogus complete", &claim.task_id, |c| {
            c.query_one(COMPLETE_SQL, &[&claim.task_id, &result, &who, &bogus]).map(|r| r.get::<_, Value>(0))
        }) {
            Outcome::Done(report) => self.error(format!(
                "a completion of {} under lease {bogus}, never issued, was accepted: {report}",
                claim.task_id
            )),
            Outcome::Refused(message) => {
                self.shared.sample("bogus complete", &message);
                self.add("reports under a token never issued refused", 1);
            }
            Outcome::Lost => {}
        }
    }

    fn fail(&mut self, claim: &Claim, retryable: bool) {
        let who = self.who.clone();
        let message = format!("{who} fails attempt {} under lease {}", claim.attempt, claim.token);
        let error = json!({"type": "Torture", "message": message});
        if retryable {
            self.shared.handed_back.lock().unwrap().insert(claim.task_id.clone(), claim.token);
        }
        let op = if retryable { "fail (retryable)" } else { "fail (permanent)" };
        match self.call(op, &claim.task_id, |c| {
            c.query_one(FAIL_SQL, &[&claim.task_id, &error, &retryable, &who, &claim.token])
                .map(|r| r.get::<_, Value>(0))
        }) {
            Outcome::Done(report) => {
                // An accepted failure is this report's outcome: a retry it scheduled (on the
                // claim's attempt) or the end it recorded (with its error); anything else is a
                // report answered as accepted though nothing of it was recorded.
                let status = report["task_status"].as_str().unwrap_or("?").to_owned();
                let recorded = report["attempt"] == json!(claim.attempt)
                    && match status.as_str() {
                        "queued" => retryable && report.get("retry_in_seconds").is_some(),
                        "dead" => retryable && report["error"]["message"] == json!(message),
                        "failed" => !retryable && report["error"]["message"] == json!(message),
                        _ => false,
                    };
                if !recorded {
                    self.error(format!(
                        "{op} of {} under lease {} was accepted, but the report is not its outcome: {report}",
                        claim.task_id, claim.token
                    ));
                }
                self.add(format!("{op} accepted: task {status}"), 1);
            }
            Outcome::Refused(message) => self.refused(op, claim, claim.token, &message),
            Outcome::Lost => {}
        }
    }

    fn release(&mut self, claim: &Claim) {
        let who = self.who.clone();
        self.shared.handed_back.lock().unwrap().insert(claim.task_id.clone(), claim.token);
        let ids = vec![claim.task_id.clone()];
        let tokens = vec![claim.token];
        match self.call("release", &claim.task_id, |c| {
            c.query_one(RELEASE_SQL, &[&ids, &who, &tokens]).map(|r| r.get::<_, i32>(0))
        }) {
            Outcome::Done(1) => self.add("releases accepted", 1),
            Outcome::Done(0) => {
                if let Some(kind) = self.diagnose("release", &claim.task_id, claim.token, "release_tasks returned 0") {
                    self.add(format!("releases skipped: {kind}"), 1);
                }
            }
            Outcome::Done(n) => self.error(format!("release of the one task {} released {n}", claim.task_id)),
            Outcome::Refused(message) => self.error(format!("release of {} raised 55000: {message}", claim.task_id)),
            Outcome::Lost => {}
        }
    }

    fn heartbeat(&mut self, claim: &Claim) {
        let who = self.who.clone();
        let ids = vec![claim.task_id.clone()];
        let tokens = vec![claim.token];
        match self.call("heartbeat", &claim.task_id, |c| c.query(HEARTBEAT_SQL, &[&ids, &LEASE, &who, &tokens])) {
            Outcome::Done(rows) if rows.len() == 1 && rows[0].get::<_, String>(0) == claim.task_id => {
                self.add("heartbeats extended", 1)
            }
            Outcome::Done(rows) if rows.is_empty() => {
                if let Some(kind) =
                    self.diagnose("heartbeat", &claim.task_id, claim.token, "heartbeat extended nothing")
                {
                    self.add(format!("heartbeats skipped: {kind}"), 1);
                }
            }
            Outcome::Done(rows) => {
                self.error(format!("heartbeat of the one task {} returned {} rows", claim.task_id, rows.len()))
            }
            Outcome::Refused(message) => self.error(format!("heartbeat of {} raised 55000: {message}", claim.task_id)),
            Outcome::Lost => {}
        }
    }

    fn complete_batch(&mut self, pending: &[(Claim, Value)]) {
        let who = self.who.clone();
        let results = Value::Array(
            pending
                .iter()
                .map(|(claim, result)| json!({"task_id": claim.task_id, "result": result, "lease_token": claim.token}))
                .collect(),
        );
        let reports = match self.call("complete_tasks", "(batch)", |c| {
            c.query_one(COMPLETE_TASKS_SQL, &[&results, &who]).map(|r| r.get::<_, Value>(0))
        }) {
            Outcome::Done(reports) => reports,
            Outcome::Refused(message) => {
                self.error(format!("complete_tasks raised 55000 for the whole batch: {message}"));
                return;
            }
            Outcome::Lost => return,
        };
        let reports = reports.as_array().cloned().unwrap_or_default();
        if reports.len() != pending.len() {
            self.error(format!("complete_tasks of {} results returned {} reports", pending.len(), reports.len()));
            return;
        }
        for ((claim, _), report) in pending.iter().zip(&reports) {
            if report["task_id"] != json!(claim.task_id) {
                self.error(format!("complete_tasks reports out of order: {} for {}", report, claim.task_id));
            } else if let Some(error) = report.get("error") {
                let message = error["message"].as_str().unwrap_or("").to_owned();
                if error["sqlstate"] == json!("55000") {
                    self.refused("complete_tasks", claim, claim.token, &message);
                } else {
                    self.error(format!("complete_tasks element {}: {error}", claim.task_id));
                }
            } else if report["task_status"] == json!("completed") {
                self.add("batch completions accepted", 1);
            } else {
                self.error(format!("complete_tasks accepted {} with the report {report}", claim.task_id));
            }
        }
    }

    fn maintenance(&mut self) {
        match self.call("run_maintenance", "", |c| {
            c.query_one("SELECT stageflow.run_maintenance()", &[]).map(|r| r.get::<_, Value>(0))
        }) {
            Outcome::Done(report) => {
                self.add("maintenance rounds", 1);
                if let Some(error) = report.get("error") {
                    // run_maintenance catches its own errors; a deadlock it lost is the documented
                    // exception (it ends tasks, and may end a stage, like a completion), anything
                    // else is a failure.
                    match error["sqlstate"].as_str() {
                        Some(code @ ("40P01" | "40001")) => self.add(format!("maintenance rounds lost to {code}"), 1),
                        _ => self.error(format!("run_maintenance returned an error: {report}")),
                    }
                    return;
                }
                for (key, value) in report.as_object().into_iter().flatten() {
                    if let Some(n) = value.as_u64() {
                        self.add(format!("maintenance {key}"), n);
                    }
                }
                // The reconciler gives a new message to an open task of a live job that has none:
                // every path that ends or re-queues a task moves its message in the same
                // transaction, so a resend means one of them lost a message.
                if report["messages_resent"].as_u64().unwrap_or(0) > 0 {
                    self.error(format!("the reconciler had to re-send lost messages: {report}"));
                }
            }
            Outcome::Refused(message) => self.error(format!("run_maintenance raised 55000: {message}")),
            Outcome::Lost => {}
        }
    }

    /// A chaos worker: claims 1 to 3 tasks and does something random with each, until stopped.
    fn work(mut self) -> Counters {
        while !self.shared.stopped() {
            let max = self.rng.range(1, 3) as i32;
            let late = if self.rng.chance(0.25) { Some(ms(self.rng.range(0, 300))) } else { None };
            let claims = self.claim(max, LEASE, late);
            if claims.is_empty() {
                let pause = self.rng.range(10, 60);
                thread::sleep(ms(pause));
                continue;
            }
            let batch = self.rng.chance(0.3);
            let mut pending: Vec<(Claim, Value)> = Vec::new();
            for claim in &claims {
                if self.shared.stopped() {
                    self.add("tasks abandoned at stop", 1);
                    continue;
                }
                let hold = if self.rng.chance(0.08) { self.rng.range(900, 1600) } else { self.rng.range(0, 60) };
                thread::sleep(ms(hold));
                if hold >= 1000 {
                    self.add("tasks held past their lease", 1);
                }
                match self.rng.below(100) {
                    0..=2 => self.add("tasks abandoned (lease left to expire)", 1),
                    3..=12 => self.fail(claim, true),
                    13..=15 => self.fail(claim, false),
                    16..=22 => self.release(claim),
                    23..=30 => {
                        self.heartbeat(claim);
                        let more = self.rng.range(0, 500);
                        thread::sleep(ms(more));
                        self.finish(claim, batch, &mut pending);
                    }
                    _ => self.finish(claim, batch, &mut pending),
                }
            }
            if !pending.is_empty() {
                self.complete_batch(&pending);
            }
        }
        self.counters
    }

    fn finish(&mut self, claim: &Claim, batch: bool, pending: &mut Vec<(Claim, Value)>) {
        if self.rng.chance(0.04) {
            self.bogus_report(claim);
        }
        let result = result_for(claim, &self.who);
        if batch {
            pending.push((claim.clone(), result));
        } else {
            self.complete_one(claim, &result, false);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The other chaos threads.

fn submit_job(session: &mut Session, seed: u64, index: usize) {
    let (job_type, n) =
        if index % 3 == 2 { ("tort_b", session.rng.range(1, 6)) } else { ("tort_a", session.rng.range(2, 12)) };
    let params = json!({"n": n, "tag": seed * 1000 + index as u64});
    match session.client.query_one("SELECT stageflow.submit_job($1, $2)", &[&job_type, &params]) {
        Ok(row) => {
            session.shared.job_ids.lock().unwrap().push(row.get(0));
            session.add("jobs submitted", 1);
        }
        Err(e) => session.error(format!("submit {job_type} {params}: {e}")),
    }
}

/// Submits the rest of the jobs over the run, cancels running jobs and retries ended ones.
fn cancel_and_retry(mut session: Session, seed: u64, seconds: u64) -> Counters {
    let started = Instant::now();
    let mut submitted = JOBS_AT_START;
    let spacing = Duration::from_millis(seconds * 1000 * 9 / 10 / JOBS_DURING_RUN as u64);
    while !session.shared.stopped() {
        let pause = session.rng.range(300, 900);
        thread::sleep(ms(pause));
        while submitted < JOBS_AT_START + JOBS_DURING_RUN
            && started.elapsed() >= spacing * (submitted - JOBS_AT_START + 1) as u32
        {
            submit_job(&mut session, seed, submitted);
            submitted += 1;
        }
        let roll = session.rng.below(100);
        let (op, wanted) = match roll {
            0..=34 => ("cancel_job", "status IN ('queued', 'processing')"),
            35..=89 => ("retry_job", "status IN ('failed', 'cancelled')"),
            _ => ("retry_job", "status = 'processing'"),
        };
        let candidates: Vec<String> = match session
            .client
            .query(&format!("SELECT job_id FROM stageflow.jobs WHERE {wanted} ORDER BY job_id"), &[])
        {
            Ok(rows) => rows.iter().map(|r| r.get(0)).collect(),
            Err(e) => {
                session.error(format!("listing jobs: {e}"));
                continue;
            }
        };
        if candidates.is_empty() {
            continue;
        }
        let job_id = candidates[session.rng.below(candidates.len() as u64) as usize].clone();
        let sql = format!("SELECT stageflow.{op}($1)");
        match session.call(op, &job_id, |c| c.query_one(sql.as_str(), &[&job_id]).map(|r| r.get::<_, Value>(0))) {
            Outcome::Done(report) if op == "cancel_job" => {
                if report["cancelled"] == json!(true) {
                    session.add("jobs cancelled", 1);
                } else {
                    session.add("cancels of a job that had just ended", 1);
                }
            }
            Outcome::Done(report) => {
                let retried = report["retried_tasks"].as_u64().unwrap_or(0);
                if retried > 0 {
                    session.add(
                        if wanted.contains("processing") { "running jobs retried" } else { "ended jobs retried" },
                        1,
                    );
                    session.add("tasks re-queued by retry_job", retried);
                } else {
                    session.add("retries with nothing to retry", 1);
                }
            }
            Outcome::Refused(message) => session.error(format!("{op}({job_id}) raised 55000: {message}")),
            Outcome::Lost => {}
        }
    }
    session.counters
}

fn maintain(mut session: Session) -> Counters {
    while !session.shared.stopped() {
        let pause = session.rng.range(100, 300);
        thread::sleep(ms(pause));
        session.maintenance();
    }
    session.counters
}

// ---------------------------------------------------------------------------------------------
// Drain, then check.

fn open_jobs(client: &mut Client) -> i64 {
    client
        .query_one("SELECT count(*) FROM stageflow.jobs WHERE status IN ('queued', 'processing')", &[])
        .unwrap()
        .get(0)
}

/// Claims and completes (fenced) until every job has ended; Err with a dump of what is stuck.
fn drain(session: &mut Session) -> Result<(), String> {
    let started = Instant::now();
    loop {
        if open_jobs(&mut session.client) == 0 {
            return Ok(());
        }
        if started.elapsed() > DRAIN_TIMEOUT {
            return Err(stuck_dump(&mut session.client));
        }
        let claims = session.claim(100, 30, None);
        if claims.is_empty() {
            session.maintenance();
            thread::sleep(ms(100));
            continue;
        }
        let pending: Vec<(Claim, Value)> = claims.iter().map(|c| (c.clone(), result_for(c, &session.who))).collect();
        session.complete_batch(&pending);
    }
}

fn stuck_dump(client: &mut Client) -> String {
    let sql = r#"
        WITH open_jobs AS (SELECT * FROM stageflow.jobs WHERE status IN ('queued', 'processing'))
        SELECT jsonb_pretty(jsonb_build_object(
            'now', stageflow.now(),
            'jobs', (SELECT jsonb_agg(to_jsonb(j) - 'definition' ORDER BY j.job_id) FROM open_jobs AS j),
            'stages', (SELECT jsonb_agg(to_jsonb(s) ORDER BY s.job_id, s.stage) FROM stageflow.stages AS s
                        WHERE s.job_id IN (SELECT job_id FROM open_jobs)),
            'shards', (SELECT jsonb_agg(to_jsonb(sh) ORDER BY sh.job_id, sh.stage, sh.shard) FROM stageflow.stage_shards AS sh
                        WHERE sh.job_id IN (SELECT job_id FROM open_jobs) AND sh.remaining_tasks > 0),
            'open_tasks', (SELECT jsonb_agg(jsonb_build_object(
                               'task_id', t.task_id, 'status', t.status, 'attempt', t.attempt, 'max_attempts', t.max_attempts,
                               'lease_token', t.lease_token, 'worker_id', t.worker_id, 'lease_expires_at', t.lease_expires_at,
                               'next_attempt_at', t.next_attempt_at, 'msg_id', t.msg_id,
                               'message', (SELECT to_jsonb(q) FROM pgmq.q_torture AS q WHERE q.msg_id = t.msg_id),
                               'messages_naming_it', (SELECT jsonb_agg(to_jsonb(q)) FROM pgmq.q_torture AS q
                                                       WHERE q.message ->> 'task_id' = t.task_id))
                               ORDER BY t.task_id)
                             FROM stageflow.tasks AS t
                            WHERE t.job_id IN (SELECT job_id FROM open_jobs) AND t.status IN ('queued', 'running')),
            'recent_events', (SELECT jsonb_agg(to_jsonb(e) ORDER BY e.event_id) FROM
                               (SELECT * FROM stageflow.events WHERE job_id IN (SELECT job_id FROM open_jobs)
                                 ORDER BY event_id DESC LIMIT 40) AS e)))"#;
    match client.query_one(sql, &[]) {
        Ok(row) => row.get(0),
        Err(e) => format!("(the dump failed: {e})"),
    }
}

/// Runs `sql` (one text column per violation) and adds its rows to `problems` under `title`.
fn violations(client: &mut Client, problems: &mut Vec<String>, title: &str, sql: &str) {
    match client.query(sql, &[]) {
        Ok(rows) => {
            let found: Vec<String> = rows.iter().map(|r| r.get::<_, String>(0)).collect();
            if !found.is_empty() {
                let shown: Vec<&String> = found.iter().take(20).collect();
                problems.push(format!(
                    "{title}: {} violation(s), e.g.\n    {}",
                    found.len(),
                    shown.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("\n    ")
                ));
            }
        }
        Err(e) => problems.push(format!("{title}: the check itself failed: {e}")),
    }
}

fn check_invariants(client: &mut Client, shared: &Shared) -> Vec<String> {
    let mut problems = Vec::new();

    // 1. Every job ended, consistently.
    violations(
        client,
        &mut problems,
        "1. every job ended",
        r#"
        SELECT format('job %s (%s) is still %s at stage %s of %s', job_id, job_type, status, current_stage, total_stages)
          FROM stageflow.jobs WHERE status IN ('queued', 'processing') ORDER BY job_id"#,
    );
    violations(
        client,
        &mut problems,
        "1. no stage of an ended job is active",
        r#"
        SELECT format('stage %s (%s) of job %s is active but its job is %s', s.stage, s.name, s.job_id, j.status)
          FROM stageflow.stages AS s JOIN stageflow.jobs AS j USING (job_id)
         WHERE s.status = 'active' AND j.status NOT IN ('queued', 'processing') ORDER BY 1"#,
    );
    violations(
        client,
        &mut problems,
        "1. completed jobs completed every stage, with errors exactly when a stage counts failures",
        r#"
        SELECT format('job %s is %s at stage %s of %s with %s completed stage(s), failures counted: %s, '
                      'result: %s entries read of %s counted',
                      j.job_id, j.status, j.current_stage, j.total_stages, x.done, x.failures, r.entries, r.counted)
          FROM stageflow.jobs AS j
          CROSS JOIN LATERAL (SELECT count(*) FILTER (WHERE s.status = 'completed') AS done,
                                     coalesce(bool_or(s.failed_count > 0), false) AS failures
                                FROM stageflow.stages AS s WHERE s.job_id = j.job_id) AS x
          -- the result reads (job_result answers a completed job) and has as many entries as job_status counts
          CROSS JOIN LATERAL (SELECT jsonb_array_length(stageflow.job_result(j.job_id, NULL, 10000) -> 'entries') AS entries,
                                     (stageflow.job_status(j.job_id) ->> 'result_count')::int AS counted) AS r
         WHERE j.status IN ('completed', 'completed_with_errors')
           AND (x.done <> j.total_stages OR j.current_stage <> j.total_stages OR r.counted IS NULL
                OR r.entries IS DISTINCT FROM r.counted
                OR x.failures <> (j.status = 'completed_with_errors'))
         ORDER BY 1"#,
    );

    // 2. Completed results came from the last lease holder, and nothing overwrote them.
    violations(
        client,
        &mut problems,
        "2. every completed task's result came from its last lease holder",
        r#"
        SELECT format('task %s: lease_token %s, worker_id %s, but the result is %s', task_id, lease_token, worker_id, result)
          FROM stageflow.tasks
         WHERE status = 'completed'
           AND (result ->> 'lease_token' IS DISTINCT FROM lease_token::text OR result ->> 'worker' IS DISTINCT FROM worker_id
                OR result ->> 'task' IS DISTINCT FROM task_id OR result ? 'repeat' OR result ? 'bogus')
         ORDER BY task_id"#,
    );
    violations(
        client,
        &mut problems,
        "2. only completed tasks have results",
        r#"
        SELECT format('task %s is %s with a result %s', task_id, status, result)
          FROM stageflow.tasks WHERE status <> 'completed' AND result IS NOT NULL ORDER BY task_id"#,
    );

    // 3. Stage counters equal their task rows.
    violations(
        client,
        &mut problems,
        "3. stage counters equal their task rows",
        r#"
        WITH t AS (
            SELECT job_id, stage,
                   count(*) FILTER (WHERE status IN ('queued', 'running')) AS open,
                   count(*) FILTER (WHERE status = 'running') AS running,
                   count(*) FILTER (WHERE status = 'completed') AS done,
                   count(*) FILTER (WHERE status IN ('failed', 'dead')) AS failed
              FROM stageflow.tasks GROUP BY job_id, stage
        ), sh AS (
            SELECT job_id, stage, count(*) AS shard_rows, sum(remaining_tasks) AS remaining,
                   sum(completed_count) AS completed, count(*) FILTER (WHERE remaining_tasks > 0) AS open_shards
              FROM stageflow.stage_shards GROUP BY job_id, stage
        ), rc AS (
            SELECT job_id, stage, running_tasks AS running FROM stageflow.stage_counts
        )
        SELECT format('job %s stage %s (%s, %s): open tasks %s vs remaining_tasks %s; running tasks %s vs running_tasks %s; '
                      'completed tasks %s vs completed_count %s; '
                      'failed+dead tasks %s vs failed_count %s; shards with open tasks %s vs open_shards %s; shard rows %s of %s',
                      s.job_id, s.stage, s.name, s.status, coalesce(t.open, 0), coalesce(sh.remaining, 0),
                      coalesce(t.running, 0), coalesce(rc.running, 0),
                      coalesce(t.done, 0), coalesce(sh.completed, 0), coalesce(t.failed, 0), s.failed_count,
                      coalesce(sh.open_shards, 0), s.open_shards, coalesce(sh.shard_rows, 0), s.shards)
          FROM stageflow.stages AS s LEFT JOIN t USING (job_id, stage) LEFT JOIN sh USING (job_id, stage)
          LEFT JOIN rc USING (job_id, stage)
         WHERE coalesce(t.open, 0) <> coalesce(sh.remaining, 0) OR coalesce(t.running, 0) <> coalesce(rc.running, 0)
            OR coalesce(t.done, 0) <> coalesce(sh.completed, 0)
            OR coalesce(t.failed, 0) <> s.failed_count OR coalesce(sh.open_shards, 0) <> s.open_shards
            OR coalesce(sh.shard_rows, 0) <> s.shards
         ORDER BY s.job_id, s.stage"#,
    );
    violations(
        client,
        &mut problems,
        "3. failed_at marks exactly the dead letters",
        r#"
        SELECT format('task %s is %s with failed_at %s', task_id, status, failed_at) FROM stageflow.tasks
         WHERE (status IN ('failed', 'dead')) <> (failed_at IS NOT NULL)
         ORDER BY task_id"#,
    );
    violations(
        client,
        &mut problems,
        "3. every task belongs to a stage row",
        r#"
        SELECT format('task %s (%s) has no stage row', t.task_id, t.status) FROM stageflow.tasks AS t
         WHERE NOT EXISTS (SELECT 1 FROM stageflow.stages AS s WHERE s.job_id = t.job_id AND s.stage = t.stage)"#,
    );
    violations(
        client,
        &mut problems,
        "3. attempts within bounds",
        r#"
        SELECT format('task %s is %s on attempt %s of %s', task_id, status, attempt, max_attempts) FROM stageflow.tasks
         WHERE attempt < 0 OR attempt > max_attempts OR (status = 'dead' AND attempt <> max_attempts)
            OR (status IN ('completed', 'failed', 'dead') AND attempt < 1)
         ORDER BY task_id"#,
    );

    // 4. (run_seed ran the final maintenance rounds) Nothing open or queued belongs to an ended job.
    violations(
        client,
        &mut problems,
        "4. no open task belongs to an ended job",
        r#"
        SELECT format('task %s is %s (attempt %s, lease %s, msg %s) but its job %s is %s', t.task_id, t.status, t.attempt,
                      t.lease_token, t.msg_id, t.job_id, j.status)
          FROM stageflow.tasks AS t JOIN stageflow.jobs AS j USING (job_id)
         WHERE t.status IN ('queued', 'running') AND j.status NOT IN ('queued', 'processing') ORDER BY 1"#,
    );
    violations(
        client,
        &mut problems,
        "4. no message of the queue belongs to an ended job",
        r#"
        SELECT format('message %s (task %s: %s, job %s: %s, the task''s msg_id %s, vt %s, read %s times) is left in pgmq.q_torture',
                      q.msg_id, q.message ->> 'task_id', coalesce(t.status, '(no such task)'), t.job_id,
                      coalesce(j.status, '(no job)'), t.msg_id, q.vt, q.read_ct)
          FROM pgmq.q_torture AS q
          LEFT JOIN stageflow.tasks AS t ON t.task_id = q.message ->> 'task_id'
          LEFT JOIN stageflow.jobs AS j ON j.job_id = t.job_id
         WHERE j.status IS NULL OR j.status NOT IN ('queued', 'processing') ORDER BY q.msg_id"#,
    );

    // 5. The events tell each job's story in a possible order.
    violations(
        client,
        &mut problems,
        "5. each stage completed at most once",
        r#"
        SELECT format('job %s stage %s: %s stage_completed events (%s job_retried events)', e.job_id, e.stage, count(*),
                      (SELECT count(*) FROM stageflow.events AS r WHERE r.job_id = e.job_id AND r.kind = 'job_retried'))
          FROM stageflow.events AS e WHERE e.kind = 'stage_completed'
         GROUP BY e.job_id, e.stage HAVING count(*) > 1 ORDER BY 1"#,
    );
    check_event_stories(client, &mut problems);

    // 6. Each stage's tasks were created once, from what the previous stage left.
    violations(
        client,
        &mut problems,
        "6. each stage's tasks were created once",
        r#"
        WITH x AS (
            SELECT s.job_id, s.stage, s.name, s.fan_out, s.task_count,
                   (SELECT count(*) FROM stageflow.tasks AS t WHERE t.job_id = s.job_id AND t.stage = s.stage) AS task_rows,
                   (SELECT count(DISTINCT t.ordinal) FROM stageflow.tasks AS t WHERE t.job_id = s.job_id AND t.stage = s.stage) AS ordinals,
                   (SELECT coalesce(max(t.ordinal) + 1, 0) FROM stageflow.tasks AS t WHERE t.job_id = s.job_id AND t.stage = s.stage) AS span,
                   CASE s.fan_out
                       WHEN 'count' THEN (j.params ->> s.param)::bigint
                       WHEN 'lineage' THEN (SELECT count(*) FROM stageflow.tasks AS p
                                             WHERE p.job_id = s.job_id AND p.stage = s.stage - 1 AND p.status = 'completed')
                       WHEN 'dynamic' THEN (SELECT coalesce(sum(jsonb_array_length(p.result -> 'tasks')), 0)::bigint FROM stageflow.tasks AS p
                                             WHERE p.job_id = s.job_id AND p.stage = s.stage - 1 AND p.status = 'completed')
                       WHEN 'fan_in' THEN 1
                   END AS expected,
                   CASE WHEN s.fan_out = 'fan_in' THEN
                       (SELECT coalesce(jsonb_array_length(t.inputs), -1) FROM stageflow.tasks AS t
                         WHERE t.job_id = s.job_id AND t.stage = s.stage AND t.ordinal = 0) END AS inputs,
                   CASE WHEN s.fan_out = 'fan_in' THEN
                       (SELECT count(*) FROM stageflow.tasks AS p
                         WHERE p.job_id = s.job_id AND p.stage = s.stage - 1 AND p.status = 'completed') END AS predecessors
              FROM stageflow.stages AS s JOIN stageflow.jobs AS j USING (job_id)
        )
        SELECT format('job %s stage %s (%s, %s): task_count %s, task rows %s, distinct ordinals %s spanning 0..%s, '
                      'the fan-out makes %s; fan-in inputs %s of %s completed predecessors',
                      job_id, stage, name, fan_out, task_count, task_rows, ordinals, span, expected, inputs, predecessors)
          FROM x
         WHERE task_count <> task_rows OR ordinals <> task_rows OR span <> task_rows OR task_count <> expected
            OR inputs IS DISTINCT FROM predecessors
         ORDER BY job_id, stage"#,
    );
    violations(
        client,
        &mut problems,
        "6. lineage tasks follow completed predecessors",
        r#"
        SELECT format('lineage task %s: predecessor %s is %s (key %s, stage %s)', t.task_id, t.predecessor_id,
                      coalesce(p.status, 'missing'), p.task_key, p.stage)
          FROM stageflow.tasks AS t
          JOIN stageflow.stages AS s ON s.job_id = t.job_id AND s.stage = t.stage
          LEFT JOIN stageflow.tasks AS p ON p.task_id = t.predecessor_id
         WHERE s.fan_out = 'lineage'
           AND (p.task_id IS NULL OR p.status <> 'completed' OR p.task_key <> t.task_key OR p.stage <> t.stage - 1)
         ORDER BY 1"#,
    );
    violations(
        client,
        &mut problems,
        "6. a job has the stage rows 1 .. current_stage",
        r#"
        SELECT format('job %s (%s) is at stage %s of %s but has stage rows %s', j.job_id, j.status, j.current_stage,
                      j.total_stages, (SELECT array_agg(s.stage ORDER BY s.stage) FROM stageflow.stages AS s WHERE s.job_id = j.job_id))
          FROM stageflow.jobs AS j
         WHERE (SELECT array_agg(s.stage ORDER BY s.stage) FROM stageflow.stages AS s WHERE s.job_id = j.job_id)
               IS DISTINCT FROM (SELECT array_agg(g ORDER BY g) FROM generate_series(1, j.current_stage) AS g)
         ORDER BY 1"#,
    );

    // 7. Lease tokens: unique per claim, the last one current.
    check_tokens(client, shared, &mut problems);
    problems
}

/// An event: event_id, kind, stage, payload.
type Event = (i64, String, Option<i32>, Value);

/// Replays each job's job-level events in order (they are written under the job's row lock, so
/// event_id order is their commit order) and checks the story is possible.
fn check_event_stories(client: &mut Client, problems: &mut Vec<String>) {
    let jobs: HashMap<String, (String, i32, i32)> = client
        .query("SELECT job_id, status, current_stage, total_stages FROM stageflow.jobs", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
        .collect();
    let rows = client
        .query(
            "SELECT job_id, event_id, kind, stage, payload FROM stageflow.events
              WHERE kind IN ('job_submitted', 'stage_completed', 'job_completed', 'job_completed_with_errors',
                             'job_failed', 'job_cancelled', 'job_retried')
              ORDER BY job_id, event_id",
            &[],
        )
        .unwrap();
    let mut stories: BTreeMap<String, Vec<Event>> = BTreeMap::new();
    for r in &rows {
        stories.entry(r.get(0)).or_default().push((r.get(1), r.get(2), r.get(3), r.get(4)));
    }
    let mut found = Vec::new();
    for (job_id, (status, current, total)) in &jobs {
        let story = stories.remove(job_id).unwrap_or_default();
        let told: Vec<String> = story
            .iter()
            .map(|(id, kind, stage, _)| format!("{id}:{kind}{}", stage.map(|s| format!("({s})")).unwrap_or_default()))
            .collect();
        let mut complain = |what: String| {
            found
                .push(format!("job {job_id} ({status}, stage {current} of {total}): {what}; events {}", told.join(" ")))
        };
        let mut ended: Option<&str> = None;
        let mut next_stage = 1;
        let mut submitted = 0;
        for (index, (event_id, kind, stage, payload)) in story.iter().enumerate() {
            match kind.as_str() {
                "job_submitted" => {
                    submitted += 1;
                    if index != 0 {
                        complain(format!("event {event_id}: job_submitted is not the first event"));
                    }
                }
                "stage_completed" => {
                    if let Some(end) = ended {
                        complain(format!("event {event_id}: stage {stage:?} completed after the job ended ({end})"));
                    }
                    if *stage != Some(next_stage) {
                        complain(format!(
                            "event {event_id}: stage {stage:?} completed, the next to complete was {next_stage}"
                        ));
                    }
                    next_stage = stage.unwrap_or(next_stage) + 1;
                }
                "job_completed" | "job_completed_with_errors" | "job_failed" | "job_cancelled" => {
                    if let Some(end) = ended {
                        complain(format!(
                            "event {event_id}: {kind} after the job had already ended ({end}) with no retry between"
                        ));
                    }
                    if kind.starts_with("job_completed") && next_stage != total + 1 {
                        complain(format!("event {event_id}: {kind} with stages up to {} completed", next_stage - 1));
                    }
                    ended = Some(kind.as_str());
                }
                "job_retried" => {
                    if let Some(end) = ended {
                        if end.starts_with("job_completed") {
                            complain(format!("event {event_id}: a completed job ({end}) was retried"));
                        }
                    }
                    if payload["stage"] != json!(next_stage) {
                        complain(format!(
                            "event {event_id}: job_retried at stage {}, but the current stage was {next_stage}",
                            payload["stage"]
                        ));
                    }
                    ended = None;
                }
                _ => unreachable!(),
            }
        }
        if submitted != 1 {
            complain(format!("{submitted} job_submitted events"));
        }
        match ended {
            None => complain("the events never end the job".to_owned()),
            Some(end) if end != format!("job_{status}") => {
                complain(format!("the last end is {end}, the job is {status}"))
            }
            _ => {}
        }
        let expected_current = if status.starts_with("completed") { *total } else { next_stage };
        if *current != expected_current {
            complain(format!(
                "stages up to {} completed, so the current stage should be {expected_current}",
                next_stage - 1
            ));
        }
    }
    for job_id in stories.keys() {
        found.push(format!("events of an unknown job {job_id}"));
    }
    if !found.is_empty() {
        found.sort();
        problems.push(format!(
            "5. the events tell each job's story in a possible order: {} violation(s), e.g.\n    {}",
            found.len(),
            found.iter().take(20).cloned().collect::<Vec<_>>().join("\n    ")
        ));
    }
}

fn check_tokens(client: &mut Client, shared: &Shared, problems: &mut Vec<String>) {
    let current: HashMap<String, (i64, String)> = client
        .query("SELECT task_id, lease_token, status FROM stageflow.tasks", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    let tokens = shared.tokens.lock().unwrap();
    let mut found = Vec::new();
    for (task_id, seen) in tokens.iter() {
        let distinct: HashSet<i64> = seen.iter().copied().collect();
        if distinct.len() != seen.len() {
            let mut sorted = seen.clone();
            sorted.sort();
            found.push(format!("task {task_id}: two claims got the same lease token: {sorted:?}"));
        }
        match current.get(task_id) {
            None => found.push(format!("task {task_id} was claimed but is gone")),
            Some((token, status)) => {
                let last = seen.iter().max().copied().unwrap_or(0);
                if *token != last {
                    found.push(format!("task {task_id} ({status}): lease_token {token}, but the last claim seen got {last} (all: {seen:?})"));
                }
            }
        }
    }
    for (task_id, (token, status)) in &current {
        if !tokens.contains_key(task_id) && *token != 0 {
            found.push(format!("task {task_id} ({status}) was never claimed but has lease_token {token}"));
        }
    }
    if !found.is_empty() {
        found.sort();
        problems.push(format!(
            "7. a lease token per claim, the last one current: {} violation(s), e.g.\n    {}",
            found.len(),
            found.iter().take(20).cloned().collect::<Vec<_>>().join("\n    ")
        ));
    }
}

// ---------------------------------------------------------------------------------------------
// One seed.

struct SeedRun {
    seed: u64,
    counters: Counters,
    statuses: BTreeMap<String, i64>,
    task_statuses: String,
    /// stages of more tasks than MESSAGE_WINDOW (their messages sent a window at a time)
    windowed_stages: i64,
    samples: BTreeMap<String, String>,
    chaos: Duration,
    drain: Duration,
}

fn run_seed(seed: u64, seconds: u64) -> SeedRun {
    let url = fresh_database(&format!("lease_torture_{seed}"));
    // Stages of more than 3 tasks get their messages 3 at a time (stageflow.message_windows), sent
    // by the claims as they go; smaller ones all at once.
    connect(&url)
        .batch_execute(&format!("ALTER DATABASE lease_torture_{seed} SET stageflow.message_window = {MESSAGE_WINDOW}"))
        .unwrap();
    let shared = Arc::new(Shared::default());
    let mut admin = Session::new(&url, "admin", Rng::new(seed, 0), "", shared.clone());
    register(&mut admin.client, "tort_a", TYPE_A);
    register(&mut admin.client, "tort_b", TYPE_B);
    for index in 0..JOBS_AT_START {
        submit_job(&mut admin, seed, index);
    }

    let started = Instant::now();
    let mut handles = Vec::new();
    for w in 0..WORKERS {
        let session = Session::new(&url, &format!("w{w}"), Rng::new(seed, 10 + w as u64), "", shared.clone());
        handles.push(thread::spawn(move || session.work()));
    }
    let maintainer = Session::new(&url, "maintenance", Rng::new(seed, 1), "", shared.clone());
    handles.push(thread::spawn(move || maintain(maintainer)));
    let meddler = Session::new(&url, "meddler", Rng::new(seed, 2), "", shared.clone());
    handles.push(thread::spawn(move || cancel_and_retry(meddler, seed, seconds)));

    thread::sleep(Duration::from_secs(seconds));
    shared.stop.store(true, Ordering::Relaxed);
    let mut counters = std::mem::take(&mut admin.counters);
    for handle in handles {
        counters.merge(handle.join().expect("a chaos thread panicked"));
    }
    let chaos = started.elapsed();

    let drain_started = Instant::now();
    let mut drainer = Session::new(&url, "drain", Rng::new(seed, 3), "drain: ", shared.clone());
    let drained = drain(&mut drainer);
    let drain_time = drain_started.elapsed();
    if drained.is_ok() {
        // Invariant 4 is checked after maintenance has had its say: its reconciler walks the
        // tasks and each queue's messages max_rows (1000) at a time, so this many rounds cover
        // every row whatever its cursors' positions.
        let tasks: i64 = drainer.client.query_one("SELECT count(*) FROM stageflow.tasks", &[]).unwrap().get(0);
        let messages: i64 = drainer.client.query_one("SELECT count(*) FROM pgmq.q_torture", &[]).unwrap().get(0);
        for _ in 0..(tasks.max(messages) / 1000 + 2) {
            drainer.maintenance();
        }
    }
    counters.merge(std::mem::take(&mut drainer.counters));

    // The errors run_maintenance counted in its answer arrived as WARNINGs naming their SQLSTATE.
    let warnings = shared.warnings.lock().unwrap().clone();
    let maintenance_errors = counters.sum("maintenance errors") + counters.get("drain: maintenance errors");
    if maintenance_errors > warnings.len() as u64 {
        shared.error(format!(
            "run_maintenance counted {maintenance_errors} errors but only {} WARNINGs arrived: {warnings:?}",
            warnings.len()
        ));
    }
    for (who, message) in &warnings {
        match ["40P01", "40001"].iter().find(|code| message.contains(&format!("SQLSTATE {code}"))) {
            Some(code) => counters.add(format!("maintenance units lost to {code} (WARNINGs)"), 1),
            None => shared.error(format!("{who}: the server warned: {message}")),
        }
    }

    let statuses: BTreeMap<String, i64> = admin
        .client
        .query("SELECT status, count(*) FROM stageflow.jobs GROUP BY status ORDER BY status", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let task_statuses: Vec<String> = admin
        .client
        .query("SELECT status, count(*) FROM stageflow.tasks GROUP BY status ORDER BY status", &[])
        .unwrap()
        .iter()
        .map(|r| format!("{} {}", r.get::<_, String>(0), r.get::<_, i64>(1)))
        .collect();

    let windowed_stages: i64 = admin
        .client
        .query_one("SELECT count(*) FROM stageflow.stages WHERE task_count > $1", &[&MESSAGE_WINDOW])
        .unwrap()
        .get(0);

    let run = SeedRun {
        seed,
        counters,
        statuses,
        task_statuses: task_statuses.join(", "),
        windowed_stages,
        samples: shared.samples.lock().unwrap().clone(),
        chaos,
        drain: drain_time,
    };
    report(&run);

    // Everything that went wrong, in one message: the errors seen during the run, then (if
    // every job ended) the invariants.
    let mut failures = Vec::new();
    if run.windowed_stages == 0 {
        failures.push(format!("no stage had more than {MESSAGE_WINDOW} tasks: no message window was tested"));
    }
    let errors = shared.errors.lock().unwrap().clone();
    if !errors.is_empty() {
        let more = if errors.len() > 30 { format!("\n  ... and {} more", errors.len() - 30) } else { String::new() };
        failures.push(format!(
            "{}{} error(s) during the run (SQLSTATEs other than 55000/40P01/40001, or contract violations):\n  {}{more}",
            errors.len(),
            if errors.len() >= 200 { " (at least)" } else { "" },
            errors[..errors.len().min(30)].join("\n  ")
        ));
    }
    match drained {
        Err(dump) => failures.push(format!(
            "jobs still open {} s after the chaos stopped; what is stuck:\n{dump}",
            DRAIN_TIMEOUT.as_secs()
        )),
        Ok(()) => {
            let problems = check_invariants(&mut admin.client, &shared);
            if !problems.is_empty() {
                failures.push(format!("invariants broken:\n{}", problems.join("\n")));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "seed {seed} (database lease_torture_{seed} is left as it was): {}",
        failures.join("\n")
    );
    run
}

fn report(run: &SeedRun) {
    let c = &run.counters;
    eprintln!(
        "=== lease torture, seed {} ({:.1} s of chaos, {:.1} s of drain)",
        run.seed,
        run.chaos.as_secs_f64(),
        run.drain.as_secs_f64()
    );
    eprintln!("  jobs ended: {:?}; tasks: {}", run.statuses, run.task_statuses);
    for (key, value) in &c.0 {
        eprintln!("  {key}: {value}");
    }
    for (op, message) in &run.samples {
        eprintln!("  first refusal of {op}: {message}");
    }
    eprintln!("{}", summary_line(run));
}

fn summary_line(run: &SeedRun) -> String {
    let c = &run.counters;
    format!(
        "lease torture seed {}: {} jobs {:?}; {} tasks claimed ({} late commits, {} expiries observed); {} + {} batch completions accepted \
         ({} repeats); {} refused ({} superseded); {} releases; {} heartbeats; {} fails; {} cancels, {} retries; {} maintenance rounds; \
         {} conflicts; reconciler: {} tasks cancelled, {} messages deleted; drain completed {}; {} stages sent in windows",
        run.seed,
        run.statuses.values().sum::<i64>(),
        run.statuses,
        c.get("tasks claimed") + c.get("drain: tasks claimed"),
        c.get("claims committed late"),
        c.sum("lease expiries observed") + c.sum("drain: lease expiries observed"),
        c.get("completions accepted"),
        c.get("batch completions accepted"),
        c.get("repeated completions accepted (idempotent)"),
        c.sum("refused ") + c.sum("drain: refused "),
        c.0.iter().filter(|(k, _)| k.contains("refused") && k.contains("superseded")).map(|(_, v)| v).sum::<u64>(),
        c.get("releases accepted"),
        c.get("heartbeats extended"),
        c.sum("fail ("),
        c.get("jobs cancelled"),
        c.get("ended jobs retried") + c.get("running jobs retried"),
        c.get("maintenance rounds") + c.get("drain: maintenance rounds"),
        c.0.iter().filter(|(k, _)| k.contains("conflicts ")).map(|(_, v)| v).sum::<u64>(),
        c.get("maintenance tasks_cancelled") + c.get("drain: maintenance tasks_cancelled"),
        c.get("maintenance messages_deleted") + c.get("drain: maintenance messages_deleted"),
        c.get("drain: batch completions accepted"),
        run.windowed_stages,
    )
}

#[test]
fn leases_hold_under_randomized_torture() {
    let (seeds, seconds) = torture_seeds_and_seconds();
    let mut runs = Vec::new();
    for seed in seeds {
        runs.push(run_seed(seed, seconds));
    }
    // The run must have exercised what it is about: leases that ran out under a holder, and
    // reports of a superseded lease refused.
    if seconds >= 10 {
        let expiries: u64 = runs.iter().map(|r| r.counters.sum("lease expiries observed")).sum();
        let superseded: u64 = runs
            .iter()
            .flat_map(|r| r.counters.0.iter())
            .filter(|(k, _)| k.contains("refused") && k.contains("superseded"))
            .map(|(_, v)| v)
            .sum();
        assert!(
            expiries > 0 && superseded > 0,
            "the torture exercised nothing: {expiries} expiries, {superseded} superseded reports refused"
        );
    }
    // Written past the test harness's capture, so that it shows on success too.
    for run in &runs {
        let _ = writeln!(std::io::stderr(), "{}", summary_line(run));
    }
}

// ---------------------------------------------------------------------------------------------
// The fencing of fail_task, case by case (what the torture finds by chance, made certain).

const ONE_TASK: &str = r#"{
    "parameters": {"type": "object", "properties": {"n": {"type": "integer"}, "case": {"type": "integer"}}},
    "retry": {"max_attempts": 3},
    "stages": [{"name": "only", "handler": "fence.only", "queue": "fence", "fan_out": "count", "param": "n"}]
}"#;

/// Claims the job's one task as `worker`; returns (task_id, lease_token).
fn claim_one(client: &mut Client, worker: &str, lease: i32) -> (String, i64) {
    let row = client
        .query_one("SELECT task_id, lease_token FROM stageflow.claim_tasks('fence', 1, $1, $2)", &[&lease, &worker])
        .unwrap_or_else(|e| panic!("claim as {worker}: {e}"));
    (row.get(0), row.get(1))
}

/// The task row as text: what a refused report must leave as it was.
fn task_row(client: &mut Client, task_id: &str) -> String {
    client
        .query_one(
            "SELECT format('%s attempt %s lease %s error %s errors %s', status, attempt, lease_token, error, errors)
               FROM stageflow.tasks WHERE task_id = $1",
            &[&task_id],
        )
        .unwrap()
        .get(0)
}

/// fail_task under `token` must be refused with 55000 and change nothing.
fn assert_fail_refused(client: &mut Client, case: &str, task_id: &str, worker: &str, token: i64, retryable: bool) {
    let before = task_row(client, task_id);
    let error = json!({"message": format!("{worker} fails under lease {token}")});
    match client.query_one("SELECT stageflow.fail_task($1, $2, $3, $4, $5)", &[&task_id, &error, &retryable, &worker, &token]) {
        Ok(row) => panic!(
            "{case}: fail_task(retryable {retryable}) by {worker} under lease {token}, a lease that is over, was accepted \
             instead of refused with 55000; it answered {} while the task is {}",
            row.get::<_, Value>(0),
            task_row(client, task_id)
        ),
        Err(e) => {
            let (code, message, _) = db_error(&e);
            assert_eq!(code, "55000", "{case}: {message}");
        }
    }
    assert_eq!(task_row(client, task_id), before, "{case}: a refused report changed the task");
}

/// A lease that ended while its task went back to the queue under the same token (the job was
/// cancelled and retried; the holder released it): the token is the task's current one, but the
/// task is not running, so the lease is over and a failure reported under it is refused.
#[test]
fn a_fenced_failure_under_a_lease_that_ended_in_the_queue_is_refused() {
    let url = fresh_database("lease_fence_requeued");
    let mut client = connect(&url);
    register(&mut client, "fence", ONE_TASK);

    // Cancelled while A held it, then retried: queued again, under A's token still.
    let job_id = submit(&mut client, "fence", json!({"n": 1, "case": 1}));
    let (task_id, token) = claim_one(&mut client, "A", 60);
    json(&mut client, "SELECT stageflow.cancel_job($1)", &[&job_id]);
    json(&mut client, "SELECT stageflow.retry_job($1)", &[&job_id]);
    for retryable in [false, true] {
        assert_fail_refused(&mut client, "cancelled and retried", &task_id, "A", token, retryable);
    }
    // (a completion under it is refused, as it should be)
    let refused =
        client.query_one("SELECT stageflow.complete_task_and_check_stage($1, '{}', 'A', $2)", &[&task_id, &token]);
    assert_eq!(refused.map_err(|e| db_error(&e).0).err().as_deref(), Some("55000"), "cancelled and retried: complete");
    json(&mut client, "SELECT stageflow.cancel_job($1)", &[&job_id]); // out of the next case's way

    // Released by its holder B, who then reports a failure under the released lease.
    submit(&mut client, "fence", json!({"n": 1, "case": 2}));
    let (task_id, token) = claim_one(&mut client, "B", 60);
    let released: i32 = client
        .query_one("SELECT stageflow.release_tasks(ARRAY[$1], 'B', ARRAY[$2::bigint])", &[&task_id, &token])
        .unwrap()
        .get(0);
    assert_eq!(released, 1);
    for retryable in [false, true] {
        assert_fail_refused(&mut client, "released", &task_id, "B", token, retryable);
    }
}

/// The lease of a task's last attempt expired and maintenance dead-lettered the task: its
/// holder's late failure is refused, not answered with the dead letter's report as if it had been
/// recorded (the task's error is the expired lease, not the holder's).
#[test]
fn a_fenced_failure_after_its_task_was_dead_lettered_is_refused() {
    let url = fresh_database("lease_fence_dead");
    let mut client = connect(&url);
    register(&mut client, "fence", &ONE_TASK.replace(r#""max_attempts": 3"#, r#""max_attempts": 1"#));
    submit(&mut client, "fence", json!({"n": 1, "case": 3}));
    let (task_id, token) = claim_one(&mut client, "C", 1);
    client.batch_execute("SET stageflow.fake_now = '2099-01-01 00:00:00+00'").unwrap();
    let maintenance = json(&mut client, "SELECT stageflow.run_maintenance()", &[]);
    client.batch_execute("RESET stageflow.fake_now").unwrap();
    assert_eq!(maintenance["dead_lettered"], json!(1), "{maintenance}");
    for retryable in [false, true] {
        assert_fail_refused(&mut client, "dead-lettered", &task_id, "C", token, retryable);
    }
}
