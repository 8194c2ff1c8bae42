//! Diagnostic handlers for trying a deployment's failure paths (and for Stageflow's own tests):
//! point a job type's stage at them.
//!
//! - `debug.sleep`: sleeps `params.ms` milliseconds (default 100), then returns `{"slept_ms"}`;
//!   with `params.marker_dir`, first writes an empty file `<marker_dir>/<task_id>.<attempt>.<pid>`
//!   so a test can count how often each task ran.
//! - `debug.fail`: fails with `params.message`, retryable unless `params.permanent` is true.
//! - `debug.panic`: panics.

use std::time::Duration;

use serde_json::{json, Value};

use crate::handlers::{Task, TaskError};

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
