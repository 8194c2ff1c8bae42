//! What the engine writes to the WAL: a report is often the first change of its task's page after
//! a checkpoint, so PostgreSQL logs the whole page with it; every entry point that updates task
//! rows compresses those full-page images (wal_compression set on the function, lz4 where the
//! server has it, else pglz, applied as the function's superuser owner), whoever calls it and
//! whatever the cluster's own setting.

// Test code: a panic (unwrap, expect) is how a test reports a failure.
#![allow(clippy::unwrap_used)]

use postgres::Client;
use serde_json::json;
use stageflow_tests::*;

const ONE_STAGE: &str = r#"{
    "parameters": {"type": "object", "properties": {"n": {"type": "integer"}}},
    "stages": [{"name": "work", "handler": "wal.work", "queue": "wal", "fan_out": "count", "param": "n"}]
}"#;

/// Runs `call` as `worker` right after a checkpoint and returns the block references of the
/// full-page images of `stageflow.tasks` that the WAL holds since (pg_walinspect's text, which
/// names the compression method of a compressed image).
fn task_page_images(admin: &mut Client, worker: &mut Client, call: &str) -> Vec<String> {
    admin.batch_execute("CHECKPOINT").unwrap();
    let start = wal_position_kept(admin);
    worker.batch_execute(call).unwrap_or_else(|e| panic!("{call}: {e}"));
    admin
        .query(
            "SELECT w.block_ref
               FROM pg_get_wal_records_info_till_end_of_wal($1::text::pg_lsn) AS w,
                    (SELECT format(' rel %s/%s/%s fork main ',
                                   CASE WHEN c.reltablespace = 0 THEN d.dattablespace ELSE c.reltablespace END,
                                   d.oid, pg_relation_filenode(c.oid)) AS rel
                       FROM pg_class c, pg_database d
                      WHERE c.oid = 'stageflow.tasks'::regclass AND d.datname = current_database()) AS t
              WHERE w.fpi_length > 0 AND strpos(w.block_ref, t.rel) > 0",
            &[&start],
        )
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

#[test]
fn every_report_compresses_the_task_pages_it_logs_whole() {
    let url = fresh_database("wal_images");
    let mut admin = connect(&url);
    let cluster_setting: String = admin.query_one("SHOW wal_compression", &[]).unwrap().get(0);
    assert_eq!(cluster_setting, "off", "the test cluster must keep the default for this test to tell anything");
    let has_lz4: bool = admin
        .query_one("SELECT 'lz4' = ANY (enumvals) FROM pg_settings WHERE name = 'wal_compression'", &[])
        .unwrap()
        .get(0);
    let method = format!("method: {}", if has_lz4 { "lz4" } else { "pglz" });
    admin
        .batch_execute(&format!(
            "CREATE EXTENSION pg_walinspect;
             DROP ROLE IF EXISTS sf_test_wal_worker;
             CREATE ROLE sf_test_wal_worker LOGIN PASSWORD '{ROLE_PASSWORD}' IN ROLE stageflow_worker;"
        ))
        .unwrap();
    register(&mut admin, "wal_images", ONE_STAGE);
    admin.batch_execute("SELECT stageflow.grant_queue('wal', 'sf_test_wal_worker')").unwrap();
    submit(&mut admin, "wal_images", json!({"n": 4}));
    // A worker that is not a superuser: the functions set a superuser's setting as their owner.
    let mut worker = connect(&url_as(&url, "sf_test_wal_worker"));
    let is_superuser: bool =
        worker.query_one("SELECT rolsuper FROM pg_roles WHERE rolname = current_user", &[]).unwrap().get(0);
    assert!(!is_superuser);

    let claimed: Vec<(String, i64)> = worker
        .query("SELECT task_id, lease_token FROM stageflow.claim_tasks('wal', 3, 60, 'w')", &[])
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(claimed.len(), 3);
    let [(first, first_token), (second, second_token), (third, third_token)] = <[_; 3]>::try_from(claimed).unwrap();

    let calls = [
        // (the fourth task)
        ("a claim", "SELECT * FROM stageflow.claim_tasks('wal', 1, 60, 'w')".to_owned()),
        (
            "a heartbeat",
            format!("SELECT * FROM stageflow.heartbeat(ARRAY['{first}'], 120, 'w', ARRAY[{first_token}]::bigint[])"),
        ),
        (
            "a completion",
            format!("SELECT stageflow.complete_task_and_check_stage('{first}', '{{}}', 'w', {first_token})"),
        ),
        (
            "a batch of completions",
            format!(
                "SELECT stageflow.complete_tasks('[{{\"task_id\": \"{second}\", \"result\": {{}}, \"lease_token\": {second_token}}}]', 'w')"
            ),
        ),
        (
            "a failure",
            format!("SELECT stageflow.fail_task('{third}', '{{\"e\": 1}}', true, 'w', {third_token})"),
        ),
    ];
    for (what, call) in calls {
        let images = task_page_images(&mut admin, &mut worker, &call);
        assert!(!images.is_empty(), "{what} logged no full-page image of its task's page after a checkpoint");
        for image in &images {
            assert!(image.contains(&method), "{what} logged a page not compressed with {method}: {image}");
        }
    }
}

/// The list in sql/0950_roles_and_grants.sql is complete: every SECURITY DEFINER function whose
/// body, or the body of a function it calls (by name, transitively), updates, deletes or locks
/// task rows carries a wal_compression setting; and no other function does (the setting is a
/// superuser's: on a function that runs as its caller, a non-superuser's call would fail).
#[test]
fn every_entry_point_that_writes_task_rows_compresses_and_no_other_function_does() {
    let url = fresh_database("wal_entry_points");
    let mut client = connect(&url);
    let rows = client
        .query(
            r"WITH RECURSIVE fns AS (
                  SELECT p.oid, p.proname, p.prosrc, p.prosecdef,
                         coalesce(EXISTS (SELECT 1 FROM unnest(p.proconfig) AS c WHERE c LIKE 'wal_compression=%'), false)
                             AS compresses
                    FROM pg_proc AS p
                   WHERE p.pronamespace = 'stageflow'::regnamespace
                     AND p.prolang <> (SELECT l.oid FROM pg_language AS l WHERE l.lanname = 'c')
              ), writers AS (
                  SELECT f.oid FROM fns AS f
                   WHERE f.prosrc ~* '(UPDATE|DELETE\s+FROM)\s+stageflow\.tasks\M'
                      OR f.prosrc ~* 'FROM\s+stageflow\.tasks\M[^;]*FOR\s+UPDATE'
                  UNION
                  SELECT a.oid FROM writers AS w JOIN fns AS b ON b.oid = w.oid
                    JOIN fns AS a ON a.prosrc ~ ('stageflow\.' || b.proname || '\(')
              )
              SELECT f.oid::regprocedure::text, f.prosecdef, f.compresses, f.oid IN (SELECT w.oid FROM writers AS w)
                FROM fns AS f
               ORDER BY 1",
            &[],
        )
        .unwrap();
    let entry_points: Vec<String> =
        rows.iter().filter(|r| r.get::<_, bool>(1) && r.get::<_, bool>(3)).map(|r| r.get(0)).collect();
    assert!(
        entry_points.len() >= 12 && entry_points.iter().any(|f| f.starts_with("stageflow.claim_tasks(")),
        "the walk finds the entry points: {entry_points:?}"
    );
    let missing: Vec<String> = rows
        .iter()
        .filter(|r| r.get::<_, bool>(1) && r.get::<_, bool>(3) && !r.get::<_, bool>(2))
        .map(|r| r.get(0))
        .collect();
    assert!(missing.is_empty(), "entry points that write task rows without wal_compression: {missing:?}");
    let on_callers_rights: Vec<String> =
        rows.iter().filter(|r| !r.get::<_, bool>(1) && r.get::<_, bool>(2)).map(|r| r.get(0)).collect();
    assert!(on_callers_rights.is_empty(), "functions not SECURITY DEFINER with wal_compression: {on_callers_rights:?}");
}

/// A queue Stageflow makes has no index on vt, and room on its pages: a claim's read moves each
/// message's vt in a HOT update, writing no index entry (with pgmq's index on vt, each read wrote
/// an entry into both of the queue's indexes). A queue made with pgmq.create keeps its index.
#[test]
fn a_claim_moves_its_messages_without_index_entries() {
    let url = fresh_database("wal_queue_hot");
    let mut admin = connect(&url);
    admin.batch_execute("CREATE EXTENSION pg_walinspect; SELECT pgmq.create('wal_own')").unwrap();
    register(&mut admin, "wal_queue_hot", &ONE_STAGE.replace(r#""queue": "wal""#, r#""queue": "wal_hot""#));
    submit(&mut admin, "wal_queue_hot", json!({"n": 20}));
    let indexed_on_vt = |admin: &mut Client, queue: &str| -> bool {
        admin
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_index AS i JOIN pg_attribute AS a
                                    ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey::int2[])
                                 WHERE i.indrelid = format('pgmq.%I', 'q_' || $1)::regclass AND a.attname = 'vt')",
                &[&queue],
            )
            .unwrap()
            .get(0)
    };
    assert!(!indexed_on_vt(&mut admin, "wal_hot"));
    assert!(indexed_on_vt(&mut admin, "wal_own"), "a queue made with pgmq.create is left as it is");

    let start = wal_position_kept(&mut admin);
    let claimed = admin.query("SELECT * FROM stageflow.claim_tasks('wal_hot', 10, 60, 'w')", &[]).unwrap();
    assert_eq!(claimed.len(), 10);
    // The queue's table and its indexes, by the `rel` pg_walinspect names in a block reference.
    let records: Vec<(String, String, String)> = admin
        .query(
            "SELECT c.relname::text, w.resource_manager, w.record_type
               FROM pg_get_wal_records_info_till_end_of_wal($1::text::pg_lsn) AS w
               JOIN pg_class AS c ON c.relnamespace = 'pgmq'::regnamespace
                AND (c.oid = 'pgmq.q_wal_hot'::regclass
                     OR c.oid IN (SELECT i.indexrelid FROM pg_index AS i WHERE i.indrelid = 'pgmq.q_wal_hot'::regclass))
                AND strpos(w.block_ref, format(' rel %s/%s/%s ',
                           (SELECT CASE WHEN c.reltablespace = 0 THEN d.dattablespace ELSE c.reltablespace END
                              FROM pg_database AS d WHERE d.datname = current_database()),
                           (SELECT d.oid FROM pg_database AS d WHERE d.datname = current_database()),
                           pg_relation_filenode(c.oid))) > 0",
            &[&start],
        )
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    let hot = records.iter().filter(|(_, rm, kind)| rm == "Heap" && kind == "HOT_UPDATE").count();
    assert_eq!(hot, 10, "each read message's vt moved in a HOT update: {records:?}");
    let index_entries: Vec<_> = records.iter().filter(|(_, rm, _)| rm == "Btree").collect();
    assert!(index_entries.is_empty(), "the claim wrote index entries of the queue: {index_entries:?}");
}
