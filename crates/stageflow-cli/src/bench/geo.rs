//! process_raster on a generated raster beside one `gdal_translate -of COG` of the whole of it.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use stageflow_worker::{Worker, WorkerConfig};

use super::jobs::{run_id, submit};
use crate::{connect, CliError};

/// process_raster of a generated `size` x `size` raster in tiles of `tile` with `workers` workers,
/// against one `gdal_translate -of COG` of the whole raster with the same creation options.
pub(super) async fn process_raster_vs_gdal(
    url: &str,
    dir: &std::path::Path,
    size: usize,
    tile: i64,
    workers: usize,
) -> Result<Value, CliError> {
    let geo_client = connect(url).await?;
    crate::demo::install_geo(&geo_client).await?;
    let client = geo_client.raw();
    std::fs::create_dir_all(dir).map_err(|e| CliError::Setup(e.to_string()))?;
    let source = dir.join(format!("bench_{size}.tif")).to_string_lossy().into_owned();
    if !std::path::Path::new(&source).exists() {
        let path = source.clone();
        tokio::task::spawn_blocking(move || stageflow_geo::raster::generate(&path, size))
            .await
            .map_err(|e| CliError::Setup(e.to_string()))?
            .map_err(|e| CliError::Setup(e.to_string()))?;
    }
    let output = dir.join(format!("tiles-{}", run_id()));
    let mut config = WorkerConfig::new(url);
    config.queues = vec!["geo".into()];
    config.concurrency = workers;
    config.poll_interval = Duration::from_millis(50);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    // The benchmark's raster and tiles are in its own directory, the only one the job may use.
    let handlers = crate::worker_handlers(&config.database_url, &crate::GeoOptions::roots(&[dir.to_path_buf()]))?;
    let worker = tokio::spawn(Worker::new(config.clone(), handlers).run(async {
        let _ = stop_rx.await;
    }));
    let start = Instant::now();
    let job_id = submit(
        client,
        "process_raster",
        json!({"source": source, "tile_size": tile, "output": output.to_string_lossy()}),
    )
    .await?;
    loop {
        let state: String = client.query_one("SELECT stageflow.job_status($1) ->> 'status'", &[&job_id]).await?.get(0);
        if state != "processing" && state != "queued" {
            if state != "completed" {
                return Err(CliError::JobFailed(job_id));
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stageflow_s = start.elapsed().as_secs_f64();
    let _ = stop_tx.send(());
    let _ = worker.await;
    let whole = dir.join(format!("whole-{}.tif", run_id()));
    let start = Instant::now();
    let status = std::process::Command::new("gdal_translate")
        .args([
            "-q",
            "-of",
            "COG",
            "-co",
            "COMPRESS=DEFLATE",
            "-co",
            "PREDICTOR=2",
            "-co",
            "BLOCKSIZE=256",
            "-co",
            "OVERVIEWS=AUTO",
            "-co",
            "OVERVIEW_RESAMPLING=AVERAGE",
        ])
        .arg(&source)
        .arg(&whole)
        .status()
        .map_err(|e| CliError::Setup(format!("gdal_translate: {e}")))?;
    let gdal_s = start.elapsed().as_secs_f64();
    if !status.success() {
        return Err(CliError::Setup("gdal_translate failed".into()));
    }
    let _ = std::fs::remove_dir_all(&output);
    let _ = std::fs::remove_file(&whole);
    Ok(json!({"raster": format!("{size}x{size} UInt16"), "tile_size": tile, "workers": workers,
              "process_raster_seconds": stageflow_s, "gdal_translate_seconds": gdal_s, "ratio": stageflow_s / gdal_s}))
}
