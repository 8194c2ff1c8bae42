//! Retention soak: tasks pushed through by two `stageflow worker` processes while this test runs
//! `stageflow.run_maintenance()` twice a second with `stageflow.retention` = 3 seconds, and the
//! table sizes (`pg_total_relation_size` of every table of schemas `stageflow` and `pgmq`) stay
//! bounded: what the jobs, their stages, shards, claims, tasks, events, webhook deliveries and the
//! queue's archived messages take stops growing once retention deletes as fast as work arrives.
//!
//! The work: `soak` jobs (hello_world's handlers: n greetings, then a reply to each, 2n tasks, and
//! a webhook URL, so each job queues a delivery that no dispatcher sends) and, one in ten, a
//! `soak_fail` job whose tasks all fail permanently (tolerated), so that their messages are
//! archived (pgmq.a_soak); every claim of those is a last attempt, which leaves a note in
//! stageflow.last_attempt_leases until its lease (5 seconds here) expires. A few jobs run at once. The test runs plain `VACUUM` over the tables
//! every 3 seconds, as autovacuum would on a busy server (the shared test cluster keeps
//! autovacuum's one-minute nap): retention bounds the rows, vacuum makes their space reusable.
//!
//! Checked: the largest size of the tables in the last third of the run stays within 1.25 times
//! (plus 8 MB) their largest in the middle third (the first third is the warm-up, before the
//! first jobs are old enough), and once the work stops and the retention has passed, maintenance
//! leaves every one of those tables without rows.
//!
//! `STAGEFLOW_SOAK_TASKS` (default 150000, about half a minute on two cores) sets how many tasks;
//! the sizes sampled are printed (run with `--nocapture` to see them).

// Test code: a panic (unwrap, expect) is how a test reports a failure.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use postgres::Client;
use stageflow_tests::{connect, fresh_database, register};

mod common;
use common::{signal, spawn_worker};

/// Greetings per `soak` job (2 x as many tasks), tasks per `soak_fail` job.
const GREETINGS: i64 = 500;
const FAILING: i64 = 100;
const OPEN_JOBS: i64 = 4;
const RETENTION: &str = "3 seconds";

/// Every table of schemas stageflow and pgmq: name, rows, pg_total_relation_size.
fn sizes(client: &mut Client) -> Vec<(String, i64, i64)> {
    let tables: Vec<String> = client
        .query(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
              WHERE n.nspname IN ('stageflow', 'pgmq') AND c.relkind IN ('r', 'p') ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    tables
        .into_iter()
        .map(|table| {
            let row = client
                .query_one(
                    &format!("SELECT (SELECT count(*) FROM {table}), pg_total_relation_size('{table}'::regclass)"),
                    &[],
                )
                .unwrap();
            (table, row.get::<_, i64>(0), row.get::<_, i64>(1))
        })
        .collect()
}

fn total(sizes: &[(String, i64, i64)]) -> i64 {
    sizes.iter().map(|(_, _, bytes)| bytes).sum()
}

fn mb(bytes: i64) -> f64 {
    bytes as f64 / 1_048_576.0
}

fn vacuum(client: &mut Client, sizes: &[(String, i64, i64)]) {
    let tables: Vec<&str> = sizes.iter().map(|(table, _, _)| table.as_str()).collect();
    client.batch_execute(&format!("VACUUM {}", tables.join(", "))).unwrap();
}

fn maintain(client: &mut Client) -> serde_json::Value {
    let report: serde_json::Value = client.query_one("SELECT stageflow.run_maintenance()", &[]).unwrap().get(0);
    assert!(report.get("error").is_none() && report["errors"] == 0, "maintenance failed: {report}");
    report
}

#[test]
fn table_sizes_stay_bounded_under_retention() {
    let target: i64 = std::env::var("STAGEFLOW_SOAK_TASKS").ok().and_then(|v| v.parse().ok()).unwrap_or(150_000);
    let url = fresh_database("retention_soak");
    let mut client = connect(&url);
    register(
        &mut client,
        "soak",
        r#"{"retry": {"max_attempts": 3}, "webhook_url": "https://example.invalid/soak",
            "stages": [{"name": "greet", "handler": "hello_world.greet", "queue": "soak", "fan_out": "count", "param": "n"},
                       {"name": "reply", "handler": "hello_world.reply", "queue": "soak", "fan_out": "lineage"}]}"#,
    );
    register(
        &mut client,
        "soak_fail",
        &format!(
            r#"{{"retry": {{"max_attempts": 1}},
                "stages": [{{"name": "fail", "handler": "debug.fail", "queue": "soak", "fan_out": "count", "param": "n",
                             "max_failed_tasks": {FAILING}}}]}}"#
        ),
    );
    let mut maintenance = connect(&url);
    maintenance.batch_execute(&format!("SET stageflow.retention = '{RETENTION}'")).unwrap();

    let logs = tempfile_dir();
    let workers: Vec<_> = (0..2)
        .map(|i| {
            spawn_worker(
                &url,
                &logs,
                &format!("soak-{i}"),
                &["--queue", "soak", "--concurrency", "32", "--batch-size", "64", "--lease-seconds", "5"],
            )
        })
        .collect();
    let mut workers = Workers(workers);

    let started = Instant::now();
    let mut submitted = 0_i64;
    let mut jobs = 0_i64;
    let mut samples: Vec<(f64, i64, i64)> = Vec::new(); // (seconds, tasks submitted, total bytes)
    let mut last_maintenance = Instant::now();
    let mut last_vacuum = Instant::now();
    let mut last_sample = Instant::now();
    let mut deleted = serde_json::Map::new();
    println!("{:>8} {:>10} {:>10} {:>8} {:>8}", "seconds", "submitted", "total MB", "tasks", "jobs");
    loop {
        let open: i64 = client
            .query_one("SELECT count(*) FROM stageflow.jobs WHERE status IN ('queued', 'processing')", &[])
            .unwrap()
            .get(0);
        if submitted >= target && open == 0 {
            break;
        }
        if open < OPEN_JOBS && submitted < target {
            jobs += 1;
            if jobs % 10 == 0 {
                let params = serde_json::json!({"n": FAILING, "message": format!("soak {jobs}"), "permanent": true});
                client.execute("SELECT stageflow.submit_job('soak_fail', $1)", &[&params]).unwrap();
                submitted += FAILING;
            } else {
                let params = serde_json::json!({"n": GREETINGS, "message": format!("soak {jobs}")});
                client.execute("SELECT stageflow.submit_job('soak', $1)", &[&params]).unwrap();
                submitted += 2 * GREETINGS;
            }
            continue;
        }
        if last_maintenance.elapsed() >= Duration::from_millis(500) {
            let report = maintain(&mut maintenance);
            for key in [
                "jobs_deleted",
                "tasks_deleted",
                "events_deleted",
                "webhook_deliveries_deleted",
                "archived_messages_deleted",
            ] {
                let sum = deleted.get(key).and_then(|v| v.as_i64()).unwrap_or(0) + report[key].as_i64().unwrap_or(0);
                deleted.insert(key.to_owned(), sum.into());
            }
            last_maintenance = Instant::now();
        }
        if last_vacuum.elapsed() >= Duration::from_secs(3) {
            let now = sizes(&mut client);
            vacuum(&mut client, &now);
            last_vacuum = Instant::now();
        }
        if last_sample.elapsed() >= Duration::from_secs(1) {
            let now = sizes(&mut client);
            let rows = |name: &str| now.iter().find(|(table, _, _)| table == name).map_or(0, |(_, rows, _)| *rows);
            let seconds = started.elapsed().as_secs_f64();
            println!(
                "{seconds:>8.1} {submitted:>10} {:>10.2} {:>8} {:>8}",
                mb(total(&now)),
                rows("stageflow.tasks"),
                rows("stageflow.jobs")
            );
            samples.push((seconds, submitted, total(&now)));
            last_sample = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(20));
        assert!(started.elapsed() < Duration::from_secs(900), "the soak takes too long: {submitted} tasks submitted");
    }
    let elapsed = started.elapsed();
    for worker in &workers.0 {
        signal(worker, "TERM");
    }
    for worker in &mut workers.0 {
        worker.wait().unwrap();
    }
    let peak = sizes(&mut client);
    println!(
        "{submitted} tasks in {:.1} s ({:.0} tasks/s); deleted by retention meanwhile: {}",
        elapsed.as_secs_f64(),
        submitted as f64 / elapsed.as_secs_f64(),
        serde_json::Value::Object(deleted.clone())
    );

    // Bounded: the last third of the run takes no more room than the middle third's largest
    // (within a quarter, plus slack for where vacuum's and retention's rounds happened to fall);
    // tables that grew with the work would take half as much again.
    let seconds = elapsed.as_secs_f64();
    let largest = |from: f64, to: f64| {
        samples.iter().filter(|(at, _, _)| *at > from && *at <= to).map(|(_, _, bytes)| *bytes).max().unwrap_or(0)
    };
    let middle = largest(seconds / 3.0, 2.0 * seconds / 3.0);
    let last = largest(2.0 * seconds / 3.0, seconds);
    println!("largest total in the middle third {:.2} MB, in the last third {:.2} MB", mb(middle), mb(last));
    assert!(
        last as f64 <= 1.25 * middle as f64 + 8.0 * 1_048_576.0,
        "the tables grew: {:.2} MB in the middle third of the run, {:.2} MB in the last",
        mb(middle),
        mb(last)
    );

    // Once the retention (and the workers' 5-second leases, whose last attempts' notes
    // maintenance drops when they expire) has passed, maintenance leaves no rows behind.
    std::thread::sleep(Duration::from_secs(6));
    let settle = Instant::now();
    loop {
        let report = maintain(&mut maintenance);
        let busy = [
            "jobs_deleted",
            "tasks_deleted",
            "events_deleted",
            "webhook_deliveries_deleted",
            "archived_messages_deleted",
        ]
        .iter()
        .any(|key| report[key].as_i64().unwrap_or(0) > 0);
        if !busy {
            break;
        }
        assert!(settle.elapsed() < Duration::from_secs(120), "retention does not finish: {report}");
    }
    let end = sizes(&mut client);
    vacuum(&mut client, &end);
    let end = sizes(&mut client);
    println!("{:<40} {:>10} {:>12} {:>12}", "table", "rows", "peak bytes", "end bytes");
    for ((table, rows, bytes), (_, _, peak_bytes)) in end.iter().zip(peak.iter()) {
        println!("{table:<40} {rows:>10} {peak_bytes:>12} {bytes:>12}");
    }
    println!("total: {:.2} MB at the end of the load, {:.2} MB after the retention", mb(total(&peak)), mb(total(&end)));
    for table in [
        "stageflow.jobs",
        "stageflow.stages",
        "stageflow.stage_shards",
        "stageflow.stage_claims",
        "stageflow.tasks",
        "stageflow.last_attempt_leases",
        "stageflow.events",
        "stageflow.webhook_deliveries",
        "stageflow.deleted_jobs",
        "pgmq.q_soak",
        "pgmq.a_soak",
    ] {
        let rows = end.iter().find(|(name, _, _)| name == table).map(|(_, rows, _)| *rows);
        assert_eq!(rows, Some(0), "{table} keeps rows after the retention");
    }
}

/// The worker processes, killed if the test fails before it stops them.
struct Workers(Vec<std::process::Child>);

impl Drop for Workers {
    fn drop(&mut self) {
        for worker in &mut self.0 {
            if worker.try_wait().ok().flatten().is_none() {
                let _ = worker.kill();
                let _ = worker.wait();
            }
        }
    }
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("stageflow-retention-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
