//! The outbox announces state changes with NOTIFY, and the background worker maintains the
//! database by itself: a task whose worker vanished is dead-lettered with nobody claiming.

// Test code: a panic (unwrap, expect) is how a test reports a failure.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use postgres::fallible_iterator::FallibleIterator;
use serde_json::{json, Value};
use stageflow_tests::*;

#[test]
fn state_changes_are_announced_on_stageflow_events() {
    let url = fresh_database("events_notify");
    let mut listener = connect(&url);
    listener.batch_execute("LISTEN stageflow_events").unwrap();
    let mut client = connect(&url);
    let job_id = submit(&mut client, "hello_world", json!({"message": "events", "n": 1}));
    drain(&mut client, "default", 10);

    let mut kinds = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while kinds.len() < 4 && Instant::now() < deadline {
        let mut notifications = listener.notifications();
        let mut iter = notifications.timeout_iter(Duration::from_millis(500));
        while let Some(n) = iter.next().unwrap() {
            let payload: Value = serde_json::from_str(n.payload()).unwrap();
            assert_eq!(payload["job_id"], json!(job_id));
            kinds.push(payload["kind"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(kinds, ["job_submitted", "stage_completed", "stage_completed", "job_completed"]);
    let stored: i64 =
        client.query_one("SELECT count(*) FROM stageflow.events WHERE job_id = $1", &[&job_id]).unwrap().get(0);
    assert_eq!(stored, 4, "each announced event is a row of the outbox");
}

#[test]
fn the_background_worker_dead_letters_an_abandoned_task_with_nobody_claiming() {
    // The maintenance worker looks after the database named by stageflow.database: `postgres`.
    let url = cluster_url();
    let mut client = connect(&url);
    client.batch_execute("CREATE EXTENSION IF NOT EXISTS stageflow CASCADE").unwrap();
    let workers: i64 = client
        .query_one("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'stageflow maintenance'", &[])
        .unwrap()
        .get(0);
    assert_eq!(workers, 1, "one maintenance worker runs (shared_preload_libraries = stageflow)");

    register(
        &mut client,
        "abandoned",
        r#"{"retry": {"max_attempts": 1}, "stages": [{"name": "s", "handler": "h", "queue": "abandoned"}],
            "parameters": {"type": "object", "properties": {"at": {"type": "string"}}}}"#,
    );
    let job_id = submit(&mut client, "abandoned", json!({"at": format!("{:?}", Instant::now())}));
    assert_eq!(claim(&mut client, "abandoned", 1, 1).len(), 1, "a worker claims it and vanishes");

    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        let status = job_status(&mut client, &job_id);
        if status["status"] != json!("processing") || Instant::now() > deadline {
            break status;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(status["status"], json!("failed"), "{status}");
    assert_eq!(status["error"]["error"]["type"], json!("lease_expired"));
    let dead: String =
        client.query_one("SELECT status FROM stageflow.tasks WHERE job_id = $1", &[&job_id]).unwrap().get(0);
    assert_eq!(dead, "dead");
}

/// Retention deleting an old failed job while an admin retries it: retention locks the job row
/// before the job's stage and shards (its cascade), the reverse of retry_job's order, and used to
/// deadlock with it (one of them failed with 40P01 after a second). It now gives up a wait after
/// 50 ms and skips the batch for the round; and retry_job, which now locks the tasks it runs again
/// before the stage, first takes a KEY SHARE lock of the job row, which retention skips. The
/// retry goes through.
#[test]
fn retention_gives_way_to_a_retry_of_the_job_it_would_delete() {
    let url = fresh_database("retention_vs_retry");
    let mut client = connect(&url);
    register(
        &mut client,
        "brittle",
        r#"{"retry": {"max_attempts": 1},
            "stages": [{"name": "s", "handler": "b.s", "queue": "brittle", "fan_out": "count", "param": "n"}]}"#,
    );
    client.batch_execute("SET stageflow.fake_now = '2030-01-01 00:00:00+00'").unwrap();
    let job_id = submit(&mut client, "brittle", json!({"n": 3}));
    let claimed = claim(&mut client, "brittle", 3, 60);
    let failed: Value = client
        .query_one("SELECT stageflow.fail_task($1, '{\"message\": \"no\"}', false)", &[&claimed[0].task_id])
        .unwrap()
        .get(0);
    assert_eq!(failed["job_status"], json!("failed"), "{failed}");

    // A session holds the job's tasks, so that retry_job waits there, holding a KEY SHARE lock of
    // the job's row (which it takes first; its stage and shards come after the tasks).
    let mut holder = connect(&url);
    let mut held = holder.transaction().unwrap();
    held.execute("SELECT 1 FROM stageflow.tasks WHERE job_id = $1 FOR UPDATE", &[&job_id]).unwrap();
    let retrier = {
        let (url, job_id) = (url.clone(), job_id.clone());
        std::thread::spawn(move || {
            let mut admin = connect(&url);
            admin.query_one("SELECT stageflow.retry_job($1)", &[&job_id]).map(|row| row.get::<_, Value>(0))
        })
    };
    let mut watcher = connect(&url);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: i64 = watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' \
                 AND query LIKE '%retry_job%'",
                &[],
            )
            .unwrap()
            .get(0);
        if waiting == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "retry_job never waited for the held tasks");
        std::thread::sleep(Duration::from_millis(20));
    }

    // Two days on, retention would delete the failed job: it skips the locked row (or, had
    // retry_job taken the stage first as it used to, it would wait for the stage and give up) and
    // reports no error; the job is still there. (Waiting for the stage until the holder commits,
    // which comes after this call, it would hang: the statement timeout ends that.)
    let mut maintenance = connect(&url);
    maintenance
        .batch_execute(
            "SET stageflow.fake_now = '2030-01-03 00:00:00+00'; SET stageflow.retention = '1 day'; \
             SET statement_timeout = '10s'",
        )
        .unwrap();
    let report: Value = maintenance
        .query_one("SELECT stageflow.run_maintenance()", &[])
        .unwrap_or_else(|e| panic!("run_maintenance waited for the retried job's stage: {e:?}"))
        .get(0);
    assert_eq!((report["jobs_deleted"].clone(), report["errors"].clone()), (json!(0), json!(0)), "{report}");
    held.commit().unwrap();
    let retried = retrier.join().unwrap().unwrap_or_else(|e| panic!("retry_job failed: {e:?}"));
    assert_eq!(retried["job_status"], json!("processing"), "{retried}");
    assert_eq!(job_status(&mut client, &job_id)["status"], json!("processing"));
}

/// A REPEATABLE READ submission of the same work as a job that retention deleted after the
/// transaction's snapshot was taken sees the old job's row beside its new one: it fails as a
/// serialization conflict (40001, run it again), not with an internal error (P0003 before).
#[test]
fn a_repeatable_read_resubmission_racing_retention_is_a_serialization_failure() {
    let url = fresh_database("retention_vs_repeatable_read");
    let mut client = connect(&url);
    client.batch_execute("SET stageflow.fake_now = '2030-01-01 00:00:00+00'").unwrap();
    let job_id = submit(&mut client, "hello_world", json!({"message": "again", "n": 1}));
    drain(&mut client, "default", 10);
    assert_eq!(job_status(&mut client, &job_id)["status"], json!("completed"));

    let mut submitter = connect(&url);
    let mut snapshot =
        submitter.build_transaction().isolation_level(postgres::IsolationLevel::RepeatableRead).start().unwrap();
    snapshot.batch_execute("SET LOCAL stageflow.fake_now = '2030-01-03 00:00:00+00'").unwrap();
    let seen: i64 = snapshot.query_one("SELECT count(*) FROM stageflow.jobs", &[]).unwrap().get(0);
    assert_eq!(seen, 1);
    client
        .batch_execute("SET stageflow.fake_now = '2030-01-03 00:00:00+00'; SET stageflow.retention = '1 day'")
        .unwrap();
    for _ in 0..10 {
        client.query_one("SELECT stageflow.run_maintenance()", &[]).unwrap();
    }
    let deleted: i64 = client.query_one("SELECT count(*) FROM stageflow.jobs", &[]).unwrap().get(0);
    assert_eq!(deleted, 0, "retention deleted the job");
    let error = snapshot
        .query_one("SELECT stageflow.submit_job('hello_world', $1)", &[&json!({"message": "again", "n": 1})])
        .unwrap_err();
    assert_eq!(db_error(&error).0, "40001", "{error:?}");
}
