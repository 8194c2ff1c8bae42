//! Roles and leases: each role can do its part and nothing else, no role touches the tables, a
//! worker claims only from the queues granted to it, and cannot report a task whose lease it does
//! not hold.

use serde_json::json;
use stageflow_tests::*;

fn refused(client: &mut postgres::Client, sql: &str) -> (String, String) {
    let error = client.batch_execute(sql).expect_err(&format!("`{sql}` should be refused"));
    let (code, message, _) = db_error(&error);
    (code, message)
}

#[test]
fn each_role_does_its_part_and_nothing_more() {
    let url = fresh_database("roles");
    let mut admin = connect(&url);
    admin
        .batch_execute(
            "DROP ROLE IF EXISTS sf_test_worker; DROP ROLE IF EXISTS sf_test_submitter; DROP ROLE IF EXISTS sf_test_nobody;
             CREATE ROLE sf_test_worker LOGIN IN ROLE stageflow_worker;
             CREATE ROLE sf_test_submitter LOGIN IN ROLE stageflow_submitter;
             CREATE ROLE sf_test_nobody LOGIN;",
        )
        .unwrap();
    let as_role = |role: &str| connect(&url.replacen("postgres@", &format!("{role}@"), 1));
    let mut submitter = as_role("sf_test_submitter");
    let mut worker = as_role("sf_test_worker");
    let mut nobody = as_role("sf_test_nobody");

    // The submitter submits and watches; it cannot work tasks or touch tables.
    let job_id = submit(&mut submitter, "hello_world", json!({"message": "roles", "n": 1}));
    assert_eq!(job_status(&mut submitter, &job_id)["status"], json!("queued"));
    assert_eq!(refused(&mut submitter, "SELECT * FROM stageflow.claim_tasks('default')").0, "42501");
    assert_eq!(refused(&mut submitter, "SELECT * FROM stageflow.jobs").0, "42501");
    assert_eq!(refused(&mut submitter, "SELECT stageflow.register_job_type('x', '{}')").0, "42501");

    // The worker claims and completes; it cannot submit, read or write tables, or call internals.
    assert_eq!(refused(&mut worker, "SELECT stageflow.submit_job('hello_world', '{}')").0, "42501");
    assert_eq!(refused(&mut worker, "SELECT count(*) FROM stageflow.tasks").0, "42501");
    assert_eq!(refused(&mut worker, "UPDATE stageflow.tasks SET status = 'completed'").0, "42501");
    assert_eq!(refused(&mut worker, "SELECT stageflow._end_task('x', 'failed', '{}')").0, "42501");
    assert_eq!(refused(&mut worker, "SELECT stageflow.job_status('x')").0, "42501");
    // It claims only from queues granted to it.
    let (code, message) = refused(&mut worker, "SELECT * FROM stageflow.claim_tasks('default', 1, 60, 'worker-a')");
    assert_eq!((code.as_str(), message.as_str()), ("42501", "role sf_test_worker may not claim tasks from queue 'default'"));
    assert_eq!(refused(&mut worker, "SELECT stageflow.grant_queue('default', 'sf_test_worker')").0, "42501");
    admin.batch_execute("SELECT stageflow.grant_queue('default', 'sf_test_worker')").unwrap();
    let task_id: String = worker
        .query_one("SELECT task_id FROM stageflow.claim_tasks('default', 1, 60, 'worker-a')", &[])
        .unwrap()
        .get(0);

    // Leases: another worker cannot report it; its holder can.
    let (code, message) = refused(
        &mut worker,
        &format!("SELECT stageflow.complete_task_and_check_stage('{task_id}', '{{}}', 'worker-b')"),
    );
    assert_eq!(code, "55000");
    assert!(message.contains("leased to worker worker-a"), "{message}");
    assert_eq!(refused(&mut worker, &format!("SELECT stageflow.fail_task('{task_id}', '{{}}', true, 'worker-b')")).0, "55000");
    let report = json(
        &mut worker,
        "SELECT stageflow.complete_task_and_check_stage($1, '{\"greeting\": \"hi\"}', 'worker-a')",
        &[&task_id],
    );
    assert_eq!(report["stage_completed"], json!(true));

    // A role without a stageflow role can do nothing at all.
    assert_eq!(refused(&mut nobody, "SELECT stageflow.job_status('x')").0, "42501");
    assert_eq!(refused(&mut nobody, "SELECT * FROM stageflow.claim_tasks('default')").0, "42501");
    assert_eq!(refused(&mut nobody, "SELECT * FROM stageflow.jobs").0, "42501");
    drop((submitter, worker, nobody));
}

#[test]
fn functions_run_as_their_owner_with_a_fixed_search_path() {
    let url = fresh_database("definer");
    let mut client = connect(&url);
    let unsafe_functions: Vec<String> = client
        .query(
            "SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
              WHERE n.nspname = 'stageflow' AND p.prolang <> (SELECT oid FROM pg_language WHERE lanname = 'c')
                AND NOT coalesce('search_path=pg_catalog, pg_temp' = ANY (p.proconfig), false)
                -- stageflow.now() and stageflow._refusal() are kept inlinable: no SET clause, every
                -- function qualified, not SECURITY DEFINER (they run with their caller's rights).
                AND NOT (p.proname IN ('now', '_refusal') AND NOT p.prosecdef)",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(unsafe_functions.is_empty(), "functions without a fixed search_path: {unsafe_functions:?}");
    let public_grants: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
              WHERE n.nspname = 'stageflow' AND has_function_privilege('public', p.oid, 'EXECUTE')",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(public_grants, 0, "nothing is executable by PUBLIC");
}
