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
