//! The one-task paths against the paths of several. `claim_tasks(queue, 1)` takes its task in
//! scalar statements, and `complete_task_and_check_stage` completes a report it may accept as it
//! stands without `_settle_completions` (sql/0400_claim_tasks.sql,
//! sql/0500_complete_task_and_check_stage.sql; bench/README.md, eighteenth pass); a claim of more
//! than one task and `complete_tasks` go the way of a batch. The same script runs in two
//! databases, one through each way: every answer (the claimed rows, the completions' reports,
//! their refusals) and the whole state after every step (tasks, stages, shard counters, the
//! claims' counts, jobs, last-attempt notes, messages) must be the same.
//!
//! The script keeps at most one message of the queue visible whenever it claims, so that a claim
//! of two takes what a claim of one takes; the engine's clock is the test clock
//! (`stageflow.fake_now`), so that both databases see the same times.

// Test code: a panic (unwrap, expect) is how a test reports a failure.
#![allow(clippy::unwrap_used)]

use postgres::Client;
use serde_json::{json, Value};
use stageflow_tests::{connect, fresh_database};

#[derive(Clone, Copy, PartialEq, Debug)]
enum Way {
    /// `claim_tasks(queue, 1)` and `complete_task_and_check_stage`.
    One,
    /// `claim_tasks(queue, 2)` and `complete_tasks` of one element.
    Batch,
}

struct Run {
    client: Client,
    way: Way,
}

/// A completion's outcome: its report, or its refusal's SQLSTATE and message.
type Outcome = Result<Value, (String, String)>;

impl Run {
    fn new(way: Way) -> Run {
        let url = fresh_database(&format!("one_task_paths_{way:?}").to_lowercase());
        let mut client = connect(&url);
        client
            .batch_execute(
                r#"SELECT stageflow.register_job_type('twin', '{
                     "parameters": {"type": "object", "properties": {"items": {"type": "array"}}},
                     "stages": [
                       {"name": "a", "handler": "h", "queue": "twin", "fan_out": "each", "param": "items"},
                       {"name": "b", "handler": "h", "queue": "twin", "fan_out": "lineage", "lease_seconds": 30},
                       {"name": "c", "handler": "h", "queue": "twin", "fan_out": "lineage", "retry": {"max_attempts": 1}}]}'::jsonb)"#,
            )
            .unwrap();
        let mut run = Run { client, way };
        run.at(0);
        run
    }

    /// The engine's clock: `seconds` after 2030-01-01 (ahead of the wall clock, which a claim
    /// reads too and takes when it is later).
    fn at(&mut self, seconds: i64) {
        let at: String = self
            .client
            .query_one(
                "SELECT (timestamptz '2030-01-01 00:00:00+00' + make_interval(secs => $1))::text",
                &[&(seconds as f64)],
            )
            .unwrap()
            .get(0);
        self.client.batch_execute(&format!("SET stageflow.fake_now = '{at}'")).unwrap();
    }

    fn submit(&mut self, item: i64) -> String {
        self.client
            .query_one("SELECT stageflow.submit_job('twin', jsonb_build_object('items', jsonb_build_array(jsonb_build_object('x', $1::int))))", &[&(item as i32)])
            .unwrap()
            .get(0)
    }

    /// The rows of a claim (lease `lease` seconds), each as JSON.
    fn claim(&mut self, lease: i32) -> Vec<Value> {
        let max: i32 = if self.way == Way::One { 1 } else { 2 };
        let rows: Value = self
            .client
            .query_one(
                "SELECT coalesce(jsonb_agg(to_jsonb(c) ORDER BY c.task_id), '[]') FROM stageflow.claim_tasks('twin', $1, $2, 'w') AS c",
                &[&max, &lease],
            )
            .unwrap()
            .get(0);
        rows.as_array().unwrap().clone()
    }

    /// Completes `task_id` with `result`, fenced by `token` and `worker` (either may be absent).
    fn complete(&mut self, task_id: &str, result: Value, worker: Option<&str>, token: Option<i64>) -> Outcome {
        match self.way {
            Way::One => self
                .client
                .query_one(
                    "SELECT stageflow.complete_task_and_check_stage($1, $2, $3, $4)",
                    &[&task_id, &result, &worker, &token],
                )
                .map(|row| row.get::<_, Value>(0))
                .map_err(|e| {
                    let db = e.as_db_error().unwrap_or_else(|| panic!("{e}"));
                    (db.code().code().to_owned(), db.message().to_owned())
                }),
            Way::Batch => {
                let element = json!({"task_id": task_id, "result": result, "lease_token": token});
                let reports: Value = self
                    .client
                    .query_one(
                        "SELECT stageflow.complete_tasks(jsonb_build_array($1::jsonb), $2)",
                        &[&element, &worker],
                    )
                    .unwrap()
                    .get(0);
                let report = reports[0].clone();
                // (a refusal: {"task_id", "error": {"sqlstate", "message", "hint"}})
                match report.get("error") {
                    Some(error) => Err((
                        error["sqlstate"].as_str().unwrap().to_owned(),
                        error["message"].as_str().unwrap().to_owned(),
                    )),
                    None => Ok(report),
                }
            }
        }
    }

    fn call(&mut self, sql: &str, job_id: &str) -> Value {
        self.client.query_one(sql, &[&job_id]).unwrap().get(0)
    }

    /// Everything the two ways write, one line per row (per stage for the claims' counts, which
    /// are per session).
    fn state(&mut self) -> Vec<String> {
        self.client
            .query(
                "SELECT line FROM (
                   SELECT format('task %s %s attempt %s token %s lease %s worker %s claimed %s started %s completed %s next %s result %s msg %s failed %s error %s',
                                 task_id, status, attempt, lease_token, lease_expires_at, worker_id, claimed_at, started_at,
                                 completed_at, next_attempt_at, result, msg_id, failed_at, error) FROM stageflow.tasks
                   UNION ALL
                   SELECT format('stage %s/%s %s open %s by %s failed %s at %s', job_id, stage, status, open_shards, completed_by,
                                 failed_count, completed_at) FROM stageflow.stages
                   UNION ALL
                   SELECT format('shard %s/%s/%s remaining %s stopped %s completed %s seconds %s', job_id, stage, shard,
                                 remaining_tasks, stopped_tasks, completed_count, completed_seconds) FROM stageflow.stage_shards
                   UNION ALL
                   SELECT format('started %s/%s %s', job_id, stage, sum(started)) FROM stageflow.stage_claims GROUP BY job_id, stage
                   UNION ALL
                   SELECT format('job %s %s stage %s started %s completed %s updated %s', job_id, status, current_stage,
                                 started_at, completed_at, updated_at) FROM stageflow.jobs
                   UNION ALL
                   SELECT format('note %s %s %s', task_id, lease_token, expires_at) FROM stageflow.last_attempt_leases
                   UNION ALL
                   -- (a message's vt when it is sent is the wall clock's; from its first read on, the
                   -- engine's, which is the test clock)
                   SELECT format('message %s vt %s read %s %s', msg_id, CASE WHEN read_ct > 0 THEN vt::text END, read_ct, message)
                     FROM pgmq.q_twin) AS f(line)
                 ORDER BY line",
                &[],
            )
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect()
    }
}

/// Both ways, step by step.
struct Twins {
    one: Run,
    batch: Run,
    step: usize,
}

impl Twins {
    /// Runs `step` in both databases; its two answers and the two states after it must be equal.
    fn step<T: PartialEq + std::fmt::Debug>(&mut self, what: &str, step: impl Fn(&mut Run) -> T) -> T {
        self.step += 1;
        let one = step(&mut self.one);
        let batch = step(&mut self.batch);
        assert_eq!(one, batch, "step {} ({what}): the answers differ (one task, batch)", self.step);
        let (one_state, batch_state) = (self.one.state(), self.batch.state());
        let only_one: Vec<_> = one_state.iter().filter(|line| !batch_state.contains(line)).collect();
        let only_batch: Vec<_> = batch_state.iter().filter(|line| !one_state.contains(line)).collect();
        assert!(
            only_one.is_empty() && only_batch.is_empty(),
            "step {} ({what}): the states differ\n  one task only: {only_one:#?}\n  batch only: {only_batch:#?}",
            self.step
        );
        one
    }
}

fn field<'a>(rows: &'a [Value], name: &str) -> &'a Value {
    assert_eq!(rows.len(), 1, "one claimed row: {rows:?}");
    &rows[0][name]
}

#[test]
fn one_task_paths_do_what_the_paths_of_several_do() {
    let mut twins = Twins { one: Run::new(Way::One), batch: Run::new(Way::Batch), step: 0 };

    // A job through its three stages: its first claim starts it; a report under a token never
    // issued, then under a lease that is over, is refused; the lease expires and the task is
    // claimed again; the completion advances the job; its repeat changes nothing.
    let job = twins.step("submit", |run| run.submit(1));
    let first = twins.step("claim a", |run| run.claim(60));
    let (task_a, token) =
        (field(&first, "task_id").as_str().unwrap().to_owned(), field(&first, "lease_token").as_i64().unwrap());
    assert_eq!(
        field(&first, "params"),
        &json!({"index": 0, "item": {"x": 1}}),
        "an `each` task: its item, not the array"
    );
    let refused = twins
        .step("complete a, a token never issued", |run| run.complete(&task_a, json!({}), Some("w"), Some(token + 7)));
    assert_eq!(refused.unwrap_err().0, "55000");
    twins.step("lease of a expires", |run| run.at(61));
    let again = twins.step("claim a again", |run| run.claim(60));
    assert_eq!(field(&again, "attempt"), &json!(2));
    let token_2 = field(&again, "lease_token").as_i64().unwrap();
    assert!(token_2 > token);
    let stale = twins
        .step("complete a, the lease that is over", |run| run.complete(&task_a, json!({}), Some("w"), Some(token)));
    assert_eq!(stale.unwrap_err().0, "55000");
    let done = twins.step("complete a", |run| run.complete(&task_a, json!({"r": "a"}), Some("w"), Some(token_2)));
    assert_eq!(done.as_ref().unwrap()["stage_completed"], json!(true), "{done:?}");
    twins
        .step("complete a again, the same lease", |run| {
            run.complete(&task_a, json!({"r": "a"}), Some("w"), Some(token_2))
        })
        .unwrap();

    // Stage b has a lease of its own (30 seconds): its message stays invisible that long.
    let b = twins.step("claim b", |run| run.claim(60));
    assert_eq!(field(&b, "effective_lease_seconds"), &json!(30));
    assert_eq!(field(&b, "predecessor"), &json!({"r": "a"}), "lineage: the predecessor's result");
    let task_b = field(&b, "task_id").as_str().unwrap().to_owned();
    // (no token: fenced by the worker alone)
    twins.step("complete b by its worker", |run| run.complete(&task_b, json!({"r": "b"}), Some("w"), None)).unwrap();

    // Stage c has one attempt: its claim leaves a note of its lease; the lease expires, and the
    // claim that reads its message again dead-letters it, which fails the job.
    let c = twins.step("claim c", |run| run.claim(60));
    let task_c = field(&c, "task_id").as_str().unwrap().to_owned();
    twins.step("lease of c expires", |run| run.at(200));
    let none = twins.step("claim reads c's message again", |run| run.claim(60));
    assert!(none.is_empty(), "{none:?}");
    let late = twins.step("complete c, its task dead", |run| run.complete(&task_c, json!({}), Some("w"), None));
    assert!(late.is_err(), "{late:?}");
    assert_eq!(
        twins.step("job failed", |run| run.call("SELECT stageflow.job_status($1) -> 'status'", &job)),
        json!("failed")
    );

    // A job cancelled while its task runs: the completion is refused or recorded alike.
    let cancelled = twins.step("submit a second job", |run| run.submit(2));
    let claimed = twins.step("claim its a", |run| run.claim(60));
    let (task, token) =
        (field(&claimed, "task_id").as_str().unwrap().to_owned(), field(&claimed, "lease_token").as_i64().unwrap());
    twins.step("cancel it", |run| run.call("SELECT stageflow.cancel_job($1)", &cancelled));
    let _ = twins.step("complete its a", |run| run.complete(&task, json!({}), Some("w"), Some(token)));

    // A job cancelled while its task is queued: the claim that reads the message cancels nothing
    // more and takes nothing.
    let queued = twins.step("submit a third job", |run| run.submit(3));
    twins.step("cancel it while queued", |run| run.call("SELECT stageflow.cancel_job($1)", &queued));
    let nothing = twins.step("claim its message", |run| run.claim(60));
    assert!(nothing.is_empty(), "{nothing:?}");

    // A job to its end, the psql form of the completion (no token, no worker: trusted).
    let last = twins.step("submit a fourth job", |run| run.submit(4));
    for stage in ["a", "b", "c"] {
        let rows = twins.step(&format!("claim {stage}"), |run| run.claim(60));
        assert_eq!(field(&rows, "stage_name"), &json!(stage));
        let task = field(&rows, "task_id").as_str().unwrap().to_owned();
        twins
            .step(&format!("complete {stage}, trusted"), |run| run.complete(&task, json!({"s": stage}), None, None))
            .unwrap();
    }
    assert_eq!(
        twins.step("job completed", |run| run.call("SELECT stageflow.job_status($1) -> 'status'", &last)),
        json!("completed")
    );
}
