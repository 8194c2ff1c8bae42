//! A planner cannot point a geospatial job's tasks outside the paths and tables its submitter
//! gave: the plan of process_raster (its `plan` stage feeds the dynamic `cog` stage) is refused
//! when an entry's params name one of the job's parameters (here `output`), and an accepted plan's
//! tasks see the job's own `output` beside their tile params.

// Test code: a panic (unwrap, expect) is how a test reports a failure.
#![allow(clippy::unwrap_used)]

mod jobs;

use serde_json::{json, Value};

#[test]
fn a_planner_cannot_replace_the_output_of_process_raster() {
    let (_url, mut client) = jobs::geo_database("geo_planner_params");
    let job_id: String = client
        .query_one(
            "SELECT stageflow.submit_job('process_raster', $1)",
            &[&json!({"source": "/data/in.tif", "output": "/data/out"})],
        )
        .unwrap()
        .get(0);
    // The stages before the plan, completed by hand (their results do not shape the plan stage).
    let plan = loop {
        let row = client
            .query_one("SELECT task_id, lease_token, stage_name FROM stageflow.claim_tasks('geo', 1, 60, 'test')", &[])
            .unwrap();
        let (task_id, token, stage): (String, i64, String) = (row.get(0), row.get(1), row.get(2));
        if stage == "plan" {
            break (task_id, token);
        }
        client
            .execute("SELECT stageflow.complete_task_and_check_stage($1, '{}', 'test', $2)", &[&task_id, &token])
            .unwrap();
    };

    let hostile = json!({"tasks": [{"key": "tile_x0_y0", "params": {"col": 0, "row": 0, "output": "/root/.ssh"}}]});
    let error = client
        .query_one("SELECT stageflow.complete_task_and_check_stage($1, $2, 'test', $3)", &[&plan.0, &hostile, &plan.1])
        .expect_err("a plan replacing the job's output must be refused");
    let db = error.as_db_error().expect("a database error");
    assert_eq!(db.code().code(), "22023", "{}", db.message());
    assert!(db.message().contains("params key \"output\" is a parameter of the job"), "{}", db.message());

    let plan_result = json!({"tasks": [{"key": "tile_x0_y0", "params": {"col": 0, "row": 0, "xoff": 0, "yoff": 0, "xsize": 8, "ysize": 8}}]});
    client
        .execute(
            "SELECT stageflow.complete_task_and_check_stage($1, $2, 'test', $3)",
            &[&plan.0, &plan_result, &plan.1],
        )
        .unwrap();
    let params: Value =
        client.query_one("SELECT params FROM stageflow.claim_tasks('geo', 1, 60, 'test')", &[]).unwrap().get(0);
    assert_eq!(params["output"], json!("/data/out"), "{params}");
    assert_eq!(params["col"], json!(0), "{params}");
    let status: String =
        client.query_one("SELECT status FROM stageflow.jobs WHERE job_id = $1", &[&job_id]).unwrap().get(0);
    assert_eq!(status, "processing");
}
