//! Every bad call raises an error with a specific SQLSTATE (never the generic P0001), a message and
//! a hint, and leaves the database exactly as it was.

// Test code: a panic (unwrap, expect) is how a test reports a failure.
#![allow(clippy::unwrap_used)]

use serde_json::json;
use stageflow_tests::*;

struct Case {
    what: &'static str,
    sql: String,
    sqlstate: &'static str,
    message_contains: &'static str,
    /// Refused by PostgreSQL's own JSON parser before any Stageflow code runs: it gives no hint.
    by_postgres: bool,
}

fn case(what: &'static str, sql: impl Into<String>, sqlstate: &'static str, message_contains: &'static str) -> Case {
    Case { what, sql: sql.into(), sqlstate, message_contains, by_postgres: false }
}

fn refused_by_postgres(what: &'static str, sql: &str, sqlstate: &'static str, message_contains: &'static str) -> Case {
    Case { by_postgres: true, ..case(what, sql, sqlstate, message_contains) }
}

#[test]
fn bad_calls_fail_with_sqlstate_message_and_hint_and_change_nothing() {
    let url = fresh_database("bad_input");
    let mut client = connect(&url);
    register(
        &mut client,
        "planner",
        r#"{"stages": [
            {"name": "plan", "handler": "p.plan", "queue": "planq"},
            {"name": "work", "handler": "p.work", "queue": "planq", "fan_out": "dynamic"}
        ]}"#,
    );
    register(
        &mut client,
        "listy",
        r#"{"parameters": {"type": "object", "properties": {"files": {"type": "array"}}},
            "stages": [{"name": "one", "handler": "l.one", "queue": "listq", "fan_out": "each", "param": "files"}]}"#,
    );
    register(
        &mut client,
        "county",
        r#"{"parameters": {"type": "object", "properties": {"n": {"type": "integer"}}},
            "stages": [{"name": "one", "handler": "c.one", "queue": "countq", "fan_out": "count", "param": "n"}]}"#,
    );
    // A job in every state a bad call may meet: a running planner, a failed task, a queued task,
    // a completed task.
    let planner_job = submit(&mut client, "planner", json!({}));
    let planner_task = claim(&mut client, "planq", 1, 300).remove(0).task_id;
    let hello_job = submit(&mut client, "hello_world", json!({"message": "x", "n": 2}));
    let hello = claim(&mut client, "default", 2, 300);
    complete(&mut client, &hello[0].task_id, json!({}));
    json(&mut client, "SELECT stageflow.fail_task($1, '{\"message\": \"boom\"}', false)", &[&hello[1].task_id]);
    // A cancelled job whose task was running when it was cancelled.
    let cancelled_job = submit(&mut client, "hello_world", json!({"message": "cancelled", "n": 1}));
    let cancelled_task = claim(&mut client, "default", 1, 300).remove(0).task_id;
    json(&mut client, "SELECT stageflow.cancel_job($1)", &[&cancelled_job]);
    let queued_job = submit(&mut client, "hello_world", json!({"message": "queued", "n": 1}));
    let queued_task: String =
        client.query_one("SELECT task_id FROM stageflow.tasks WHERE job_id = $1", &[&queued_job]).unwrap().get(0);
    // This login's jobs hold 2 open tasks (the planner, the queued one): room for 8 more.
    client.batch_execute("SELECT stageflow.set_quota(session_user, 10, NULL)").unwrap();
    let (completed_task, failed_task) = (&hello[0].task_id, &hello[1].task_id);
    assert_eq!(job_status(&mut client, &hello_job)["status"], json!("failed"));
    let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
    // A queue made with pgmq's own function under a name Stageflow's rules refuse (a claim takes a
    // queue pgmq has without asking the name's pattern: it is refused when the queue is read).
    client.batch_execute("SELECT pgmq.create('UpperQ')").unwrap();

    let cases = vec![
        case("unknown job type", "SELECT stageflow.submit_job('nope', '{}')", "42704", "unknown job type"),
        case("NULL job type", "SELECT stageflow.submit_job(NULL, '{}')", "42704", "unknown job type"),
        case("params outside the schema", "SELECT stageflow.submit_job('hello_world', '{\"n\": 10001}')", "22023", "params.n"),
        case("params of the wrong JSON type", "SELECT stageflow.submit_job('hello_world', '{\"n\": \"three\"}')", "22023", "expected integer"),
        case("params that are not an object", "SELECT stageflow.submit_job('hello_world', '[1, 2]')", "22023", "must be a JSON object"),
        case("NULL params", "SELECT stageflow.submit_job('hello_world', NULL)", "22004", "got NULL"),
        case("an unknown parameter", "SELECT stageflow.submit_job('hello_world', '{\"n\": 1, \"nn\": 2}')", "22023", "params.nn"),
        case("an each parameter that is not an array", "SELECT stageflow.submit_job('listy', '{\"files\": 3}')", "22023", "expected array"),
        case("a missing each parameter", "SELECT stageflow.submit_job('listy', '{}')", "22023", "params.files"),
        case("completing an unknown task", "SELECT stageflow.complete_task_and_check_stage('0000000000000000-s1-0', '{}')", "42704", "unknown task"),
        case("completing a failed task", format!("SELECT stageflow.complete_task_and_check_stage('{failed_task}', '{{}}')"), "55000", "is failed"),
        case("completing a queued task", format!("SELECT stageflow.complete_task_and_check_stage('{queued_task}', '{{}}')"), "55000", "is not claimed"),
        case("a planner result without tasks", format!("SELECT stageflow.complete_task_and_check_stage('{planner_task}', '{{\"x\": 1}}')"), "22023", "no \"tasks\" array"),
        case("a planner entry with a bad key", format!("SELECT stageflow.complete_task_and_check_stage('{planner_task}', '{{\"tasks\": [{{\"key\": \"a b\"}}]}}')"), "22023", "entry 0"),
        case("planner entries with duplicate keys", format!("SELECT stageflow.complete_task_and_check_stage('{planner_task}', '{{\"tasks\": [{{\"key\": \"a\"}}, {{\"key\": \"a\"}}]}}')"), "22023", "more than once"),
        case("failing an unknown task", "SELECT stageflow.fail_task('nope', '{}')", "42704", "unknown task"),
        case("failing a completed task", format!("SELECT stageflow.fail_task('{completed_task}', '{{}}')"), "55000", "already completed"),
        case("failing a queued task", format!("SELECT stageflow.fail_task('{queued_task}', '{{}}')"), "55000", "is not claimed"),
        case("failing with a NULL error", format!("SELECT stageflow.fail_task('{planner_task}', NULL)"), "22004", "got NULL"),
        case("claiming from a queue name pgmq rejects", "SELECT * FROM stageflow.claim_tasks('bad;queue')", "42602", "invalid queue name"),
        case("claiming from a quoted queue name", "SELECT * FROM stageflow.claim_tasks('x''y')", "42602", "invalid queue name"),
        case("claiming from a pgmq queue under a name Stageflow refuses", "SELECT * FROM stageflow.claim_tasks('UpperQ')", "42602", "invalid queue name 'UpperQ'"),
        case("claiming from an unknown queue", "SELECT * FROM stageflow.claim_tasks('nosuchqueue')", "42704", "unknown queue"),
        case("claiming zero tasks", "SELECT * FROM stageflow.claim_tasks('default', 0)", "22023", "max_tasks"),
        case("claiming with a zero lease", "SELECT * FROM stageflow.claim_tasks('default', 1, 0)", "22023", "lease_seconds"),
        case("claiming with a negative lease", "SELECT * FROM stageflow.claim_tasks('default', 1, -5)", "22023", "lease_seconds"),
        case("a heartbeat with a zero lease", format!("SELECT * FROM stageflow.heartbeat(ARRAY['{planner_task}'], 0)"), "22023", "lease_seconds"),
        case("listing jobs of an unknown status", "SELECT * FROM stageflow.list_jobs(filter_status => 'done')", "22023", "unknown job status"),
        case("listing zero jobs", "SELECT * FROM stageflow.list_jobs(max_rows => 0)", "22023", "max_rows"),
        case("advancing an unknown job", "SELECT stageflow.advance_stage('nope')", "42704", "unknown job"),
        case("the status of an unknown job", "SELECT stageflow.job_status('nope')", "42704", "unknown job"),
        case("the tasks of an unknown job", "SELECT * FROM stageflow.job_tasks('nope')", "42704", "unknown job"),
        case("a page of zero tasks", format!("SELECT * FROM stageflow.job_tasks('{hello_job}', NULL, 0)"), "22023", "max_rows must be between 1 and 10000"),
        case("a page of tasks after a task of another job", format!("SELECT * FROM stageflow.job_tasks('{hello_job}', 'nope', 5)"), "22023", "is not a task of job"),
        case("a webhook endpoint with a bad name", "SELECT stageflow.register_webhook_endpoint('Bad Name', 'https://example.org')", "22023", "is not 1 to 63 lowercase letters"),
        case("a webhook endpoint that is not an http(s) URL", "SELECT stageflow.register_webhook_endpoint('ok', 'ftp://example.org')", "22023", "is not an http(s) URL"),
        case("a submission naming an unknown webhook endpoint", "SELECT stageflow.submit_job('hello_world', '{\"message\": \"x\", \"n\": 1}', 'endpoint:nope')", "42704", "unknown webhook endpoint"),
        case("the result of an unknown job", "SELECT stageflow.job_result('nope')", "42704", "unknown job"),
        case("the result of a job that is not completed", format!("SELECT stageflow.job_result('{hello_job}')"), "55000", "has no result: it is failed"),
        case("the result of a job still running", format!("SELECT stageflow.job_result('{planner_job}')"), "55000", "has no result: it is processing"),
        case("a result page of zero entries", format!("SELECT stageflow.job_result('{hello_job}', NULL, 0)"), "22023", "limit must be between 1 and 10000, got 0"),
        case("a result page of more than 10000 entries", format!("SELECT stageflow.job_result('{hello_job}', 5, 10001)"), "22023", "limit must be between 1 and 10000, got 10001"),
        case("a result page with a NULL limit", format!("SELECT stageflow.job_result('{hello_job}', NULL, NULL)"), "22023", "got NULL"),
        case("registering a bad job type name", "SELECT stageflow.register_job_type('Bad Name', '{\"stages\": [{\"name\": \"a\", \"handler\": \"h\"}]}')", "42602", "invalid job type name"),
        case("registering a definition with an unknown field", "SELECT stageflow.register_job_type('t', '{\"stages\": [{\"name\": \"a\", \"handler\": \"h\"}], \"stagez\": 1}')", "22023", "definition.stagez"),
        case("registering a stage with a bad queue", "SELECT stageflow.register_job_type('t', '{\"stages\": [{\"name\": \"a\", \"handler\": \"h\", \"queue\": \"q;drop\"}]}')", "22023", "definition.stages[0].queue"),
        case("registering a NULL definition", "SELECT stageflow.register_job_type('t', NULL)", "22004", "is NULL"),
        case("params larger than 1 MiB", "SELECT stageflow.submit_job('planner', jsonb_build_object('blob', repeat('x', 1100000)))", "54000", "more than the limit of 1048576"),
        case("params nested 200 levels deep", format!("SELECT stageflow.submit_job('planner', '{{\"deep\": {deep}}}')"), "54000", "nested more than 128 levels"),
        case("params with a number beyond a 64-bit float", "SELECT stageflow.submit_job('planner', '{\"big\": 1e400}')", "22023", "outside the range"),
        case("params with an integer a 64-bit float would round", "SELECT stageflow.submit_job('planner', '{\"acct\": 12345678901234567890123}')", "22023", "does not hold exactly"),
        case("params with a decimal a 64-bit float would round", "SELECT stageflow.submit_job('planner', '{\"x\": 0.1000000000000000000001}')", "22023", "does not hold exactly"),
        refused_by_postgres("params with NaN", "SELECT stageflow.submit_job('hello_world', '{\"n\": NaN}')", "22P02", "invalid input syntax for type json"),
        refused_by_postgres("params with Infinity", "SELECT stageflow.submit_job('hello_world', '{\"n\": Infinity}')", "22P02", "invalid input syntax for type json"),
        case("a result larger than 8 MiB", format!("SELECT stageflow.complete_task_and_check_stage('{planner_task}', (SELECT jsonb_object_agg(g::text, md5(g::text)) FROM generate_series(1, 250000) AS g))"), "54000", "more than the limit of 8388608"),
        case("an error larger than 64 KiB", format!("SELECT stageflow.fail_task('{planner_task}', jsonb_build_object('message', repeat('e', 70000)))"), "54000", "more than the limit of 65536"),
        case("an unknown error category", format!("SELECT stageflow.fail_task('{planner_task}', '{{\"category\": \"sometimes\"}}')"), "22023", "unknown error category"),
        case("a negative retry_after_seconds", format!("SELECT stageflow.fail_task('{planner_task}', '{{\"category\": \"throttling\", \"retry_after_seconds\": -1}}')"), "22023", "retry_after_seconds"),
        case("completing a task leased to another worker", format!("SELECT stageflow.complete_task_and_check_stage('{planner_task}', '{{\"tasks\": []}}', 'someone-else')"), "55000", "is leased to worker"),
        case("failing a task leased to another worker", format!("SELECT stageflow.fail_task('{planner_task}', '{{}}', true, 'someone-else')"), "55000", "is leased to worker"),
        case("completing after cancel", format!("SELECT stageflow.complete_task_and_check_stage('{cancelled_task}', '{{}}')"), "55000", "is cancelled"),
        case("failing after cancel", format!("SELECT stageflow.fail_task('{cancelled_task}', '{{}}')"), "55000", "is cancelled"),
        case("cancelling an unknown job", "SELECT stageflow.cancel_job('nope')", "42704", "unknown job"),
        case("retrying an unknown job", "SELECT stageflow.retry_job('nope')", "42704", "unknown job"),
        case("listing zero dead letters", "SELECT * FROM stageflow.dead_letters(0)", "22023", "max_rows"),
        case("a maintenance round of no rows", "SELECT stageflow.run_maintenance(0)", "22023", "max_rows must be at least 1, got 0"),
        case("a maintenance round of NULL rows", "SELECT stageflow.run_maintenance(NULL)", "22023", "max_rows must be at least 1, got NULL"),
        case("a heartbeat with a NULL lease", format!("SELECT * FROM stageflow.heartbeat(ARRAY['{planner_task}'], NULL)"), "22023", "lease_seconds"),
        case("a job type name with a quote and a semicolon", "SELECT stageflow.register_job_type('x''; DROP TABLE stageflow.jobs; --', '{\"stages\": [{\"name\": \"a\", \"handler\": \"h\"}]}')", "42602", "invalid job type name"),
        case("a stage name with a quote", "SELECT stageflow.register_job_type('t', '{\"stages\": [{\"name\": \"a''b\", \"handler\": \"h\"}]}')", "22023", "definition.stages[0].name"),
        case("two stages with one name", "SELECT stageflow.register_job_type('t', '{\"stages\": [{\"name\": \"a\", \"handler\": \"h\"}, {\"name\": \"a\", \"handler\": \"h\"}]}')", "22023", "names an earlier stage"),
        case("a zero job timeout", "SELECT stageflow.register_job_type('t', '{\"timeout_seconds\": 0, \"stages\": [{\"name\": \"a\", \"handler\": \"h\"}]}')", "22023", "definition.timeout_seconds"),
        case("a failure ratio above 1", "SELECT stageflow.register_job_type('t', '{\"stages\": [{\"name\": \"a\", \"handler\": \"h\", \"max_failure_ratio\": 2}]}')", "22023", "max_failure_ratio"),
        case("a webhook_url that is not an http(s) URL", "SELECT stageflow.submit_job('hello_world', '{}', 'ftp://example.org/x')", "22023", "is not an http(s) URL"),
        case("a job type webhook_url that is not a URL", "SELECT stageflow.register_job_type('t', '{\"webhook_url\": \"mailto:x\", \"stages\": [{\"name\": \"a\", \"handler\": \"h\"}]}')", "22023", "definition.webhook_url"),
        case("claiming webhook deliveries with a zero lease", "SELECT * FROM stageflow.claim_webhook_deliveries(10, 0)", "22023", "lease_seconds"),
        case("recording an attempt of an unknown delivery", "SELECT stageflow.record_webhook_attempt(-1, true)", "42704", "no pending webhook delivery"),
        case("a batch of results that is not an array", "SELECT stageflow.complete_tasks('{}')", "22023", "must be a JSON array"),
        case("a batch element without a task_id", "SELECT stageflow.complete_tasks('[{\"result\": 1}]')", "22023", "needs a \"task_id\""),
        case("a batch element whose lease_token is text", format!("SELECT stageflow.complete_tasks('[{{\"task_id\": \"{planner_task}\", \"lease_token\": \"x\"}}]')"), "22023", "is an integer"),
        case("a batch element whose lease_token is a fraction", format!("SELECT stageflow.complete_tasks('[{{\"task_id\": \"{planner_task}\", \"lease_token\": 1.5}}]')"), "22023", "is an integer"),
        case("a batch naming a task twice", format!("SELECT stageflow.complete_tasks('[{{\"task_id\": \"{planner_task}\"}}, {{\"task_id\": \"{planner_task}\"}}]')"), "22023", "more than once"),
        case("a job over the tasks a job may have", "SELECT stageflow.submit_job('county', '{\"n\": 100001}')", "54000", "more than the 100000 tasks it may have"),
        case("a submission over the open-task quota", "SELECT stageflow.submit_job('county', '{\"n\": 9}')", "54000", "would leave login postgres with 11 open tasks, more than its quota of 10"),
        case("a quota for an unknown role", "SELECT stageflow.set_quota('no_such_role', 1, 1)", "42704", "unknown role"),
        case("a negative quota", "SELECT stageflow.set_quota(session_user, -1, NULL)", "22023", "cannot be negative"),
        case("submitting another tenant's identical work", "SET stageflow.tenant = 'other'; SELECT stageflow.submit_job('hello_world', '{\"message\": \"queued\", \"n\": 1}')".to_string(), "23505", "another login (or tenant) submitted this work"),
        case("a tenant label with a space", "SET stageflow.tenant = 'a b'; SELECT * FROM stageflow.list_jobs()", "22023", "is not a tenant label"),
        case("registering a schema with an unsupported keyword", "SELECT stageflow.register_job_type('t', '{\"parameters\": {\"oneOf\": []}, \"stages\": [{\"name\": \"a\", \"handler\": \"h\"}]}')", "22023", "unsupported keyword"),
    ];

    for case in &cases {
        let before = state_digest(&mut client);
        let error =
            client.batch_execute(&case.sql).err().unwrap_or_else(|| panic!("{}: `{}` succeeded", case.what, case.sql));
        let (sqlstate, message, hint) = db_error(&error);
        assert_eq!(sqlstate, case.sqlstate, "{}: {message}", case.what);
        assert_ne!(sqlstate, "P0001", "{}", case.what);
        assert!(
            message.contains(case.message_contains),
            "{}: message {message:?} lacks {:?}",
            case.what,
            case.message_contains
        );
        if !case.by_postgres {
            assert!(hint.as_deref().is_some_and(|h| !h.is_empty()), "{}: no hint ({message})", case.what);
        }
        assert_eq!(state_digest(&mut client), before, "{}: the database changed", case.what);
    }
    println!("{} bad calls refused with their SQLSTATE, database unchanged", cases.len());

    // The README's table lists every case with its SQLSTATE.
    let readme_path = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("run by cargo test"))
        .join("../../README.md");
    let readme = std::fs::read_to_string(&readme_path).unwrap();
    let missing: Vec<String> = cases
        .iter()
        .filter(|c| !readme.contains(&format!("| {} | `{}` |", c.what, c.sqlstate)))
        .map(|c| format!("| {} | `{}` |", c.what, c.sqlstate))
        .collect();
    assert!(missing.is_empty(), "README.md lacks these rows of the bad-input table:\n{}", missing.join("\n"));
    // The planner job is still waiting for a valid plan.
    assert_eq!(job_status(&mut client, &planner_job)["status"], json!("processing"));
}
