//! The job commands: submit, status, tasks, jobs. Each calls one stageflow SQL function and prints
//! its answer as text, or as JSON with `--json`.

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use tokio_postgres::Client;

/// Builds params from `--params JSON` and `-p key=value` pairs (a value that parses as JSON is
/// taken as JSON, anything else as a string).
pub fn build_params(params: Option<&str>, pairs: &[String]) -> Result<Value, String> {
    let mut object = match params {
        Some(text) => match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(map)) => map,
            Ok(other) => return Err(format!("--params must be a JSON object, got {other}")),
            Err(e) => return Err(format!("--params is not JSON: {e}")),
        },
        None => serde_json::Map::new(),
    };
    for pair in pairs {
        let (key, value) = pair.split_once('=').ok_or_else(|| format!("-p {pair}: expected key=value"))?;
        let value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_owned()));
        object.insert(key.to_owned(), value);
    }
    Ok(Value::Object(object))
}

pub async fn submit(client: &Client, job_type: &str, params: &Value) -> Result<String, tokio_postgres::Error> {
    Ok(submit_outcome(client, job_type, params).await?.0)
}

/// Submits a job: its id and the outcome (`created`, `exists`, `resumed`, `owned_by_another`).
pub async fn submit_outcome(
    client: &Client,
    job_type: &str,
    params: &Value,
) -> Result<(String, String), tokio_postgres::Error> {
    let row = client
        .query_one("SELECT job_id, outcome FROM stageflow.submit_job_outcome($1, $2)", &[&job_type, params])
        .await?;
    Ok((row.get(0), row.get(1)))
}

fn timestamp(value: &Value) -> Option<DateTime<Utc>> {
    value.as_str().and_then(|s| DateTime::parse_from_rfc3339(s).ok()).map(|t| t.with_timezone(&Utc))
}

/// Seconds left for the current stage at its rate so far, when it can be told.
pub fn eta_seconds(status: &Value, now: DateTime<Utc>) -> Option<f64> {
    if status["status"] != json!("processing") {
        return None;
    }
    let stage = &status["stages"][status["current_stage"].as_u64()? as usize - 1];
    let started = timestamp(&stage["created_at"])?;
    let done = stage["tasks"]["completed"].as_f64()?;
    let total = stage["task_count"].as_f64()?;
    let elapsed = (now - started).num_milliseconds() as f64 / 1000.0;
    (done > 0.0 && elapsed > 0.0).then(|| (total - done) / (done / elapsed))
}

pub fn print_status(status: &Value) {
    println!("job      {}", status["job_id"].as_str().unwrap_or("?"));
    println!("type     {}", status["job_type"].as_str().unwrap_or("?"));
    println!(
        "status   {}   stage {}/{}   progress {}%",
        status["status"].as_str().unwrap_or("?"),
        status["current_stage"],
        status["total_stages"],
        status["progress"]
    );
    if let Some(eta) = eta_seconds(status, Utc::now()) {
        println!("eta      {eta:.1} s for the current stage");
    }
    println!(
        "{:<3} {:<16} {:<10} {:>8} {:>8} {:>8} {:>9} {:>8} {:>9}",
        "#", "stage", "status", "tasks", "queued", "running", "completed", "failed", "cancelled"
    );
    for stage in status["stages"].as_array().into_iter().flatten() {
        let count = |k: &str| stage["tasks"][k].as_i64().map(|n| n.to_string()).unwrap_or_else(|| "-".into());
        println!(
            "{:<3} {:<16} {:<10} {:>8} {:>8} {:>8} {:>9} {:>8} {:>9}",
            stage["stage"].to_string(),
            stage["name"].as_str().unwrap_or("?"),
            stage["status"].as_str().unwrap_or("?"),
            stage["task_count"].as_i64().map(|n| n.to_string()).unwrap_or_else(|| "-".into()),
            count("queued"),
            count("running"),
            count("completed"),
            count("failed"),
            count("cancelled"),
        );
    }
    if !status["error"].is_null() {
        println!("error    {}", status["error"]);
    }
    if !status["result"].is_null() {
        let text = status["result"].to_string();
        let shown: String = text.chars().take(400).collect();
        println!("result   {shown}{}", if text.len() > shown.len() { " ..." } else { "" });
    }
}

pub async fn tasks(
    client: &Client,
    job_id: &str,
    status: Option<&str>,
    as_json: bool,
) -> Result<(), tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT task_id, stage_name, task_key, status, attempt, max_attempts, worker_id, result, error \
               FROM stageflow.job_tasks($1) WHERE $2::text IS NULL OR status = $2",
            &[&job_id, &status],
        )
        .await?;
    if as_json {
        let tasks: Vec<Value> = rows
            .iter()
            .map(|r| {
                json!({"task_id": r.get::<_, String>(0), "stage_name": r.get::<_, String>(1), "task_key": r.get::<_, String>(2),
                       "status": r.get::<_, String>(3), "attempt": r.get::<_, i32>(4), "max_attempts": r.get::<_, i32>(5),
                       "worker_id": r.get::<_, Option<String>>(6), "result": r.get::<_, Option<Value>>(7), "error": r.get::<_, Option<Value>>(8)})
            })
            .collect();
        println!("{}", Value::Array(tasks));
        return Ok(());
    }
    println!("{:<40} {:<12} {:<10} {:>7}  result / error", "task", "stage", "status", "attempt");
    for r in &rows {
        let outcome =
            r.get::<_, Option<Value>>(8).or(r.get::<_, Option<Value>>(7)).map(|v| v.to_string()).unwrap_or_default();
        let outcome: String = outcome.chars().take(80).collect();
        println!(
            "{:<40} {:<12} {:<10} {:>3}/{:<3}  {outcome}",
            r.get::<_, String>(0),
            r.get::<_, String>(1),
            r.get::<_, String>(3),
            r.get::<_, i32>(4),
            r.get::<_, i32>(5)
        );
    }
    println!("{} tasks", rows.len());
    Ok(())
}

pub async fn list(
    client: &Client,
    status: Option<&str>,
    job_type: Option<&str>,
    limit: i32,
    as_json: bool,
) -> Result<(), tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT job_id, job_type, status, current_stage, total_stages, current_stage_name, progress::float8, created_at \
               FROM stageflow.list_jobs($1, $2, $3)",
            &[&status, &job_type, &limit],
        )
        .await?;
    if as_json {
        let jobs: Vec<Value> = rows
            .iter()
            .map(|r| {
                json!({"job_id": r.get::<_, String>(0), "job_type": r.get::<_, String>(1), "status": r.get::<_, String>(2),
                       "current_stage": r.get::<_, i32>(3), "total_stages": r.get::<_, i32>(4),
                       "current_stage_name": r.get::<_, Option<String>>(5), "progress": r.get::<_, f64>(6),
                       "created_at": r.get::<_, DateTime<Utc>>(7).to_rfc3339()})
            })
            .collect();
        println!("{}", Value::Array(jobs));
        return Ok(());
    }
    println!("{:<64}  {:<16} {:<11} {:>7} {:>8}  created", "job", "type", "status", "stage", "progress");
    for r in &rows {
        println!(
            "{:<64}  {:<16} {:<11} {:>3}/{:<3} {:>7.1}%  {}",
            r.get::<_, String>(0),
            r.get::<_, String>(1),
            r.get::<_, String>(2),
            r.get::<_, i32>(3),
            r.get::<_, i32>(4),
            r.get::<_, f64>(6),
            r.get::<_, DateTime<Utc>>(7).format("%Y-%m-%d %H:%M:%S")
        );
    }
    Ok(())
}

/// Prints the queue grants: which roles may claim from which queue.
pub async fn queue_grants(client: &Client, as_json: bool) -> Result<(), tokio_postgres::Error> {
    let rows =
        client.query("SELECT queue, role_name::text, granted_at FROM stageflow.list_queue_grants()", &[]).await?;
    if as_json {
        let grants: Vec<Value> = rows
            .iter()
            .map(|r| {
                json!({"queue": r.get::<_, String>(0), "role_name": r.get::<_, String>(1),
                       "granted_at": r.get::<_, DateTime<Utc>>(2).to_rfc3339()})
            })
            .collect();
        println!("{}", Value::Array(grants));
        return Ok(());
    }
    println!("{:<48} {:<32} granted at", "queue", "role");
    for r in &rows {
        println!(
            "{:<48} {:<32} {}",
            r.get::<_, String>(0),
            r.get::<_, String>(1),
            r.get::<_, DateTime<Utc>>(2).to_rfc3339()
        );
    }
    Ok(())
}

/// Prints the quotas in force and the open tasks held against them (stageflow.list_quotas): the
/// caller's own, or every login's for an admin.
pub async fn quotas(client: &Client, as_json: bool) -> Result<(), tokio_postgres::Error> {
    let rows = client
        .query("SELECT role_name::text, max_open_tasks, max_tasks_per_job, open_tasks, custom FROM stageflow.list_quotas()", &[])
        .await?;
    if as_json {
        let quotas: Vec<Value> = rows
            .iter()
            .map(|r| {
                json!({"role_name": r.get::<_, String>(0), "max_open_tasks": r.get::<_, i64>(1),
                       "max_tasks_per_job": r.get::<_, i64>(2), "open_tasks": r.get::<_, i64>(3), "custom": r.get::<_, bool>(4)})
            })
            .collect();
        println!("{}", Value::Array(quotas));
        return Ok(());
    }
    println!("{:<32} {:>14} {:>17} {:>12}  from", "role", "max open tasks", "max tasks per job", "open tasks");
    for r in &rows {
        println!(
            "{:<32} {:>14} {:>17} {:>12}  {}",
            r.get::<_, String>(0),
            r.get::<_, i64>(1),
            r.get::<_, i64>(2),
            r.get::<_, i64>(3),
            if r.get::<_, bool>(4) { "set_quota" } else { "defaults" }
        );
    }
    Ok(())
}

pub async fn dead_letters(client: &Client, limit: i32, as_json: bool) -> Result<(), tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT task_id, job_id, job_type, stage_name, status, attempt, max_attempts, error, failed_at \
               FROM stageflow.dead_letters($1)",
            &[&limit],
        )
        .await?;
    if as_json {
        let letters: Vec<Value> = rows
            .iter()
            .map(|r| {
                json!({"task_id": r.get::<_, String>(0), "job_id": r.get::<_, String>(1), "job_type": r.get::<_, String>(2),
                       "stage_name": r.get::<_, String>(3), "status": r.get::<_, String>(4), "attempt": r.get::<_, i32>(5),
                       "max_attempts": r.get::<_, i32>(6), "error": r.get::<_, Option<Value>>(7),
                       "failed_at": r.get::<_, Option<DateTime<Utc>>>(8).map(|t| t.to_rfc3339())})
            })
            .collect();
        println!("{}", Value::Array(letters));
        return Ok(());
    }
    println!("{:<40} {:<16} {:<12} {:<6} {:>7}  error", "task", "job type", "stage", "status", "attempt");
    for r in &rows {
        let error = r
            .get::<_, Option<Value>>(7)
            .map(|e| e["message"].as_str().map(str::to_owned).unwrap_or(e.to_string()))
            .unwrap_or_default();
        println!(
            "{:<40} {:<16} {:<12} {:<6} {:>3}/{:<3}  {}",
            r.get::<_, String>(0),
            r.get::<_, String>(2),
            r.get::<_, String>(3),
            r.get::<_, String>(4),
            r.get::<_, i32>(5),
            r.get::<_, i32>(6),
            error.chars().take(80).collect::<String>()
        );
    }
    println!("{} dead letters", rows.len());
    Ok(())
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn params_merge_json_and_key_values() {
        let params = build_params(
            Some(r#"{"n": 1, "message": "a"}"#),
            &["n=3".into(), "tag=raw text".into(), "flags=[1,2]".into()],
        )
        .unwrap();
        assert_eq!(params, json!({"n": 3, "message": "a", "tag": "raw text", "flags": [1, 2]}));
        assert!(build_params(Some("[1]"), &[]).unwrap_err().contains("JSON object"));
        assert!(build_params(None, &["novalue".into()]).unwrap_err().contains("key=value"));
    }

    #[test]
    fn eta_follows_the_current_stage_rate() {
        let now = Utc::now();
        let started = (now - chrono::Duration::seconds(10)).to_rfc3339();
        let status = json!({"status": "processing", "current_stage": 1,
                            "stages": [{"created_at": started, "task_count": 100, "tasks": {"completed": 25}}]});
        let eta = eta_seconds(&status, now).unwrap();
        assert!((eta - 30.0).abs() < 0.5, "{eta}");
        let done = json!({"status": "completed"});
        assert_eq!(eta_seconds(&done, now), None);
    }
}
