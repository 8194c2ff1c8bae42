//! Extension upgrades (`ALTER EXTENSION stageflow UPDATE`), on the test cluster: every version
//! recorded in `sql/versions/` (whose install scripts `scripts/setup.sh` installs beside the
//! current one) upgrades to the catalog a fresh install of the current version has; and jobs left
//! mid-flight by 0.1.0's workers (queued, running, expiring, waiting for a retry, half planned)
//! finish after the upgrade, on the library and the workers of the current version.

// Test code: a panic (unwrap, expect) is how a test reports a failure.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use postgres::Client;
use serde_json::{json, Value};
use stageflow_tests::{cluster_url, connect, url_as, url_for, ROLE_PASSWORD};

/// One line per fact of the extension's catalog: members, tables, columns in order, constraints,
/// indexes, views, functions (a digest of each definition), grants, comments, dump marks.
const CATALOG: &str = include_str!("catalog.sql");

/// The versions whose install scripts are recorded, oldest first.
fn recorded_versions() -> Vec<String> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../sql/versions");
    let mut versions: Vec<Vec<u32>> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|entry| {
            let name = entry.unwrap().file_name().into_string().unwrap();
            let version = name.strip_prefix("stageflow--")?.strip_suffix(".sql")?.to_owned();
            Some(version.split('.').map(|part| part.parse().unwrap()).collect())
        })
        .collect();
    versions.sort();
    versions.iter().map(|v| v.iter().map(u32::to_string).collect::<Vec<_>>().join(".")).collect()
}

/// One CREATE EXTENSION at a time: 0.1.0's makes the cluster's stageflow_* roles without
/// minding another session making them at the same moment.
static CREATING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A new database of the test cluster with the extension at `version` (None: the current one).
fn database(name: &str, version: Option<&str>) -> (String, Client) {
    let _one_at_a_time = CREATING.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut admin = connect(&cluster_url());
    admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).unwrap();
    admin.batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
    let url = url_for(&cluster_url(), name);
    let mut client = connect(&url);
    let create = match version {
        Some(version) => format!("CREATE EXTENSION stageflow VERSION '{version}' CASCADE"),
        None => "CREATE EXTENSION stageflow CASCADE".to_owned(),
    };
    client.batch_execute(&create).unwrap_or_else(|e| {
        panic!("{create}: {e:?} (scripts/setup.sh installs the recorded versions' install scripts)")
    });
    (url, client)
}

fn catalog(client: &mut Client) -> Vec<String> {
    client.query(CATALOG, &[]).unwrap().iter().map(|row| row.get(0)).collect()
}

fn installed_version(client: &mut Client) -> String {
    client.query_one("SELECT extversion FROM pg_extension WHERE extname = 'stageflow'", &[]).unwrap().get(0)
}

fn current_version(client: &mut Client) -> String {
    client
        .query_one("SELECT default_version FROM pg_available_extensions WHERE name = 'stageflow'", &[])
        .unwrap()
        .get(0)
}

/// The facts of `left` not in `right` and those of `right` not in `left`.
fn difference(left: &[String], right: &[String]) -> String {
    let only = |a: &[String], b: &[String]| a.iter().filter(|line| !b.contains(line)).cloned().collect::<Vec<_>>();
    format!(
        "only in the upgraded one:\n  {}\nonly in the fresh one:\n  {}",
        only(left, right).join("\n  "),
        only(right, left).join("\n  ")
    )
}

#[test]
fn every_recorded_version_upgrades_to_the_catalog_of_a_fresh_install() {
    let (_, mut fresh) = database("upgrade_fresh", None);
    let current = current_version(&mut fresh);
    let expected = catalog(&mut fresh);
    assert!(expected.len() > 300, "the catalog query lists the extension: {} facts", expected.len());
    let older: Vec<String> = recorded_versions().into_iter().filter(|v| *v != current).collect();
    assert!(older.contains(&"0.1.0".to_owned()), "{older:?}");
    for version in older {
        let (_, mut client) = database(&format!("upgrade_from_{}", version.replace('.', "_")), Some(&version));
        assert_eq!(installed_version(&mut client), version);
        client.batch_execute("ALTER EXTENSION stageflow UPDATE").unwrap_or_else(|e| panic!("from {version}: {e:?}"));
        assert_eq!(installed_version(&mut client), current);
        let upgraded = catalog(&mut client);
        assert!(upgraded == expected, "{version} -> {current}: {}", difference(&upgraded, &expected));
        // Tasks made after the update start above any token a deleted task of a version before
        // 0.3.0 reached (its retention noted none); a fresh install starts at 0.
        if ["0.1.0", "0.2.0"].contains(&version.as_str()) {
            let floor: Option<i64> =
                client.query_one("SELECT max(token) FROM stageflow.lease_token_floor", &[]).unwrap().get(0);
            assert_eq!(floor, Some(1 << 31), "from {version}");
        }
    }
    let floor: Option<i64> = fresh.query_one("SELECT max(token) FROM stageflow.lease_token_floor", &[]).unwrap().get(0);
    assert_eq!(floor, None);
}

/// `(task_id, job_id, stage)` of the tasks 0.1.0's claim_tasks hands a worker.
fn claim_010(client: &mut Client, queue: &str, max_tasks: i32, lease_seconds: i32) -> Vec<(String, String, i32)> {
    client
        .query(
            "SELECT task_id, job_id, stage FROM stageflow.claim_tasks($1, $2, $3, 'old-1') ORDER BY task_id",
            &[&queue, &max_tasks, &lease_seconds],
        )
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect()
}

/// 0.1.0's report of a completion: (task_id, result, worker_id), no lease token.
fn complete_010(client: &mut Client, task_id: &str, result: Value) -> Value {
    client
        .query_one("SELECT stageflow.complete_task_and_check_stage($1, $2, 'old-1')", &[&task_id, &result])
        .unwrap_or_else(|e| panic!("completing {task_id}: {e:?}"))
        .get(0)
}

fn submit(client: &mut Client, job_type: &str, params: Value) -> String {
    client.query_one("SELECT stageflow.submit_job($1, $2)", &[&job_type, &params]).unwrap().get(0)
}

#[test]
fn jobs_in_flight_on_0_1_0_finish_after_the_upgrade() {
    let (url, mut client) = database("upgrade_in_flight", Some("0.1.0"));
    let retry = json!({"max_attempts": 3, "backoff_base_seconds": 2});
    let two = json!({"retry": retry, "stages": [
        {"name": "first", "handler": "debug.sleep", "fan_out": "count", "param": "n", "queue": "up"},
        {"name": "second", "handler": "debug.sleep", "fan_out": "lineage", "queue": "up"}]});
    // The planners run on a queue of their own, which only this test's SQL serves.
    let planned = json!({"retry": retry, "stages": [
        {"name": "plan", "handler": "up.plan", "fan_out": "count", "param": "n", "queue": "up_plan"},
        {"name": "work", "handler": "debug.sleep", "fan_out": "dynamic", "queue": "up"}]});
    for (name, definition) in [("up_two", &two), ("up_planned", &planned)] {
        client.execute("SELECT stageflow.register_job_type($1, $2)", &[&name, definition]).unwrap();
    }

    // 0.1.0's worker ("old-1", through 0.1.0's functions) runs a whole job...
    let done = submit(&mut client, "up_two", json!({"n": 1, "ms": 10, "tag": "done"}));
    for stage in 1..=2 {
        let claimed = claim_010(&mut client, "up", 1, 600);
        assert_eq!((claimed.len(), claimed[0].1.as_str(), claimed[0].2), (1, done.as_str(), stage));
        complete_010(&mut client, &claimed[0].0, json!({"by": "old-1"}));
    }
    // ... holds two tasks of another, having completed one of them ...
    let running = submit(&mut client, "up_two", json!({"n": 2, "ms": 10, "tag": "running"}));
    let held = claim_010(&mut client, "up", 2, 600);
    assert_eq!(held.len(), 2);
    let kept_result = json!({"by": "old-1", "before": "the upgrade"});
    complete_010(&mut client, &held[0].0, kept_result.clone());
    // ... holds a task whose lease expires (its worker is gone) ...
    let expiring = submit(&mut client, "up_two", json!({"n": 1, "ms": 10, "tag": "expiring"}));
    let lost = claim_010(&mut client, "up", 1, 1);
    assert_eq!(lost[0].1, expiring);
    // ... failed a task, which waits for its retry ...
    let retried = submit(&mut client, "up_two", json!({"n": 1, "ms": 10, "tag": "retried"}));
    let failed = claim_010(&mut client, "up", 1, 600);
    let report: Value = client
        .query_one(
            "SELECT stageflow.fail_task($1, '{\"type\": \"flaky\", \"message\": \"boom\"}', true, 'old-1')",
            &[&failed[0].0],
        )
        .unwrap()
        .get(0);
    assert_eq!(report["task_status"], json!("queued"), "{report}");
    // ... and planned half of a dynamic stage (one planner completed, the other held).
    let planning = submit(&mut client, "up_planned", json!({"n": 2, "tag": "planning"}));
    let planners = claim_010(&mut client, "up_plan", 2, 600);
    assert_eq!(planners.len(), 2);
    complete_010(&mut client, &planners[0].0, json!({"tasks": [{"key": "a", "params": {"ms": 10}}]}));
    // One job nobody has touched.
    let queued = submit(&mut client, "up_two", json!({"n": 3, "ms": 10, "tag": "queued"}));
    let jobs = [&done, &running, &expiring, &retried, &planning, &queued];
    // The job type moves to another queue: its jobs keep the definition (and the queue) they were
    // submitted with, and 0.2.0's workers, which claim only from queues granted to them, must
    // still get them.
    let moved = json!({"retry": retry, "stages": [
        {"name": "first", "handler": "debug.sleep", "fan_out": "count", "param": "n", "queue": "up_next"},
        {"name": "second", "handler": "debug.sleep", "fan_out": "lineage", "queue": "up_next"}]});
    let moved_planned = json!({"retry": retry, "stages": [
        {"name": "plan", "handler": "up.plan", "fan_out": "count", "param": "n", "queue": "up_plan_next"},
        {"name": "work", "handler": "debug.sleep", "fan_out": "dynamic", "queue": "up_next"}]});
    client.execute("SELECT stageflow.register_job_type('up_two', $1)", &[&moved]).unwrap();
    client.execute("SELECT stageflow.register_job_type('up_planned', $1)", &[&moved_planned]).unwrap();

    // 0.2.0 limits the tasks a job may create (its owner's quota when submitted); 0.1.0's jobs
    // had no limit and keep none, whatever the default is when the update runs (here 1: the half
    // planned job's two planners would already fill it).
    client.batch_execute("SET stageflow.max_tasks_per_job = 1").unwrap();
    // A queue of pgmq's own, which no job type names.
    client.batch_execute("SELECT pgmq.create('up_own')").unwrap();
    client.batch_execute("ALTER EXTENSION stageflow UPDATE").unwrap_or_else(|e| panic!("{e:?}"));
    client.batch_execute("RESET stageflow.max_tasks_per_job").unwrap();
    assert_eq!(installed_version(&mut client), current_version(&mut client));
    // The update leaves the queues as they are (its transaction holds stageflow.tasks, and
    // dropping a queue's index there deadlocked with a claim); stageflow.shape_queues, which the
    // maintenance worker calls after each round, shapes the queues the job types name (pgmq's
    // index on vt dropped, fillfactor 50, as a queue made by 0.3.0 is), and only those: the old
    // queues that only jobs in flight name, and a queue of pgmq's own, keep theirs.
    let vt_indexed = |client: &mut Client| -> Vec<String> {
        client
            .query(
                "SELECT m.queue_name FROM pgmq.meta AS m
                  WHERE EXISTS (SELECT 1 FROM pg_index AS i JOIN pg_attribute AS a
                                    ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey::int2[])
                                 WHERE i.indrelid = format('pgmq.%I', 'q_' || m.queue_name)::regclass AND a.attname = 'vt')
                  ORDER BY 1",
                &[],
            )
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect()
    };
    let queues: Vec<String> = client
        .query("SELECT queue_name FROM pgmq.meta ORDER BY 1", &[])
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(vt_indexed(&mut client), queues, "the update shaped no queue");
    for queue in ["up", "up_plan", "up_next", "up_plan_next", "up_own"] {
        assert!(queues.contains(&queue.to_owned()), "{queue}: {queues:?}");
    }
    let shaped: i32 = client.query_one("SELECT stageflow.shape_queues()", &[]).unwrap().get(0);
    assert_eq!(vt_indexed(&mut client), ["up", "up_own", "up_plan"], "the queues: {queues:?}");
    assert_eq!(shaped as usize, queues.len() - 3);
    let again: i32 = client.query_one("SELECT stageflow.shape_queues()", &[]).unwrap().get(0);
    assert_eq!(again, 0, "each queue is shaped once");

    // The old worker reports what it held, as it did (worker_id, no lease token): accepted.
    let report = complete_010(&mut client, &held[1].0, json!({"by": "old-1", "after": "the upgrade"}));
    assert_eq!(report["task_status"], json!("completed"), "{report}");
    let report = complete_010(&mut client, &planners[1].0, json!({"tasks": [{"key": "b", "params": {"ms": 10}}]}));
    assert_eq!(report["stage_completed"], json!(true), "{report}");

    // The current version's workers finish the rest, logged in as a member of stageflow_worker
    // (0.1.0's workers were: they claimed from every queue).
    client
        .batch_execute(&format!(
            "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'upgrade_worker') THEN \
               CREATE ROLE upgrade_worker LOGIN PASSWORD '{ROLE_PASSWORD}' IN ROLE stageflow_worker; END IF; END $$"
        ))
        .unwrap();
    let logs = std::env::temp_dir().join(format!("stageflow-upgrade-{}", std::process::id()));
    std::fs::create_dir_all(&logs).unwrap();
    let worker_url = url_as(&url, "upgrade_worker");
    let mut workers: Vec<_> = ["new-1", "new-2"]
        .iter()
        .map(|name| common::spawn_worker(&worker_url, &logs, name, &["--queue", "up"]))
        .collect();
    let started = Instant::now();
    let statuses = loop {
        let statuses: Vec<Value> = jobs
            .iter()
            .map(|job| client.query_one("SELECT stageflow.job_status($1)", &[job]).unwrap().get(0))
            .collect();
        let open = statuses.iter().any(|s| ["queued", "processing"].contains(&s["status"].as_str().unwrap()));
        if !open || started.elapsed() > Duration::from_secs(90) {
            break statuses;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    for worker in &mut workers {
        let _ = worker.kill();
        let _ = worker.wait();
    }
    for status in &statuses {
        assert_eq!(status["status"], json!("completed"), "{status} (worker logs in {})", logs.display());
    }

    // Each stage advanced once, every task completed once, the counters back to nothing running.
    for job in jobs {
        let advances: Vec<(i32, i64)> = client
            .query(
                "SELECT stage, count(*) FROM stageflow.events WHERE job_id = $1 AND kind = 'stage_completed' \
                 GROUP BY stage ORDER BY stage",
                &[job],
            )
            .unwrap()
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        assert_eq!(advances, vec![(1, 1), (2, 1)], "job {job}");
        let open: i64 = client
            .query_one("SELECT count(*) FROM stageflow.tasks WHERE job_id = $1 AND status <> 'completed'", &[job])
            .unwrap()
            .get(0);
        assert_eq!(open, 0, "job {job}");
        let counts: Vec<(i32, i32, i32)> = client
            .query(
                "SELECT stage, remaining_tasks, running_tasks FROM stageflow.stage_counts WHERE job_id = $1 ORDER BY stage",
                &[job],
            )
            .unwrap()
            .iter()
            .map(|row| (row.get(0), row.get(1), row.get(2)))
            .collect();
        assert_eq!(counts, vec![(1, 0, 0), (2, 0, 0)], "job {job}");
    }
    let tasks_of = |client: &mut Client, job: &str| -> Vec<(i32, String, String, i32)> {
        client
            .query(
                "SELECT stage, task_key, coalesce(worker_id, ''), attempt FROM stageflow.tasks WHERE job_id = $1 \
                 ORDER BY stage, ordinal",
                &[&job],
            )
            .unwrap()
            .iter()
            .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
            .collect()
    };
    // What the old worker completed is kept; what it held is what it reported.
    let result: Value =
        client.query_one("SELECT result FROM stageflow.tasks WHERE task_id = $1", &[&held[0].0]).unwrap().get(0);
    assert_eq!(result, kept_result);
    let of_running = tasks_of(&mut client, &running);
    assert_eq!(of_running.len(), 4, "{of_running:?}");
    assert!(of_running[..2].iter().all(|t| t.2 == "old-1"), "{of_running:?}");
    // The expired lease's task was delivered again, to a new worker; the retry ran its attempt 2.
    for (job, attempt) in [(&expiring, 2), (&retried, 2)] {
        let first = &tasks_of(&mut client, job)[0];
        assert!(first.2.starts_with("new-") && first.3 == attempt, "job {job}: {first:?}");
    }
    // The dynamic stage holds one task per planned entry, from both planners.
    let work: Vec<String> = tasks_of(&mut client, &planning).iter().filter(|t| t.0 == 2).map(|t| t.1.clone()).collect();
    assert_eq!(work, ["a", "b"]);
    assert_eq!(tasks_of(&mut client, &queued).len(), 6);
    // 0.1.0's completed job reads as a completed job of the current version, result included.
    let done_result: Value = client.query_one("SELECT stageflow.job_result($1)", &[&done]).unwrap().get(0);
    assert!(done_result.to_string().contains("old-1"), "{done_result}");
    let _ = std::fs::remove_dir_all(&logs);
}

/// `(name, argument types, number with defaults, result)` of the extension's public functions.
fn public_functions(client: &mut Client) -> Vec<(String, Vec<String>, usize, String)> {
    client
        .query(
            "SELECT p.proname::text, coalesce(array_agg(format_type(t.type, NULL) ORDER BY t.n) \
                    FILTER (WHERE t.type IS NOT NULL), '{}'), p.pronargdefaults::int, pg_get_function_result(p.oid) \
               FROM pg_proc AS p LEFT JOIN unnest(p.proargtypes::oid[]) WITH ORDINALITY AS t(type, n) ON true \
              WHERE p.pronamespace = 'stageflow'::regnamespace AND p.proname !~ '^_' \
              GROUP BY p.oid ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get::<_, i32>(2) as usize, row.get(3)))
        .collect()
}

/// The SQL functions are a contract: what a caller of an earlier version calls still resolves,
/// with the same arguments (new ones only at the end, with defaults), and a table a function
/// returns keeps its columns in order (new ones only after them).
#[test]
fn every_call_of_an_earlier_version_resolves_with_its_results_in_place() {
    let (_, mut fresh) = database("upgrade_calls_fresh", None);
    let current_version = current_version(&mut fresh);
    let current = public_functions(&mut fresh);
    for version in recorded_versions().into_iter().filter(|v| *v != current_version) {
        let (_, mut client) = database(&format!("upgrade_calls_{}", version.replace('.', "_")), Some(&version));
        let earlier = public_functions(&mut client);
        assert!(earlier.len() > 20, "{version}: {} public functions", earlier.len());
        for (name, arguments, _, result) in &earlier {
            let compatible = current.iter().find(|(n, args, defaults, _)| {
                n == name && args.starts_with(arguments) && *defaults >= args.len() - arguments.len()
            });
            let Some((_, _, _, now)) = compatible else {
                panic!("{version}'s {name}({}) does not resolve in {current_version}", arguments.join(", "))
            };
            let (before, after) = (result.trim_end_matches(')'), now.trim_end_matches(')'));
            assert!(
                after == before || (before.starts_with("TABLE(") && after.starts_with(&format!("{before}, "))),
                "{name}: {version} returns {result}, {current_version} returns {now}"
            );
        }
    }
}
