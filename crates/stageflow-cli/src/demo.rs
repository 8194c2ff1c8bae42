//! `stageflow demo`: hello_world at a realistic size on a private cluster in `./.stageflow`, with
//! a pool of workers in this process and live progress bars.

use std::time::{Duration, Instant};

use serde_json::json;
use stageflow_worker::{builtin_handlers, Worker, WorkerConfig};
use tokio::sync::oneshot;

use crate::cluster::Cluster;
use crate::{connect, jobs, progress, CliError};

pub struct DemoOptions {
    pub n: u32,
    pub workers: usize,
}

pub async fn run(cluster: &Cluster, options: DemoOptions) -> Result<(), CliError> {
    let state = if cluster.is_running() {
        "Reusing the running"
    } else if cluster.exists() {
        "Started the existing (data kept)"
    } else {
        "Created a private"
    };
    let url = cluster.ensure_running().map_err(CliError::Setup)?;
    println!("{state} PostgreSQL cluster in {} ({url})", cluster.dir().display());
    let client = connect(&url).await?;
    client.batch_execute("CREATE EXTENSION IF NOT EXISTS stageflow CASCADE").await?;

    let params = json!({
        "message": format!("hello from the demo at {}", chrono::Utc::now().format("%H:%M:%S%.3f")),
        "n": options.n,
    });
    let started = Instant::now();
    let job_id = jobs::submit(&client, "hello_world", &params).await?;
    let submitted = started.elapsed();
    println!("Submitted hello_world with n = {} as job {job_id} in {:.1} ms", options.n, submitted.as_secs_f64() * 1000.0);
    println!("Running it with {} workers in this process:", options.workers);

    let mut config = WorkerConfig::new(url.clone());
    config.concurrency = options.workers;
    config.batch_size = options.workers.max(1);
    config.poll_interval = Duration::from_millis(250);
    config.grace_period = Duration::from_secs(5);
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let worker = tokio::spawn(Worker::new(config, builtin_handlers()).run(async {
        let _ = stop_rx.await;
    }));

    let status = progress::follow(&client, &job_id).await?;
    let elapsed = started.elapsed();
    let _ = stop_tx.send(());
    let report = worker.await.map_err(|e| CliError::Setup(format!("the worker pool crashed: {e}")))?;

    println!();
    jobs::print_status(&status);
    let tasks: u64 = status["stages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["task_count"].as_u64())
        .sum();
    println!();
    println!(
        "{tasks} tasks in {:.2} s ({:.0} tasks/s end to end); the workers completed {} and failed {}",
        elapsed.as_secs_f64(),
        tasks as f64 / elapsed.as_secs_f64(),
        report.completed,
        report.failed
    );
    if let Some(replies) = status["result"].as_array() {
        for reply in replies.iter().take(3) {
            println!("  {}", reply["reply"].as_str().unwrap_or_default());
        }
        if replies.len() > 3 {
            println!("  ... {} replies in all", replies.len());
        }
    }
    println!();
    println!("The cluster keeps running. Connect with:  psql {url}");
    println!("Try:  stageflow jobs   |   stageflow status {job_id}   |   stageflow demo --stop");
    if status["status"] != json!("completed") {
        return Err(CliError::JobFailed(job_id));
    }
    Ok(())
}
