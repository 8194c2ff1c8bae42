//! `stageflow bench`: Stageflow beside raw pgmq, on one private cluster, in one run, with the same
//! number of client connections for every line; each line with synchronous_commit on and off.
//!
//! 1. the machine's single-row commit rate (the physical limit of one commit per task);
//! 2. pgmq: read + delete one message at a time, and 100 at a time;
//! 3. Stageflow end to end (`count` N no-op tasks, then `lineage`): claim + complete one at a
//!    time, and claim 100 + `complete_tasks`, each completion fenced by its lease as a worker's is;
//! 4. fan-out: submitting a job whose first stage has 100,000 tasks;
//! 5. flatness: the cost of a completion in stages of 100, 10,000 and 100,000 tasks;
//! 6. latency: last completion committed -> next stage's first task claimed by an idle worker
//!    woken by NOTIFY, and submit -> first claim (p50, p99);
//! 7. memory: the worker's resident memory over a 100,000-task job, and job_status on it.
//!
//! Results are printed and written to `<out>/<date>.json`.
//!
//! Setup goes through the SQL API (`stageflow_client`); what a line times is written out as SQL
//! here (prepared by each client, returning only the columns it uses, a batch built in the
//! statement), so that a change of the client does not change what is measured, and runs on raw
//! tokio-postgres connections.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use stageflow_worker::tasks::{listen, TaskApi};
use stageflow_worker::{builtin_handlers, Worker, WorkerConfig};
use tokio::sync::Notify;
use tokio_postgres::Client;

use crate::cluster::Cluster;
use crate::{connect, CliError};

pub struct BenchOptions {
    pub clients: usize,
    pub quick: bool,
    pub out_dir: std::path::PathBuf,
    pub cluster_dir: std::path::PathBuf,
}

struct Sizes {
    messages: usize,
    e2e_tasks: i64,
    e2e_batch_tasks: i64,
    fan_out: i64,
    flat_sample: usize,
    flat_sizes: [i64; 3],
    latency_rounds: usize,
    memory_tasks: i64,
    commit_seconds: f64,
}

/// `n` raw connections for a timed line.
async fn clients(url: &str, n: usize, sync: bool) -> Result<Vec<Client>, CliError> {
    let mut all = Vec::with_capacity(n);
    for _ in 0..n {
        let client = connect(url).await?.into_raw();
        client.batch_execute(if sync { "SET synchronous_commit = on" } else { "SET synchronous_commit = off" }).await?;
        all.push(client);
    }
    Ok(all)
}

fn percentile(samples: &mut [f64], p: f64) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[((samples.len() as f64 - 1.0) * p).round() as usize]
}

/// Brings the database to the same quiet state before a timed line: the previous line's churn
/// vacuumed and analysed and its WAL checkpointed, so that neither autovacuum nor a checkpoint
/// competes with the line for the machine (on 2 cores an autovacuum worker halved a line).
async fn settle(client: &stageflow_client::Client) -> Result<(), CliError> {
    let client = client.raw();
    client.batch_execute("VACUUM (ANALYZE)").await?;
    client.batch_execute("CHECKPOINT").await?;
    Ok(())
}

/// Runs `work` on every client at once until each returns; returns the elapsed time.
async fn in_parallel<F, Fut>(clients: Vec<Client>, work: F) -> Result<(Duration, Vec<Client>), CliError>
where
    F: Fn(Client) -> Fut,
    Fut: std::future::Future<Output = Result<Client, tokio_postgres::Error>> + Send + 'static,
{
    let start = Instant::now();
    let handles: Vec<_> = clients.into_iter().map(|c| tokio::spawn(work(c))).collect();
    let mut back = Vec::new();
    for handle in handles {
        back.push(handle.await.map_err(|e| CliError::Setup(format!("bench client crashed: {e}")))??);
    }
    Ok((start.elapsed(), back))
}

async fn commit_rate(url: &str, n: usize, sync: bool, seconds: f64) -> Result<f64, CliError> {
    let setup = connect(url).await?;
    setup.raw().batch_execute("DROP TABLE IF EXISTS bench_commits; CREATE TABLE bench_commits (id bigserial, at timestamptz DEFAULT now())").await?;
    let done = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let (elapsed, _) = in_parallel(clients(url, n, sync).await?, |client| {
        let done = done.clone();
        async move {
            let insert = client.prepare("INSERT INTO bench_commits DEFAULT VALUES").await?;
            while Instant::now() < deadline {
                client.execute(&insert, &[]).await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok(client)
        }
    })
    .await?;
    Ok(done.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64())
}

async fn pgmq_rate(url: &str, n: usize, sync: bool, batch: i32, messages: usize) -> Result<f64, CliError> {
    let setup = connect(url).await?;
    setup.raw().batch_execute("SELECT pgmq.create('bench_pgmq'); SELECT pgmq.purge_queue('bench_pgmq')").await?;
    let payload: Vec<Value> = (0..1000).map(|i| json!({"task_id": format!("message-{i}")})).collect();
    for _ in 0..messages.div_ceil(1000) {
        setup.raw().execute("SELECT pgmq.send_batch('bench_pgmq', $1::jsonb[])", &[&payload]).await?;
    }
    let (elapsed, _) = in_parallel(clients(url, n, sync).await?, |client| async move {
        let read = client.prepare("SELECT msg_id FROM pgmq.read('bench_pgmq', 30, $1)").await?;
        let delete_one = client.prepare("SELECT pgmq.delete('bench_pgmq', $1::bigint)").await?;
        let delete_many = client.prepare("SELECT pgmq.delete('bench_pgmq', $1::bigint[])").await?;
        loop {
            let ids: Vec<i64> = client.query(&read, &[&batch]).await?.iter().map(|r| r.get(0)).collect();
            match ids.len() {
                0 => return Ok(client),
                1 => {
                    client.query(&delete_one, &[&ids[0]]).await?;
                }
                _ => {
                    client.query(&delete_many, &[&ids]).await?;
                }
            }
        }
    })
    .await?;
    Ok(messages.div_ceil(1000) as f64 * 1000.0 / elapsed.as_secs_f64())
}

const BENCH_TYPE: &str = r#"{
    "description": "stageflow bench: N no-op tasks, then one per task",
    "parameters": {"type": "object", "properties": {"n": {"type": "integer"}, "run": {"type": "string"}, "ms": {"type": "integer"}}},
    "stages": [{"name": "first", "handler": "debug.sleep", "queue": "bench", "fan_out": "count", "param": "n"},
               {"name": "second", "handler": "debug.sleep", "queue": "bench", "fan_out": "lineage"}]
}"#;

async fn register_bench_types(client: &stageflow_client::Client) -> Result<(), CliError> {
    let api = client.api();
    let two: Value = serde_json::from_str(BENCH_TYPE).expect("valid");
    api.register_job_type("bench", &two).await?;
    let one = json!({"stages": [{"name": "only", "handler": "debug.sleep", "queue": "flat", "fan_out": "count", "param": "n"}],
                     "parameters": {"type": "object", "properties": {"n": {"type": "integer"}, "run": {"type": "string"}}}});
    api.register_job_type("bench_flat", &one).await?;
    let hop = json!({"stages": [{"name": "a", "handler": "debug.sleep", "queue": "hop"}, {"name": "b", "handler": "debug.sleep", "queue": "hop"}],
                     "parameters": {"type": "object", "properties": {"run": {"type": "string"}}}});
    api.register_job_type("bench_hop", &hop).await?;
    Ok(())
}

fn run_id() -> String {
    format!("{}-{}", std::process::id(), chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default())
}

/// Raw: the fan-out line times this statement.
async fn submit(client: &Client, job_type: &str, params: Value) -> Result<String, CliError> {
    Ok(client.query_one("SELECT stageflow.submit_job($1, $2)", &[&job_type, &params]).await?.get(0))
}

/// End to end: workers claim and complete until the job is done; returns tasks per second. Each
/// completion passes the worker id and the claim's lease token, as the worker runtime does.
async fn stageflow_rate(url: &str, n: usize, sync: bool, batch: i32, tasks: i64) -> Result<f64, CliError> {
    let setup = connect(url).await?;
    let job_id = submit(setup.raw(), "bench", json!({"n": tasks, "run": run_id()})).await?;
    let finished = Arc::new(AtomicBool::new(false));
    let (elapsed, _) = in_parallel(clients(url, n, sync).await?, |client| {
        let (job_id, finished) = (job_id.clone(), finished.clone());
        async move {
            let claim = client.prepare("SELECT task_id, lease_token FROM stageflow.claim_tasks('bench', $1, 60, 'bench')").await?;
            let complete = client.prepare("SELECT stageflow.complete_task_and_check_stage($1, '{}', 'bench', $2)").await?;
            let complete_many = client
                .prepare(
                    "SELECT stageflow.complete_tasks((SELECT jsonb_agg(jsonb_build_object('task_id', id, 'lease_token', token)) \
                                                        FROM unnest($1::text[], $2::bigint[]) AS t(id, token)), 'bench')",
                )
                .await?;
            let status = client.prepare("SELECT status FROM stageflow.jobs WHERE job_id = $1").await?;
            loop {
                let (ids, tokens): (Vec<String>, Vec<i64>) =
                    client.query(&claim, &[&batch]).await?.iter().map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1))).unzip();
                if ids.is_empty() {
                    if finished.load(Ordering::Relaxed) {
                        return Ok(client);
                    }
                    let state: String = client.query_one(&status, &[&job_id]).await?.get(0);
                    if state != "processing" && state != "queued" {
                        finished.store(true, Ordering::Relaxed);
                        return Ok(client);
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                }
                if batch == 1 {
                    client.query_one(&complete, &[&ids[0], &tokens[0]]).await?;
                } else {
                    client.query_one(&complete_many, &[&ids, &tokens]).await?;
                }
            }
        }
    })
    .await?;
    Ok(2.0 * tasks as f64 / elapsed.as_secs_f64())
}

async fn fan_out_seconds(url: &str, sync: bool, tasks: i64) -> Result<f64, CliError> {
    let client = clients(url, 1, sync).await?.remove(0);
    let start = Instant::now();
    let job_id = submit(&client, "bench_flat", json!({"n": tasks, "run": run_id()})).await?;
    let elapsed = start.elapsed().as_secs_f64();
    stageflow_client::Api::new(&client).cancel_job(&job_id).await?;
    Ok(elapsed)
}

/// Microseconds per completion (at n clients) in stages of `size` tasks, over `sample` completions,
/// in the psql form (no worker id, no lease token).
async fn completion_cost(url: &str, n: usize, sync: bool, size: i64, sample: usize) -> Result<f64, CliError> {
    let setup = connect(url).await?;
    let jobs = ((sample as i64 + size - 1) / size).max(1);
    let mut ids: Vec<String> = Vec::new();
    let mut job_ids = Vec::new();
    for _ in 0..jobs {
        job_ids.push(submit(setup.raw(), "bench_flat", json!({"n": size, "run": run_id()})).await?);
    }
    while ids.len() < sample {
        let want = (sample - ids.len()).min(5000) as i32;
        let claimed: Vec<String> = setup
            .api()
            .claim_tasks("flat", want, 600, Some("bench"))
            .await?
            .into_iter()
            .map(|task| task.task_id)
            .collect();
        if claimed.is_empty() {
            break;
        }
        ids.extend(claimed);
    }
    let count = ids.len();
    let queue = Arc::new(std::sync::Mutex::new(ids));
    let (elapsed, _) = in_parallel(clients(url, n, sync).await?, |client| {
        let queue = queue.clone();
        async move {
            let complete = client.prepare("SELECT stageflow.complete_task_and_check_stage($1, '{}')").await?;
            loop {
                // A poisoned lock means another client panicked: its ids are as good as ever.
                let next = queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop();
                match next {
                    Some(id) => {
                        client.query_one(&complete, &[&id]).await?;
                    }
                    None => return Ok(client),
                }
            }
        }
    })
    .await?;
    for job_id in job_ids {
        setup.api().cancel_job(&job_id).await?;
    }
    Ok(elapsed.as_secs_f64() * 1e6 / count as f64)
}

/// Claims one task of the `hop` queue, sleeping until a notification while the queue is empty;
/// returns it with the instant it was claimed.
async fn claim_when_woken(worker: &TaskApi, wake: &Notify) -> Result<(String, Instant), stageflow_client::Error> {
    loop {
        let tasks = worker.claim("hop", 1, 60, "bench-idle").await?;
        if let Some(task) = tasks.into_iter().next() {
            return Ok((task.task_id, Instant::now()));
        }
        // The poll fallback (5 s) is far beyond any latency measured here.
        let _ = tokio::time::timeout(Duration::from_secs(5), wake.notified()).await;
    }
}

/// (stage advance, submit -> first claim) latencies in milliseconds, with an idle worker woken by NOTIFY;
/// the driver completes in the psql form.
async fn latencies(url: &str, sync: bool, rounds: usize) -> Result<(Vec<f64>, Vec<f64>), CliError> {
    let driver = clients(url, 1, sync).await?.remove(0);
    let wake = Arc::new(Notify::new());
    let ended = Arc::new(Notify::new());
    let _listener = listen(url, wake.clone(), ended).await?;
    let worker = TaskApi::connect(url).await?;
    let mut advance = Vec::new();
    let mut first_claim = Vec::new();
    for _ in 0..rounds {
        let pending = claim_when_woken(&worker, &wake);
        tokio::pin!(pending);
        // Let the idle worker find the queue empty and wait before the work arrives.
        tokio::select! {
            _ = &mut pending => return Err(CliError::Setup("the hop queue was not empty".into())),
            _ = tokio::time::sleep(Duration::from_millis(5)) => {}
        }
        let job_id = submit(&driver, "bench_hop", json!({"run": run_id()})).await?;
        let submitted = Instant::now();
        let (task_id, claimed) = pending.await?;
        first_claim.push((claimed - submitted).as_secs_f64() * 1000.0);

        let pending = claim_when_woken(&worker, &wake);
        tokio::pin!(pending);
        tokio::select! {
            _ = &mut pending => return Err(CliError::Setup("stage b appeared before stage a completed".into())),
            _ = tokio::time::sleep(Duration::from_millis(5)) => {}
        }
        // Raw, as the timed completions elsewhere: the latency is counted from its commit.
        driver.query_one("SELECT stageflow.complete_task_and_check_stage($1, '{}')", &[&task_id]).await?;
        let committed = Instant::now();
        let (task_id, claimed) = pending.await?;
        advance.push((claimed - committed).as_secs_f64() * 1000.0);
        driver.query_one("SELECT stageflow.complete_task_and_check_stage($1, '{}')", &[&task_id]).await?;
        let state: String =
            driver.query_one("SELECT status FROM stageflow.jobs WHERE job_id = $1", &[&job_id]).await?.get(0);
        if state != "completed" {
            return Err(CliError::Setup(format!("latency job ended {state}")));
        }
    }
    Ok((advance, first_claim))
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Runs the worker runtime over a job of `tasks` tasks; returns (RSS at start, RSS at end, tasks/s,
/// job_status p50 ms on the finished job).
async fn memory(url: &str, n: usize, tasks: i64) -> Result<Value, CliError> {
    // Raw: job_status is timed here as the statement it is; the job's state is polled from its
    // row (lighter than job_status, so that polling does not weigh on the line).
    let client = connect(url).await?.into_raw();
    let job_id = submit(&client, "bench", json!({"n": tasks / 2, "ms": 0, "run": run_id()})).await?;
    let mut config = WorkerConfig::new(url);
    config.queues = vec!["bench".into()];
    config.concurrency = n * 4;
    config.batch_size = 64;
    config.poll_interval = Duration::from_millis(100);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let start_rss = rss_kib();
    let start = Instant::now();
    let worker = tokio::spawn(Worker::new(config, builtin_handlers()).run(async {
        let _ = stop_rx.await;
    }));
    let mut peak = start_rss;
    let mut running_status_ms = Vec::new();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        peak = peak.max(rss_kib());
        let state: String =
            client.query_one("SELECT status FROM stageflow.jobs WHERE job_id = $1", &[&job_id]).await?.get(0);
        if state != "processing" && state != "queued" {
            break;
        }
        // job_status of the running job (a small document: the result comes only at the end).
        let t = Instant::now();
        client.query_one("SELECT stageflow.job_status($1)", &[&job_id]).await?;
        running_status_ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let _ = stop_tx.send(());
    let report = worker.await.map_err(|e| CliError::Setup(e.to_string()))?;
    // Before this process reads the finished job's large result below.
    let end_rss = rss_kib();
    let mut status_ms = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        client.query_one("SELECT stageflow.job_status($1)", &[&job_id]).await?;
        status_ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(json!({
        "tasks": tasks, "completed_by_worker": report.completed, "tasks_per_second": tasks as f64 / elapsed,
        "rss_start_kib": start_rss, "rss_peak_kib": peak, "rss_end_kib": end_rss,
        "job_status_p50_ms": percentile(&mut status_ms, 0.5),
        "job_status_while_running_p50_ms": percentile(&mut running_status_ms, 0.5),
        "job_status_while_running_max_ms": percentile(&mut running_status_ms, 1.0),
    }))
}

/// process_raster of a generated `size` x `size` raster in tiles of `tile` with `workers` workers,
/// against one `gdal_translate -of COG` of the whole raster with the same creation options.
#[cfg(feature = "geo")]
async fn geo_line(url: &str, dir: &std::path::Path, size: usize, tile: i64, workers: usize) -> Result<Value, CliError> {
    let geo_client = connect(url).await?;
    crate::demo::install_geo(&geo_client).await?;
    let client = geo_client.raw();
    std::fs::create_dir_all(dir).map_err(|e| CliError::Setup(e.to_string()))?;
    let source = dir.join(format!("bench_{size}.tif")).to_string_lossy().into_owned();
    if !std::path::Path::new(&source).exists() {
        let path = source.clone();
        tokio::task::spawn_blocking(move || stageflow_geo::raster::generate(&path, size))
            .await
            .map_err(|e| CliError::Setup(e.to_string()))?
            .map_err(|e| CliError::Setup(e.to_string()))?;
    }
    let output = dir.join(format!("tiles-{}", run_id()));
    let mut config = WorkerConfig::new(url);
    config.queues = vec!["geo".into()];
    config.concurrency = workers;
    config.poll_interval = Duration::from_millis(50);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(Worker::new(config.clone(), crate::worker_handlers(&config.database_url)).run(async {
        let _ = stop_rx.await;
    }));
    let start = Instant::now();
    let job_id = submit(
        client,
        "process_raster",
        json!({"source": source, "tile_size": tile, "output": output.to_string_lossy()}),
    )
    .await?;
    loop {
        let state: String =
            client.query_one("SELECT status FROM stageflow.jobs WHERE job_id = $1", &[&job_id]).await?.get(0);
        if state != "processing" && state != "queued" {
            if state != "completed" {
                return Err(CliError::JobFailed(job_id));
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stageflow_s = start.elapsed().as_secs_f64();
    let _ = stop_tx.send(());
    let _ = worker.await;
    let whole = dir.join(format!("whole-{}.tif", run_id()));
    let start = Instant::now();
    let status = std::process::Command::new("gdal_translate")
        .args([
            "-q",
            "-of",
            "COG",
            "-co",
            "COMPRESS=DEFLATE",
            "-co",
            "PREDICTOR=2",
            "-co",
            "BLOCKSIZE=256",
            "-co",
            "OVERVIEWS=AUTO",
            "-co",
            "OVERVIEW_RESAMPLING=AVERAGE",
        ])
        .arg(&source)
        .arg(&whole)
        .status()
        .map_err(|e| CliError::Setup(format!("gdal_translate: {e}")))?;
    let gdal_s = start.elapsed().as_secs_f64();
    if !status.success() {
        return Err(CliError::Setup("gdal_translate failed".into()));
    }
    let _ = std::fs::remove_dir_all(&output);
    let _ = std::fs::remove_file(&whole);
    Ok(json!({"raster": format!("{size}x{size} UInt16"), "tile_size": tile, "workers": workers,
              "process_raster_seconds": stageflow_s, "gdal_translate_seconds": gdal_s, "ratio": stageflow_s / gdal_s}))
}

pub async fn run(options: BenchOptions) -> Result<(), CliError> {
    let sizes = if options.quick {
        Sizes {
            messages: 2000,
            e2e_tasks: 500,
            e2e_batch_tasks: 2000,
            fan_out: 10_000,
            flat_sample: 300,
            flat_sizes: [100, 1000, 10_000],
            latency_rounds: 10,
            memory_tasks: 2000,
            commit_seconds: 0.5,
        }
    } else {
        Sizes {
            messages: 20_000,
            e2e_tasks: 5000,
            e2e_batch_tasks: 50_000,
            fan_out: 100_000,
            flat_sample: 2000,
            flat_sizes: [100, 10_000, 100_000],
            latency_rounds: 100,
            memory_tasks: 100_000,
            commit_seconds: 3.0,
        }
    };
    let cluster = Cluster::at(&options.cluster_dir).map_err(CliError::Setup)?.with_settings(&[
        "shared_buffers=1GB",
        "max_wal_size=4GB",
        "stageflow.retention=0",
    ]);
    cluster.stop("fast").map_err(CliError::Setup)?;
    let url = cluster.ensure_running().map_err(CliError::Setup)?;
    let admin = connect(&url).await?;
    admin.raw().batch_execute("DROP DATABASE IF EXISTS stageflow_bench WITH (FORCE)").await?;
    admin.raw().batch_execute("CREATE DATABASE stageflow_bench").await?;
    let url = url
        .rsplit_once('/')
        .map(|(base, _)| format!("{base}/stageflow_bench"))
        .ok_or_else(|| CliError::Setup(format!("the cluster's URL has no database part: {url}")))?;
    let setup = connect(&url).await?;
    setup.raw().batch_execute("CREATE EXTENSION stageflow CASCADE").await?;
    register_bench_types(&setup).await?;
    let version: String = setup.raw().query_one("SELECT version()", &[]).await?.get(0);
    let c = options.clients;
    println!("stageflow bench: {c} client connections, {}", if options.quick { "quick sizes" } else { "full sizes" });

    let mut modes = serde_json::Map::new();
    for sync in [true, false] {
        let label = if sync { "on" } else { "off" };
        println!("\n-- synchronous_commit = {label}");
        settle(&setup).await?;
        let commits = commit_rate(&url, c, sync, sizes.commit_seconds).await?;
        println!("{:<58} {:>12.0} commits/s", "single-row INSERT commits", commits);
        settle(&setup).await?;
        let pgmq_one = pgmq_rate(&url, c, sync, 1, sizes.messages).await?;
        println!("{:<58} {:>12.0} msg/s", "pgmq read + delete, one at a time", pgmq_one);
        settle(&setup).await?;
        let pgmq_batch = pgmq_rate(&url, c, sync, 100, sizes.messages).await?;
        println!("{:<58} {:>12.0} msg/s", "pgmq read 100 + delete 100", pgmq_batch);
        settle(&setup).await?;
        let sf_one = stageflow_rate(&url, c, sync, 1, sizes.e2e_tasks).await?;
        println!(
            "{:<58} {:>12.0} tasks/s  ({:.2}x pgmq one at a time)",
            "stageflow claim + complete, one at a time",
            sf_one,
            sf_one / pgmq_one
        );
        settle(&setup).await?;
        let sf_batch = stageflow_rate(&url, c, sync, 100, sizes.e2e_batch_tasks).await?;
        println!(
            "{:<58} {:>12.0} tasks/s  ({:.2}x pgmq one at a time)",
            "stageflow claim 100 + complete_tasks",
            sf_batch,
            sf_batch / pgmq_one
        );
        settle(&setup).await?;
        let fan_out = fan_out_seconds(&url, sync, sizes.fan_out).await?;
        println!("{:<58} {:>12.3} s", format!("submit a job of {} first-stage tasks", sizes.fan_out), fan_out);
        let mut costs = Vec::new();
        for size in sizes.flat_sizes {
            settle(&setup).await?;
            let cost = completion_cost(&url, c, sync, size, sizes.flat_sample).await?;
            println!("{:<58} {:>12.1} us/task", format!("completion in a stage of {size} tasks"), cost);
            costs.push(cost);
        }
        let flatness = costs[2] / costs[0];
        println!("{:<58} {:>12.2}", "flatness (largest / smallest stage)", flatness);
        settle(&setup).await?;
        let (mut advance, mut first) = latencies(&url, sync, sizes.latency_rounds).await?;
        let (a50, a99, f50, f99) = (
            percentile(&mut advance, 0.5),
            percentile(&mut advance, 0.99),
            percentile(&mut first, 0.5),
            percentile(&mut first, 0.99),
        );
        println!("{:<58} {:>7.2} / {:.2} ms", "stage advance -> next task claimed, p50 / p99", a50, a99);
        println!("{:<58} {:>7.2} / {:.2} ms", "submit -> first task claimed, p50 / p99", f50, f99);
        modes.insert(
            label.into(),
            json!({
                "commit_rate_per_s": commits,
                "pgmq_one_at_a_time_msg_per_s": pgmq_one,
                "pgmq_batch_100_msg_per_s": pgmq_batch,
                "stageflow_one_at_a_time_tasks_per_s": sf_one,
                "stageflow_batch_100_tasks_per_s": sf_batch,
                "ratio_one_at_a_time_to_pgmq": sf_one / pgmq_one,
                "ratio_batch_to_pgmq_one_at_a_time": sf_batch / pgmq_one,
                "fan_out_tasks": sizes.fan_out,
                "fan_out_seconds": fan_out,
                "completion_cost_us": {"stage_sizes": sizes.flat_sizes, "per_task": costs},
                "flatness_ratio": flatness,
                "stage_advance_ms": {"p50": a50, "p99": a99},
                "submit_to_first_claim_ms": {"p50": f50, "p99": f99},
            }),
        );
    }
    println!("\n-- the worker runtime over {} tasks", sizes.memory_tasks);
    settle(&setup).await?;
    let mem = memory(&url, c, sizes.memory_tasks).await?;
    println!(
        "{:<58} {:>7} -> {} KiB (peak {})",
        "worker RSS, start -> end", mem["rss_start_kib"], mem["rss_end_kib"], mem["rss_peak_kib"]
    );
    println!("{:<58} {:>12.0} tasks/s", "worker runtime end to end", mem["tasks_per_second"].as_f64().unwrap_or(0.0));
    println!(
        "{:<58} {:>7.2} / {:.2} ms",
        format!("job_status of the {}-task job while it runs, p50 / max", sizes.memory_tasks),
        mem["job_status_while_running_p50_ms"].as_f64().unwrap_or(0.0),
        mem["job_status_while_running_max_ms"].as_f64().unwrap_or(0.0)
    );
    println!(
        "{:<58} {:>12.2} ms",
        "job_status once completed (returns its 50,000-entry result), p50",
        mem["job_status_p50_ms"].as_f64().unwrap_or(0.0)
    );

    #[cfg(feature = "geo")]
    let geo = {
        let (size, tile) = if options.quick { (1024, 512) } else { (8192, 2048) };
        println!("\n-- process_raster beside gdal_translate");
        let line = geo_line(&url, &options.cluster_dir.join("geo"), size, tile, 2).await?;
        println!(
            "{:<58} {:>7.2} s vs {:.2} s ({:.2}x)",
            format!("process_raster {size}x{size}, 2 workers, vs one gdal_translate -of COG"),
            line["process_raster_seconds"].as_f64().unwrap_or(0.0),
            line["gdal_translate_seconds"].as_f64().unwrap_or(0.0),
            line["ratio"].as_f64().unwrap_or(0.0)
        );
        line
    };
    #[cfg(not(feature = "geo"))]
    let geo = Value::Null;

    let date = chrono::Utc::now();
    let report = json!({
        "geo": geo,
        "date": date.to_rfc3339(),
        "quick": options.quick,
        "clients": c,
        "machine": {
            "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "memory_kib": std::fs::read_to_string("/proc/meminfo").ok()
                .and_then(|m| m.lines().next()?.split_whitespace().nth(1)?.parse::<u64>().ok()),
            "postgres": version,
            "build": if cfg!(debug_assertions) { "debug" } else { "release" },
        },
        "synchronous_commit": modes,
        "worker": mem,
    });
    std::fs::create_dir_all(&options.out_dir).map_err(|e| CliError::Setup(e.to_string()))?;
    let path = options.out_dir.join(format!(
        "{}{}.json",
        date.format("%Y-%m-%dT%H%M%S"),
        if options.quick { "-quick" } else { "" }
    ));
    let text = serde_json::to_string_pretty(&report).map_err(|e| CliError::Setup(e.to_string()))?;
    std::fs::write(&path, text).map_err(|e| CliError::Setup(e.to_string()))?;
    println!("\nwritten to {}", path.display());
    cluster.stop("fast").map_err(CliError::Setup)?;
    Ok(())
}
