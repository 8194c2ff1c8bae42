//! Roles and leases: each role can do its part and nothing else, no role touches the tables, a
//! worker claims only from the queues granted to it, and cannot report a task whose lease it does
//! not hold; a submitter sees and cancels only its own jobs, within its quota.

// Test code: a panic (unwrap, expect) is how a test reports a failure.
#![allow(clippy::unwrap_used)]

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
        .batch_execute(&format!(
            "DROP ROLE IF EXISTS sf_test_worker; DROP ROLE IF EXISTS sf_test_submitter; DROP ROLE IF EXISTS sf_test_nobody;
             CREATE ROLE sf_test_worker LOGIN PASSWORD '{ROLE_PASSWORD}' IN ROLE stageflow_worker;
             CREATE ROLE sf_test_submitter LOGIN PASSWORD '{ROLE_PASSWORD}' IN ROLE stageflow_submitter;
             CREATE ROLE sf_test_nobody LOGIN PASSWORD '{ROLE_PASSWORD}';"
        ))
        .unwrap();
    let as_role = |role: &str| connect(&url_as(&url, role));
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
    assert_eq!(
        (code.as_str(), message.as_str()),
        ("42501", "role sf_test_worker may not claim tasks from queue 'default'")
    );
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
    assert_eq!(
        refused(&mut worker, &format!("SELECT stageflow.fail_task('{task_id}', '{{}}', true, 'worker-b')")).0,
        "55000"
    );
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
fn a_submitter_cannot_touch_another_logins_jobs() {
    let url = fresh_database("ownership");
    let mut admin = connect(&url);
    admin
        .batch_execute(&format!(
            "DROP ROLE IF EXISTS sf_test_alice; DROP ROLE IF EXISTS sf_test_mallory;
             CREATE ROLE sf_test_alice LOGIN PASSWORD '{ROLE_PASSWORD}' IN ROLE stageflow_submitter;
             CREATE ROLE sf_test_mallory LOGIN PASSWORD '{ROLE_PASSWORD}' IN ROLE stageflow_submitter;"
        ))
        .unwrap();
    let as_role = |role: &str| connect(&url_as(&url, role));
    let mut alice = as_role("sf_test_alice");
    let mut mallory = as_role("sf_test_mallory");
    let params = json!({"message": "mine", "n": 2});
    let job_id = submit(&mut alice, "hello_world", params.clone());
    let computed: String = mallory.query_one("SELECT stageflow.job_id('hello_world', $1)", &[&params]).unwrap().get(0);
    assert_eq!(computed, job_id, "any submitter can compute a job id");

    // Mallory knows the id: reading, listing, cancelling and the deliveries all say "unknown job",
    // and nothing changes, even with the clock moved back (a superuser's setting only).
    for sql in [
        "SELECT stageflow.job_status($1)::text",
        "SELECT count(*)::text FROM stageflow.job_tasks($1)",
        "SELECT count(*)::text FROM stageflow.webhook_deliveries($1)",
        "SELECT stageflow.cancel_job($1)::text",
    ] {
        let error = mallory.query_one(sql, &[&job_id]).expect_err(sql);
        assert_eq!(db_error(&error).0, "42704", "{sql}");
    }
    assert_eq!(refused(&mut mallory, "SET stageflow.fake_now = '1970-01-01'").0, "42501");
    let listed: i64 = mallory.query_one("SELECT count(*) FROM stageflow.list_jobs()", &[]).unwrap().get(0);
    assert_eq!(listed, 0);
    let row = mallory
        .query_one(
            "SELECT job_id, outcome, job_status FROM stageflow.submit_job_outcome('hello_world', $1)",
            &[&params],
        )
        .unwrap();
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, String>(1), row.get::<_, Option<String>>(2)),
        (job_id.clone(), "owned_by_another".into(), None)
    );
    assert_eq!(job_status(&mut alice, &job_id)["status"], json!("queued"), "alice's job is untouched");
    assert_eq!(job_status(&mut admin, &job_id)["owner"], json!("sf_test_alice"), "an admin sees whose it is");

    // A quota refusal changes nothing.
    admin.batch_execute("SELECT stageflow.set_quota('sf_test_mallory', 1, 10)").unwrap();
    let error = mallory
        .batch_execute("SELECT stageflow.submit_job('hello_world', '{\"message\": \"big\", \"n\": 2}')")
        .unwrap_err();
    let (code, message, hint) = db_error(&error);
    assert_eq!(code, "54000", "{message}");
    assert!(hint.is_some_and(|h| h.contains("stageflow.set_quota")));
    let jobs: i64 = admin.query_one("SELECT count(*) FROM stageflow.jobs", &[]).unwrap().get(0);
    assert_eq!(jobs, 1);
    drop((alice, mallory));
}

/// PL/pgSQL helpers of the claim and completion paths without a SET clause (ARCHITECTURE.md,
/// Conventions).
const HELPERS_WITHOUT_SEARCH_PATH: [&str; 4] =
    ["_settle_completions", "_check_report_grants", "_queue_granted_to_session", "_take_from_free_shards"];

#[test]
fn functions_run_as_their_owner_with_a_fixed_search_path() {
    let url = fresh_database("definer");
    let mut client = connect(&url);
    let helpers: &[&str] = &HELPERS_WITHOUT_SEARCH_PATH;
    let unsafe_functions: Vec<String> = client
        .query(
            "SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
              WHERE n.nspname = 'stageflow' AND p.prolang <> (SELECT oid FROM pg_language WHERE lanname = 'c')
                AND NOT coalesce('search_path=pg_catalog, pg_temp' = ANY (p.proconfig), false)
                -- stageflow.now(), stageflow._refusal() and _report_fenced(), the status classes and _is_task_of_job of
                -- sql/0015_statuses.sql, _task_params, _completion_reports and _window_reached are kept inlinable: no SET clause, every function qualified, not
                -- SECURITY DEFINER (they run with their caller's rights; a SET clause would stop
                -- PostgreSQL inlining them).
                AND NOT (p.proname IN ('now', '_refusal', '_report_fenced', '_job_is_open', '_job_is_done', '_job_is_stopped',
                                       '_job_has_ended', '_task_is_open', '_task_has_failed',
                                       '_task_ended_without_result', '_task_is_claimable', '_task_params',
                                       '_is_task_of_job', '_completion_reports', '_window_reached')
                         AND NOT p.prosecdef)
                -- the completion path's helpers without a SET clause (ARCHITECTURE.md, Conventions):
                -- checked below to run only inside functions that fix it, and to be callable by no role
                AND NOT (p.proname = ANY ($1) AND NOT p.prosecdef)",
            &[&helpers],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(unsafe_functions.is_empty(), "functions without a fixed search_path: {unsafe_functions:?}");
    // Those helpers: each exists without a SET clause, only its owner may execute it, and every
    // function of the schema whose body calls it fixes the search path (or is such a helper).
    for helper in HELPERS_WITHOUT_SEARCH_PATH {
        let row = client
            .query_one(
                "SELECT p.proconfig IS NULL, p.prosecdef,
                        (SELECT count(*) FROM pg_roles AS r
                          WHERE r.oid <> p.proowner AND NOT r.rolsuper
                            AND has_function_privilege(r.oid, p.oid, 'EXECUTE'))
                   FROM pg_proc AS p WHERE p.oid = ('stageflow.' || $1)::regproc",
                &[&helper],
            )
            .unwrap();
        let (no_settings, definer, executors): (bool, bool, i64) = (row.get(0), row.get(1), row.get(2));
        assert!(no_settings && !definer, "{helper}: expected a helper without SET clause, not SECURITY DEFINER");
        assert_eq!(executors, 0, "{helper}: no role but its owner (and superusers) may execute it");
        // (every function of the schema whose body calls it, and those among them that do not fix
        // the search path and are not such helpers themselves)
        let row = client
            .query_one(
                "SELECT count(*),
                        coalesce(array_agg(p.oid::regprocedure::text)
                                 FILTER (WHERE NOT coalesce('search_path=pg_catalog, pg_temp' = ANY (p.proconfig), false)
                                           AND NOT p.proname = ANY ($2)), '{}')
                   FROM pg_proc AS p JOIN pg_namespace AS n ON n.oid = p.pronamespace
                  WHERE n.nspname = 'stageflow' AND p.prosrc LIKE '%stageflow.' || $1 || '(%' AND p.proname <> $1",
                &[&helper, &helpers],
            )
            .unwrap();
        let (callers, unsafe_callers): (i64, Vec<String>) = (row.get(0), row.get(1));
        assert!(
            unsafe_callers.is_empty(),
            "{helper} is called by functions without a fixed search_path: {unsafe_callers:?}"
        );
        assert!(callers > 0, "{helper}: no caller found (the check above would pass vacuously)");
    }
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

/// stageflow_monitor reads the metrics (every job's counters) and nothing else: what an HTTP
/// server's login needs for /metrics without being an admin.
#[test]
fn the_monitor_role_reads_metrics_and_nothing_else() {
    let url = fresh_database("monitor_role");
    let mut admin = connect(&url);
    admin
        .batch_execute(&format!(
            "DROP ROLE IF EXISTS sf_test_monitor;
             CREATE ROLE sf_test_monitor LOGIN PASSWORD '{ROLE_PASSWORD}' IN ROLE stageflow_monitor;"
        ))
        .unwrap();
    let job_id = submit(&mut admin, "hello_world", json!({"message": "monitored", "n": 2}));
    let mut monitor = connect(&url_as(&url, "sf_test_monitor"));
    let queued: f64 = monitor
        .query_one(
            "SELECT value FROM stageflow.metrics() WHERE metric = 'stageflow_tasks' AND labels ->> 'status' = 'queued'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(queued, 2.0);
    for forbidden in [
        format!("SELECT stageflow.job_status('{job_id}')"),
        "SELECT * FROM stageflow.list_jobs()".to_owned(),
        "SELECT stageflow.submit_job('hello_world', '{}')".to_owned(),
        "SELECT * FROM stageflow.claim_tasks('default')".to_owned(),
        "SELECT * FROM stageflow.dead_letters(10)".to_owned(),
        "SELECT count(*) FROM stageflow.tasks".to_owned(),
    ] {
        assert_eq!(refused(&mut monitor, &forbidden).0, "42501", "{forbidden}");
    }
}
