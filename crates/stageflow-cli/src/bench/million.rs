//! A million-task job through the real worker runtime: `count` N then `lineage` N (2N tasks), run
//! by several `stageflow worker` processes (this binary, the built-in handlers, `debug.sleep` with
//! `ms` 0). Measured: the submission (the N-task fan-out) beside `pgmq.send_batch` of N messages
//! into a fresh queue, the wall time and tasks/s overall and per stage, the time per completion
//! over successive windows of the run (flatness: last window / first), the peak memory of each
//! worker process and of the server, the WAL per task of the run, and the database's size before
//! the submission, after the job completed, after retention deleted it, and after VACUUM.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::clients::clients;
use super::jobs::{run_id, submit};
use super::wal::Meter;
use crate::{connect, CliError};

/// A `/proc/<pid>/status` field in KiB (VmRSS, VmHWM), 0 when /proc does not say.
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

/// The postmaster's pid and its children's (the server's processes), from /proc.
fn server_pids(data_dir: &Path) -> Vec<u32> {
    let Some(postmaster) = std::fs::read_to_string(data_dir.join("postmaster.pid"))
        .ok()
        .and_then(|s| s.lines().next()?.trim().parse::<u32>().ok())
    else {
        return Vec::new();
    };
    let mut pids = vec![postmaster];
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            // /proc/<pid>/stat: "pid (comm) state ppid ..."; comm may hold spaces, so split after ')'.
            let ppid = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| s.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse::<u32>().ok());
            if ppid == Some(postmaster) {
                pids.push(pid);
            }
        }
    }
    pids
}

/// The server's memory now, summed over its processes, in KiB: (PSS, private RSS) from
/// /proc/<pid>/smaps_rollup. PSS shares shared_buffers out among the processes mapping it; private
/// RSS (Private_Clean + Private_Dirty) leaves shared memory out altogether.
fn server_memory_kib(data_dir: &Path) -> (u64, u64) {
    let (mut pss, mut private) = (0, 0);
    for pid in server_pids(data_dir) {
        let Ok(rollup) = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) else { continue };
        for line in rollup.lines() {
            let mut words = line.split_whitespace();
            let (Some(name), Some(kib)) = (words.next(), words.next().and_then(|w| w.parse::<u64>().ok())) else {
                continue;
            };
            match name {
                "Pss:" => pss += kib,
                "Private_Clean:" | "Private_Dirty:" => private += kib,
                _ => {}
            }
        }
    }
    (pss, private)
}

fn spawn_worker(url: &str, logs: &Path, name: &str) -> Result<Child, CliError> {
    let exe = std::env::current_exe().map_err(|e| CliError::Setup(format!("this program's path: {e}")))?;
    let log = std::fs::File::create(logs.join(format!("{name}.log")))
        .map_err(|e| CliError::Setup(format!("{}: {e}", logs.display())))?;
    let err = log.try_clone().map_err(|e| CliError::Setup(e.to_string()))?;
    Command::new(exe)
        .args(["worker", "--database-url", url, "--worker-id", name, "--queue", "bench"])
        .args(["--concurrency", "16", "--batch-size", "64", "--poll-interval-ms", "100"])
        .stdout(log)
        .stderr(err)
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| CliError::Setup(format!("stageflow worker: {e}")))
}

/// Stops a worker with SIGTERM (it finishes or releases its tasks) and waits for it.
fn stop_worker(mut child: Child) -> Result<(), CliError> {
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    child.wait().map_err(|e| CliError::Setup(format!("waiting for a worker: {e}")))?;
    Ok(())
}

/// Seconds `pgmq.send_batch` takes to enqueue `count` messages (payloads like a task's message) in
/// one committed statement, into a fresh queue (dropped after).
pub(super) async fn send_batch_seconds(url: &str, sync: bool, count: i64) -> Result<f64, CliError> {
    let client = clients(url, 1, sync).await?.remove(0);
    client.batch_execute("SELECT pgmq.create('bench_send_batch')").await?;
    let start = Instant::now();
    client
        .query_one(
            "SELECT count(*) FROM pgmq.send_batch('bench_send_batch', \
               ARRAY(SELECT jsonb_build_object('task_id', '0123456789abcdef-s1-' || i) \
                       FROM generate_series(0, $1::bigint - 1) AS i))",
            &[&count],
        )
        .await?;
    let elapsed = start.elapsed().as_secs_f64();
    client.batch_execute("SELECT pgmq.drop_queue('bench_send_batch')").await?;
    Ok(elapsed)
}

/// The time per completion (µs) in successive windows of `window` completions, from samples of
/// (seconds since start, tasks completed), each window's ends interpolated between samples.
fn windows(samples: &[(f64, i64)], window: i64, total: i64) -> Vec<f64> {
    let at = |count: i64| -> f64 {
        let i = samples.partition_point(|s| s.1 < count);
        if i == 0 {
            return samples.first().map_or(0.0, |s| s.0);
        }
        let Some(&(t1, c1)) = samples.get(i) else { return samples.last().map_or(0.0, |s| s.0) };
        let (t0, c0) = samples[i - 1];
        t0 + (t1 - t0) * (count - c0) as f64 / (c1 - c0).max(1) as f64
    };
    (0..total / window).map(|k| (at((k + 1) * window) - at(k * window)) * 1e6 / window as f64).collect()
}

/// Runs the line: `n` tasks a stage, `workers` worker processes, windows of `window` completions.
pub(super) async fn run(
    url: &str,
    data_dir: &Path,
    logs: &Path,
    sync: bool,
    n: i64,
    workers: usize,
    window: i64,
) -> Result<Value, CliError> {
    let setup = connect(url).await?.into_raw();
    let size = "SELECT pg_database_size(current_database())";
    let pgmq_size = "SELECT coalesce(pg_total_relation_size('pgmq.q_bench'), 0) + coalesce(pg_total_relation_size('pgmq.a_bench'), 0)";
    // The job has 2n tasks: the bench's login may open them (an admin's quota, reset at the end).
    setup.execute("SELECT stageflow.set_quota(session_user, $1::bigint, $1::bigint)", &[&(4 * n)]).await?;

    let send_batch = send_batch_seconds(url, sync, n).await?;
    setup.batch_execute("VACUUM (ANALYZE)").await?;
    setup.batch_execute("CHECKPOINT").await?;
    // The workers' sessions take the line's synchronous_commit from the database.
    setup
        .batch_execute(&format!(
            "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET synchronous_commit = {}', current_database()); END $$",
            if sync { "on" } else { "off" }
        ))
        .await?;
    let size_before: i64 = setup.query_one(size, &[]).await?.get(0);
    let pgmq_before: i64 = setup.query_one(pgmq_size, &[]).await?.get(0);

    let submitter = clients(url, 1, sync).await?.remove(0);
    let start = Instant::now();
    let job_id = submit(&submitter, "bench", json!({"n": n, "ms": 0, "run": run_id()})).await?;
    let submit_seconds = start.elapsed().as_secs_f64();
    // The WAL of the run, stage 2's lineage fan-out included (checkpoints fall within it, so its
    // claims and completions log task pages whole as a backlog does); not the submission's.
    // (the submitter stays connected until the reading after the run: the count of connections
    // that reading waits to come back to includes it)
    let wal = Meter::start(url, &[&setup, &submitter]).await?;

    let mut children = Vec::new();
    for i in 0..workers {
        children.push(spawn_worker(url, logs, &format!("million-{i}"))?);
    }
    let pids: Vec<u32> = children.iter().map(Child::id).collect();
    let workers_start = start.elapsed().as_secs_f64();
    let progress = setup
        .prepare(
            "SELECT j.status, coalesce((SELECT sum(s.task_count - c.remaining_tasks)::bigint \
                                          FROM stageflow.stages AS s JOIN stageflow.stage_counts AS c USING (job_id, stage) \
                                         WHERE s.job_id = j.job_id), 0), \
                    coalesce((SELECT c.remaining_tasks FROM stageflow.stage_counts AS c \
                               WHERE c.job_id = j.job_id AND c.stage = 1), -1) \
               FROM stageflow.jobs AS j WHERE j.job_id = $1",
        )
        .await?;
    let mut samples: Vec<(f64, i64)> = vec![(workers_start, 0)];
    let mut stage1_done = None;
    let (mut peak_pss, mut peak_private) = (0, 0);
    let mut last_memory = Instant::now() - Duration::from_secs(10);
    let status: String = loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let row = setup.query_one(&progress, &[&job_id]).await?;
        let now = start.elapsed().as_secs_f64();
        let (status, completed, stage1_left): (String, i64, i32) = (row.get(0), row.get(1), row.get(2));
        samples.push((now, completed));
        if stage1_done.is_none() && stage1_left == 0 {
            stage1_done = Some(now);
        }
        if last_memory.elapsed() >= Duration::from_secs(1) {
            last_memory = Instant::now();
            let (pss, private) = server_memory_kib(data_dir);
            peak_pss = peak_pss.max(pss);
            peak_private = peak_private.max(private);
        }
        if status != "processing" && status != "queued" {
            break status;
        }
        if children.iter_mut().any(|c| matches!(c.try_wait(), Ok(Some(_)))) {
            return Err(CliError::Setup(format!("a worker process exited early (see {})", logs.display())));
        }
    };
    let wall = start.elapsed().as_secs_f64();
    let worker_kib: Vec<Value> = pids
        .iter()
        .map(|&pid| json!({"peak_rss_kib": status_kib(pid, "VmHWM:"), "end_rss_kib": status_kib(pid, "VmRSS:")}))
        .collect();
    for child in children {
        stop_worker(child)?;
    }
    let wal = wal.per((2 * n) as f64).await?;
    drop(submitter);
    let stage1_done = stage1_done.unwrap_or(wall);
    let flat = windows(&samples, window, 2 * n);
    let flatness = match (flat.first(), flat.last()) {
        (Some(first), Some(last)) if *first > 0.0 => last / first,
        _ => 0.0,
    };
    let worst = flat.iter().copied().fold(0.0, f64::max) / flat.iter().copied().fold(f64::INFINITY, f64::min);

    setup
        .batch_execute(
            "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I RESET synchronous_commit', current_database()); END $$",
        )
        .await?;
    let size_done: i64 = setup.query_one(size, &[]).await?.get(0);
    let pgmq_done: i64 = setup.query_one(pgmq_size, &[]).await?.get(0);

    // Retention: the finished job is deleted by maintenance rounds, its row first, then its tasks
    // and events at most stageflow.retention_batch_size (default 10000) of each a round, until
    // stageflow.deleted_jobs no longer notes it.
    setup.batch_execute("SET stageflow.retention = '1 microsecond'").await?;
    let retention_start = Instant::now();
    let mut rounds = 0;
    loop {
        rounds += 1;
        let report: Value = setup.query_one("SELECT stageflow.run_maintenance(1000)", &[]).await?.get(0);
        if report.get("error").is_some() {
            return Err(CliError::Setup(format!("run_maintenance: {report}")));
        }
        let gone: bool = setup
            .query_one(
                "SELECT NOT EXISTS (SELECT FROM stageflow.jobs WHERE job_id = $1) \
                    AND NOT EXISTS (SELECT FROM stageflow.deleted_jobs WHERE job_id = $1)",
                &[&job_id],
            )
            .await?
            .get(0);
        if gone {
            break;
        }
        if rounds >= 1000 {
            return Err(CliError::Setup(format!("retention did not delete job {job_id} in {rounds} rounds")));
        }
    }
    let retention_seconds = retention_start.elapsed().as_secs_f64();
    setup.batch_execute("RESET stageflow.retention").await?;
    let tasks_left: i64 =
        setup.query_one("SELECT count(*) FROM stageflow.tasks WHERE job_id = $1", &[&job_id]).await?.get(0);
    let size_retained: i64 = setup.query_one(size, &[]).await?.get(0);
    let vacuum_start = Instant::now();
    setup.batch_execute("VACUUM").await?;
    let vacuum_seconds = vacuum_start.elapsed().as_secs_f64();
    let size_vacuumed: i64 = setup.query_one(size, &[]).await?.get(0);
    let pgmq_vacuumed: i64 = setup.query_one(pgmq_size, &[]).await?.get(0);
    setup.execute("SELECT stageflow.set_quota(session_user, NULL, NULL)", &[]).await?;

    let mib = |bytes: i64| bytes as f64 / 1048576.0;
    Ok(json!({
        "tasks_per_stage": n, "tasks": 2 * n, "worker_processes": workers, "job_status": status,
        "submit_seconds": submit_seconds, "send_batch_seconds": send_batch,
        "submit_to_send_batch_ratio": submit_seconds / send_batch,
        "wall_seconds": wall, "tasks_per_second": (2 * n) as f64 / wall,
        "stage_1_tasks_per_second": n as f64 / (stage1_done - workers_start),
        "stage_2_tasks_per_second": n as f64 / (wall - stage1_done),
        "window_tasks": window, "window_us_per_task": flat,
        "flatness_last_to_first": flatness, "flatness_max_to_min": worst,
        "wal_per_task": wal.json(),
        "workers": worker_kib,
        "server_peak_pss_kib": peak_pss, "server_peak_private_rss_kib": peak_private,
        "database_mib": {"before": mib(size_before), "completed": mib(size_done),
                         "after_retention": mib(size_retained), "after_vacuum": mib(size_vacuumed)},
        "pgmq_bench_queue_mib": {"before": mib(pgmq_before), "completed": mib(pgmq_done), "after_vacuum": mib(pgmq_vacuumed)},
        "retention_rounds": rounds, "retention_seconds": retention_seconds, "vacuum_seconds": vacuum_seconds,
        "tasks_left_after_retention": tasks_left,
    }))
}

/// Where the workers' logs go: the cluster's directory.
pub(super) fn logs_dir(cluster_dir: &Path) -> PathBuf {
    cluster_dir.join("million-workers")
}
