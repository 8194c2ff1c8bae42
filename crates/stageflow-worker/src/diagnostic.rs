//! Diagnostic handlers for trying a deployment's failure paths (and for Stageflow's own tests):
//! point a job type's stage at them.
//!
//! - `debug.sleep`: sleeps `params.ms` milliseconds (default 100), then returns `{"slept_ms"}`;
//!   with `params.marker_dir`, first writes an empty file `<marker_dir>/<task_id>.<attempt>.<pid>`
//!   so a test can count how often each task ran.
//! - `debug.fail`: fails with `params.message`, retryable unless `params.permanent` is true.
//! - `debug.panic`: panics.
//! - `debug.insert_row` (transactional): inserts `(task_id, lease_token)` into the table
//!   `params.table` (one name, quoted as an identifier, found on the worker login's search path) in
//!   its completion's transaction, then sleeps `params.ms` milliseconds (default 0) and returns
//!   `{"table", "key"}`. The table must exist and the worker's login must be granted `INSERT` on
//!   it (and `USAGE` on the sequences of its defaults); each completed task then leaves exactly one
//!   row, however often it ran (`crates/stageflow-cli/tests/exactly_once.rs`).

use std::time::Duration;

use serde_json::{json, Value};

use crate::handlers::{Task, TaskError, Transaction};

pub async fn sleep(task: Task) -> Result<Value, TaskError> {
    if let Some(dir) = task.params["marker_dir"].as_str() {
        let marker = format!("{dir}/{}.{}.{}", task.task_id, task.attempt, std::process::id());
        std::fs::write(&marker, b"").map_err(|e| TaskError::retryable("io", format!("{marker}: {e}")))?;
    }
    let ms = task.params["ms"].as_u64().unwrap_or(100);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    Ok(json!({"slept_ms": ms, "key": task.task_key}))
}

pub async fn fail(task: Task) -> Result<Value, TaskError> {
    let message = task.params["message"].as_str().unwrap_or("debug.fail was asked to fail").to_owned();
    if task.params["permanent"].as_bool().unwrap_or(false) {
        Err(TaskError::permanent("debug_failure", message))
    } else {
        Err(TaskError::retryable("debug_failure", message))
    }
}

pub async fn panic(task: Task) -> Result<Value, TaskError> {
    panic!("debug.panic was asked to panic in task {}", task.task_id)
}

pub async fn insert_row(task: Task, transaction: &Transaction<'_>) -> Result<Value, TaskError> {
    let table = task.params["table"]
        .as_str()
        .ok_or_else(|| TaskError::permanent("bad_params", "debug.insert_row needs params.table, a table name"))?;
    let insert = format!("INSERT INTO \"{}\" (task_id, lease_token) VALUES ($1, $2)", table.replace('"', "\"\""));
    transaction
        .execute(&insert, &[&task.task_id, &task.lease_token])
        .await
        .map_err(|e| TaskError::retryable("database", format!("{insert}: {e}")))?;
    let ms = task.params["ms"].as_u64().unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    Ok(json!({"table": table, "key": task.task_key}))
}
