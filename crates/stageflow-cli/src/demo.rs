//! `stageflow demo`: hello_world at a realistic size on a private cluster in `./.stageflow`, with
//! a pool of workers in this process and live progress bars.

use std::time::{Duration, Instant};

use serde_json::json;
use stageflow_worker::{Worker, WorkerConfig};
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
    println!("{state} PostgreSQL cluster in {} ({})", cluster.dir().display(), crate::cluster::redacted(&url));
    let client = connect(&url).await?;
    client.raw().batch_execute("CREATE EXTENSION IF NOT EXISTS stageflow CASCADE").await?;

    let params = json!({
        "message": format!("hello from the demo at {}", chrono::Utc::now().format("%H:%M:%S%.3f")),
        "n": options.n,
    });
    let started = Instant::now();
    let job_id = jobs::submit(&client, "hello_world", &params).await?;
    let submitted = started.elapsed();
    println!(
        "Submitted hello_world with n = {} as job {job_id} in {:.1} ms",
        options.n,
        submitted.as_secs_f64() * 1000.0
    );
    println!("Running it with {} workers in this process:", options.workers);

    let mut config = WorkerConfig::new(url.clone());
    config.concurrency = options.workers;
    config.batch_size = options.workers.max(1);
    config.poll_interval = Duration::from_millis(250);
    config.grace_period = Duration::from_secs(5);
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let worker = tokio::spawn(
        Worker::new(config.clone(), crate::worker_handlers(&config.database_url, &crate::GeoOptions::roots(&[]))?).run(
            async {
                let _ = stop_rx.await;
            },
        ),
    );

    let status = progress::follow(&client, &job_id).await?;
    let elapsed = started.elapsed();
    let _ = stop_tx.send(());
    let report = worker.await.map_err(|e| CliError::Setup(format!("the worker pool crashed: {e}")))?;

    println!();
    jobs::print_status(&status.document);
    let tasks: u64 = status.stages.iter().filter_map(|s| s.task_count).map(|n| u64::try_from(n).unwrap_or(0)).sum();
    println!();
    println!(
        "{tasks} tasks in {:.2} s ({:.0} tasks/s end to end); the workers completed {} and failed {}",
        elapsed.as_secs_f64(),
        tasks as f64 / elapsed.as_secs_f64(),
        report.completed,
        report.failed
    );
    if status.result_count.is_some() {
        let first = client.api().job_result(&job_id, None, 3).await?;
        for entry in &first.entries {
            println!("  {}", entry.result["reply"].as_str().unwrap_or_default());
        }
        if first.next_after.is_some() {
            println!("  ... {} replies in all", status.result_count.unwrap_or_default());
        }
    }
    println!();
    println!("The cluster keeps running. Connect with:  psql {url}");
    println!(
        "Try:  stageflow jobs   |   stageflow status {job_id}   |   stageflow result {job_id} --limit 5   |   stageflow demo --stop"
    );
    if status.status != "completed" {
        return Err(CliError::JobFailed(job_id));
    }
    Ok(())
}

/// Registers the geospatial job types; returns their names.
#[cfg(feature = "geo")]
pub async fn install_geo(client: &stageflow_client::Client) -> Result<Vec<&'static str>, CliError> {
    client.raw().batch_execute(&stageflow_geo::install_sql()).await?;
    let mut names = Vec::new();
    for (name, definition) in stageflow_geo::job_types() {
        client.api().register_job_type(name, &definition).await?;
        names.push(name);
    }
    Ok(names)
}

/// `stageflow demo --geo`: process_raster on Debian's Landsat 7 scene and on a generated
/// 8192 x 8192 raster, with the worker pool in this process and live progress.
#[cfg(feature = "geo")]
pub async fn run_geo(cluster: &Cluster, workers: usize) -> Result<(), CliError> {
    let url = cluster.ensure_running().map_err(CliError::Setup)?;
    let client = connect(&url).await?;
    client.raw().batch_execute("CREATE EXTENSION IF NOT EXISTS stageflow CASCADE").await?;
    install_geo(&client).await?;
    let base = cluster.dir().join("geo");
    let landsat = std::env::var("STAGEFLOW_GEODATA")
        .unwrap_or_else(|_| "/var/tmp/stageflow-geodata/stars/usr/lib/R/site-library/stars/tif".into())
        + "/L7_ETMs.tif";
    let generated = base.join("generated_8192.tif");
    std::fs::create_dir_all(&base).map_err(|e| CliError::Setup(e.to_string()))?;
    if !generated.exists() {
        println!("Generating an 8192 x 8192 raster at {} ...", generated.display());
        let path = generated.to_string_lossy().into_owned();
        tokio::task::spawn_blocking(move || stageflow_geo::raster::generate(&path, 8192))
            .await
            .map_err(|e| CliError::Setup(e.to_string()))?
            .map_err(|e| CliError::Setup(e.to_string()))?;
    }
    let mut config = WorkerConfig::new(url.clone());
    config.queues = vec!["geo".into()];
    config.concurrency = workers.max(1);
    config.poll_interval = Duration::from_millis(200);
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    // The jobs read the scenes where they are and write under the demo's own directory.
    let roots =
        [std::path::PathBuf::from(&landsat).parent().map(|p| p.to_path_buf()).unwrap_or_default(), base.clone()];
    let handlers = crate::worker_handlers(&config.database_url, &crate::GeoOptions::roots(&roots))?;
    let worker = tokio::spawn(Worker::new(config.clone(), handlers).run(async {
        let _ = stop_rx.await;
    }));
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S").to_string();
    for (name, source, tile) in
        [("landsat", landsat, 128), ("generated", generated.to_string_lossy().into_owned(), 2048)]
    {
        let output = base.join(format!("{name}-{stamp}"));
        let started = Instant::now();
        let job_id = jobs::submit(
            &client,
            "process_raster",
            &json!({"source": source, "tile_size": tile, "output": output.to_string_lossy()}),
        )
        .await?;
        println!("\nprocess_raster of {source} (tiles of {tile}) as job {job_id}:");
        let status = progress::follow(&client, &job_id).await?;
        jobs::print_status(&status.document);
        println!("{:.1} s; COGs and STAC catalog in {}", started.elapsed().as_secs_f64(), output.display());
        if status.status != "completed" {
            let _ = stop_tx.send(());
            return Err(CliError::JobFailed(job_id));
        }
    }
    let _ = stop_tx.send(());
    let _ = worker.await;
    Ok(())
}
