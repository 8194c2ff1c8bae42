//! Failover to a synchronous standby. A primary private cluster (`stageflow cluster start`, the
//! extension created in it) and a standby made from it with `pg_basebackup -R`, named in the
//! primary's `synchronous_standby_names`, so that a commit is acknowledged only once the standby
//! has it. Two `stageflow worker` processes connect with one URL naming both servers and
//! `target_session_attrs=read-write`. In the middle of a three-stage job the primary's postmaster
//! is killed with SIGKILL and the standby promoted with `pg_ctl promote`; the workers reconnect to
//! it on their own and the job completes there:
//!
//! - every completion a worker logged as committed before the promotion (all of them acknowledged
//!   by the old primary) is on the new one, under the lease it was made with, and every completed
//!   task was logged as committed exactly once;
//! - each stage advanced once (one `stage_completed` event per stage, one job end) and no stage has
//!   a task twice;
//! - the maintenance worker idled on the standby without a warning or an error in its log, and
//!   maintains once it is promoted: a last attempt claimed by hand (in a queue no worker reads)
//!   whose lease expires after the promotion is dead-lettered there, which only maintenance does.
//!
//! It prints what it measured (how long the job was interrupted); STAGEFLOW_FAILOVER_DELAY_MS
//! leaves the primary dead that long before the promotion. The clusters live under
//! `/var/tmp/failover-<pid>` on ports 5600-5699, and are stopped and removed at the end (kept, for
//! their logs, when the test fails).

// Test code: a panic (unwrap, expect) is how a test reports a failure.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;
use stageflow_tests::{claim, connect, job_status, register, submit};

/// The standby's `application_name`, which the primary's `synchronous_standby_names` names.
const STANDBY_NAME: &str = "failover_standby";
/// Tasks of the first and second stage; each sleeps TASK_MS.
const TASKS: i64 = 48;
const TASK_MS: i64 = 250;
/// The primary dies once this many tasks of the second stage are completed.
const KILL_AFTER: i64 = 12;
/// The workers: four handlers each, leases of 5 s (a claim whose answer was lost with the primary
/// is delivered again once its lease expires).
const WORKER_ARGS: &[&str] = &["--queue", "failover", "--concurrency", "4", "--lease-seconds", "5"];
/// The probe's lease: it expires after the promotion.
const PROBE_LEASE_SECONDS: i32 = 4;

fn stageflow(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stageflow")).args(args).stdin(Stdio::null()).output().expect("stageflow runs")
}

fn is_root() -> bool {
    let uid = Command::new("id").arg("-u").output().unwrap();
    String::from_utf8_lossy(&uid.stdout).trim() == "0"
}

/// A PostgreSQL program run as the clusters' owner (`postgres` when we are root, as the cluster
/// command does).
fn pg(program: &str) -> Command {
    let bin = std::env::var("STAGEFLOW_PG_BINDIR").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".to_owned());
    let path = format!("{bin}/{program}");
    let mut command = if is_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--", &path]);
        command
    } else {
        Command::new(path)
    };
    command.stdin(Stdio::null());
    command
}

fn run(mut command: Command) -> String {
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{command:?}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A free port of 127.0.0.1 in 5600-5699 other than `taken`.
fn free_port(taken: &[u16]) -> u16 {
    (5600..5700)
        .find(|port| !taken.contains(port) && std::net::TcpListener::bind(("127.0.0.1", *port)).is_ok())
        .expect("a free port in 5600-5699")
}

/// Writes a cluster directory's `url` file (its owner only may read it: it holds the password).
fn write_url(dir: &Path, url: &str) {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir).unwrap();
    let mut file =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(dir.join("url"));
    std::io::Write::write_all(file.as_mut().unwrap(), url.as_bytes()).unwrap();
}

/// Polls `probe` every 100 ms until it returns something, for at most `limit`.
fn wait_for<T>(what: &str, limit: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The clusters and the workers: stopped (and their directory removed, unless the test failed)
/// when dropped.
struct Failover {
    base: PathBuf,
    workers: Vec<Child>,
}

impl Drop for Failover {
    fn drop(&mut self) {
        for worker in &mut self.workers {
            let _ = worker.kill();
            let _ = worker.wait();
        }
        for cluster in ["primary", "standby"] {
            let dir = self.base.join(cluster);
            let _ = stageflow(&["cluster", "stop", "--dir", dir.to_str().unwrap(), "--mode", "immediate"]);
        }
        if std::thread::panicking() {
            eprintln!("failover: the clusters' directories and the workers' logs are kept in {}", self.base.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.base);
        }
    }
}

/// `(task_id, lease_token)` of every completion the worker logs under `logs` say committed (their
/// `completion committed` debug lines), in log order.
fn committed_in_logs(logs: &Path) -> Vec<(String, i64)> {
    let mut committed = Vec::new();
    for entry in std::fs::read_dir(logs).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|ext| ext != "log") {
            continue;
        }
        for line in strip_ansi(&std::fs::read_to_string(&path).unwrap()).lines() {
            if !line.contains("completion committed") {
                continue;
            }
            let field =
                |name: &str| line.split_whitespace().find_map(|word| word.strip_prefix(name)).map(str::to_owned);
            let task_id = field("task_id=").unwrap_or_else(|| panic!("no task_id in {line:?}"));
            let token = field("lease_token=").and_then(|t| t.parse().ok()).unwrap_or_else(|| panic!("{line:?}"));
            committed.push((task_id, token));
        }
    }
    committed
}

/// `text` without its terminal colour sequences.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Lines of a server log that are a WARNING, ERROR, FATAL or PANIC about stageflow.
fn stageflow_complaints(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|line| ["WARNING:", "ERROR:", "FATAL:", "PANIC:"].iter().any(|level| line.contains(level)))
        .filter(|line| line.to_lowercase().contains("stageflow"))
        .collect()
}

fn epoch_seconds() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

#[test]
fn workers_fail_over_to_the_promoted_synchronous_standby_and_the_job_completes() {
    let base = PathBuf::from(format!("/var/tmp/failover-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    // The postgres user must reach the cluster directories.
    run({
        let mut chmod = Command::new("chmod");
        chmod.arg("755").arg(&base);
        chmod
    });
    let logs = base.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let mut failover = Failover { base: base.clone(), workers: Vec::new() };
    let (primary_dir, standby_dir) = (base.join("primary"), base.join("standby"));

    // The primary: a private cluster as `stageflow cluster start` makes it (stageflow preloaded),
    // on a port of ours (the command starts a cluster on the port its `url` file names, if free).
    let primary_port = free_port(&[]);
    write_url(&primary_dir, &format!("postgres://postgres@127.0.0.1:{primary_port}/postgres"));
    let started = stageflow(&["cluster", "start", "--dir", primary_dir.to_str().unwrap()]);
    assert!(started.status.success(), "{}", String::from_utf8_lossy(&started.stderr));
    let primary_url = String::from_utf8(started.stdout).unwrap().trim().to_owned();
    assert!(primary_url.contains(&format!("@127.0.0.1:{primary_port}/")), "{primary_url}");
    // postgres://postgres:<password>@127.0.0.1:<port>/postgres
    let userinfo = primary_url.strip_prefix("postgres://").unwrap().split_once('@').unwrap().0;
    let password = userinfo.split_once(':').expect("a password in the URL").1.to_owned();
    let mut primary = connect(&primary_url);
    primary.batch_execute("CREATE EXTENSION stageflow CASCADE").unwrap();
    register(
        &mut primary,
        "failover_steps",
        r#"{"retry": {"max_attempts": 5, "backoff_base_seconds": 0.1, "backoff_max_seconds": 1},
            "parameters": {"type": "object", "properties": {"n": {"type": "integer"}, "ms": {"type": "integer"}}},
            "stages": [{"name": "split", "handler": "debug.sleep", "queue": "failover", "fan_out": "count", "param": "n"},
                       {"name": "work", "handler": "debug.sleep", "queue": "failover", "fan_out": "lineage"},
                       {"name": "gather", "handler": "debug.sleep", "queue": "failover", "fan_out": "fan_in"}]}"#,
    );
    // One attempt, in a queue no worker reads: only maintenance dead-letters it when its lease expires.
    register(
        &mut primary,
        "failover_probe",
        r#"{"retry": {"max_attempts": 1}, "stages": [{"name": "hold", "handler": "debug.sleep", "queue": "failover_probe"}]}"#,
    );

    // The standby: a base backup with the replication settings (-R) and its application_name, run
    // by the cluster command from the same directory layout, on a port of its own.
    std::fs::create_dir_all(&standby_dir).unwrap();
    if is_root() {
        run({
            let mut chown = Command::new("chown");
            chown.arg("postgres:postgres").arg(&standby_dir);
            chown
        });
    }
    run({
        let mut backup = pg("pg_basebackup");
        backup.arg("-D").arg(standby_dir.join("data")).args(["-R", "-X", "stream", "-c", "fast", "-d"]).arg(format!(
            "host=127.0.0.1 port={primary_port} user=postgres password={password} application_name={STANDBY_NAME}"
        ));
        backup
    });
    let conf = std::fs::read_to_string(standby_dir.join("data/postgresql.auto.conf")).unwrap();
    assert!(conf.contains(&format!("application_name={STANDBY_NAME}")), "{conf}");
    let standby_port = free_port(&[primary_port]);
    write_url(&standby_dir, &format!("postgres://postgres:{password}@127.0.0.1:{standby_port}/postgres"));
    let started = stageflow(&["cluster", "start", "--dir", standby_dir.to_str().unwrap()]);
    assert!(started.status.success(), "{}", String::from_utf8_lossy(&started.stderr));
    let standby_url = String::from_utf8(started.stdout).unwrap().trim().to_owned();
    assert!(standby_url.contains(&format!("@127.0.0.1:{standby_port}/")), "{standby_url}");
    let mut standby = connect(&standby_url);
    assert!(standby.query_one("SELECT pg_is_in_recovery()", &[]).unwrap().get::<_, bool>(0));

    // Synchronous from now on (set after the base backup: the standby, once promoted, has no
    // standby of its own to wait for).
    primary.batch_execute(&format!("ALTER SYSTEM SET synchronous_standby_names = '\"{STANDBY_NAME}\"'")).unwrap();
    primary.batch_execute("SELECT pg_reload_conf()").unwrap();
    wait_for("the standby to replicate synchronously", Duration::from_secs(30), || {
        let row = primary
            .query_opt("SELECT sync_state FROM pg_stat_replication WHERE application_name = $1", &[&STANDBY_NAME])
            .unwrap();
        row.filter(|row| row.get::<_, String>(0) == "sync").map(|_| ())
    });

    // The standby's maintenance worker runs there and says once that it waits for a promotion.
    let standby_log = standby_dir.join("postgres.log");
    wait_for("the maintenance worker to wait on the standby", Duration::from_secs(20), || {
        std::fs::read_to_string(&standby_log).unwrap().contains("waiting for its promotion").then_some(())
    });

    // The workers, on one URL naming both servers: they write only where writes are allowed.
    let workers_url = format!(
        "postgresql://postgres:{password}@127.0.0.1:{primary_port},127.0.0.1:{standby_port}/postgres\
         ?target_session_attrs=read-write&connect_timeout=2"
    );
    let env = [("STAGEFLOW_LOG", "info,stageflow_worker=debug"), ("NO_COLOR", "1")];
    for name in ["w1", "w2"] {
        failover.workers.push(common::spawn_worker_with_env(&workers_url, &logs, name, WORKER_ARGS, &env));
    }
    let submitted_at = Instant::now();
    let job_id = submit(&mut primary, "failover_steps", json!({"n": TASKS, "ms": TASK_MS}));

    wait_for("the second stage to be under way", Duration::from_secs(60), || {
        let done: i64 = primary
            .query_one(
                "SELECT count(*) FROM stageflow.tasks WHERE job_id = $1 AND stage = 2 AND status = 'completed'",
                &[&job_id],
            )
            .unwrap()
            .get(0);
        (done >= KILL_AFTER).then_some(())
    });
    // The probe's last attempt, claimed by hand: its claim is committed on the standby too.
    let probe_job = submit(&mut primary, "failover_probe", json!({}));
    let probe = claim(&mut primary, "failover_probe", 1, PROBE_LEASE_SECONDS);
    assert_eq!((probe.len(), probe[0].job_id.as_str(), probe[0].attempt), (1, probe_job.as_str(), 1));
    let probe_task = probe[0].task_id.clone();
    drop(primary);

    // The primary's postmaster dies.
    let pid = std::fs::read_to_string(primary_dir.join("data/postmaster.pid")).unwrap();
    let pid = pid.lines().next().unwrap().trim().to_owned();
    let killed_at = Instant::now();
    let killed_epoch = epoch_seconds();
    run({
        let mut kill = Command::new("kill");
        kill.args(["-KILL", &pid]);
        kill
    });
    wait_for("the primary to refuse connections", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", primary_port)).is_err().then_some(())
    });
    // What the workers saw committed so far, the old primary acknowledged: the standby takes no
    // writes until it is promoted (the workers' URL refuses it while it is read-only).
    let acknowledged_by_old = committed_in_logs(&logs);
    let read_only: String = standby.query_one("SHOW transaction_read_only", &[]).unwrap().get(0);
    assert_eq!(read_only, "on");
    let status = job_status(&mut standby, &job_id);
    assert_eq!(status["status"], "processing", "the job was not under way when the primary died: {status}");
    let probe_status: String =
        standby.query_one("SELECT status FROM stageflow.tasks WHERE task_id = $1", &[&probe_task]).unwrap().get(0);
    assert_eq!(probe_status, "running");
    let while_standby = std::fs::read_to_string(&standby_log).unwrap();
    assert!(stageflow_complaints(&while_standby).is_empty(), "the standby's log:\n{while_standby}");
    assert_eq!(while_standby.matches("waiting for its promotion").count(), 1, "{while_standby}");
    assert!(!while_standby.contains("the server was promoted"), "{while_standby}");
    drop(standby);

    // (A failover manager takes a while to decide that the primary is gone: the pause before the
    // promotion, STAGEFLOW_FAILOVER_DELAY_MS, default none, stands for it.)
    let delay: u64 = std::env::var("STAGEFLOW_FAILOVER_DELAY_MS").ok().and_then(|ms| ms.parse().ok()).unwrap_or(0);
    std::thread::sleep(Duration::from_millis(delay));
    run({
        let mut promote = pg("pg_ctl");
        promote.args(["promote", "-w", "-t", "60", "-D"]).arg(standby_dir.join("data"));
        promote
    });
    let promoted_after = killed_at.elapsed();

    // The job completes on the new primary.
    let mut new_primary = connect(&standby_url);
    assert!(!new_primary.query_one("SELECT pg_is_in_recovery()", &[]).unwrap().get::<_, bool>(0));
    let status = wait_for("the job to complete on the new primary", Duration::from_secs(120), || {
        let status = job_status(&mut new_primary, &job_id);
        (status["status"] != "processing" && status["status"] != "queued").then_some(status)
    });
    let job_seconds = submitted_at.elapsed().as_secs_f64();
    assert_eq!(status["status"], "completed", "{status}");

    // Every completion a worker saw committed is there, under the lease it was made with; every
    // completed task was seen committed, once.
    assert!(!acknowledged_by_old.is_empty(), "no completion was committed before the primary died");
    let tasks: HashMap<String, (String, i64, i32)> = new_primary
        .query("SELECT task_id, status, lease_token, attempt FROM stageflow.tasks WHERE job_id = $1", &[&job_id])
        .unwrap()
        .iter()
        .map(|row| (row.get(0), (row.get(1), row.get(2), row.get(3))))
        .collect();
    for (task_id, token) in &acknowledged_by_old {
        let (status, lease_token, _) = tasks.get(task_id).unwrap_or_else(|| panic!("{task_id} is missing"));
        assert_eq!((status.as_str(), lease_token), ("completed", token), "{task_id}, committed before the failover");
    }
    let committed = committed_in_logs(&logs);
    let mut seen: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
    for (task_id, token) in &committed {
        seen.entry(task_id.as_str()).or_default().push(*token);
    }
    assert_eq!(seen.len(), committed.len(), "a completion was seen committed twice: {seen:?}");
    assert_eq!(tasks.len() as i64, 2 * TASKS + 1);
    for (task_id, (status, lease_token, _)) in &tasks {
        assert_eq!(status, "completed", "{task_id}");
        assert_eq!(seen.get(task_id.as_str()), Some(&vec![*lease_token]), "{task_id} was not seen committed");
    }
    assert!(committed.len() > acknowledged_by_old.len(), "nothing was completed on the new primary");

    // Each stage advanced once, and no stage has a task twice.
    let stages: Vec<(i32, String, i32, i64, i64, i64)> = new_primary
        .query(
            "SELECT s.stage, s.status, s.task_count,
                    (SELECT count(*) FROM stageflow.tasks t WHERE t.job_id = s.job_id AND t.stage = s.stage),
                    (SELECT count(DISTINCT t.task_key) FROM stageflow.tasks t WHERE t.job_id = s.job_id AND t.stage = s.stage),
                    (SELECT count(*) FROM stageflow.events e
                      WHERE e.job_id = s.job_id AND e.stage = s.stage AND e.kind = 'stage_completed')
               FROM stageflow.stages s WHERE s.job_id = $1 ORDER BY s.stage",
            &[&job_id],
        )
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4), row.get(5)))
        .collect();
    let tasks_per_stage = [TASKS as i32, TASKS as i32, 1];
    assert_eq!(stages.len(), 3, "{stages:?}");
    for ((stage, status, task_count, rows, keys, advanced), expected) in stages.iter().zip(tasks_per_stage) {
        assert_eq!(
            (status.as_str(), *task_count, *rows, *keys, *advanced),
            ("completed", expected, expected as i64, expected as i64, 1),
            "stage {stage}: status, task count, tasks, distinct keys, stage_completed events"
        );
    }
    let job_ends: i64 = new_primary
        .query_one("SELECT count(*) FROM stageflow.events WHERE job_id = $1 AND kind = 'job_completed'", &[&job_id])
        .unwrap()
        .get(0);
    assert_eq!(job_ends, 1);

    // Maintenance runs on the new primary: the probe's expired last attempt is dead-lettered.
    let probe_error: serde_json::Value =
        wait_for("maintenance to dead-letter the probe", Duration::from_secs(30), || {
            let row = new_primary
                .query_one(
                    "SELECT status, coalesce(error, 'null') FROM stageflow.tasks WHERE task_id = $1",
                    &[&probe_task],
                )
                .unwrap();
            (row.get::<_, String>(0) == "dead").then(|| row.get(1))
        });
    assert_eq!(probe_error["type"], "lease_expired", "{probe_error}");
    let after = std::fs::read_to_string(&standby_log).unwrap();
    assert!(after.contains("stageflow maintenance worker: the server was promoted; maintaining"), "{after}");
    assert!(stageflow_complaints(&after).is_empty(), "the new primary's log:\n{after}");

    // The workers rode it out: still running, having lost the database and found it again.
    let worker_logs: String =
        ["w1", "w2"].iter().map(|name| std::fs::read_to_string(logs.join(format!("{name}.log"))).unwrap()).collect();
    let worker_logs = strip_ansi(&worker_logs);
    assert!(
        worker_logs.contains("lost the database") || worker_logs.contains("cannot connect"),
        "the workers did not notice the failover:\n{worker_logs}"
    );
    for worker in &mut failover.workers {
        assert!(worker.try_wait().unwrap().is_none(), "a worker exited:\n{worker_logs}");
        common::signal(worker, "TERM");
    }
    for worker in &mut failover.workers {
        assert!(worker.wait().unwrap().success(), "{worker_logs}");
    }

    // How long the job was interrupted: from the last completion before the kill to the first after.
    let row = new_primary
        .query_one(
            "SELECT extract(epoch FROM min(completed_at) FILTER (WHERE completed_at > to_timestamp($2))
                                   - max(completed_at) FILTER (WHERE completed_at <= to_timestamp($2)))::float8,
                    extract(epoch FROM min(completed_at) FILTER (WHERE completed_at > to_timestamp($2)))::float8 - $2,
                    count(*) FILTER (WHERE completed_at <= to_timestamp($2)),
                    count(*) FILTER (WHERE attempt > 1)
               FROM stageflow.tasks WHERE job_id = $1",
            &[&job_id, &killed_epoch],
        )
        .unwrap();
    let (gap, kill_to_first, before_kill, retried): (f64, f64, i64, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    let reconnects = worker_logs.matches("lost the database").count();
    println!(
        "failover: job of {} tasks in {job_seconds:.2} s; {before_kill} completed before the kill ({} seen committed by \
         the workers); standby promoted {:.2} s after the kill; first completion on the new primary {kill_to_first:.2} \
         s after the kill; no completion for {gap:.2} s; {retried} tasks ran a second attempt; {reconnects} \
         lost-connection warnings in the workers' logs",
        2 * TASKS + 1,
        acknowledged_by_old.len(),
        promoted_after.as_secs_f64(),
    );
    drop(new_primary);
    drop(failover);
}
