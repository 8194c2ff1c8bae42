//! Backup and restore: `pg_dump -Fc` of a database whose jobs are mid-flight, restored with
//! `pg_restore` into a new cluster, where `stageflow worker` processes finish every job.
//!
//! The source cluster holds jobs in every state a backup can catch: tasks queued (hello_world on
//! the `default` queue, a job of 2,000 tasks on a queue of its own), a task claimed and running
//! under a lease whose worker never comes back, a task failed and waiting for its retry, a
//! three-stage job in its second stage, a completed job. Jobs are owned by a submitter login and
//! run by a worker login, so roles and queue grants have to come along too.
//!
//! The restore follows docs/operations.md ("Backup and restore"): roles first (`pg_dumpall
//! --roles-only`, without the superuser), then one plain `pg_restore`. Before any worker runs,
//! the restored database must hold every row of every table of `stageflow` and `pgmq` the source
//! held (the queues' messages included), with every sequence at or past the source's. (Before
//! 0.2.0's fixes a plain restore failed: `CREATE EXTENSION stageflow` made the `default` queue,
//! whose row in `pgmq.meta` then collided with the dumped one and whose messages the dump left
//! out, and the identity sequences of events and webhook deliveries came back at 1.)
//!
//! The reference: the source itself, which goes on after the dump with workers of its own. Both
//! finish; every job must end with the same status, stage counts and result, every task with the
//! same status, attempt and result; in the restored cluster every stage advanced once, every task
//! open at the dump ran its handler exactly once (the running task's too, once its lease expired:
//! attempt 2), no task completed before the dump ran again, and the old lease's report is refused.

// Test code: a panic (unwrap, expect) is how a test reports a failure.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use stageflow_tests::{
    claim, complete, connect, job_result, job_status, register, state_digest, submit, url_as, url_for, Claimed,
    ROLE_PASSWORD,
};

mod common;
use common::{signal, spawn_worker};

const DATABASE: &str = "flow";
const SUBMITTER: &str = "dr_submitter";
const WORKER: &str = "dr_worker";
const QUEUES: &[&str] = &["default", "naps", "relay_a", "relay_b", "bulk"];

fn bindir() -> String {
    std::env::var("STAGEFLOW_PG_BINDIR").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".to_string())
}

/// Runs a program to success; returns its stdout.
fn run(program: &str, args: &[&str], stdin: Option<&[u8]>) -> Vec<u8> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input).unwrap();
    }
    let output = child.wait_with_output().unwrap();
    // Arguments may hold a URL with its password: name the program and the error only.
    assert!(output.status.success(), "{program} failed: {}", String::from_utf8_lossy(&output.stderr));
    output.stdout
}

fn stageflow(args: &[&str]) -> String {
    String::from_utf8(run(env!("CARGO_BIN_EXE_stageflow"), args, None)).unwrap().trim().to_owned()
}

/// A private cluster in a directory of its own, stopped and removed when dropped.
struct Cluster(PathBuf);

impl Cluster {
    fn start(dir: PathBuf) -> (Cluster, String) {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let url = stageflow(&["cluster", "start", "--dir", dir.to_str().unwrap()]);
        (Cluster(dir), url)
    }

    fn restart(&self) -> String {
        stageflow(&["cluster", "stop", "--dir", self.0.to_str().unwrap()]);
        stageflow(&["cluster", "start", "--dir", self.0.to_str().unwrap()])
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(env!("CARGO_BIN_EXE_stageflow"))
            .args(["cluster", "stop", "--dir", self.0.to_str().unwrap(), "--mode", "immediate"])
            .output();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Worker processes, sent SIGKILL if the test fails before it stops them.
struct Workers(Vec<Child>);

impl Drop for Workers {
    fn drop(&mut self) {
        for child in &mut self.0 {
            if child.try_wait().ok().flatten().is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Workers {
    fn stop(mut self) {
        for child in &self.0 {
            signal(child, "TERM");
        }
        for child in &mut self.0 {
            let start = Instant::now();
            let status = loop {
                if let Some(status) = child.try_wait().unwrap() {
                    break status;
                }
                assert!(start.elapsed() < Duration::from_secs(30), "a worker did not exit after SIGTERM");
                std::thread::sleep(Duration::from_millis(50));
            };
            assert!(status.success(), "a worker exits 0 on SIGTERM");
        }
        self.0.clear();
    }

    fn pids(&self) -> HashSet<u32> {
        self.0.iter().map(Child::id).collect()
    }
}

fn start_workers(url: &str, logs: &Path, prefix: &str, count: usize) -> Workers {
    let mut args = vec!["--concurrency", "4", "--lease-seconds", "30"];
    for queue in QUEUES {
        args.extend(["--queue", queue]);
    }
    Workers((0..count).map(|i| spawn_worker(url, logs, &format!("{prefix}{i}"), &args)).collect())
}

fn wait_until(limit: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn open_jobs(client: &mut postgres::Client) -> i64 {
    client
        .query_one("SELECT count(*) FROM stageflow.jobs WHERE status IN ('queued', 'processing')", &[])
        .unwrap()
        .get(0)
}

/// A task's task_id, status, attempt and result.
type TaskEnd = (String, String, i32, Option<Value>);

/// What must be the same in both clusters at the end: per job, its status, stages (status, task
/// count, task counts by status), result count and result; per task, status, attempt, result.
fn outcome(client: &mut postgres::Client, jobs: &[String]) -> (Vec<Value>, Vec<TaskEnd>) {
    let statuses = jobs
        .iter()
        .map(|job_id| {
            let status = job_status(client, job_id);
            let stages: Vec<Value> = status["stages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| json!({"stage": s["stage"], "status": s["status"], "task_count": s["task_count"], "tasks": s["tasks"]}))
                .collect();
            let result = if matches!(status["status"].as_str(), Some("completed" | "completed_with_errors")) {
                job_result(client, job_id)
            } else {
                Value::Null
            };
            json!({"job_id": job_id, "status": status["status"], "current_stage": status["current_stage"],
                   "progress": status["progress"], "result_count": status["result_count"], "stages": stages,
                   "error": status["error"], "result": result})
        })
        .collect();
    let tasks = client
        .query("SELECT task_id, status, attempt, result FROM stageflow.tasks ORDER BY task_id", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    (statuses, tasks)
}

/// Every sequence of `stageflow` and `pgmq` with its last value (0 when never used).
fn sequences(client: &mut postgres::Client) -> BTreeMap<String, i64> {
    client
        .query(
            "SELECT schemaname || '.' || sequencename, coalesce(last_value, 0) FROM pg_sequences \
              WHERE schemaname IN ('stageflow', 'pgmq')",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

fn extconfig(client: &mut postgres::Client) -> Vec<(String, String)> {
    client
        .query(
            "SELECT extname, extconfig::regclass[]::text FROM pg_extension WHERE extname IN ('stageflow', 'pgmq') ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// The job types: hello_world's definition, every other row whole.
fn job_types(client: &mut postgres::Client) -> Vec<String> {
    client
        .query(
            "SELECT CASE WHEN name = 'hello_world' THEN concat_ws('|', name, definition) ELSE t::text END \
               FROM stageflow.job_types AS t ORDER BY name",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Runs of each task's handler by the given worker processes, from the markers `debug.sleep`
/// writes (`<task_id>.<attempt>.<pid>`).
fn runs_by(markers: &Path, pids: &HashSet<u32>) -> BTreeMap<String, Vec<i32>> {
    let mut runs: BTreeMap<String, Vec<i32>> = BTreeMap::new();
    for entry in std::fs::read_dir(markers).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().to_string();
        let mut parts = name.rsplitn(3, '.');
        let pid: u32 = parts.next().unwrap().parse().unwrap();
        let attempt: i32 = parts.next().unwrap().parse().unwrap();
        let task_id = parts.next().unwrap().to_owned();
        if pids.contains(&pid) {
            runs.entry(task_id).or_default().push(attempt);
        }
    }
    runs
}

#[test]
fn a_dump_of_jobs_mid_flight_restored_into_a_new_cluster_finishes_there() {
    let bulk_tasks: i64 =
        std::env::var("STAGEFLOW_DUMP_RESTORE_TASKS").map_or(2000, |n| n.parse().expect("a number of tasks"));
    let base = PathBuf::from(format!("/var/tmp/dumprestore-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let logs = base.join("logs");
    let markers = base.join("markers");
    std::fs::create_dir_all(&markers).unwrap();
    std::fs::create_dir_all(&logs).unwrap();
    let marker_dir = markers.to_str().unwrap();

    // --- The source: roles, job types, jobs left in every state.
    let (source_cluster, source_admin) = Cluster::start(base.join("source"));
    let mut admin = connect(&source_admin);
    admin.batch_execute(&format!("CREATE DATABASE {DATABASE}")).unwrap();
    let source = url_for(&source_admin, DATABASE);
    let mut db = connect(&source);
    // (the extension creates the stageflow_* roles, cluster-wide, if they do not exist)
    db.batch_execute(&format!(
        "CREATE EXTENSION stageflow CASCADE;
         CREATE ROLE {SUBMITTER} LOGIN PASSWORD '{ROLE_PASSWORD}' IN ROLE stageflow_submitter;
         CREATE ROLE {WORKER} LOGIN PASSWORD '{ROLE_PASSWORD}' IN ROLE stageflow_worker;"
    ))
    .unwrap();
    let retry = r#""retry": {"max_attempts": 3, "backoff_base_seconds": 1, "backoff_max_seconds": 2}"#;
    let params = r#""parameters": {"type": "object", "properties": {"n": {"type": "integer"}, "ms": {"type": "integer"},
                                                                     "marker_dir": {"type": "string"}}}"#;
    register(
        &mut db,
        "nap",
        &format!(
            r#"{{{retry}, {params}, "stages": [{{"name": "nap", "handler": "debug.sleep", "queue": "naps", "fan_out": "count", "param": "n"}}]}}"#
        ),
    );
    register(
        &mut db,
        "relay",
        &format!(
            r#"{{{retry}, {params}, "stages": [
                {{"name": "first", "handler": "debug.sleep", "queue": "relay_a", "fan_out": "count", "param": "n"}},
                {{"name": "second", "handler": "debug.sleep", "queue": "relay_b", "fan_out": "lineage"}},
                {{"name": "gather", "handler": "debug.sleep", "queue": "relay_b", "fan_out": "fan_in"}}]}}"#
        ),
    );
    register(
        &mut db,
        "bulk",
        &format!(
            r#"{{{retry}, {params}, "stages": [{{"name": "many", "handler": "debug.sleep", "queue": "bulk", "fan_out": "count", "param": "n"}}]}}"#
        ),
    );
    for queue in QUEUES {
        db.execute("SELECT stageflow.grant_queue($1, $2)", &[queue, &WORKER]).unwrap();
    }
    let mut submitter = connect(&url_as(&source, SUBMITTER));
    // Queued: hello_world on the default queue, and a bulk job (the numbers in docs/operations.md).
    let hello = submit(&mut submitter, "hello_world", json!({"message": "restored", "n": 6}));
    let bulk = submit(&mut submitter, "bulk", json!({"n": bulk_tasks, "ms": 0}));
    // Completed before the dump.
    let done = submit(&mut submitter, "nap", json!({"n": 3, "ms": 1, "marker_dir": marker_dir}));
    for task in claim(&mut db, "naps", 10, 60) {
        complete(&mut db, &task.task_id, json!({"slept_ms": 1, "key": task.task_key}));
    }
    assert_eq!(job_status(&mut db, &done)["status"], json!("completed"));
    // Running under a lease whose worker is gone, failed awaiting a retry, and queued.
    let naps = submit(&mut submitter, "nap", json!({"n": 6, "ms": 20, "marker_dir": marker_dir}));
    let held: Vec<Claimed> = claim(&mut db, "naps", 2, 5);
    assert_eq!(held.len(), 2);
    let ghost = held[0].clone();
    let failed = db
        .query_one(
            "SELECT stageflow.fail_task($1, '{\"message\": \"flaky\", \"category\": \"transient\"}', true, 'test', $2)",
            &[&held[1].task_id, &held[1].lease_token],
        )
        .unwrap()
        .get::<_, Value>(0);
    assert_eq!(failed["task_status"], json!("queued"), "{failed}");
    assert!(failed["retry_in_seconds"].as_f64().unwrap() > 0.0, "{failed}");
    // In its second stage (of three): every task of the first completed here.
    let relay = submit(&mut submitter, "relay", json!({"n": 4, "ms": 20, "marker_dir": marker_dir}));
    for task in claim(&mut db, "relay_a", 10, 60) {
        complete(&mut db, &task.task_id, json!({"slept_ms": 0, "key": task.task_key}));
    }
    assert_eq!(job_status(&mut db, &relay)["current_stage"], json!(2));
    let jobs = vec![hello.clone(), bulk.clone(), naps.clone(), relay.clone(), done.clone()];
    let ended_at_dump: HashSet<String> = db
        .query("SELECT task_id FROM stageflow.tasks WHERE status NOT IN ('queued', 'running')", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let states: Vec<(String, String, i64)> = db
        .query("SELECT job_id, status, count(*) FROM stageflow.tasks GROUP BY 1, 2 ORDER BY 1, 2", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    println!("tasks at the dump (job, status, count): {states:?}");
    assert!(states.contains(&(naps.clone(), "running".into(), 1)), "{states:?}");
    let source_digest = state_digest(&mut db);
    let source_sequences = sequences(&mut db);
    let source_config = extconfig(&mut db);
    let source_job_types = job_types(&mut db);

    // --- Dump: the roles (cluster-wide) and the database.
    let bin = bindir();
    let started = Instant::now();
    let roles = run(&format!("{bin}/pg_dumpall"), &["--roles-only", "-d", &source_admin], None);
    let roles_dumped = started.elapsed();
    let roles: String = String::from_utf8(roles)
        .unwrap()
        .lines()
        // the new cluster's superuser keeps its own password
        .filter(|line| !line.starts_with("CREATE ROLE postgres;") && !line.starts_with("ALTER ROLE postgres WITH"))
        .map(|line| format!("{line}\n"))
        .collect();
    assert!(roles.contains(&format!("GRANT stageflow_worker TO {WORKER}")), "{roles}");
    let dump = base.join("flow.dump");
    let started = Instant::now();
    run(&format!("{bin}/pg_dump"), &["-Fc", "-f", dump.to_str().unwrap(), "-d", &source], None);
    let dumped = started.elapsed();
    let dump_bytes = std::fs::metadata(&dump).unwrap().len();
    // The queues' tables and their rows, pgmq's queue list, the extensions' tables are in it.
    let contents = String::from_utf8(run(&format!("{bin}/pg_restore"), &["-l", dump.to_str().unwrap()], None)).unwrap();
    for table in ["pgmq meta", "stageflow jobs", "stageflow tasks", "stageflow stages", "stageflow events"]
        .into_iter()
        .map(str::to_owned)
        .chain(QUEUES.iter().filter(|q| **q != "default").flat_map(|q| [format!("pgmq q_{q}"), format!("pgmq a_{q}")]))
    {
        assert!(contents.contains(&format!("TABLE DATA {table} ")), "no data of {table} in the dump:\n{contents}");
    }

    // --- Restore into a new cluster: roles, then the database, in one plain pg_restore.
    let (target_cluster, target_admin) = Cluster::start(base.join("target"));
    let started = Instant::now();
    run(&format!("{bin}/psql"), &["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", &target_admin], Some(roles.as_bytes()));
    connect(&target_admin).batch_execute(&format!("CREATE DATABASE {DATABASE}")).unwrap();
    let target = url_for(&target_admin, DATABASE);
    run(&format!("{bin}/pg_restore"), &["--exit-on-error", "-d", &target, dump.to_str().unwrap()], None);
    let restored_in = started.elapsed();
    let mut restored = connect(&target);
    assert_eq!(extconfig(&mut restored), source_config, "the same tables marked for pg_dump");
    // Every row of every table is back, the queues' messages included.
    let restored_digest = state_digest(&mut restored);
    for (before, after) in source_digest.lines().zip(restored_digest.lines()) {
        if before.starts_with("stageflow.job_types:") {
            // hello_world's row is the extension's own, written again by CREATE EXTENSION (the
            // others are dumped): compared below without its timestamps.
            continue;
        }
        assert_eq!(after, before, "restored as dumped");
    }
    assert_eq!(restored_digest.lines().count(), source_digest.lines().count());
    assert_eq!(job_types(&mut restored), source_job_types);
    let restored_sequences = sequences(&mut restored);
    for (name, value) in &source_sequences {
        assert!(restored_sequences[name] >= *value, "{name}: {} < {value}", restored_sequences[name]);
    }
    // The maintenance worker looks after one database, read when the server starts.
    restored.batch_execute(&format!("ALTER SYSTEM SET stageflow.database = '{DATABASE}'")).unwrap();
    drop(restored);
    assert_eq!(target_cluster.restart(), target_admin, "a restart keeps the URL");
    let mut restored = connect(&target);
    wait_until(Duration::from_secs(30), "the maintenance worker in the restored database", || {
        restored
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'stageflow maintenance' AND datname = $1",
                &[&DATABASE],
            )
            .unwrap()
            .get::<_, i64>(0)
            == 1
    });
    // The submitter's jobs are its own there too.
    let mut restored_submitter = connect(&url_as(&target, SUBMITTER));
    assert_eq!(job_status(&mut restored_submitter, &done)["status"], json!("completed"));
    println!(
        "{bulk_tasks} bulk tasks; dump {dump_bytes} bytes in {dumped:?} (roles {roles_dumped:?}); restored in \
         {restored_in:?}"
    );

    // --- Both clusters finish their jobs: the source is the reference.
    let started = Instant::now();
    let source_workers = start_workers(&url_as(&source, WORKER), &logs, "source", 1);
    let target_workers = start_workers(&url_as(&target, WORKER), &logs, "restored", 2);
    let target_pids = target_workers.pids();
    let limit = Duration::from_secs(120 + bulk_tasks as u64 / 50);
    wait_until(limit, "every job to end in the restored cluster", || open_jobs(&mut restored) == 0);
    println!("the restored cluster finished its jobs {:?} after its workers started", started.elapsed());
    wait_until(limit, "every job to end in the source", || open_jobs(&mut db) == 0);
    target_workers.stop();
    source_workers.stop();

    let expected = outcome(&mut db, &jobs);
    let (statuses, tasks) = outcome(&mut restored, &jobs);
    for (job, reference) in statuses.iter().zip(&expected.0) {
        assert_eq!(job, reference, "the restored job ends as the source's");
        assert_eq!(job["status"], json!("completed"), "{job}");
    }
    assert_eq!(tasks.len(), expected.1.len());
    for (task, reference) in tasks.iter().zip(&expected.1) {
        assert_eq!(task, reference, "the restored task ends as the source's");
    }
    assert_eq!(
        job_result(&mut restored, &relay),
        json!({"slept_ms": 20, "key": "0"}),
        "the fan-in ran after the restore"
    );
    let ghost_attempt: i32 =
        restored.query_one("SELECT attempt FROM stageflow.tasks WHERE task_id = $1", &[&ghost.task_id]).unwrap().get(0);
    assert_eq!(ghost_attempt, 2, "the task running at the dump ran again once its lease expired");
    let advances: Vec<(String, i32, i64)> = restored
        .query(
            "SELECT job_id, stage, count(*) FROM stageflow.events WHERE kind = 'stage_completed' \
              GROUP BY 1, 2 HAVING count(*) <> 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert!(advances.is_empty(), "a stage advanced more than once: {advances:?}");
    let counters: i64 = restored
        .query_one("SELECT count(*) FROM stageflow.stage_counts WHERE running_tasks <> 0 OR remaining_tasks <> 0", &[])
        .unwrap()
        .get(0);
    assert_eq!(counters, 0, "no task counted as running or open at the end");
    // Handlers run in the restored cluster: once per task open at the dump or created after it,
    // never for a task that had ended at the dump.
    let runs = runs_by(&markers, &target_pids);
    let marked: Vec<String> = restored
        .query(
            "SELECT t.task_id FROM stageflow.tasks AS t JOIN stageflow.jobs AS j USING (job_id) \
              WHERE j.params ? 'marker_dir'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for task_id in &marked {
        let ran = runs.get(task_id).map_or(0, Vec::len);
        let expected = usize::from(!ended_at_dump.contains(task_id));
        assert_eq!(ran, expected, "{task_id} ran {ran} times in the restored cluster: {:?}", runs.get(task_id));
    }
    assert_eq!(runs.get(&ghost.task_id), Some(&vec![2]));
    // The lease the source handed out is not the restored task's: its report is refused.
    let refused = restored
        .query_one(
            "SELECT stageflow.complete_task_and_check_stage($1, '{}', 'test', $2)",
            &[&ghost.task_id, &ghost.lease_token],
        )
        .expect_err("the old lease's report is refused");
    assert_eq!(refused.as_db_error().map(|e| e.code().code()), Some("55000"), "{refused}");
    drop((restored, db));
    drop(target_cluster);
    drop(source_cluster);
    let _ = std::fs::remove_dir_all(&base);
}
