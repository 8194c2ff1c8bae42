//! The job commands: submit, status, result, tasks, jobs. Each makes one call of the SQL API
//! (`stageflow_client`) and prints its answer as text, or as JSON with `--json`.

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use stageflow_client::{Client, Error, JobResultPage, ListJobs, MAX_RESULT_PAGE};

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

/// Submits a job: its id (a new job's, or that of the job of identical work).
pub async fn submit(client: &Client, job_type: &str, params: &Value) -> Result<String, Error> {
    Ok(client.api().submit_job_outcome(job_type, params, None).await?.job_id)
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
    if let Some(count) = status["result_count"].as_i64() {
        let entries = if count == 1 { "1 entry" } else { &format!("{count} entries") };
        println!("result   {entries}: stageflow result {}", status["job_id"].as_str().unwrap_or("?"));
    }
}

/// `stageflow result`: one page of a job's result (`limit` entries after `after`), or with `limit`
/// `None` every page from `after` on; as `ordinal  task_key  result` lines, or as the page's JSON.
pub async fn result(
    client: &Client,
    job_id: &str,
    after: Option<i32>,
    limit: Option<i32>,
    as_json: bool,
) -> Result<(), Error> {
    let api = client.api();
    if as_json {
        let Some(limit) = limit else {
            let mut page = api.job_result(job_id, after, MAX_RESULT_PAGE).await?;
            all_pages(client, job_id, &mut page).await?;
            println!("{}", page_json(&page));
            return Ok(());
        };
        println!("{}", api.job_result_json(job_id, after, limit).await?);
        return Ok(());
    }
    let mut page = api.job_result(job_id, after, limit.unwrap_or(MAX_RESULT_PAGE)).await?;
    if limit.is_none() {
        all_pages(client, job_id, &mut page).await?;
    }
    for entry in &page.entries {
        println!("{:<8} {:<16} {}", entry.ordinal, entry.task_key, entry.result);
    }
    match page.next_after {
        Some(next) => eprintln!(
            "{} entries; more after ordinal {next}: stageflow result {job_id} --after {next}",
            page.entries.len()
        ),
        None => eprintln!("{} entries; the end of the result", page.entries.len()),
    }
    Ok(())
}

/// Appends every page after `page` to it.
async fn all_pages(client: &Client, job_id: &str, page: &mut JobResultPage) -> Result<(), Error> {
    while let Some(after) = page.next_after {
        let next = client.api().job_result(job_id, Some(after), MAX_RESULT_PAGE).await?;
        page.entries.extend(next.entries);
        page.next_after = next.next_after;
    }
    Ok(())
}

fn page_json(page: &JobResultPage) -> Value {
    let entries: Vec<Value> = page
        .entries
        .iter()
        .map(|e| json!({"ordinal": e.ordinal, "task_key": e.task_key, "task_id": e.task_id, "result": e.result}))
        .collect();
    json!({"job_id": page.job_id, "status": page.status, "fan_out": page.fan_out, "entries": entries,
           "next_after": page.next_after})
}

pub async fn tasks(client: &Client, job_id: &str, status: Option<&str>, as_json: bool) -> Result<(), Error> {
    let mut rows = client.api().job_tasks(job_id).await?;
    rows.retain(|r| status.is_none_or(|s| r.status == s));
    if as_json {
        let tasks: Vec<Value> = rows
            .iter()
            .map(|r| {
                json!({"task_id": r.task_id, "stage_name": r.stage_name, "task_key": r.task_key,
                       "status": r.status, "attempt": r.attempt, "max_attempts": r.max_attempts,
                       "worker_id": r.worker_id, "result": r.result, "error": r.error})
            })
            .collect();
        println!("{}", Value::Array(tasks));
        return Ok(());
    }
    println!("{:<40} {:<12} {:<10} {:>7}  result / error", "task", "stage", "status", "attempt");
    for r in &rows {
        let outcome = r.error.as_ref().or(r.result.as_ref()).map(|v| v.to_string()).unwrap_or_default();
        let outcome: String = outcome.chars().take(80).collect();
        println!(
            "{:<40} {:<12} {:<10} {:>3}/{:<3}  {outcome}",
            r.task_id, r.stage_name, r.status, r.attempt, r.max_attempts
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
) -> Result<(), Error> {
    let rows = client.api().list_jobs(ListJobs { status, job_type, max_rows: limit, before: None }).await?;
    if as_json {
        let jobs: Vec<Value> = rows
            .iter()
            .map(|r| {
                json!({"job_id": r.job_id, "job_type": r.job_type, "status": r.status,
                       "current_stage": r.current_stage, "total_stages": r.total_stages,
                       "current_stage_name": r.current_stage_name, "progress": r.progress,
                       "created_at": r.created_at.to_rfc3339()})
            })
            .collect();
        println!("{}", Value::Array(jobs));
        return Ok(());
    }
    println!("{:<64}  {:<16} {:<11} {:>7} {:>8}  created", "job", "type", "status", "stage", "progress");
    for r in &rows {
        println!(
            "{:<64}  {:<16} {:<11} {:>3}/{:<3} {:>7.1}%  {}",
            r.job_id,
            r.job_type,
            r.status,
            r.current_stage,
            r.total_stages,
            r.progress,
            r.created_at.format("%Y-%m-%d %H:%M:%S")
        );
    }
    Ok(())
}

/// Prints the queue grants: which roles may claim from which queue.
pub async fn queue_grants(client: &Client, as_json: bool) -> Result<(), Error> {
    let rows = client.api().list_queue_grants().await?;
    if as_json {
        let grants: Vec<Value> = rows
            .iter()
            .map(|r| json!({"queue": r.queue, "role_name": r.role_name, "granted_at": r.granted_at.to_rfc3339()}))
            .collect();
        println!("{}", Value::Array(grants));
        return Ok(());
    }
    println!("{:<48} {:<32} granted at", "queue", "role");
    for r in &rows {
        println!("{:<48} {:<32} {}", r.queue, r.role_name, r.granted_at.to_rfc3339());
    }
    Ok(())
}

/// Prints the quotas in force and the open tasks held against them (stageflow.list_quotas): the
/// caller's own, or every login's for an admin.
pub async fn quotas(client: &Client, as_json: bool) -> Result<(), Error> {
    let rows = client.api().list_quotas().await?;
    if as_json {
        let quotas: Vec<Value> = rows
            .iter()
            .map(|r| {
                json!({"role_name": r.role_name, "max_open_tasks": r.max_open_tasks,
                       "max_tasks_per_job": r.max_tasks_per_job, "open_tasks": r.open_tasks, "custom": r.custom})
            })
            .collect();
        println!("{}", Value::Array(quotas));
        return Ok(());
    }
    println!("{:<32} {:>14} {:>17} {:>12}  from", "role", "max open tasks", "max tasks per job", "open tasks");
    for r in &rows {
        println!(
            "{:<32} {:>14} {:>17} {:>12}  {}",
            r.role_name,
            r.max_open_tasks,
            r.max_tasks_per_job,
            r.open_tasks,
            if r.custom { "set_quota" } else { "defaults" }
        );
    }
    Ok(())
}

pub async fn dead_letters(client: &Client, limit: i32, as_json: bool) -> Result<(), Error> {
    let rows = client.api().dead_letters(limit).await?;
    if as_json {
        let letters: Vec<Value> = rows
            .iter()
            .map(|r| {
                json!({"task_id": r.task_id, "job_id": r.job_id, "job_type": r.job_type,
                       "stage_name": r.stage_name, "status": r.status, "attempt": r.attempt,
                       "max_attempts": r.max_attempts, "error": r.error,
                       "failed_at": r.failed_at.map(|t| t.to_rfc3339())})
            })
            .collect();
        println!("{}", Value::Array(letters));
        return Ok(());
    }
    println!("{:<40} {:<16} {:<12} {:<6} {:>7}  error", "task", "job type", "stage", "status", "attempt");
    for r in &rows {
        let error = r
            .error
            .as_ref()
            .map(|e| e["message"].as_str().map(str::to_owned).unwrap_or(e.to_string()))
            .unwrap_or_default();
        println!(
            "{:<40} {:<16} {:<12} {:<6} {:>3}/{:<3}  {}",
            r.task_id,
            r.job_type,
            r.stage_name,
            r.status,
            r.attempt,
            r.max_attempts,
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
