//! The handlers of the built-in `hello_world` job type.

use serde_json::{json, Value};

use crate::handlers::{Task, TaskError};

/// Stage 1: one greeting per task.
pub async fn greet(task: Task) -> Result<Value, TaskError> {
    let message = task.params["message"].as_str().unwrap_or("hello");
    let index = task.params["index"].as_i64().unwrap_or_default();
    Ok(json!({"greeting": format!("{message} #{index}")}))
}

/// Stage 2: replies to the greeting this task descends from.
pub async fn reply(task: Task) -> Result<Value, TaskError> {
    let greeting = task
        .predecessor
        .as_ref()
        .and_then(|p| p["greeting"].as_str())
        .ok_or_else(|| TaskError::permanent("missing_predecessor", "a reply needs its greeting's result"))?;
    Ok(json!({"reply": format!("reply to {greeting}")}))
}
