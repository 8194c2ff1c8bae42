//! Chaos: a job of 3,001 tasks over three stages (count -> lineage -> fan_in) on a cluster of its
//! own, run by four worker processes while a random worker is killed with SIGKILL after every 400
//! to 800 completed tasks and PostgreSQL is restarted once with an immediate shutdown (a crash).
//! Several seeds.
//!
//! At the end the job is completed, every stage advanced exactly once, every task is completed
//! exactly once in the final state, and every task's handler ran at least once (delivery is at
//! least once: the extra runs are printed).

// Test code: a panic (unwrap, expect) is how a test reports a failure.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use stageflow_tests::{connect, job_status, register, submit, url_for, Rng};

mod common;
use common::spawn_worker;

/// The chaos workers: four handlers each, leases of 2 s.
const WORKER_ARGS: &[&str] = &["--queue", "chaos", "--concurrency", "4", "--lease-seconds", "2"];

const STAGE_TASKS: i64 = 1500;
/// A worker is killed after every KILL_EVERY_MIN to KILL_EVERY_MIN + KILL_EVERY_SPREAD - 1
/// completed tasks.
const KILL_EVERY_MIN: i64 = 400;
const KILL_EVERY_SPREAD: u64 = 400;

fn stageflow(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_stageflow")).args(args).output().unwrap();
    assert!(output.status.success(), "stageflow {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// Polls with a fresh connection each time: the server may be down for a moment.
fn status_of(url: &str, job_id: &str) -> Option<Value> {
    let mut client = postgres::Client::connect(url, postgres::NoTls).ok()?;
    client.query_one("SELECT stageflow.job_status($1)", &[&job_id]).ok().map(|row| row.get(0))
}

fn run(seed: u64, cluster_dir: &Path, admin_url: &str) {
    let database = format!("chaos_{seed}");
    let mut admin = connect(admin_url);
    admin.batch_execute(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)")).unwrap();
    admin.batch_execute(&format!("CREATE DATABASE {database}")).unwrap();
    let url = url_for(admin_url, &database);
    let mut client = connect(&url);
    client.batch_execute("CREATE EXTENSION stageflow CASCADE").unwrap();
    register(
        &mut client,
        "chaos",
        r#"{"retry": {"max_attempts": 20, "backoff_base_seconds": 0.05, "backoff_max_seconds": 0.5},
            "parameters": {"type": "object", "properties": {"n": {"type": "integer"}, "ms": {"type": "integer"},
                                                            "marker_dir": {"type": "string"}}},
            "stages": [{"name": "fan", "handler": "debug.sleep", "queue": "chaos", "fan_out": "count", "param": "n"},
                       {"name": "follow", "handler": "debug.sleep", "queue": "chaos", "fan_out": "lineage"},
                       {"name": "gather", "handler": "debug.sleep", "queue": "chaos", "fan_out": "fan_in"}]}"#,
    );
    let logs = std::env::temp_dir().join(format!("stageflow-chaos/seed-{seed}"));
    let _ = std::fs::remove_dir_all(&logs);
    let markers = logs.join("markers");
    std::fs::create_dir_all(&markers).unwrap();
    let job_id =
        submit(&mut client, "chaos", json!({"n": STAGE_TASKS, "ms": 10, "marker_dir": markers.to_str().unwrap()}));
    drop(client);

    // A seed replays the same kill schedule: which worker is killed once how many tasks of the job
    // are completed (kills follow the job's progress, not the clock; the count is polled every
    // 100 ms, so which tasks are in flight at a kill still varies from run to run).
    let mut rng = Rng::new(seed, 0);
    let mut workers: Vec<Child> = (0..4).map(|i| spawn_worker(&url, &logs, &format!("w{i}"), WORKER_ARGS)).collect();
    let mut kills = 0;
    let mut restarted = false;
    let start = Instant::now();
    // Completed tasks (all stages) at which the next worker is killed.
    let mut next_kill = KILL_EVERY_MIN + rng.below(KILL_EVERY_SPREAD) as i64;
    loop {
        assert!(start.elapsed() < Duration::from_secs(300), "seed {seed}: the job did not finish in 5 minutes");
        let status = status_of(&url, &job_id);
        if let Some(status) = &status {
            if status["status"] != json!("processing") && status["status"] != json!("queued") {
                break;
            }
            let done = status["stages"][0]["tasks"]["completed"].as_i64().unwrap_or(0);
            if !restarted && done >= STAGE_TASKS * 2 / 5 {
                stageflow(&["cluster", "stop", "--dir", cluster_dir.to_str().unwrap(), "--mode", "immediate"]);
                std::thread::sleep(Duration::from_millis(500));
                stageflow(&["cluster", "start", "--dir", cluster_dir.to_str().unwrap()]);
                restarted = true;
                println!("seed {seed}: restarted PostgreSQL (immediate shutdown) at {done} stage-1 completions");
            }
            let completed: i64 = status["stages"]
                .as_array()
                .map_or(0, |stages| stages.iter().map(|stage| stage["tasks"]["completed"].as_i64().unwrap_or(0)).sum());
            if completed >= next_kill {
                let victim = rng.below(workers.len() as u64) as usize;
                workers[victim].kill().unwrap();
                workers[victim].wait().unwrap();
                workers[victim] = spawn_worker(&url, &logs, &format!("w{victim}"), WORKER_ARGS);
                kills += 1;
                next_kill += KILL_EVERY_MIN + rng.below(KILL_EVERY_SPREAD) as i64;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for worker in &mut workers {
        worker.kill().unwrap();
        worker.wait().unwrap();
    }
    assert!(restarted, "seed {seed}: the job ended before the restart; make it longer");

    let mut client = connect(&url);
    let status = job_status(&mut client, &job_id);
    assert_eq!(status["status"], json!("completed"), "seed {seed}: {status}");
    let advances: Vec<(i32, i64)> = client
        .query("SELECT stage, count(*) FROM stageflow.events WHERE job_id = $1 AND kind = 'stage_completed' GROUP BY stage ORDER BY stage", &[&job_id])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(advances, vec![(1, 1), (2, 1), (3, 1)], "seed {seed}: every stage advanced exactly once");
    let stages: Vec<(i32, i32, i32)> = client
        .query("SELECT s.stage, s.task_count, c.completed_count FROM stageflow.stages AS s JOIN stageflow.stage_counts AS c USING (job_id, stage) WHERE s.job_id = $1 ORDER BY s.stage", &[&job_id])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let n = STAGE_TASKS as i32;
    assert_eq!(stages, vec![(1, n, n), (2, n, n), (3, 1, 1)], "seed {seed}");
    let tasks: Vec<(String, String)> = client
        .query("SELECT task_id, status FROM stageflow.tasks WHERE job_id = $1", &[&job_id])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(tasks.len() as i64, 2 * STAGE_TASKS + 1);
    assert!(tasks.iter().all(|(_, s)| s == "completed"), "seed {seed}: every task completed");
    let inputs: i64 = client
        .query_one(
            "SELECT jsonb_array_length(inputs)::bigint FROM stageflow.tasks WHERE job_id = $1 AND stage = 3",
            &[&job_id],
        )
        .unwrap()
        .get(0);
    assert_eq!(inputs, STAGE_TASKS, "the fan-in saw every result once");

    let mut runs: HashMap<String, usize> = HashMap::new();
    for entry in std::fs::read_dir(&markers).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().to_string();
        let task_id = name.rsplitn(3, '.').nth(2).unwrap().to_owned();
        *runs.entry(task_id).or_default() += 1;
    }
    let never_ran: Vec<&String> = tasks.iter().map(|(id, _)| id).filter(|id| !runs.contains_key(*id)).collect();
    assert!(never_ran.is_empty(), "seed {seed}: tasks completed without their handler running: {never_ran:?}");
    let total: usize = runs.values().sum();
    println!(
        "seed {seed}: {} tasks completed once each; {total} handler runs ({} extra) under {kills} SIGKILLs and 1 restart, {:.1} s",
        tasks.len(),
        total - tasks.len(),
        start.elapsed().as_secs_f64()
    );
}

#[test]
fn a_job_survives_killed_workers_and_a_crashed_server() {
    let cluster_dir: PathBuf = std::env::temp_dir().join("stageflow-chaos/cluster");
    let _ = Command::new(env!("CARGO_BIN_EXE_stageflow"))
        .args(["cluster", "stop", "--dir", cluster_dir.to_str().unwrap()])
        .output();
    let _ = std::fs::remove_dir_all(&cluster_dir);
    std::fs::create_dir_all(&cluster_dir).unwrap();
    let admin_url = stageflow(&["cluster", "start", "--dir", cluster_dir.to_str().unwrap()]);
    let seeds: Vec<u64> = std::env::var("STAGEFLOW_CHAOS_SEEDS")
        .unwrap_or_else(|_| "1,2,3".into())
        .split(',')
        .map(|s| s.trim().parse().expect("seeds are integers"))
        .collect();
    for seed in seeds {
        run(seed, &cluster_dir, &admin_url);
    }
    stageflow(&["cluster", "stop", "--dir", cluster_dir.to_str().unwrap()]);
}
