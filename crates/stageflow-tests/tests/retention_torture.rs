//! Retention torture: the same work submitted again and again while retention deletes its
//! earlier jobs, with workers that hold leases across the deletion, then the lease tokens checked.
//!
//! Per seed, on a database of its own: one job type `rt` (one `count` stage of 3 tasks), submitted
//! with only four different params, so the same job ids and task ids come back in every life of a
//! job. Until at least 8 tasks have each been claimed in two lives and 8 reports under a deleted
//! life's lease have been refused (or `STAGEFLOW_TORTURE_SECONDS`, default 20, have passed, which
//! fails):
//! - four workers claim with 1-second leases; each task is completed at once, or failed, or
//!   released, or held past its lease (a report that comes late), or kept for up to 2.5 seconds
//!   and reported then (a worker that still holds a lease of a job cancelled and deleted
//!   meanwhile); every report is fenced with the claim's `lease_token`;
//! - one session submits the four jobs again and again and cancels running ones;
//! - one session runs `run_maintenance()` every 30-120 ms with `stageflow.retention` at 200 ms,
//!   so an ended job is deleted within a few rounds and its next submission makes its tasks anew.
//!
//! Checked: no claim ever got a (task id, lease token) that another claim got, in any life of
//! the task (a report is accepted only under the task's current token: a token handed out twice
//! lets the first holder's report be taken for the second's lease); no report was refused for a
//! reason other than a lease that is over, a task or job that is gone (55000, 42704) or a
//! conflict a caller retries (40P01, 40001, counted and printed); no other error, and no
//! maintenance round or unit failed but for such a conflict. A new life of a task is seen as a
//! jump of its tokens: within a life each claim adds one, and this test sees every claim. Before
//! `stageflow.lease_token_floor`, a task made again counted its tokens from 0 and this failed
//! within seconds.

// Test code: a panic (unwrap, expect) is how a test reports a failure.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use postgres::Client;
use serde_json::json;
use stageflow_tests::*;

const QUEUE: &str = "rt";
const WORKERS: u64 = 4;
const JOB_TYPE: &str = r#"{
    "parameters": {"type": "object", "properties": {"n": {"type": "integer"}, "k": {"type": "integer"}}},
    "retry": {"max_attempts": 4, "backoff_base_seconds": 0.05},
    "stages": [{"name": "s", "handler": "h", "queue": "rt", "fan_out": "count", "param": "n", "max_failed_tasks": 3}]
}"#;

/// SQLSTATEs a report may be refused with here: a lease that is over or a task no longer open
/// (55000), a task or job retention deleted (42704).
const REFUSALS: [&str; 2] = ["55000", "42704"];
/// Conflicts a caller makes its call again for (counted, not failures).
const CONFLICTS: [&str; 2] = ["40P01", "40001"];

#[derive(Default)]
struct Seen {
    /// Every claim: (task id, lease token) -> how many claims got it.
    claims: HashMap<(String, i64), u32>,
    /// Each task's tokens, as claims got them.
    tokens: HashMap<String, Vec<i64>>,
    /// Reports refused with an unexpected SQLSTATE, and other failures.
    unexpected: Vec<String>,
    /// Conflicts (40P01, 40001) by where they happened.
    conflicts: HashMap<String, u64>,
    accepted: u64,
    refused: u64,
    /// Reports refused whose lease was of a life of the task that a later claim's token shows over.
    refused_across_lives: u64,
}

impl Seen {
    /// Whether `task_id` was claimed in a later life than the one `token` belongs to: above it, its
    /// tokens as seen so far jump by more than one (within a life, each claim adds one).
    fn later_life(&self, task_id: &str, token: i64) -> bool {
        let Some(tokens) = self.tokens.get(task_id) else { return false };
        let mut sorted = tokens.clone();
        sorted.sort_unstable();
        sorted.dedup();
        // the lives: runs of tokens that go up by one
        sorted.windows(2).any(|w| w[0] >= token && w[1] > w[0] + 1)
    }

    /// Tasks claimed in two lives or more.
    fn reborn(&self) -> usize {
        self.tokens
            .values()
            .filter(|tokens| {
                let mut sorted = (*tokens).clone();
                sorted.sort_unstable();
                sorted.dedup();
                sorted.windows(2).any(|w| w[1] > w[0] + 1)
            })
            .count()
    }

    fn conflict(&mut self, site: &str) {
        *self.conflicts.entry(site.to_owned()).or_default() += 1;
    }
}

fn sqlstate(error: &postgres::Error) -> String {
    error
        .as_db_error()
        .map(|db| db.code().code().to_owned())
        .unwrap_or_else(|| format!("not a database error: {error}"))
}

/// Runs `sql` with `params`; Ok(()) or the error's SQLSTATE.
fn report(client: &mut Client, sql: &str, params: &[&(dyn postgres::types::ToSql + Sync)]) -> Result<(), String> {
    client.execute(sql, params).map(|_| ()).map_err(|e| sqlstate(&e))
}

fn worker(url: String, seed: u64, n: u64, stop: Arc<AtomicBool>, seen: Arc<Mutex<Seen>>) {
    let mut rng = Rng::new(seed, n);
    let mut client = connect(&url);
    let worker_id = format!("w{n}");
    // Tasks held for a late report: (task id, token, when to report).
    let mut held: Vec<(String, i64, Instant)> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let claimed: Vec<(String, i64)> = match client
            .query("SELECT task_id, lease_token FROM stageflow.claim_tasks($1, 3, 1, $2)", &[&QUEUE, &worker_id])
        {
            Ok(rows) => rows.iter().map(|r| (r.get(0), r.get(1))).collect(),
            Err(e) => {
                let mut seen = seen.lock().unwrap();
                match sqlstate(&e) {
                    code if CONFLICTS.contains(&code.as_str()) => seen.conflict(&format!("claim {code}")),
                    _ => seen.unexpected.push(format!("claim: {e}")),
                }
                Vec::new()
            }
        };
        {
            let mut seen = seen.lock().unwrap();
            for (task_id, token) in &claimed {
                *seen.claims.entry((task_id.clone(), *token)).or_default() += 1;
                seen.tokens.entry(task_id.clone()).or_default().push(*token);
            }
        }
        let now = Instant::now();
        for (task_id, token) in claimed {
            match rng.below(10) {
                0..=4 => held.push((task_id, token, now)),
                5 | 6 => held.push((task_id, token, now + Duration::from_millis(rng.range(200, 1500)))),
                _ => held.push((task_id, token, now + Duration::from_millis(rng.range(1500, 2500)))),
            }
        }
        let due: Vec<(String, i64, Instant)> = {
            let now = Instant::now();
            let (due, later) = held.drain(..).partition(|(_, _, at)| *at <= now);
            held = later;
            due
        };
        for (task_id, token, _) in due {
            let outcome = match rng.below(10) {
                0..=6 => report(
                    &mut client,
                    "SELECT stageflow.complete_task_and_check_stage($1, $2, $3, $4)",
                    &[&task_id, &json!({"by": worker_id, "token": token}), &worker_id, &token],
                ),
                7 | 8 => report(
                    &mut client,
                    "SELECT stageflow.fail_task($1, $2, $3, $4, $5)",
                    &[&task_id, &json!({"message": "no"}), &rng.chance(0.7), &worker_id, &token],
                ),
                _ => report(
                    &mut client,
                    "SELECT stageflow.release_tasks(ARRAY[$1], $2, ARRAY[$3::bigint])",
                    &[&task_id, &worker_id, &token],
                ),
            };
            let mut seen = seen.lock().unwrap();
            match outcome {
                Ok(()) => seen.accepted += 1,
                Err(code) if REFUSALS.contains(&code.as_str()) => {
                    seen.refused += 1;
                    if seen.later_life(&task_id, token) {
                        seen.refused_across_lives += 1;
                    }
                }
                Err(code) if CONFLICTS.contains(&code.as_str()) => seen.conflict(&format!("report {code}")),
                Err(code) => seen.unexpected.push(format!("report of {task_id} under lease {token}: {code}")),
            }
        }
        thread::sleep(Duration::from_millis(rng.range(0, 20)));
    }
}

fn submitter(url: String, seed: u64, stop: Arc<AtomicBool>, seen: Arc<Mutex<Seen>>) {
    let mut rng = Rng::new(seed, 100);
    let mut client = connect(&url);
    while !stop.load(Ordering::Relaxed) {
        let params = json!({"n": 3, "k": rng.below(4)});
        if let Err(e) = client.query_one("SELECT stageflow.submit_job('rt', $1)", &[&params]) {
            let mut seen = seen.lock().unwrap();
            match sqlstate(&e) {
                code if CONFLICTS.contains(&code.as_str()) => seen.conflict(&format!("submit {code}")),
                code => seen.unexpected.push(format!(
                    "submit {params}: {code} {}",
                    e.as_db_error().map_or_else(|| e.to_string(), |db| db.message().to_owned())
                )),
            }
        }
        if rng.chance(0.4) {
            let params = json!({"n": 3, "k": rng.below(4)});
            let sql = "SELECT stageflow.cancel_job(stageflow.job_id('rt', $1)) \
                       WHERE EXISTS (SELECT 1 FROM stageflow.jobs WHERE job_id = stageflow.job_id('rt', $1) \
                                     AND status IN ('queued', 'processing'))";
            if let Err(code) = report(&mut client, sql, &[&params]) {
                let mut seen = seen.lock().unwrap();
                match code {
                    // (retention deleted it meanwhile, or it ended)
                    code if REFUSALS.contains(&code.as_str()) => {}
                    code if CONFLICTS.contains(&code.as_str()) => seen.conflict(&format!("cancel {code}")),
                    code => seen.unexpected.push(format!("cancel {params}: {code}")),
                }
            }
        }
        thread::sleep(Duration::from_millis(rng.range(20, 150)));
    }
}

fn maintenance(url: String, seed: u64, stop: Arc<AtomicBool>, seen: Arc<Mutex<Seen>>) -> u64 {
    let mut rng = Rng::new(seed, 200);
    // A unit of a round that fails is counted in its "errors" and named in a WARNING with its
    // SQLSTATE: a conflict is the documented exception, anything else a failure.
    let mut config: postgres::Config = url.parse().unwrap();
    let listener = seen.clone();
    config.notice_callback(move |notice| {
        if notice.severity() == "WARNING" {
            let mut seen = listener.lock().unwrap();
            match CONFLICTS.iter().find(|code| notice.message().contains(&format!("SQLSTATE {code}"))) {
                Some(code) => seen.conflict(&format!("maintenance unit {code}")),
                None => seen.unexpected.push(format!("maintenance warned: {}", notice.message())),
            }
        }
    });
    let mut client = config.connect(postgres::NoTls).unwrap();
    client
        .batch_execute("SET stageflow.retention = '200 milliseconds'; SET stageflow.retention_batch_size = 2")
        .unwrap();
    let mut jobs_deleted = 0;
    while !stop.load(Ordering::Relaxed) {
        match client.query_one("SELECT stageflow.run_maintenance()", &[]) {
            Ok(row) => {
                let round: serde_json::Value = row.get(0);
                jobs_deleted += round["jobs_deleted"].as_u64().unwrap_or(0);
                if let Some(code) = round.get("error").map(|error| error["sqlstate"].as_str().unwrap_or_default()) {
                    let mut seen = seen.lock().unwrap();
                    match code {
                        code if CONFLICTS.contains(&code) => seen.conflict(&format!("maintenance round {code}")),
                        _ => seen.unexpected.push(format!("maintenance round: {round}")),
                    }
                }
            }
            Err(e) => seen.lock().unwrap().unexpected.push(format!("run_maintenance: {e}")),
        }
        thread::sleep(Duration::from_millis(rng.range(30, 120)));
    }
    jobs_deleted
}

#[test]
fn tokens_are_never_handed_out_twice_while_retention_deletes_the_same_work_again_and_again() {
    let (seeds, seconds) = torture_seeds_and_seconds();
    for seed in seeds {
        let url = fresh_database(&format!("retention_torture_{seed}"));
        let mut client = connect(&url);
        register(&mut client, "rt", JOB_TYPE);
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let mut workers = Vec::new();
        for n in 0..WORKERS {
            let (url, stop, seen) = (url.clone(), stop.clone(), seen.clone());
            workers.push(thread::spawn(move || worker(url, seed, n, stop, seen)));
        }
        let submitting = {
            let (url, stop, seen) = (url.clone(), stop.clone(), seen.clone());
            thread::spawn(move || submitter(url, seed, stop, seen))
        };
        let maintaining = {
            let (url, stop, seen) = (url.clone(), stop.clone(), seen.clone());
            thread::spawn(move || maintenance(url, seed, stop, seen))
        };
        // Until the run has done what it is for (tasks made again and claimed in two lives, late
        // reports of a deleted life refused), or the time is up.
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(seconds) {
            thread::sleep(Duration::from_millis(200));
            let seen = seen.lock().unwrap();
            if seen.reborn() >= 8 && seen.refused_across_lives >= 8 {
                break;
            }
        }
        stop.store(true, Ordering::Relaxed);
        for worker in workers {
            worker.join().unwrap();
        }
        submitting.join().unwrap();
        let jobs_deleted = maintaining.join().unwrap();

        let seen = seen.lock().unwrap();
        let twice: Vec<_> = seen.claims.iter().filter(|(_, count)| **count > 1).collect();
        println!(
            "seed {seed} ({:.1} s): {} claims, {} tasks claimed in two lives or more, {} reports accepted, {} refused \
             ({} under a lease of a life that was over), {jobs_deleted} jobs deleted by retention, conflicts {:?}",
            start.elapsed().as_secs_f64(),
            seen.claims.values().sum::<u32>(),
            seen.reborn(),
            seen.accepted,
            seen.refused,
            seen.refused_across_lives,
            seen.conflicts
        );
        assert!(seen.unexpected.is_empty(), "seed {seed}: {:#?}", seen.unexpected);
        assert!(twice.is_empty(), "seed {seed}: lease tokens handed out twice: {twice:?}");
        // The run did what it is for.
        assert!(seen.reborn() >= 8, "seed {seed}: only {} tasks were claimed in two lives", seen.reborn());
        assert!(
            seen.refused_across_lives >= 8,
            "seed {seed}: only {} reports under a lease of a deleted life were refused",
            seen.refused_across_lives
        );
        drop(client);
        assert!(seen.accepted > 0, "seed {seed}");
    }
}
