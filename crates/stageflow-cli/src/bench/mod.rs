//! `stageflow bench`: Stageflow beside raw pgmq, on one private cluster, in one run, with the same
//! number of client connections for every line; each line with synchronous_commit on and off.
//! A module per line, named after what it measures:
//!
//! 1. `commits`: the machine's single-row commit rate (the physical limit of one commit per task);
//! 2. `pgmq`: read + delete one message at a time, and 100 at a time;
//! 3. `end_to_end`: Stageflow end to end (`count` N no-op tasks, then `lineage`): claim + complete
//!    one at a time, and claim 100 + `complete_tasks`, each completion fenced by its lease as a
//!    worker's is;
//! 4. `pgbench`: the one-at-a-time and batched lines of pgmq and Stageflow again, under `pgbench`
//!    with the same statements, to see what the benchmark's own client costs; then both in
//!    alternating rounds, whose median ratios are read against the targets;
//! 5. `pgflow`: pgflow's worker path (read, `start_tasks`, `complete_task`) one at a time and in
//!    batches of 10, over a map step then a single step, its published SQL loaded into a database
//!    of the same cluster;
//! 6. `fan_out`: submitting a job whose first stage has 100,000 tasks;
//! 7. `flatness`: the cost of a completion in stages of 100, 10,000 and 100,000 tasks;
//! 8. `latency`: last completion committed -> next stage's first task claimed by an idle worker
//!    woken by NOTIFY, and submit -> first claim (p50, p99);
//! 9. `memory`: the worker's resident memory over a 100,000-task job, job_status on it, and the
//!    first page of its result (job_result);
//! 10. `million` (with `--million`, and at a small size with `--quick`): a job of `count` N then
//!     `lineage` N through several `stageflow worker` processes, its submission beside
//!     `pgmq.send_batch` of N messages, memory, flatness, and the database's size through retention;
//! 11. `geo` (with `--features geo`): process_raster beside one `gdal_translate -of COG`.
//!
//! `clients` holds the raw connections a line runs on, `jobs` the benchmark's job types and its
//! submission, `wal` the WAL per message or task of the pgmq, Stageflow and pgflow lines. This
//! module runs the lines in order ([`run`]), prints them, and writes the report to
//! `<out>/<date>.json`.
//!
//! Setup goes through the SQL API (`stageflow_client`); what a line times is written out as SQL
//! in its module (prepared by each client, returning only the columns it uses, a batch built in
//! the statement), so that a change of the client does not change what is measured, and runs on
//! raw tokio-postgres connections.

mod clients;
mod commits;
mod end_to_end;
mod fan_out;
mod flatness;
#[cfg(feature = "geo")]
mod geo;
mod jobs;
mod latency;
mod memory;
mod million;
mod pgbench;
mod pgflow;
mod pgmq;
mod wal;

use pgbench::Variant;
use serde_json::json;

use crate::cluster::Cluster;
use crate::{connect, CliError};

pub struct BenchOptions {
    pub clients: usize,
    pub quick: bool,
    /// Run the million-task line (always run, small, with `quick`).
    pub million: bool,
    /// Run only the million-task line.
    pub million_only: bool,
    pub out_dir: std::path::PathBuf,
    pub cluster_dir: std::path::PathBuf,
}

struct Sizes {
    messages: usize,
    e2e_tasks: i64,
    e2e_batch_tasks: i64,
    pgflow_items: i32,
    pgflow_batch_items: i32,
    fan_out: i64,
    flat_sample: usize,
    flat_sizes: [i64; 3],
    latency_rounds: usize,
    memory_tasks: i64,
    commit_seconds: f64,
    /// The alternating pgbench rounds: how many, and the messages and tasks of a half one at a
    /// time and batched.
    rounds: usize,
    round_units: usize,
    round_batch_units: usize,
    /// The million line's tasks per stage (0: not run), its worker processes and window.
    million: i64,
    million_workers: usize,
    million_window: i64,
}

/// The `p` quantile of `samples` (sorted in place), by nearest rank.
fn percentile(samples: &mut [f64], p: f64) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[((samples.len() as f64 - 1.0) * p).round() as usize]
}

/// Brings the databases (the benchmark's and pgflow's) to the same quiet state before a timed
/// line: the previous line's churn vacuumed and analysed and its WAL checkpointed, so that neither
/// autovacuum nor a checkpoint competes with the line for the machine (on 2 cores an autovacuum
/// worker halved a line).
async fn settle(databases: &[&tokio_postgres::Client]) -> Result<(), CliError> {
    for client in databases {
        client.batch_execute("VACUUM (ANALYZE)").await?;
    }
    if let Some(client) = databases.first() {
        client.batch_execute("CHECKPOINT").await?;
    }
    // (the VACUUM's WAL counted before the next line starts: see wal.rs)
    wal::flush(databases).await
}

/// A printed line: its name, its rate and unit, what follows (ratios, WAL).
fn line(name: &str, rate: f64, unit: &str, rest: &str) {
    println!("{name:<58} {rate:>12.0} {unit:<8} {rest}");
}

/// The million-task line in one mode: runs it and prints what it measured.
async fn million_line(
    url: &str,
    cluster: &Cluster,
    options: &BenchOptions,
    sizes: &Sizes,
    sync: bool,
) -> Result<serde_json::Value, CliError> {
    let logs = million::logs_dir(&options.cluster_dir);
    std::fs::create_dir_all(&logs).map_err(|e| CliError::Setup(format!("{}: {e}", logs.display())))?;
    let m = million::run(
        url,
        &cluster.dir().join("data"),
        &logs,
        sync,
        sizes.million,
        sizes.million_workers,
        sizes.million_window,
    )
    .await?;
    let f = |key: &str| m[key].as_f64().unwrap_or(0.0);
    println!(
        "{:<58} {:>7.2} s vs {:.2} s ({:.2}x)",
        format!("submit {} tasks vs pgmq.send_batch of as many", sizes.million),
        f("submit_seconds"),
        f("send_batch_seconds"),
        f("submit_to_send_batch_ratio")
    );
    println!(
        "{:<58} {:>7.1} s, {:.0} tasks/s (stages {:.0} / {:.0})",
        format!("job of 2 x {} tasks, {} worker processes", sizes.million, sizes.million_workers),
        f("wall_seconds"),
        f("tasks_per_second"),
        f("stage_1_tasks_per_second"),
        f("stage_2_tasks_per_second")
    );
    println!(
        "{:<58} {:>7.2} (max / min {:.2})",
        format!("flatness, windows of {} completions, last / first", sizes.million_window),
        f("flatness_last_to_first"),
        f("flatness_max_to_min")
    );
    let wal = &m["wal_per_task"];
    println!(
        "{:<58} {:>7.0} B / {:.1} rec / {:.3} full pages",
        "WAL per task of the run",
        wal["bytes"].as_f64().unwrap_or(0.0),
        wal["records"].as_f64().unwrap_or(0.0),
        wal["full_page_images"].as_f64().unwrap_or(0.0)
    );
    let peaks: Vec<String> =
        m["workers"].as_array().into_iter().flatten().map(|w| w["peak_rss_kib"].to_string()).collect();
    println!("{:<58} {:>12} KiB", "worker processes' peak RSS", peaks.join(" / "));
    println!(
        "{:<58} {:>7} / {} KiB",
        "server peak PSS / private RSS (all its processes)", m["server_peak_pss_kib"], m["server_peak_private_rss_kib"]
    );
    let db = &m["database_mib"];
    println!(
        "{:<58} {:>7.0} -> {:.0} -> {:.0} -> {:.0} MiB",
        "database: before -> completed -> retention -> VACUUM",
        db["before"].as_f64().unwrap_or(0.0),
        db["completed"].as_f64().unwrap_or(0.0),
        db["after_retention"].as_f64().unwrap_or(0.0),
        db["after_vacuum"].as_f64().unwrap_or(0.0)
    );
    println!(
        "{:<58} {:>7} rounds, {:.1} s",
        "retention deleting the job",
        m["retention_rounds"],
        f("retention_seconds")
    );
    Ok(m)
}

pub async fn run(options: BenchOptions) -> Result<(), CliError> {
    let sizes = if options.quick {
        Sizes {
            messages: 2000,
            e2e_tasks: 500,
            e2e_batch_tasks: 2000,
            pgflow_items: 1000,
            pgflow_batch_items: 2000,
            fan_out: 10_000,
            flat_sample: 300,
            flat_sizes: [100, 1000, 10_000],
            latency_rounds: 10,
            memory_tasks: 2000,
            commit_seconds: 0.5,
            rounds: 3,
            round_units: 1000,
            round_batch_units: 2000,
            million: 10_000,
            million_workers: 4,
            million_window: 1000,
        }
    } else {
        Sizes {
            messages: 20_000,
            e2e_tasks: 5000,
            e2e_batch_tasks: 50_000,
            pgflow_items: 5000,
            pgflow_batch_items: 10_000,
            fan_out: 100_000,
            flat_sample: 4000,
            flat_sizes: [100, 10_000, 100_000],
            latency_rounds: 100,
            memory_tasks: 100_000,
            commit_seconds: 3.0,
            rounds: 5,
            round_units: 10_000,
            // (Runs CM-CP took 200,000, whose halves were steadier, and CP's sync-off half aborted:
            // a claim came back empty in mid-stage while the next window was being sent, which a
            // pgbench script cannot take: bench/README.md, twentieth pass. Back to 50,000, within
            // the default quota of a job, until a claim waits for a window being sent, or the
            // script takes an empty claim; more than 100,000 needs the bench login's quotas raised
            // around the rounds, as the million-task line raises them.)
            round_batch_units: 50_000,
            million: if options.million || options.million_only { 1_000_000 } else { 0 },
            million_workers: 4,
            million_window: 100_000,
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
    let pgflow_db = pgflow::install(&url, options.clients).await?;
    admin.raw().batch_execute("DROP DATABASE IF EXISTS stageflow_bench WITH (FORCE)").await?;
    admin.raw().batch_execute("CREATE DATABASE stageflow_bench").await?;
    let url = url
        .rsplit_once('/')
        .map(|(base, _)| format!("{base}/stageflow_bench"))
        .ok_or_else(|| CliError::Setup(format!("the cluster's URL has no database part: {url}")))?;
    let setup = connect(&url).await?;
    setup.raw().batch_execute("CREATE EXTENSION stageflow CASCADE").await?;
    jobs::register_bench_types(&setup).await?;
    let version: String = setup.raw().query_one("SELECT version()", &[]).await?.get(0);
    let pgflow_client = match &pgflow_db {
        Some((pgflow_url, _)) => Some(connect(pgflow_url).await?.into_raw()),
        None => None,
    };
    let quiet: Vec<&tokio_postgres::Client> = std::iter::once(setup.raw()).chain(pgflow_client.as_ref()).collect();
    let scripts = options.cluster_dir.join("pgbench");
    let c = options.clients;
    println!("stageflow bench: {c} client connections, {}", if options.quick { "quick sizes" } else { "full sizes" });

    // Plans on fresh statistics: the first job of a new install claimed at once, nothing analysed
    // (autovacuum kept off the task and queue tables during the line, as before autoanalyze
    // catches up). The hot path's plans must not depend on statistics; the sync-on one-at-a-time
    // line below runs the same work after VACUUM (ANALYZE).
    const FRESH_TABLES: [&str; 2] = ["stageflow.tasks", "pgmq.q_bench"];
    let mut fresh = None;
    if !options.million_only {
        for table in FRESH_TABLES {
            setup.raw().batch_execute(&format!("ALTER TABLE {table} SET (autovacuum_enabled = false)")).await?;
        }
        let (rate, wal) = end_to_end::rate(&url, c, true, 1, sizes.e2e_tasks).await?;
        for table in FRESH_TABLES {
            setup.raw().batch_execute(&format!("ALTER TABLE {table} RESET (autovacuum_enabled)")).await?;
        }
        println!("\n-- before any ANALYZE (synchronous_commit = on)");
        line("stageflow claim + complete, one at a time, fresh statistics", rate, "tasks/s", &wal.label());
        fresh = Some((rate, wal));
    }

    let mut modes = serde_json::Map::new();
    for sync in [true, false] {
        let label = if sync { "on" } else { "off" };
        println!("\n-- synchronous_commit = {label}");
        let mut line_json = if options.million_only {
            json!({})
        } else {
            settle(&quiet).await?;
            let commits = commits::rate(&url, c, sync, sizes.commit_seconds).await?;
            println!("{:<58} {:>12.0} commits/s", "single-row INSERT commits", commits);
            settle(&quiet).await?;
            let (pgmq_one, pgmq_one_wal) = pgmq::rate(&url, c, sync, 1, sizes.messages).await?;
            line("pgmq read + delete, one at a time", pgmq_one, "msg/s", &pgmq_one_wal.label());
            settle(&quiet).await?;
            let (pgmq_bench, pgmq_bench_wal) =
                pgbench::pgmq(&url, c, Variant::plain(sync), 1, sizes.messages, &scripts).await?;
            line(
                "  the same under pgbench",
                pgmq_bench,
                "msg/s",
                &format!("{}  (the client measured {:.2}x of it)", pgmq_bench_wal.label(), pgmq_one / pgmq_bench),
            );
            settle(&quiet).await?;
            // (as many messages as the batched Stageflow line has tasks: at 20,000 the line lasted
            // a third of a second and moved by half between runs; the pgbench lines take half as
            // many, a job of 55,000 tasks within the bench login's quota of 100,000 a job)
            let batch_units = 2 * sizes.e2e_batch_tasks as usize;
            let (pgmq_batch, pgmq_batch_wal) = pgmq::rate(&url, c, sync, 100, batch_units).await?;
            line("pgmq read 100 + delete 100", pgmq_batch, "msg/s", &pgmq_batch_wal.label());
            settle(&quiet).await?;
            let (pgmq_batch_bench, pgmq_batch_bench_wal) =
                pgbench::pgmq(&url, c, Variant::plain(sync), 100, sizes.e2e_batch_tasks as usize, &scripts).await?;
            line(
                "  the same under pgbench",
                pgmq_batch_bench,
                "msg/s",
                &format!(
                    "{}  (the client measured {:.2}x of it)",
                    pgmq_batch_bench_wal.label(),
                    pgmq_batch / pgmq_batch_bench
                ),
            );
            settle(&quiet).await?;
            let (sf_one, sf_one_wal) = end_to_end::rate(&url, c, sync, 1, sizes.e2e_tasks).await?;
            line(
                "stageflow claim + complete, one at a time",
                sf_one,
                "tasks/s",
                &format!(
                    "{}  ({:.2}x pgmq one at a time; WAL {:.2}x its bytes{})",
                    sf_one_wal.label(),
                    sf_one / pgmq_one,
                    sf_one_wal.bytes / pgmq_one_wal.bytes,
                    match (sync, fresh) {
                        (true, Some((rate, _))) => format!("; fresh statistics {:.2}x of it", rate / sf_one),
                        _ => String::new(),
                    }
                ),
            );
            settle(&quiet).await?;
            let tasks = 2 * sizes.e2e_tasks as usize;
            let (sf_bench, sf_bench_wal) =
                pgbench::stageflow(&url, c, Variant::plain(sync), 1, tasks, &scripts).await?;
            line(
                "  the same under pgbench (first stage only)",
                sf_bench,
                "tasks/s",
                &format!(
                    "{}  (the client measured {:.2}x of it; {:.2}x pgmq under pgbench)",
                    sf_bench_wal.label(),
                    sf_one / sf_bench,
                    sf_bench / pgmq_bench
                ),
            );
            // A backlog: the messages sent and the job submitted, then a checkpoint, so that the
            // line's first change of each page logs the whole page. Stageflow's functions that
            // update task rows compress those images whatever the cluster says (wal_compression
            // set on them, sql/0950_roles_and_grants.sql); pgmq's with the cluster's default
            // (off), then with the same method in its sessions too, the honest counterpart.
            let backlog = if sync {
                let method: String = setup
                    .raw()
                    .query_one(
                        "SELECT coalesce((SELECT split_part(c, '=', 2) FROM pg_proc AS p, unnest(p.proconfig) AS c
                                           WHERE p.oid = 'stageflow.claim_tasks(text, int, int, text)'::regprocedure
                                             AND c LIKE 'wal_compression=%'), 'off')",
                        &[],
                    )
                    .await?
                    .get(0);
                let compressed = format!("-c wal_compression={method}");
                let at = |settings| Variant { sync, settings, backlog: true };
                settle(&quiet).await?;
                let (pgmq_rate, pgmq_wal) = pgbench::pgmq(&url, c, at(""), 1, sizes.messages, &scripts).await?;
                line("  pgmq under pgbench, a checkpointed backlog", pgmq_rate, "msg/s", &pgmq_wal.label());
                settle(&quiet).await?;
                let (pgmq_compressed_rate, pgmq_compressed_wal) =
                    pgbench::pgmq(&url, c, at(&compressed), 1, sizes.messages, &scripts).await?;
                line(
                    &format!("  the same with wal_compression = {method}"),
                    pgmq_compressed_rate,
                    "msg/s",
                    &pgmq_compressed_wal.label(),
                );
                settle(&quiet).await?;
                let (sf_rate, sf_wal) = pgbench::stageflow(&url, c, at(""), 1, tasks, &scripts).await?;
                line(
                    "  stageflow under pgbench, a checkpointed backlog",
                    sf_rate,
                    "tasks/s",
                    &format!(
                        "{}  (WAL {:.2}x pgmq's bytes; {:.2}x pgmq's with {method})",
                        sf_wal.label(),
                        sf_wal.bytes / pgmq_wal.bytes,
                        sf_wal.bytes / pgmq_compressed_wal.bytes
                    ),
                );
                json!({
                    "wal_compression_of_the_engine": method,
                    "pgmq_one_at_a_time_msg_per_s": pgmq_rate,
                    "pgmq_one_at_a_time_compressed_msg_per_s": pgmq_compressed_rate,
                    "stageflow_one_at_a_time_first_stage_tasks_per_s": sf_rate,
                    "wal_per_unit": {
                        "pgmq_one_at_a_time": pgmq_wal.json(),
                        "pgmq_one_at_a_time_compressed": pgmq_compressed_wal.json(),
                        "stageflow_one_at_a_time": sf_wal.json(),
                    },
                    "ratio_one_at_a_time_wal_bytes_to_pgmq": sf_wal.bytes / pgmq_wal.bytes,
                    "ratio_one_at_a_time_wal_bytes_to_pgmq_compressed": sf_wal.bytes / pgmq_compressed_wal.bytes,
                })
            } else {
                serde_json::Value::Null
            };
            settle(&quiet).await?;
            let (sf_batch, sf_batch_wal) = end_to_end::rate(&url, c, sync, 100, sizes.e2e_batch_tasks).await?;
            line(
                "stageflow claim 100 + complete_tasks",
                sf_batch,
                "tasks/s",
                &format!(
                    "{}  ({:.2}x pgmq one at a time, {:.2}x pgmq batched)",
                    sf_batch_wal.label(),
                    sf_batch / pgmq_one,
                    sf_batch / pgmq_batch
                ),
            );
            settle(&quiet).await?;
            let (sf_batch_bench, sf_batch_bench_wal) =
                pgbench::stageflow(&url, c, Variant::plain(sync), 100, sizes.e2e_batch_tasks as usize, &scripts)
                    .await?;
            line(
                "  the same under pgbench (first stage only)",
                sf_batch_bench,
                "tasks/s",
                &format!(
                    "{}  (the client measured {:.2}x of it; {:.2}x pgmq batched under pgbench)",
                    sf_batch_bench_wal.label(),
                    sf_batch / sf_batch_bench,
                    sf_batch_bench / pgmq_batch_bench
                ),
            );
            // The same statements in alternating rounds, each round's two halves seconds apart: the
            // ratios the targets are read from (pgbench.rs, Rounds).
            let one_rounds =
                pgbench::rounds(&url, c, sync, 1, sizes.round_units, sizes.rounds, &quiet, &scripts).await?;
            let batch_rounds =
                pgbench::rounds(&url, c, sync, 100, sizes.round_batch_units, sizes.rounds, &quiet, &scripts).await?;
            for (name, r) in [("one at a time", &one_rounds), ("batched (100)", &batch_rounds)] {
                let (median, min, max) = r.median_min_max();
                println!(
                    "{:<58} {:>11.2}x median  ({:.2}x-{:.2}x; pgmq {} /s; stageflow {} /s)",
                    format!("{name}, stageflow / pgmq, {} alternating pgbench rounds", sizes.rounds),
                    median,
                    min,
                    max,
                    r.pgmq.iter().map(|v| format!("{v:.0}")).collect::<Vec<_>>().join(" "),
                    r.stageflow.iter().map(|v| format!("{v:.0}")).collect::<Vec<_>>().join(" "),
                );
            }
            let pgflow_lines = match &pgflow_db {
                None => serde_json::Value::Null,
                Some((pgflow_url, _)) => {
                    settle(&quiet).await?;
                    let (pf_one, pf_one_wal) = pgflow::rate(pgflow_url, c, sync, 1, sizes.pgflow_items).await?;
                    line(
                        "pgflow read 1 + start_tasks + complete_task",
                        pf_one,
                        "tasks/s",
                        &format!("{}  (stageflow one at a time {:.2}x of it)", pf_one_wal.label(), sf_one / pf_one),
                    );
                    settle(&quiet).await?;
                    let (pf_batch, pf_batch_wal) =
                        pgflow::rate(pgflow_url, c, sync, 10, sizes.pgflow_batch_items).await?;
                    line(
                        "pgflow read 10 + start_tasks + 10 complete_task",
                        pf_batch,
                        "tasks/s",
                        &format!("{}  (stageflow batched {:.2}x of it)", pf_batch_wal.label(), sf_batch / pf_batch),
                    );
                    json!({
                        "one_at_a_time_tasks_per_s": pf_one,
                        "batch_10_tasks_per_s": pf_batch,
                        "one_at_a_time_tasks": sizes.pgflow_items + 1,
                        "batch_10_tasks": sizes.pgflow_batch_items + 1,
                        "ratio_stageflow_one_at_a_time_to_pgflow_one_at_a_time": sf_one / pf_one,
                        "ratio_stageflow_batch_100_to_pgflow_batch_10": sf_batch / pf_batch,
                        "wal_per_task": {"one_at_a_time": pf_one_wal.json(), "batch_10": pf_batch_wal.json()},
                    })
                }
            };
            settle(&quiet).await?;
            let fan_out = fan_out::seconds(&url, sync, sizes.fan_out).await?;
            println!("{:<58} {:>12.3} s", format!("submit a job of {} first-stage tasks", sizes.fan_out), fan_out);
            let mut costs = Vec::new();
            for size in sizes.flat_sizes {
                let cost = flatness::completion_cost(&url, c, sync, size, sizes.flat_sample, &quiet).await?;
                println!("{:<58} {:>12.1} us/task", format!("completion in a stage of {size} tasks"), cost);
                costs.push(cost);
            }
            let flatness = costs[2] / costs[0];
            println!("{:<58} {:>12.2}", "flatness (largest / smallest stage)", flatness);
            settle(&quiet).await?;
            let (mut advance, mut first) = latency::latencies(&url, sync, sizes.latency_rounds).await?;
            let (a50, a99, f50, f99) = (
                percentile(&mut advance, 0.5),
                percentile(&mut advance, 0.99),
                percentile(&mut first, 0.5),
                percentile(&mut first, 0.99),
            );
            println!("{:<58} {:>7.2} / {:.2} ms", "stage advance -> next task claimed, p50 / p99", a50, a99);
            println!("{:<58} {:>7.2} / {:.2} ms", "submit -> first task claimed, p50 / p99", f50, f99);
            json!({
                "commit_rate_per_s": commits,
                "pgmq_one_at_a_time_msg_per_s": pgmq_one,
                "pgmq_batch_100_msg_per_s": pgmq_batch,
                "stageflow_one_at_a_time_tasks_per_s": sf_one,
                "stageflow_batch_100_tasks_per_s": sf_batch,
                "ratio_one_at_a_time_to_pgmq": sf_one / pgmq_one,
                "ratio_batch_to_pgmq_one_at_a_time": sf_batch / pgmq_one,
                "ratio_batch_to_pgmq_batch": sf_batch / pgmq_batch,
                "ratio_one_at_a_time_wal_bytes_to_pgmq": sf_one_wal.bytes / pgmq_one_wal.bytes,
                "wal_per_unit": {
                    "pgmq_one_at_a_time": pgmq_one_wal.json(),
                    "pgmq_batch_100": pgmq_batch_wal.json(),
                    "stageflow_one_at_a_time": sf_one_wal.json(),
                    "stageflow_batch_100": sf_batch_wal.json(),
                },
                "pgbench": {
                    "pgmq_one_at_a_time_msg_per_s": pgmq_bench,
                    "stageflow_one_at_a_time_first_stage_tasks_per_s": sf_bench,
                    "client_to_pgbench_pgmq": pgmq_one / pgmq_bench,
                    "client_to_pgbench_stageflow": sf_one / sf_bench,
                    "pgmq_batch_100_msg_per_s": pgmq_batch_bench,
                    "stageflow_batch_100_first_stage_tasks_per_s": sf_batch_bench,
                    "ratio_batch_to_pgmq_batch": sf_batch_bench / pgmq_batch_bench,
                    "client_to_pgbench_pgmq_batch": pgmq_batch / pgmq_batch_bench,
                    "client_to_pgbench_stageflow_batch": sf_batch / sf_batch_bench,
                    "wal_per_unit": {
                        "pgmq_one_at_a_time": pgmq_bench_wal.json(),
                        "stageflow_one_at_a_time": sf_bench_wal.json(),
                        "pgmq_batch_100": pgmq_batch_bench_wal.json(),
                        "stageflow_batch_100": sf_batch_bench_wal.json(),
                    },
                    "checkpointed_backlog": backlog,
                    "rounds": {
                        "units_one_at_a_time": sizes.round_units,
                        "units_batch_100": sizes.round_batch_units,
                        "one_at_a_time": one_rounds.json(),
                        "batch_100": batch_rounds.json(),
                    },
                },
                "pgflow": pgflow_lines,
                "fan_out_tasks": sizes.fan_out,
                "fan_out_seconds": fan_out,
                "completion_cost_us": {"stage_sizes": sizes.flat_sizes, "per_task": costs},
                "flatness_ratio": flatness,
                "stage_advance_ms": {"p50": a50, "p99": a99},
                "submit_to_first_claim_ms": {"p50": f50, "p99": f99},
            })
        };
        if sizes.million > 0 {
            settle(&quiet).await?;
            line_json["million"] = million_line(&url, &cluster, &options, &sizes, sync).await?;
        }
        modes.insert(label.into(), line_json);
    }
    let mem = if options.million_only {
        serde_json::Value::Null
    } else {
        println!("\n-- the worker runtime over {} tasks", sizes.memory_tasks);
        settle(&quiet).await?;
        let mem = memory::worker_runtime(&url, c, sizes.memory_tasks).await?;
        println!(
            "{:<58} {:>7} -> {} KiB (peak {})",
            "worker RSS, start -> end", mem["rss_start_kib"], mem["rss_end_kib"], mem["rss_peak_kib"]
        );
        println!(
            "{:<58} {:>12.0} tasks/s",
            "worker runtime end to end",
            mem["tasks_per_second"].as_f64().unwrap_or(0.0)
        );
        println!(
            "{:<58} {:>7.2} / {:.2} ms",
            format!("job_status of the {}-task job while it runs, p50 / max", sizes.memory_tasks),
            mem["job_status_while_running_p50_ms"].as_f64().unwrap_or(0.0),
            mem["job_status_while_running_max_ms"].as_f64().unwrap_or(0.0)
        );
        println!(
            "{:<58} {:>12.2} ms",
            format!("job_status of the {}-task job once completed, p50", sizes.memory_tasks),
            mem["job_status_p50_ms"].as_f64().unwrap_or(0.0)
        );
        println!(
            "{:<58} {:>12.2} ms",
            format!("job_result's first page ({} entries), p50", mem["job_result_first_page_entries"]),
            mem["job_result_first_page_p50_ms"].as_f64().unwrap_or(0.0)
        );
        mem
    };

    #[cfg(feature = "geo")]
    let geo = if options.million_only {
        serde_json::Value::Null
    } else {
        let (size, tile) = if options.quick { (1024, 512) } else { (8192, 2048) };
        println!("\n-- process_raster beside gdal_translate");
        let line = geo::process_raster_vs_gdal(&url, &options.cluster_dir.join("geo"), size, tile, 2).await?;
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
    let geo = serde_json::Value::Null;

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
        "fresh_statistics": fresh.map(|(rate, wal)| json!({
            "stageflow_one_at_a_time_tasks_per_s": rate,
            "ratio_to_analysed": modes.get("on").and_then(|m| m["stageflow_one_at_a_time_tasks_per_s"].as_f64()).map(|a| rate / a),
            "wal_per_task": wal.json(),
        })),
        "pgflow": pgflow_db.as_ref().map(|(_, migrations)| json!({
            "package": format!("@pgflow/core@{}", pgflow::VERSION),
            "migrations": migrations,
            "stubs": ["pgmq created before its migrations (pgmq 1.11.1)", "realtime.send(jsonb, text, text, boolean): does nothing"],
            "settings": ["jit = off in pgflow_bench (with jit = on every start_tasks was JIT-compiled once step_tasks grew)"],
            "flow": "map step 'items' over N integers, then single step 'total' depending on it",
            "worker": "pgmq.read_with_poll(flow, 2, batch, 2, 10), pgflow.start_tasks, one pgflow.complete_task per task; each its own transaction",
        })),
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
