//! `stageflow worker` processes against a real cluster: sharing a large job, claiming ahead of its
//! reports within a bound on the leases it holds, being killed with
//! SIGKILL mid-task, shutting down on SIGTERM, surviving a panicking handler and lost
//! connections, keeping a stage's short lease alive, losing a lease; and a worker written in plain
//! Python beside them.

// Test code: a panic (unwrap, expect) is how a test reports a failure.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use stageflow_tests::*;

mod common;
use common::{signal, spawn_worker};

const SLEEPY: &str = r#"{
    "parameters": {"type": "object", "properties": {"n": {"type": "integer"}, "ms": {"type": "integer"},
                                                    "marker_dir": {"type": "string"}, "run": {"type": "string"}}},
    "retry": {"max_attempts": 3, "backoff_base_seconds": 0.2},
    "stages": [{"name": "nap", "handler": "debug.sleep", "queue": "sleepy", "fan_out": "count", "param": "n"}]
}"#;

fn log_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("stageflow-worker-tests/{test}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Waits for a child to exit, up to `limit`; returns whether it exited with success.
fn wait_exit(child: &mut Child, limit: Duration) -> bool {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.success();
        }
        assert!(start.elapsed() < limit, "process {} did not exit within {limit:?}", child.id());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_until(limit: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn job_state(client: &mut postgres::Client, job_id: &str) -> String {
    job_status(client, job_id)["status"].as_str().unwrap().to_owned()
}

fn wait_for_job(client: &mut postgres::Client, job_id: &str, limit: Duration) -> Value {
    wait_until(limit, "the job to end", || matches!(job_state(client, job_id).as_str(), "completed" | "failed"));
    job_status(client, job_id)
}

fn running_by(client: &mut postgres::Client, job_id: &str, worker: &str) -> Vec<String> {
    client
        .query(
            "SELECT task_id FROM stageflow.tasks WHERE job_id = $1 AND status = 'running' AND worker_id = $2",
            &[&job_id, &worker],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[test]
fn several_worker_processes_run_every_task_of_a_large_job_once() {
    let url = fresh_database("workers_share");
    let logs = log_dir("workers_share");
    let mut client = connect(&url);
    let job_id = submit(&mut client, "hello_world", json!({"message": "shared", "n": 2000}));
    let mut workers: Vec<Child> =
        (0..3).map(|i| spawn_worker(&url, &logs, &format!("w{i}"), &["--concurrency", "4"])).collect();

    let status = wait_for_job(&mut client, &job_id, Duration::from_secs(180));
    assert_eq!(status["status"], json!("completed"), "{status}");
    let row = client
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE status = 'completed' AND attempt = 1), count(DISTINCT worker_id) \
               FROM stageflow.tasks WHERE job_id = $1",
            &[&job_id],
        )
        .unwrap();
    let (tasks, once, worker_count): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!((tasks, once), (4000, 4000), "every task completed on its first attempt");
    let split: Vec<(String, i64)> = client
        .query("SELECT worker_id, count(*) FROM stageflow.tasks WHERE job_id = $1 GROUP BY 1 ORDER BY 1", &[&job_id])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    println!("tasks per worker: {split:?}");
    assert!(worker_count >= 2, "the work was shared: {split:?}");
    assert_eq!(status["result_count"], json!(2000));
    assert_eq!(job_result(&mut client, &job_id).as_array().map(Vec::len), Some(2000));

    for worker in &workers {
        signal(worker, "TERM");
    }
    for worker in &mut workers {
        assert!(wait_exit(worker, Duration::from_secs(20)), "a worker exits 0 on SIGTERM");
    }
}

/// A handler's slot frees when it returns, so a worker with fast handlers claims the next batch
/// while the reporter is still sending the last one's outcomes; the finished tasks waiting for
/// their report are bounded (twice `--concurrency`), so the leases a worker holds are at most
/// three times its concurrency, whatever the speed of its handlers and of the database.
#[test]
fn a_worker_claims_ahead_of_its_reports_within_three_times_its_concurrency() {
    let url = fresh_database("workers_pipeline");
    let logs = log_dir("workers_pipeline");
    let mut client = connect(&url);
    register(&mut client, "sleepy", SLEEPY);
    let job_id = submit(&mut client, "sleepy", json!({"n": 1500, "ms": 0}));
    let mut worker =
        spawn_worker(&url, &logs, "ahead", &["--queue", "sleepy", "--concurrency", "4", "--batch-size", "8"]);

    let mut sampler = connect(&url);
    let (mut most, mut samples) = (0, 0);
    let start = Instant::now();
    while job_state(&mut client, &job_id) != "completed" {
        assert!(start.elapsed() < Duration::from_secs(120), "the job did not complete");
        let held = running_by(&mut sampler, &job_id, "ahead").len();
        most = most.max(held);
        samples += 1;
    }
    println!("leases held at once: at most {most} over {samples} samples");
    assert!(most <= 12, "a worker of concurrency 4 held {most} leases at once");
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE status = 'completed' AND attempt = 1), count(*) FROM stageflow.tasks WHERE job_id = $1",
            &[&job_id],
        )
        .unwrap();
    let (once, tasks): (i64, i64) = (row.get(0), row.get(1));
    assert_eq!((once, tasks), (1500, 1500), "every task completed on its first attempt");
    signal(&worker, "TERM");
    assert!(wait_exit(&mut worker, Duration::from_secs(20)), "the worker exits 0 on SIGTERM");
}

#[test]
fn a_worker_killed_mid_task_leaves_its_tasks_to_be_redelivered() {
    let url = fresh_database("workers_sigkill");
    let logs = log_dir("workers_sigkill");
    let markers = logs.join("markers");
    std::fs::create_dir_all(&markers).unwrap();
    let mut client = connect(&url);
    register(&mut client, "sleepy", SLEEPY);
    let job_id = submit(&mut client, "sleepy", json!({"n": 12, "ms": 1500, "marker_dir": markers.to_str().unwrap()}));

    let mut doomed =
        spawn_worker(&url, &logs, "doomed", &["--queue", "sleepy", "--concurrency", "4", "--lease-seconds", "2"]);
    // Mid-task: 4 tasks leased to it and all 4 handlers started (each writes its marker first).
    wait_until(Duration::from_secs(30), "the doomed worker to run 4 handlers", || {
        running_by(&mut client, &job_id, "doomed").len() == 4 && std::fs::read_dir(&markers).unwrap().count() == 4
    });
    let held = running_by(&mut client, &job_id, "doomed");
    signal(&doomed, "KILL");
    assert!(!wait_exit(&mut doomed, Duration::from_secs(10)), "SIGKILL is not a clean exit");

    let mut survivor =
        spawn_worker(&url, &logs, "survivor", &["--queue", "sleepy", "--concurrency", "4", "--lease-seconds", "2"]);
    let status = wait_for_job(&mut client, &job_id, Duration::from_secs(120));
    assert_eq!(status["status"], json!("completed"), "{status}");
    for task_id in &held {
        let row = client
            .query_one("SELECT status, attempt, worker_id FROM stageflow.tasks WHERE task_id = $1", &[task_id])
            .unwrap();
        let (state, attempt, worker): (String, i32, String) = (row.get(0), row.get(1), row.get(2));
        assert_eq!((state.as_str(), attempt, worker.as_str()), ("completed", 2, "survivor"), "{task_id}");
        let runs = std::fs::read_dir(&markers)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with(&format!("{task_id}.")))
            .count();
        assert_eq!(runs, 2, "{task_id} ran once in the killed worker and once after redelivery");
    }
    let total_runs = std::fs::read_dir(&markers).unwrap().count();
    println!("12 tasks, {total_runs} handler runs ({} extra, from the killed worker)", total_runs - 12);
    signal(&survivor, "TERM");
    assert!(wait_exit(&mut survivor, Duration::from_secs(20)));
}

#[test]
fn sigterm_finishes_nothing_long_and_releases_in_flight_tasks_at_once() {
    let url = fresh_database("workers_sigterm");
    let logs = log_dir("workers_sigterm");
    let mut client = connect(&url);
    register(&mut client, "sleepy", SLEEPY);
    let job_id = submit(&mut client, "sleepy", json!({"n": 3, "ms": 60000}));
    let mut worker =
        spawn_worker(&url, &logs, "leaving", &["--queue", "sleepy", "--concurrency", "3", "--grace-seconds", "1"]);
    wait_until(Duration::from_secs(30), "3 running tasks", || running_by(&mut client, &job_id, "leaving").len() == 3);

    let asked = Instant::now();
    signal(&worker, "TERM");
    assert!(wait_exit(&mut worker, Duration::from_secs(15)), "exit 0 after the grace period");
    println!("exited {:?} after SIGTERM", asked.elapsed());
    let rows = client.query("SELECT status, attempt FROM stageflow.tasks WHERE job_id = $1", &[&job_id]).unwrap();
    assert!(
        rows.iter().all(|r| r.get::<_, String>(0) == "queued" && r.get::<_, i32>(1) == 0),
        "released, attempt not spent"
    );
    let again = claim(&mut client, "sleepy", 10, 60);
    assert_eq!(again.len(), 3, "released tasks are claimable at once, not after their lease");
    assert!(again.iter().all(|t| t.attempt == 1));
}

#[test]
fn a_panicking_handler_fails_only_its_task() {
    let url = fresh_database("workers_panic");
    let logs = log_dir("workers_panic");
    let mut client = connect(&url);
    register(
        &mut client,
        "boom",
        r#"{"retry": {"max_attempts": 1}, "stages": [{"name": "explode", "handler": "debug.panic", "queue": "boom"}]}"#,
    );
    let boom = submit(&mut client, "boom", json!({}));
    let hello = submit(&mut client, "hello_world", json!({"message": "after the panic", "n": 20}));
    let mut worker = spawn_worker(&url, &logs, "sturdy", &["--queue", "boom", "--queue", "default"]);

    let failed = wait_for_job(&mut client, &boom, Duration::from_secs(60));
    assert_eq!(failed["status"], json!("failed"));
    assert_eq!(failed["error"]["error"]["type"], json!("panic"), "{}", failed["error"]);
    assert!(failed["error"]["error"]["message"].as_str().unwrap().contains("asked to panic"));
    let done = wait_for_job(&mut client, &hello, Duration::from_secs(60));
    assert_eq!(done["status"], json!("completed"));
    assert!(worker.try_wait().unwrap().is_none(), "the worker keeps running");
    signal(&worker, "TERM");
    assert!(wait_exit(&mut worker, Duration::from_secs(20)));
}

#[test]
fn a_stage_timeout_stops_a_slow_handler() {
    let url = fresh_database("workers_stage_timeout");
    let logs = log_dir("workers_stage_timeout");
    let mut client = connect(&url);
    register(
        &mut client,
        "too_slow",
        r#"{"retry": {"max_attempts": 1},
            "parameters": {"type": "object", "properties": {"ms": {"type": "integer"}}},
            "stages": [{"name": "s", "handler": "debug.sleep", "queue": "slowq", "timeout_seconds": 1}]}"#,
    );
    let job_id = submit(&mut client, "too_slow", json!({"ms": 30000}));
    let started = Instant::now();
    let mut worker = spawn_worker(&url, &logs, "patient", &["--queue", "slowq"]);
    let status = wait_for_job(&mut client, &job_id, Duration::from_secs(30));
    assert!(started.elapsed() < Duration::from_secs(15), "the stage's 1 s timeout, not the handler's 30 s");
    assert_eq!(status["status"], json!("failed"));
    assert_eq!(status["error"]["error"]["type"], json!("timeout"), "{}", status["error"]);
    signal(&worker, "TERM");
    assert!(wait_exit(&mut worker, Duration::from_secs(20)));
}

#[test]
fn lost_connections_are_retried_and_nothing_is_lost() {
    let url = fresh_database("workers_reconnect");
    let logs = log_dir("workers_reconnect");
    let mut client = connect(&url);
    register(&mut client, "sleepy", SLEEPY);
    let job_id = submit(&mut client, "sleepy", json!({"n": 60, "ms": 50}));
    let mut worker =
        spawn_worker(&url, &logs, "resilient", &["--queue", "sleepy", "--concurrency", "4", "--lease-seconds", "3"]);

    for cut in 0..3 {
        wait_until(Duration::from_secs(30), "progress", || {
            job_status(&mut client, &job_id)["stages"][0]["tasks"]["completed"].as_i64().unwrap_or(0) >= 10 * (cut + 1)
                || job_state(&mut client, &job_id) == "completed"
        });
        let cut_off: i64 = client
            .query_one(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity \
                  WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'",
                &[],
            )
            .unwrap()
            .get(0);
        println!("cut {cut}: terminated {cut_off} worker connections");
    }
    let status = wait_for_job(&mut client, &job_id, Duration::from_secs(120));
    assert_eq!(status["status"], json!("completed"), "{status}");
    assert_eq!(status["stages"][0]["tasks"]["completed"], json!(60));
    assert_eq!(job_result(&mut client, &job_id).as_array().map(Vec::len), Some(60));
    assert!(worker.try_wait().unwrap().is_none(), "the worker survived its lost connections");
    signal(&worker, "TERM");
    assert!(wait_exit(&mut worker, Duration::from_secs(20)));
}

/// The lines of a worker's log that contain every one of `words` (the log may colour its fields).
fn log_lines(logs: &Path, worker: &str, words: &[&str]) -> Vec<String> {
    std::fs::read_to_string(logs.join(format!("{worker}.log")))
        .unwrap()
        .lines()
        .filter(|line| words.iter().all(|word| line.contains(word)))
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_stage_lease_shorter_than_the_workers_is_kept_alive_by_heartbeats() {
    let url = fresh_database("workers_stage_lease");
    let logs = log_dir("workers_stage_lease");
    let markers = logs.join("markers");
    std::fs::create_dir_all(&markers).unwrap();
    let mut client = connect(&url);
    register(
        &mut client,
        "short_lease",
        r#"{"parameters": {"type": "object", "properties": {"ms": {"type": "integer"}, "marker_dir": {"type": "string"}}},
            "stages": [{"name": "s", "handler": "debug.sleep", "queue": "shortq", "lease_seconds": 2}]}"#,
    );
    // 5 s of work under the stage's 2 s lease, by a worker whose own lease is 60 s: only heartbeats
    // every third of the stage's lease keep it (at a third of 60 s it would lapse and be claimed again).
    let job_id = submit(&mut client, "short_lease", json!({"ms": 5000, "marker_dir": markers.to_str().unwrap()}));
    let mut worker =
        spawn_worker(&url, &logs, "keeper", &["--queue", "shortq", "--concurrency", "2", "--lease-seconds", "60"]);
    let status = wait_for_job(&mut client, &job_id, Duration::from_secs(60));
    assert_eq!(status["status"], json!("completed"), "{status}");
    let attempt: i32 =
        client.query_one("SELECT attempt FROM stageflow.tasks WHERE job_id = $1", &[&job_id]).unwrap().get(0);
    assert_eq!(attempt, 1, "the lease never lapsed");
    assert_eq!(std::fs::read_dir(&markers).unwrap().count(), 1, "the handler ran once");
    assert!(log_lines(&logs, "keeper", &["lost the lease"]).is_empty(), "no lease lost");
    signal(&worker, "TERM");
    assert!(wait_exit(&mut worker, Duration::from_secs(20)));
}

#[test]
fn a_worker_that_lost_a_lease_has_its_report_refused_once_and_goes_on() {
    let url = fresh_database("workers_lost_lease");
    let logs = log_dir("workers_lost_lease");
    let mut client = connect(&url);
    register(&mut client, "sleepy", SLEEPY);
    let job_id = submit(&mut client, "sleepy", json!({"n": 1, "ms": 8000}));
    let mut worker =
        spawn_worker(&url, &logs, "loser", &["--queue", "sleepy", "--concurrency", "1", "--lease-seconds", "3"]);
    wait_until(Duration::from_secs(30), "the worker to hold the task", || {
        running_by(&mut client, &job_id, "loser").len() == 1
    });
    let task_id = running_by(&mut client, &job_id, "loser").remove(0);

    // On this session's clock the worker's lease has expired: the task is claimed again at once.
    client.execute("SELECT set_config('stageflow.fake_now', (now() + interval '1 hour')::text, false)", &[]).unwrap();
    let taken = claim(&mut client, "sleepy", 1, 60);
    assert_eq!(taken.len(), 1, "the task whose lease expired is claimed again");
    assert_eq!((taken[0].task_id.as_str(), taken[0].attempt), (task_id.as_str(), 2));

    // The worker's next heartbeat (every second) no longer extends its lease; when its handler
    // ends, its completion is refused, logged once as a lost lease, and not made again.
    wait_until(Duration::from_secs(30), "the refused report", || {
        !log_lines(&logs, "loser", &["lost the lease: the report was refused", &task_id]).is_empty()
    });
    assert_eq!(log_lines(&logs, "loser", &["lost the lease (the heartbeat did not extend it)", &task_id]).len(), 1);
    let refusals = log_lines(&logs, "loser", &["lost the lease: the report was refused", &task_id]);
    assert_eq!(refusals.len(), 1, "{refusals:?}");
    assert!(refusals[0].contains("WARN"), "{}", refusals[0]);
    assert!(log_lines(&logs, "loser", &["ERROR"]).is_empty(), "nothing logged as an error");
    let row =
        client.query_one("SELECT status, worker_id FROM stageflow.tasks WHERE task_id = $1", &[&task_id]).unwrap();
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, String>(1)),
        ("running".to_owned(), "test".to_owned()),
        "the new lease holds"
    );

    // The new holder completes; the worker's slot (its only one) was freed: it runs the next job.
    complete_fenced(&mut client, &taken[0], json!({"by": "test"}));
    assert_eq!(job_status(&mut client, &job_id)["status"], json!("completed"));
    let next = submit(&mut client, "sleepy", json!({"n": 1, "ms": 10}));
    let status = wait_for_job(&mut client, &next, Duration::from_secs(30));
    assert_eq!(status["status"], json!("completed"), "{status}");
    signal(&worker, "TERM");
    assert!(wait_exit(&mut worker, Duration::from_secs(20)));
}

#[test]
fn a_python_worker_runs_hello_world_beside_a_rust_worker() {
    let url = fresh_database("workers_python");
    let logs = log_dir("workers_python");
    let mut client = connect(&url);
    let job_id = submit(&mut client, "hello_world", json!({"message": "polyglot", "n": 300}));
    // The runtime variable, not env!(): a shared build cache may hold a binary built in another checkout.
    let script = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("run by cargo test"))
        .join("../../examples/python_worker.py");
    // Debian's interpreter, which has python3-psycopg (scripts/setup.sh installs it).
    let python = Command::new("/usr/bin/python3")
        .arg(&script)
        .args([url.as_str(), "--until-idle", "3", "--batch", "5"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    wait_until(Duration::from_secs(30), "the python worker's first completion", || {
        client
            .query_one("SELECT count(*) FROM stageflow.tasks WHERE job_id = $1 AND status = 'completed'", &[&job_id])
            .unwrap()
            .get::<_, i64>(0)
            > 0
    });
    let mut rust = spawn_worker(&url, &logs, "rusty", &["--concurrency", "2", "--batch-size", "1"]);
    let status = wait_for_job(&mut client, &job_id, Duration::from_secs(120));
    assert_eq!(status["status"], json!("completed"), "{status}");
    let output = python.wait_with_output().unwrap();
    assert!(output.status.success(), "python worker: {}", String::from_utf8_lossy(&output.stderr));
    let summary: Value = serde_json::from_slice(&output.stdout).expect("the python worker prints a JSON summary");
    println!("python worker: {summary}");
    assert!(summary["completed"].as_i64().unwrap() > 0);
    let from_python = job_result(&mut client, &job_id)
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["reply"].as_str().is_some_and(|s| s.ends_with("(from python)")))
        .count();
    assert!(from_python > 0, "some replies were written by the python worker");
    signal(&rust, "TERM");
    assert!(wait_exit(&mut rust, Duration::from_secs(20)));
}
