//! Exactly-once effects of database work: a job of 1,500 tasks whose handler, the transactional
//! `debug.insert_row`, inserts one row per task in its completion's transaction, run by four
//! `stageflow worker` processes on 1-second leases, while a worker is disturbed after every 50 to
//! 99 completed tasks, in turn killed with SIGKILL (and started again) or paused with SIGSTOP for
//! longer than its leases and then let go with SIGCONT, so that its tasks are claimed again by the
//! others while it still holds them, and it finishes its handlers and completes them late, under
//! leases that are no longer theirs.
//!
//! At the end the job is completed and the table holds exactly one row per task, though handlers
//! ran (and inserted) more often than that: every insert takes a number from a sequence, which a
//! rollback does not give back, so the sequence counts the rows written and the table those that
//! committed. The workers log in as a role of their own, which has no rights on `stageflow`'s
//! tables: the test grants it the target table.

// Test code: a panic (unwrap, expect) is how a test reports a failure.
#![allow(clippy::unwrap_used)]

use std::process::Child;
use std::time::{Duration, Instant};

use serde_json::json;
use stageflow_tests::{connect, fresh_database, job_status, register, submit, url_as, Rng, ROLE_PASSWORD};

mod common;
use common::{signal, spawn_worker};

/// The disturbed workers: four handlers each, leases of 1 s.
const WORKER_ARGS: &[&str] = &["--queue", "effects", "--concurrency", "4", "--lease-seconds", "1"];

const TASKS: i64 = 1500;
const WORKERS: usize = 4;
/// A worker is disturbed after every DISTURB_EVERY_MIN to DISTURB_EVERY_MIN + DISTURB_EVERY_SPREAD
/// - 1 completed tasks.
const DISTURB_EVERY_MIN: i64 = 50;
const DISTURB_EVERY_SPREAD: u64 = 50;
/// How long a paused worker stays stopped: well past its 1-second leases.
const PAUSE: Duration = Duration::from_millis(2500);
const ROLE: &str = "sf_effects_worker";

#[test]
fn database_work_commits_once_per_task_under_killed_and_stale_workers() {
    let url = fresh_database("exactly_once");
    let mut admin = connect(&url);
    admin
        .batch_execute(&format!(
            "DROP ROLE IF EXISTS {ROLE};
             CREATE ROLE {ROLE} LOGIN PASSWORD '{ROLE_PASSWORD}' IN ROLE stageflow_worker;
             CREATE SEQUENCE effect_writes;
             CREATE TABLE effects (task_id text NOT NULL, lease_token bigint NOT NULL,
                                   write_no bigint NOT NULL DEFAULT nextval('effect_writes'));
             GRANT INSERT ON effects TO {ROLE};
             GRANT USAGE ON SEQUENCE effect_writes TO {ROLE};"
        ))
        .unwrap();
    register(
        &mut admin,
        "effects",
        r#"{"retry": {"max_attempts": 50, "backoff_base_seconds": 0.05, "backoff_max_seconds": 0.5},
            "parameters": {"type": "object", "properties": {"n": {"type": "integer"}, "ms": {"type": "integer"},
                                                            "table": {"type": "string"}}},
            "stages": [{"name": "write", "handler": "debug.insert_row", "queue": "effects", "fan_out": "count",
                        "param": "n"}]}"#,
    );
    admin.batch_execute(&format!("SELECT stageflow.grant_queue('effects', '{ROLE}')")).unwrap();
    // The worker's login cannot read or write stageflow's tables: what it writes, it was granted.
    let worker_url = url_as(&url, ROLE);
    let mut as_worker = connect(&worker_url);
    let refused = as_worker.batch_execute("SELECT count(*) FROM stageflow.tasks").unwrap_err();
    assert_eq!(refused.code().map(|c| c.code()), Some("42501"));
    drop(as_worker);

    let job_id = submit(&mut admin, "effects", json!({"n": TASKS, "ms": 20, "table": "effects"}));
    let logs = std::env::temp_dir().join("stageflow-exactly-once");
    let _ = std::fs::remove_dir_all(&logs);
    std::fs::create_dir_all(&logs).unwrap();

    let mut rng = Rng::new(0x5EED_F00D_1234_5679, 0);
    let mut workers: Vec<Child> =
        (0..WORKERS).map(|i| spawn_worker(&worker_url, &logs, &format!("w{i}"), WORKER_ARGS)).collect();
    // When each paused worker is let go.
    let mut paused: Vec<Option<Instant>> = vec![None; WORKERS];
    let (mut kills, mut pauses) = (0, 0);
    let start = Instant::now();
    let mut next_disturbance = DISTURB_EVERY_MIN + rng.below(DISTURB_EVERY_SPREAD) as i64;
    loop {
        assert!(start.elapsed() < Duration::from_secs(300), "the job did not finish in 5 minutes");
        for (worker, until) in workers.iter().zip(paused.iter_mut()) {
            if until.is_some_and(|until| Instant::now() >= until) {
                signal(worker, "CONT");
                *until = None;
            }
        }
        let status = job_status(&mut admin, &job_id);
        if status["status"] != json!("processing") && status["status"] != json!("queued") {
            break;
        }
        let completed = status["stages"][0]["tasks"]["completed"].as_i64().unwrap_or(0);
        if completed >= next_disturbance {
            let victim = rng.below(WORKERS as u64) as usize;
            if paused[victim].is_none() {
                if (kills + pauses) % 2 == 0 {
                    workers[victim].kill().unwrap();
                    workers[victim].wait().unwrap();
                    workers[victim] = spawn_worker(&worker_url, &logs, &format!("w{victim}"), WORKER_ARGS);
                    kills += 1;
                } else {
                    signal(&workers[victim], "STOP");
                    paused[victim] = Some(Instant::now() + PAUSE);
                    pauses += 1;
                }
            }
            next_disturbance += DISTURB_EVERY_MIN + rng.below(DISTURB_EVERY_SPREAD) as i64;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for worker in &mut workers {
        worker.kill().unwrap();
        worker.wait().unwrap();
    }

    let status = job_status(&mut admin, &job_id);
    assert_eq!(status["status"], json!("completed"), "{status}");
    let row = admin
        .query_one(
            "SELECT count(*), count(DISTINCT task_id),
                    (SELECT count(*) FROM stageflow.tasks WHERE job_id = $1 AND status = 'completed'),
                    (SELECT count(*) FROM stageflow.tasks AS t WHERE t.job_id = $1 AND t.status = 'completed'
                        AND EXISTS (SELECT FROM effects AS e WHERE e.task_id = t.task_id)),
                    (SELECT count(*) FROM stageflow.tasks WHERE job_id = $1 AND attempt > 1),
                    (SELECT last_value FROM effect_writes)
               FROM effects",
            &[&job_id],
        )
        .unwrap();
    let (rows, distinct, completed, completed_with_row, claimed_again, writes): (i64, i64, i64, i64, i64, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4), row.get(5));
    let refused_completions: usize = (0..WORKERS)
        .map(|i| std::fs::read_to_string(logs.join(format!("w{i}.log"))).unwrap_or_default())
        .map(|log| log.matches("its transaction rolled back").count())
        .sum();
    println!(
        "{TASKS} tasks under {kills} SIGKILLs and {pauses} SIGSTOPs of {PAUSE:?}: {rows} rows ({} duplicates) for \
         {completed} completed tasks; {writes} rows written by handlers, {} rolled back; {claimed_again} tasks \
         claimed more than once; {refused_completions} late completions refused and rolled back; {:.1} s",
        rows - distinct,
        writes - rows,
        start.elapsed().as_secs_f64()
    );
    assert_eq!(completed, TASKS, "every task completed");
    assert_eq!(rows - distinct, 0, "no task's row was written twice");
    assert_eq!(
        (rows, completed_with_row),
        (TASKS, TASKS),
        "exactly one row per task, and every completed task has one"
    );
    assert!(kills > 0 && pauses > 0, "the schedule disturbed no worker; make the job longer");
    assert!(writes > rows, "no handler's write was rolled back: the test did not exercise a re-run");
    assert!(refused_completions > 0, "no late completion was refused: the test did not exercise a stale worker");
}

/// A transactional handler that waits in the database past its stage's timeout is stopped there:
/// the worker cancels its query, rolls its transaction back and reports the timeout, while the
/// lock it waits for is still held (before, the rollback queued behind the waiting query until
/// the lock was let go, and the task stayed running with its lease extended). The time it takes is
/// the one thing this test times: it tells a cancelled query from one left to run.
#[test]
fn a_transactional_handler_stuck_in_the_database_times_out() {
    let url = fresh_database("exactly_once_timeout");
    let mut admin = connect(&url);
    let role = "sf_stuck_worker";
    admin
        .batch_execute(&format!(
            "DROP ROLE IF EXISTS {role};
             CREATE ROLE {role} LOGIN PASSWORD '{ROLE_PASSWORD}' IN ROLE stageflow_worker;
             CREATE TABLE stuck_effects (task_id text NOT NULL, lease_token bigint NOT NULL);
             GRANT INSERT ON stuck_effects TO {role};"
        ))
        .unwrap();
    register(
        &mut admin,
        "stuck",
        r#"{"retry": {"max_attempts": 1},
            "parameters": {"type": "object", "properties": {"ms": {"type": "integer"}, "table": {"type": "string"}}},
            "stages": [{"name": "write", "handler": "debug.insert_row", "queue": "stuck", "timeout_seconds": 1}]}"#,
    );
    admin.batch_execute(&format!("SELECT stageflow.grant_queue('stuck', '{role}')")).unwrap();
    // The table the handler writes is locked until the end of the test.
    let mut holder = connect(&url);
    holder.batch_execute("BEGIN; LOCK TABLE stuck_effects IN ACCESS EXCLUSIVE MODE").unwrap();

    let job_id = submit(&mut admin, "stuck", json!({"ms": 0, "table": "stuck_effects"}));
    let worker_url = url_as(&url, role);
    let logs = std::env::temp_dir().join("stageflow-exactly-once-timeout");
    let _ = std::fs::remove_dir_all(&logs);
    std::fs::create_dir_all(&logs).unwrap();
    let mut worker =
        spawn_worker(&worker_url, &logs, "stuck", &["--queue", "stuck", "--concurrency", "1", "--lease-seconds", "30"]);
    let start = Instant::now();
    let status = loop {
        let status = job_status(&mut admin, &job_id);
        if status["status"] != json!("processing") && status["status"] != json!("queued") {
            break status;
        }
        // A second for the timeout, the worker's start and a poll or two; not the five seconds
        // the worker would give a rollback stuck behind the query before closing the connection.
        assert!(
            start.elapsed() < Duration::from_millis(4500),
            "the handler stuck in the database was not stopped: {status}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    worker.kill().unwrap();
    worker.wait().unwrap();
    assert_eq!(status["status"], json!("failed"), "{status}");
    let error: serde_json::Value =
        admin.query_one("SELECT error FROM stageflow.tasks WHERE job_id = $1", &[&job_id]).unwrap().get(0);
    assert_eq!(error["type"], json!("timeout"), "{error}");
    // Still locked: the worker gave up while the lock was held.
    holder.batch_execute("ROLLBACK").unwrap();
    let rows: i64 = admin.query_one("SELECT count(*) FROM stuck_effects", &[]).unwrap().get(0);
    assert_eq!(rows, 0, "the timed-out handler's write rolled back");
}
