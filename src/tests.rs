//! `#[pg_test]` unit tests: each runs inside a transaction that is rolled back, so they cover what
//! one session sees. Commits, concurrency and workers are tested against a real cluster in
//! `crates/stageflow-tests`.

// Test code: a panic (unwrap, expect) is how a test reports a failure.
#![allow(clippy::unwrap_used)]

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;
    use serde_json::{json, Value};

    fn query_json(sql: &str) -> Value {
        Spi::get_one::<pgrx::JsonB>(sql).expect("query failed").expect("query returned NULL").0
    }

    /// Claims up to `n` tasks and completes each with `{"done": <task_key>}`; returns the reports.
    fn work_through(queue: &str, n: i32) -> Vec<Value> {
        let claimed: Vec<(String, String)> = Spi::connect(|client| {
            client
                .select(&format!("SELECT task_id, task_key FROM stageflow.claim_tasks('{queue}', {n})"), None, &[])
                .expect("claim failed")
                .map(|row| (row.get::<String>(1).unwrap().unwrap(), row.get::<String>(2).unwrap().unwrap()))
                .collect()
        });
        claimed
            .iter()
            .map(|(task_id, key)| {
                query_json(&format!(
                    "SELECT stageflow.complete_task_and_check_stage('{task_id}', '{{\"done\": \"{key}\"}}')"
                ))
            })
            .collect()
    }

    #[pg_test]
    fn hello_world_runs_both_stages_in_one_session() {
        let job_id =
            Spi::get_one::<String>("SELECT stageflow.submit_job('hello_world', '{\"message\": \"hi\", \"n\": 3}')")
                .unwrap()
                .unwrap();
        let greet = work_through("default", 10);
        assert_eq!(greet.len(), 3);
        assert_eq!(greet.iter().filter(|r| r["stage_completed"] == json!(true)).count(), 1);
        assert_eq!(greet[2]["next_stage"], json!(2));

        let reply = work_through("default", 10);
        assert_eq!(reply.len(), 3);
        assert_eq!(reply[2]["job_status"], json!("completed"));

        let status = query_json(&format!("SELECT stageflow.job_status('{job_id}')"));
        assert_eq!(status["status"], json!("completed"));
        assert_eq!(status["progress"], json!(100));
        assert_eq!(status["result_count"], json!(3));
        let page = query_json(&format!("SELECT stageflow.job_result('{job_id}')"));
        let results: Vec<&Value> = page["entries"].as_array().unwrap().iter().map(|e| &e["result"]).collect();
        assert_eq!(results, [&json!({"done": "0"}), &json!({"done": "1"}), &json!({"done": "2"})]);
        assert_eq!(page["next_after"], json!(null));
        assert_eq!(status["stages"][1]["tasks"]["completed"], json!(3));
    }

    #[pg_test]
    fn submitting_the_same_work_twice_returns_the_same_job() {
        let first =
            Spi::get_one::<String>("SELECT stageflow.submit_job('hello_world', '{\"n\": 2, \"message\": \"a\"}')");
        let second =
            Spi::get_one::<String>("SELECT stageflow.submit_job('hello_world', '{\"message\": \"a\", \"n\": 2}')");
        assert_eq!(first, second);
        let tasks = Spi::get_one::<i64>("SELECT count(*) FROM stageflow.tasks").unwrap().unwrap();
        assert_eq!(tasks, 2);
    }

    #[pg_test]
    fn the_sql_job_id_is_the_rust_job_id() {
        let from_sql = Spi::get_one::<String>("SELECT stageflow.job_id('t', '{}')").unwrap().unwrap();
        assert_eq!(from_sql, crate::job_id::job_id("t", &json!({})));
        let canonical =
            Spi::get_one::<String>("SELECT stageflow.canonical_json('{\"b\": [1, 2], \"a\": 1.50}')").unwrap().unwrap();
        assert_eq!(canonical, r#"{"a":1.5,"b":[1,2]}"#);
    }

    #[pg_test]
    fn defaults_are_applied_before_the_id_is_derived() {
        let implicit = Spi::get_one::<String>("SELECT stageflow.submit_job('hello_world', '{}')").unwrap().unwrap();
        let explicit =
            Spi::get_one::<String>("SELECT stageflow.job_id('hello_world', '{\"message\": \"hello\", \"n\": 3}')")
                .unwrap()
                .unwrap();
        assert_eq!(implicit, explicit);
    }

    #[pg_test(
        error = "invalid definition of job type broken: definition.stages[0].fan_out: \"lineage\" fans out from a previous stage, and the first stage has none"
    )]
    fn a_first_stage_cannot_be_lineage() {
        Spi::run("SELECT stageflow.register_job_type('broken', '{\"stages\": [{\"name\": \"a\", \"handler\": \"h\", \"fan_out\": \"lineage\"}]}')")
            .unwrap();
    }

    #[pg_test(error = "params do not fit job type hello_world: params.n: 0 is less than the minimum 1")]
    fn params_outside_the_schema_are_refused() {
        Spi::run("SELECT stageflow.submit_job('hello_world', '{\"n\": 0}')").unwrap();
    }
}
