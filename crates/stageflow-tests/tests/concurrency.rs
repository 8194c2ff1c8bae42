//! Races that must not break the engine: many sessions completing the last tasks of a stage at
//! once, mixed completions, batches and failures settling sharded counters, hand-made advances racing the last completion, two workers holding the same task after
//! its lease expired, and many workers emptying large jobs.

// Test code: a panic (unwrap, expect) is how a test reports a failure.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use serde_json::{json, Value};
use stageflow_tests::*;

const TWO_STAGES: &str = r#"{
    "parameters": {"type": "object", "properties": {"n": {"type": "integer"}, "seed": {"type": "integer"}}},
    "stages": [
        {"name": "fan", "handler": "race.fan", "queue": "race", "fan_out": "count", "param": "n"},
        {"name": "follow", "handler": "race.follow", "queue": "race", "fan_out": "lineage"}
    ]
}"#;

fn messages_in(client: &mut postgres::Client, queue: &str) -> i64 {
    client.query_one(&format!("SELECT count(*) FROM pgmq.q_{queue}"), &[]).unwrap().get(0)
}

/// Registers `name`: a `count` stage of `race.fan` tasks on `queue` that tolerates `max_failed`
/// failed tasks, then a `lineage` stage on `next_queue`.
fn register_tolerant_fan(client: &mut postgres::Client, name: &str, queue: &str, next_queue: &str, max_failed: i32) {
    let definition = json!({
        "parameters": {"type": "object", "properties": {"n": {"type": "integer"}, "seed": {"type": "integer"}}},
        "stages": [
            {"name": "fan", "handler": "race.fan", "queue": queue, "fan_out": "count", "param": "n",
             "max_failed_tasks": max_failed},
            {"name": "follow", "handler": "race.follow", "queue": next_queue, "fan_out": "lineage"}
        ]
    });
    register(client, name, &definition.to_string());
}

/// How many times stage 1 of the job advanced (its `stage_completed` events).
fn stage_one_advances(client: &mut postgres::Client, job_id: &str) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM stageflow.events WHERE job_id = $1 AND kind = 'stage_completed' AND stage = 1",
            &[&job_id],
        )
        .unwrap()
        .get(0)
}

/// Claims all `n` tasks of stage 1 and completes them from `n` sessions released together by a
/// barrier; returns the completion reports.
fn complete_all_at_once(url: &str, tasks: Vec<Claimed>, extra: impl Fn(&str) + Send + Sync + 'static) -> Vec<Value> {
    let barrier = Arc::new(Barrier::new(tasks.len()));
    let extra = Arc::new(extra);
    let handles: Vec<_> = tasks
        .into_iter()
        .map(|task| {
            let (url, barrier, extra) = (url.to_owned(), barrier.clone(), extra.clone());
            thread::spawn(move || {
                let mut client = connect(&url);
                barrier.wait();
                let report = complete(&mut client, &task.task_id, json!({"from": task.task_key}));
                extra(&task.job_id);
                report
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().expect("completion thread panicked")).collect()
}

#[test]
fn concurrent_last_completions_advance_the_stage_exactly_once() {
    let url = fresh_database("race_last_completions");
    let mut client = connect(&url);
    register(&mut client, "race", TWO_STAGES);
    let n = 8;
    for round in 0..40 {
        let job_id = submit(&mut client, "race", json!({"n": n, "seed": round}));
        let tasks = claim(&mut client, "race", n, 60);
        assert_eq!(tasks.len(), n as usize);
        let reports = complete_all_at_once(&url, tasks, |_| {});

        let advancing: Vec<&Value> = reports.iter().filter(|r| r["stage_completed"] == json!(true)).collect();
        assert_eq!(advancing.len(), 1, "round {round}: exactly one completion finishes the stage: {reports:?}");
        assert_eq!(advancing[0]["next_stage"], json!(2));
        let stage2: i64 = client
            .query_one("SELECT count(*) FROM stageflow.tasks WHERE job_id = $1 AND stage = 2", &[&job_id])
            .unwrap()
            .get(0);
        assert_eq!(stage2, n as i64, "round {round}: stage 2 has one task per stage-1 task");
        assert_eq!(messages_in(&mut client, "race"), n as i64, "round {round}: one message per stage-2 task");
        let status = job_status(&mut client, &job_id);
        assert_eq!(status["current_stage"], json!(2));
        assert_eq!(status["stages"][0]["tasks"]["completed"], json!(n));

        assert_eq!(drain(&mut client, "race", 100), n as usize);
        assert_eq!(job_status(&mut client, &job_id)["status"], json!("completed"));
    }
}

/// A stage's counters are split over 16 shards (no task belongs to one: a completion takes its tasks
/// off whichever shards have them), and only the session that empties a shard touches the stage row. 8 sessions settle a 48-task stage (3 tasks in each of 16
/// shards) at once, each in its own way: single completions, `complete_tasks` batches, and
/// permanent failures the stage tolerates. Every round: exactly one stage advance, counters equal
/// to what the task rows say, every shard empty.
#[test]
fn sharded_counters_settle_exactly_under_mixed_concurrent_outcomes() {
    let url = fresh_database("race_sharded_counters");
    let mut client = connect(&url);
    register_tolerant_fan(&mut client, "shard_race", "shards", "shards", 48);
    let n = 48;
    for round in 0..15 {
        let job_id = submit(&mut client, "shard_race", json!({"n": n, "seed": round}));
        let tasks = claim(&mut client, "shards", n, 60);
        assert_eq!(tasks.len(), n as usize);
        let shards: (i32, i32) = {
            let row = client
                .query_one(
                    "SELECT shards, open_shards FROM stageflow.stages WHERE job_id = $1 AND stage = 1",
                    &[&job_id],
                )
                .unwrap();
            (row.get(0), row.get(1))
        };
        assert_eq!(shards, (16, 16), "round {round}");
        // Session k takes tasks k, k + 8, ...: its batch of 6 finds no shard with 6 open tasks (3
        // each), so it takes them shard by shard from shards no one holds, or else waits for every
        // shard in shard order; every shard is emptied by sessions racing on it.
        let sessions = 8;
        let barrier = Arc::new(Barrier::new(sessions));
        let handles: Vec<_> = (0..sessions)
            .map(|k| {
                let mine: Vec<String> = tasks.iter().skip(k).step_by(sessions).map(|t| t.task_id.clone()).collect();
                let (url, barrier) = (url.clone(), barrier.clone());
                thread::spawn(move || {
                    let mut client = connect(&url);
                    barrier.wait();
                    let mut failed = 0;
                    match k % 3 {
                        0 => {
                            for id in &mine {
                                complete(&mut client, id, json!({"by": k}));
                            }
                        }
                        1 => {
                            let results: Vec<Value> =
                                mine.iter().map(|id| json!({"task_id": id, "result": {"by": k}})).collect();
                            let reports =
                                json(&mut client, "SELECT stageflow.complete_tasks($1)", &[&Value::Array(results)]);
                            assert!(
                                reports.as_array().unwrap().iter().all(|r| r["task_status"] == json!("completed")),
                                "{reports}"
                            );
                        }
                        _ => {
                            for (i, id) in mine.iter().enumerate() {
                                if i % 2 == 0 {
                                    json(
                                        &mut client,
                                        "SELECT stageflow.fail_task($1, $2, false)",
                                        &[id, &json!({"message": "no"})],
                                    );
                                    failed += 1;
                                } else {
                                    complete(&mut client, id, json!({"by": k}));
                                }
                            }
                        }
                    }
                    failed
                })
            })
            .collect();
        let failed: i32 = handles.into_iter().map(|h| h.join().expect("session panicked")).sum();

        assert_eq!(stage_one_advances(&mut client, &job_id), 1, "round {round}: the stage advanced exactly once");
        let row = client
            .query_one(
                "SELECT c.remaining_tasks, c.completed_count, s.failed_count, s.open_shards, s.status,
                        (SELECT count(*)::int FROM stageflow.stage_shards AS sh
                          WHERE sh.job_id = s.job_id AND sh.stage = 1 AND sh.remaining_tasks <> 0),
                        (SELECT count(*)::int FROM stageflow.tasks AS t WHERE t.job_id = s.job_id AND t.stage = 1 AND t.status = 'completed'),
                        (SELECT count(*)::int FROM stageflow.tasks AS t WHERE t.job_id = s.job_id AND t.stage = 2)
                   FROM stageflow.stages AS s JOIN stageflow.stage_counts AS c USING (job_id, stage)
                  WHERE s.job_id = $1 AND s.stage = 1",
                &[&job_id],
            )
            .unwrap();
        let completed = n - failed;
        assert_eq!(row.get::<_, i32>(0), 0, "round {round}: nothing open");
        assert_eq!(row.get::<_, i32>(1), completed, "round {round}: completions counted once each");
        assert_eq!(row.get::<_, i32>(2), failed, "round {round}");
        assert_eq!(row.get::<_, i32>(3), 0, "round {round}: no open shard");
        assert_eq!(row.get::<_, String>(4), "completed", "round {round}");
        assert_eq!(row.get::<_, i32>(5), 0, "round {round}: every shard empty");
        assert_eq!(row.get::<_, i32>(6), completed, "round {round}: the counters agree with the task rows");
        assert_eq!(row.get::<_, i32>(7), completed, "round {round}: one stage-2 task per completed stage-1 task");
        assert_eq!(drain(&mut client, "shards", 100), completed as usize);
        assert_eq!(job_status(&mut client, &job_id)["status"], json!("completed_with_errors"));
    }
}

/// A stage's shards under random load: no task belongs to a shard, so each session takes its tasks
/// off shards no other transaction holds, or waits for every shard in shard order when those are
/// too few. 8 sessions settle one stage of 1,200 tasks (16 shards of 75) in random batches of 2 to
/// 11 and of 1 to 120 (a batch larger than any shard, or than what other sessions leave unlocked, takes the
/// waiting path), single completions and permanent failures, while a ninth session keeps calling
/// `retry_job` (failed tasks open again, spread over the shards). Any error fails the test (a
/// deadlock, 40P01, included); afterwards a drain completes what was retried, and the stage must
/// have advanced exactly once with counters equal to the task rows. Seeds from
/// `STAGEFLOW_SHARD_SEEDS` (default `1,2,3,4`) fix each session's choices, not the interleavings.
#[test]
fn shard_counters_settle_exactly_under_random_batches_failures_and_retries() {
    let url = fresh_database("race_shard_random");
    let mut client = connect(&url);
    register_tolerant_fan(&mut client, "shard_random", "shard_random", "shard_random_next", 1200);
    // splitmix64: a seed fixes the sequence.
    fn next(state: &mut u64) -> u64 {
        *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    let seeds: Vec<u64> = std::env::var("STAGEFLOW_SHARD_SEEDS")
        .unwrap_or_else(|_| "1,2,3,4".to_owned())
        .split(',')
        .map(|s| s.trim().parse().expect("STAGEFLOW_SHARD_SEEDS: comma-separated integers"))
        .collect();
    let n = 1200;
    for seed in seeds {
        let job_id = submit(&mut client, "shard_random", json!({"n": n, "seed": seed}));
        let mut tasks = Vec::new();
        while tasks.len() < n as usize {
            let got = claim(&mut client, "shard_random", 500, 300);
            assert!(!got.is_empty(), "seed {seed}: all {n} tasks claimable");
            tasks.extend(got.into_iter().map(|t| t.task_id));
        }
        // Each session's share: a shuffled eighth of the tasks.
        let mut state = seed;
        for i in (1..tasks.len()).rev() {
            tasks.swap(i, (next(&mut state) % (i as u64 + 1)) as usize);
        }
        let sessions = 8;
        let barrier = Arc::new(Barrier::new(sessions + 1));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let handles: Vec<_> = (0..sessions)
            .map(|k| {
                let mine: Vec<String> = tasks.iter().skip(k).step_by(sessions).cloned().collect();
                let (url, barrier) = (url.clone(), barrier.clone());
                let mut state = seed.wrapping_mul(1000).wrapping_add(k as u64);
                thread::spawn(move || {
                    let mut client = connect(&url);
                    barrier.wait();
                    let mut at = 0;
                    while at < mine.len() {
                        let pick = next(&mut state) % 10;
                        let size = match pick {
                            0..=2 => 1 + (next(&mut state) % 120) as usize,
                            3..=5 => 2 + (next(&mut state) % 10) as usize,
                            _ => 1,
                        };
                        let chunk = &mine[at..(at + size).min(mine.len())];
                        at += chunk.len();
                        match pick {
                            0..=5 => {
                                let results: Vec<Value> =
                                    chunk.iter().map(|id| json!({"task_id": id, "result": {"by": k}})).collect();
                                let reports = client
                                    .query_one(
                                        "SELECT stageflow.complete_tasks($1, NULL, false)",
                                        &[&Value::Array(results)],
                                    )
                                    .unwrap_or_else(|e| panic!("seed {seed} session {k}: complete_tasks: {e:?}"))
                                    .get::<_, Value>(0);
                                assert!(
                                    reports.as_array().unwrap().iter().all(|r| r.get("error").is_none()),
                                    "seed {seed} session {k}: {reports}"
                                );
                            }
                            6..=7 => {
                                client
                                    .query_one(
                                        "SELECT stageflow.complete_task_and_check_stage($1, $2)",
                                        &[&chunk[0], &json!({"by": k})],
                                    )
                                    .unwrap_or_else(|e| panic!("seed {seed} session {k}: complete: {e:?}"));
                            }
                            _ => {
                                client
                                    .query_one(
                                        "SELECT stageflow.fail_task($1, $2, false)",
                                        &[&chunk[0], &json!({"message": "no"})],
                                    )
                                    .unwrap_or_else(|e| panic!("seed {seed} session {k}: fail_task: {e:?}"));
                            }
                        }
                    }
                })
            })
            .collect();
        let retrier = {
            let (url, barrier, stop, job_id) = (url.clone(), barrier.clone(), stop.clone(), job_id.clone());
            thread::spawn(move || {
                let mut client = connect(&url);
                barrier.wait();
                let mut rounds = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    client
                        .query_one("SELECT stageflow.retry_job($1)", &[&job_id])
                        .unwrap_or_else(|e| panic!("seed {seed}: retry_job: {e:?}"));
                    rounds += 1;
                    thread::sleep(Duration::from_millis(2));
                }
                rounds
            })
        };
        for h in handles {
            h.join().expect("session panicked");
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let rounds = retrier.join().expect("retrier panicked");
        assert!(rounds > 0, "seed {seed}: retry_job ran");

        // What retry_job opened again: claimed and completed until the stage is done.
        loop {
            let stage: i32 = client
                .query_one("SELECT current_stage FROM stageflow.jobs WHERE job_id = $1", &[&job_id])
                .unwrap()
                .get(0);
            if stage == 2 {
                break;
            }
            let got = claim(&mut client, "shard_random", 100, 300);
            assert!(!got.is_empty(), "seed {seed}: stage 1 is still open with nothing to claim");
            let results: Vec<Value> = got.iter().map(|t| json!({"task_id": t.task_id, "result": {}})).collect();
            json(&mut client, "SELECT stageflow.complete_tasks($1)", &[&Value::Array(results)]);
        }
        assert_eq!(stage_one_advances(&mut client, &job_id), 1, "seed {seed}: the stage advanced exactly once");
        let row = client
            .query_one(
                "SELECT c.remaining_tasks, c.running_tasks, c.completed_count, s.failed_count, s.open_shards, s.status,
                        (SELECT count(*)::int FROM stageflow.stage_shards AS sh
                          WHERE sh.job_id = s.job_id AND sh.stage = 1 AND sh.remaining_tasks <> 0),
                        (SELECT count(*)::int FROM stageflow.tasks AS t WHERE t.job_id = s.job_id AND t.stage = 1 AND t.status = 'completed'),
                        (SELECT count(*)::int FROM stageflow.tasks AS t
                          WHERE t.job_id = s.job_id AND t.stage = 1 AND t.status IN ('failed', 'dead')),
                        (SELECT count(*)::int FROM stageflow.tasks AS t WHERE t.job_id = s.job_id AND t.stage = 2)
                   FROM stageflow.stages AS s JOIN stageflow.stage_counts AS c USING (job_id, stage)
                  WHERE s.job_id = $1 AND s.stage = 1",
                &[&job_id],
            )
            .unwrap();
        let completed: i32 = row.get(7);
        assert_eq!(row.get::<_, i32>(0), 0, "seed {seed}: nothing open");
        assert_eq!(row.get::<_, i32>(1), 0, "seed {seed}: nothing running");
        assert_eq!(row.get::<_, i32>(2), completed, "seed {seed}: completions counted once each");
        assert_eq!(row.get::<_, i32>(3), row.get::<_, i32>(8), "seed {seed}: failures counted as the task rows say");
        assert_eq!(row.get::<_, i32>(4), 0, "seed {seed}: no open shard");
        assert_eq!(row.get::<_, String>(5), "completed", "seed {seed}");
        assert_eq!(row.get::<_, i32>(6), 0, "seed {seed}: every shard empty");
        assert_eq!(completed + row.get::<_, i32>(8), n, "seed {seed}: every task ended once");
        assert_eq!(row.get::<_, i32>(9), completed, "seed {seed}: one stage-2 task per completed stage-1 task");
        eprintln!(
            "shard seed {seed}: {completed} completed, {} failed, {rounds} retry_job rounds",
            row.get::<_, i32>(8)
        );
    }
}

/// A batch completion locks its tasks before their messages and decides under those locks, so
/// nothing can requeue a task between the batch's look and its message delete (the old protocol
/// looked first and could lose the message of a task requeued meanwhile). The interleaving is
/// forced: a third session holds the message the batch deletes first, so the batch waits there,
/// holding its tasks, after their leases expired. Another worker's claim then reads the expired
/// lease's message but must not take the task a report is in flight for: it skips it, and A's
/// completions (whose leases nobody else took) are recorded.
#[test]
fn a_claim_never_takes_a_task_whose_batch_completion_is_in_flight() {
    let url = fresh_database("race_batch_requeue");
    let mut client = connect(&url);
    register(
        &mut client,
        "requeue",
        r#"{"parameters": {"type": "object"}, "retry": {"max_attempts": 5, "backoff_base_seconds": 1, "backoff_max_seconds": 1},
            "stages": [{"name": "pair", "handler": "r.pair", "queue": "requeue", "fan_out": "count", "param": "n"}]}"#,
    );
    let job_id = submit(&mut client, "requeue", json!({"n": 2}));
    // Worker A claims both, with a 1-second lease.
    let claimed: Vec<(String, i64)> = client
        .query("SELECT c.task_id, t.msg_id FROM stageflow.claim_tasks('requeue', 2, 1, 'A') AS c JOIN stageflow.tasks AS t USING (task_id) ORDER BY t.msg_id", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(claimed.len(), 2);
    let ((first, first_msg), (second, _)) = (claimed[0].clone(), claimed[1].clone());

    // Session C holds the first message, so A's batch, which deletes in msg_id order, waits there.
    let mut holder = connect(&url);
    let mut hold = holder.transaction().unwrap();
    hold.execute("SELECT 1 FROM pgmq.q_requeue WHERE msg_id = $1 FOR UPDATE", &[&first_msg]).unwrap();
    thread::sleep(Duration::from_millis(1300)); // both leases expire
    let batch = {
        let (url, first, second) = (url.clone(), first.clone(), second.clone());
        thread::spawn(move || {
            let mut a = connect(&url);
            json(
                &mut a,
                "SELECT stageflow.complete_tasks($1, 'A')",
                &[&json!([{"task_id": first, "result": {"by": "A"}}, {"task_id": second, "result": {"by": "A"}}])],
            )
        })
    };
    // Wait until A's batch is blocked on the held message.
    let started = std::time::Instant::now();
    loop {
        let waiting: i64 = client
            .query_one("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE '%complete_tasks%'", &[])
            .unwrap()
            .get(0);
        if waiting > 0 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "the batch never waited on the held message");
        thread::sleep(Duration::from_millis(20));
    }
    // Worker B's claim reads the second task's message (its lease expired), finds the task held
    // by A's batch and skips it: no claim, and the message is left for a later look.
    let b: Vec<String> = client
        .query("SELECT task_id FROM stageflow.claim_tasks('requeue', 1, 60, 'B')", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(b.is_empty(), "B must not take a task whose report is in flight: {b:?}");
    hold.commit().unwrap();
    let reports = batch.join().expect("batch thread panicked");

    assert_eq!(reports[0]["task_status"], json!("completed"), "{reports}");
    assert_eq!(reports[1]["task_status"], json!("completed"), "{reports}");
    let rows = client
        .query(
            "SELECT t.status, t.result ->> 'by', t.lease_token, (SELECT count(*) FROM pgmq.q_requeue AS q WHERE q.message ->> 'task_id' = t.task_id) \
               FROM stageflow.tasks AS t WHERE t.job_id = $1 ORDER BY t.task_id",
            &[&job_id],
        )
        .unwrap();
    for row in &rows {
        assert_eq!(
            (row.get::<_, String>(0), row.get::<_, String>(1), row.get::<_, i64>(2), row.get::<_, i64>(3)),
            ("completed".to_owned(), "A".to_owned(), 1, 0),
            "each task completed once, by A's only lease, its message gone"
        );
    }
    assert_eq!(job_status(&mut client, &job_id)["status"], json!("completed"));
}

#[test]
fn hand_made_advances_racing_the_last_completion_create_the_next_stage_once() {
    let url = fresh_database("race_hand_advance");
    let mut client = connect(&url);
    register(&mut client, "race", TWO_STAGES);
    let n = 6;
    for round in 0..25 {
        let job_id = submit(&mut client, "race", json!({"n": n, "seed": round}));
        let tasks = claim(&mut client, "race", n, 60);
        // Every completing session also calls advance_stage by hand right after its completion.
        let advance_url = url.clone();
        complete_all_at_once(&url, tasks, move |job_id| {
            let mut other = connect(&advance_url);
            json(&mut other, "SELECT stageflow.advance_stage($1)", &[&job_id]);
        });
        let rows = client
            .query_one(
                "SELECT count(*), count(DISTINCT task_id) FROM stageflow.tasks WHERE job_id = $1 AND stage = 2",
                &[&job_id],
            )
            .unwrap();
        let (tasks, distinct): (i64, i64) = (rows.get(0), rows.get(1));
        assert_eq!((tasks, distinct), (n as i64, n as i64), "round {round}");
        assert_eq!(messages_in(&mut client, "race"), n as i64, "round {round}");
        let report = json(&mut client, "SELECT stageflow.advance_stage($1)", &[&job_id]);
        assert_eq!(report["advanced"], json!(false), "round {round}: nothing left to advance: {report}");
        drain(&mut client, "race", 100);
    }
}

#[test]
fn two_workers_holding_an_expired_lease_count_the_task_once() {
    let url = fresh_database("race_expired_lease");
    let mut client = connect(&url);
    register(&mut client, "race", TWO_STAGES);
    for round in 0..5 {
        let job_id = submit(&mut client, "race", json!({"n": 2, "seed": round}));
        let first = claim(&mut client, "race", 1, 1);
        assert_eq!(first.len(), 1);
        // The other task is completed normally, so the expired one is the last of its stage.
        let other = claim(&mut client, "race", 1, 60);
        complete(&mut client, &other[0].task_id, json!({}));

        thread::sleep(Duration::from_millis(1300));
        let second = claim(&mut client, "race", 1, 60);
        assert_eq!(second.len(), 1, "the expired task is delivered again");
        assert_eq!(second[0].task_id, first[0].task_id);
        assert_eq!(second[0].attempt, 2);

        // Both holders complete at once: one completion counts, the other gets the same report.
        let reports = complete_all_at_once(&url, vec![first[0].clone(), second[0].clone()], |_| {});
        assert_eq!(reports[0], reports[1], "round {round}");
        assert_eq!(reports[0]["stage_completed"], json!(true));
        let row = client
            .query_one(
                "SELECT completed_count, remaining_tasks FROM stageflow.stage_counts WHERE job_id = $1 AND stage = 1",
                &[&job_id],
            )
            .unwrap();
        assert_eq!((row.get::<_, i32>(0), row.get::<_, i32>(1)), (2, 0), "round {round}");
        let stage2: i64 = client
            .query_one("SELECT count(*) FROM stageflow.tasks WHERE job_id = $1 AND stage = 2", &[&job_id])
            .unwrap()
            .get(0);
        assert_eq!(stage2, 2);
        drain(&mut client, "race", 10);
        assert_eq!(job_status(&mut client, &job_id)["status"], json!("completed"));
    }
}

/// Runs `workers` sessions that claim in batches and complete until the job is done; returns
/// how many completions each made.
fn run_workers(url: &str, queue: &str, job_id: &str, workers: usize, batch: i32) -> Vec<usize> {
    let handles: Vec<_> = (0..workers)
        .map(|_| {
            let (url, queue, job_id) = (url.to_owned(), queue.to_owned(), job_id.to_owned());
            thread::spawn(move || {
                let mut client = connect(&url);
                let mut done = 0;
                loop {
                    let tasks = claim(&mut client, &queue, batch, 60);
                    if tasks.is_empty() {
                        let status = job_status(&mut client, &job_id);
                        if status["status"] != json!("processing") && status["status"] != json!("queued") {
                            return done;
                        }
                        thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                    for task in tasks {
                        let result = match &task.predecessor {
                            Some(p) => json!({"reply_to": p}),
                            None => json!({"greeting": task.task_key}),
                        };
                        complete(&mut client, &task.task_id, result);
                        done += 1;
                    }
                }
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().expect("worker panicked")).collect()
}

#[test]
fn many_workers_run_every_task_exactly_once() {
    let url = fresh_database("many_workers");
    let mut client = connect(&url);
    register(&mut client, "race", TWO_STAGES);
    let n = 3000;
    let job_id = submit(&mut client, "race", json!({"n": n, "seed": 1}));
    let per_worker = run_workers(&url, "race", &job_id, 8, 10);
    assert_eq!(per_worker.iter().sum::<usize>(), 2 * n as usize, "{per_worker:?}");

    let status = job_status(&mut client, &job_id);
    assert_eq!(status["status"], json!("completed"));
    let row = client
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE status = 'completed' AND attempt = 1) FROM stageflow.tasks WHERE job_id = $1",
            &[&job_id],
        )
        .unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (2 * n as i64, 2 * n as i64));
    let result = job_result(&mut client, &job_id);
    let result = result.as_array().expect("result is the array of replies");
    assert_eq!(result.len(), n as usize);
    assert_eq!(result[0], json!({"reply_to": {"greeting": "0"}}));
    assert_eq!(result[n as usize - 1], json!({"reply_to": {"greeting": (n - 1).to_string()}}));
    assert_eq!(messages_in(&mut client, "race"), 0);
}

#[test]
fn hello_world_of_ten_thousand_completes() {
    let url = fresh_database("hello_world_10000");
    let mut client = connect(&url);
    let job_id = submit(&mut client, "hello_world", json!({"message": "big", "n": 10000}));
    let per_worker = run_workers(&url, "default", &job_id, 4, 200);
    assert_eq!(per_worker.iter().sum::<usize>(), 20000);
    let status = job_status(&mut client, &job_id);
    assert_eq!(status["status"], json!("completed"));
    assert_eq!(status["result_count"], json!(10000));
    assert_eq!(job_result(&mut client, &job_id).as_array().map(Vec::len), Some(10000));
    assert_eq!(status["stages"][1]["tasks"]["completed"], json!(10000));
}

/// A batch of completions that advances many jobs uses one subtransaction id, not one per job:
/// past 64 in one transaction, PostgreSQL's snapshots in every other session stop knowing that
/// transaction's subtransactions and look each of them up in pg_subtrans while it runs. Each
/// advance plans the next stage in a subtransaction (a bad plan fails only its job), which reads
/// only and so gets no id; the one id is the batch's attempt at the shards without waiting. Before
/// the change, 100 jobs advancing took 101 (and a WAL record assigning the overflow). The commit
/// record lists the transaction's subtransaction ids (pg_walinspect).
#[test]
fn a_batch_advancing_a_hundred_jobs_uses_one_subtransaction_id() {
    let url = fresh_database("subxact_ids");
    let mut client = connect(&url);
    client.batch_execute("CREATE EXTENSION pg_walinspect").unwrap();
    register(
        &mut client,
        "small",
        r#"{"parameters": {"type": "object", "properties": {"i": {"type": "integer"}}},
            "stages": [{"name": "a", "handler": "small.a", "queue": "small_a"},
                       {"name": "b", "handler": "small.b", "queue": "small_b"}]}"#,
    );
    // Half the jobs' next stage has more tasks than a message window (3 here): its first window is
    // sent in the same transaction (stageflow.message_windows), and takes no subtransaction id
    // either (found by review: one each, 71 in a batch advancing 70 such jobs).
    register(
        &mut client,
        "wide",
        r#"{"parameters": {"type": "object", "properties": {"i": {"type": "integer"}, "n": {"type": "integer"}}},
            "stages": [{"name": "a", "handler": "wide.a", "queue": "small_a"},
                       {"name": "b", "handler": "wide.b", "queue": "wide_b", "fan_out": "count", "param": "n"}]}"#,
    );
    client.batch_execute("SET stageflow.message_window = 3").unwrap();
    for i in 0..50 {
        submit(&mut client, "small", json!({"i": i}));
        submit(&mut client, "wide", json!({"i": i, "n": 4}));
    }
    let claimed = claim(&mut client, "small_a", 100, 300);
    assert_eq!(claimed.len(), 100);
    let results: Vec<Value> = claimed
        .iter()
        .map(|task| json!({"task_id": task.task_id, "result": {"i": task.task_key}, "lease_token": task.lease_token}))
        .collect();
    let start = wal_position_kept(&mut client);
    let mut tx = client.transaction().unwrap();
    let reports: Value =
        tx.query_one("SELECT stageflow.complete_tasks($1, 'test')", &[&Value::Array(results)]).unwrap().get(0);
    let refused: Vec<&Value> = reports.as_array().unwrap().iter().filter(|r| r.get("error").is_some()).collect();
    assert!(refused.is_empty(), "{refused:?}");
    let xid: String = tx.query_one("SELECT pg_current_xact_id()::text", &[]).unwrap().get(0);
    tx.commit().unwrap();
    // (the transaction's commit record)
    let records: Vec<(String, String)> = client
        .query(
            "SELECT record_type, description FROM pg_get_wal_records_info_till_end_of_wal($1::text::pg_lsn)
              WHERE resource_manager = 'Transaction' AND xid::text = $2",
            &[&start, &xid],
        )
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(records.len(), 1, "{records:?}");
    let (kind, description) = &records[0];
    assert_eq!(kind, "COMMIT", "{records:?}");
    let subxacts = description.split("subxacts:").nth(1).map_or(0, |ids| ids.split_whitespace().count());
    assert_eq!(subxacts, 1, "{description}");
    let advanced: i64 =
        client.query_one("SELECT count(*) FROM stageflow.jobs WHERE current_stage = 2", &[]).unwrap().get(0);
    assert_eq!(advanced, 100);
    let windows: i64 = client.query_one("SELECT count(*) FROM stageflow.message_windows", &[]).unwrap().get(0);
    assert_eq!(windows, 50, "each wide job's stage b sends its messages in windows");
    assert_eq!(claim(&mut client, "small_b", 200, 300).len(), 50);
    // The first windows, 3 of each stage's 4 tasks; that read reaches every stage's last window
    // and sends each stage's last task, which the next claim takes.
    assert_eq!(claim(&mut client, "wide_b", 150, 300).len(), 150);
    assert_eq!(claim(&mut client, "wide_b", 150, 300).len(), 50);
}
