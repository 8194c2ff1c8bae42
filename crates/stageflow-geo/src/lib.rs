//! Stageflow's geospatial job types (GDAL through the `gdal` crate, Debian's GDAL 3.6), kept out of
//! the core so that it builds without GDAL:
//!
//! - `extract_metadata {path}`: a raster's CRS, bounds (native and WGS84), size, bands, data types,
//!   nodata, block size, overviews, compression and whether it is a COG;
//! - `process_raster {source, tile_size, output}` (local paths or `s3://` ones, through GDAL's
//!   `/vsis3/`): validate -> plan (the tile grid, keys
//!   `tile_x{col}_y{row}`) -> cog (dynamic fan-out: one Cloud-Optimized GeoTIFF per tile) -> stac
//!   (fan-in: a STAC Collection and one Item per tile, with projection and raster fields).
//! - `container_inventory {source}` (a directory or `s3://bucket/prefix`): list -> inspect (dynamic:
//!   size, time, SHA-256, media type from the content) -> catalog (fan-in: the result and rows of
//!   `stageflow_geo.inventory`); see [`inventory`];
//! - `validate_stac {path}`: discover -> validate (dynamic: one STAC document each, offline against
//!   the schemas shipped in `schemas/`) -> report (fan-in: every error); see [`validate_stac`].
//! - `stage_vector {source, table, srid?}`: inspect (schema, CRS, create the table) -> load (dynamic:
//!   chunks of features binary-COPYed into PostGIS) -> finish (fan-in: index, checks); see [`vector`];
//! - `export_geoparquet {table, output}`: inspect -> write (a GeoParquet 1.1 file); see
//!   [`geoparquet_export`].
//!
//! Every failure is a categorised [`TaskError`]: unreadable files, missing CRS, bad sizes and GDAL
//! errors are permanent; none panics.

pub mod confine;
pub mod db;
pub mod geoparquet_export;
pub mod inventory;
pub mod raster;
pub mod stac;
pub mod validate_stac;
pub mod vector;
pub mod vsi;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

pub use confine::{Confinement, Use};
use serde_json::{json, Value};
use stageflow_worker::{Handlers, Task, TaskError};
use Use::{OutputDirectory, OutputFile, Raster, Read, Table};

/// The geospatial handlers, to add to a worker's. `database_url` is where the handlers that read or
/// write PostGIS tables connect (the database of the engine). `confinement` is what they may
/// touch: every handler's path and table params are checked against it before it runs (see
/// [`confine`]). GDAL, the `postgres` client and file reads block: those handlers run on tokio's
/// blocking pool; the inventory's listing and reading through object_store are async.
pub fn handlers(base: Handlers, database_url: &str, confinement: Confinement) -> Handlers {
    raster::harden_gdal();
    let url = database_url;
    let c = Arc::new(confinement);
    base.register("geo.extract_metadata", blocking(&c, &[Raster("path")], extract_metadata))
        .register("geo.raster_validate", blocking(&c, &[Raster("source")], raster::validate))
        .register("geo.raster_plan", blocking(&c, &[Raster("source")], raster::plan))
        .register("geo.raster_cog", blocking(&c, &[Raster("source"), OutputDirectory("output")], raster::cog))
        .register("geo.raster_stac", blocking(&c, &[Raster("source"), OutputDirectory("output")], stac::write_catalog))
        .register("geo.inventory_list", confined(&c, &[Read("source")], inventory::list))
        .register(
            "geo.inventory_inspect",
            confined(&c, &[Read("source"), Use::Within("source", "object")], inventory::inspect),
        )
        .register("geo.inventory_catalog", blocking_db(&c, &[], inventory::catalog, url))
        .register("geo.stac_discover", blocking(&c, &[Read("path")], validate_stac::discover))
        .register("geo.stac_validate", blocking(&c, &[Use::MaybeRead("document")], validate_stac::validate))
        .register("geo.stac_report", blocking(&c, &[], validate_stac::report))
        .register("geo.vector_inspect", blocking_db(&c, &[Read("source"), Table("table")], vector::inspect, url))
        .register("geo.vector_load", blocking_db(&c, &[Read("source"), Table("table")], vector::load, url))
        .register("geo.vector_finish", blocking_db(&c, &[Table("table")], vector::finish, url))
        .register(
            "geo.geoparquet_inspect",
            blocking_db(&c, &[Table("table"), OutputFile("output")], geoparquet_export::inspect, url),
        )
        .register(
            "geo.geoparquet_write",
            blocking_db(&c, &[Table("table"), OutputFile("output")], geoparquet_export::write, url),
        )
}

type HandlerFuture = Pin<Box<dyn Future<Output = Result<Value, TaskError>> + Send>>;

/// An async handler run on the task as its confinement checked it.
fn confined<Fut>(
    confinement: &Arc<Confinement>,
    uses: &'static [Use],
    handler: fn(Task) -> Fut,
) -> impl Fn(Task) -> HandlerFuture + Send + Sync + Clone
where
    Fut: Future<Output = Result<Value, TaskError>> + Send + 'static,
{
    let confinement = confinement.clone();
    move |task: Task| -> HandlerFuture {
        let confinement = confinement.clone();
        Box::pin(async move {
            // (the checks touch the file system: off the runtime)
            let checked = off_the_runtime_with(move || confinement.check(task, uses)).await?;
            handler(checked).await
        })
    }
}

/// A blocking handler run on tokio's blocking pool, on the task as its confinement checked it.
fn blocking(
    confinement: &Arc<Confinement>,
    uses: &'static [Use],
    handler: fn(&Task) -> Result<Value, TaskError>,
) -> impl Fn(Task) -> HandlerFuture + Send + Sync + Clone {
    let confinement = confinement.clone();
    move |task: Task| -> HandlerFuture {
        let confinement = confinement.clone();
        Box::pin(off_the_runtime(move || handler(&confinement.check(task, uses)?)))
    }
}

/// As [`blocking`], for a handler that connects to the database at `url`.
fn blocking_db(
    confinement: &Arc<Confinement>,
    uses: &'static [Use],
    handler: fn(&Task, &str) -> Result<Value, TaskError>,
    url: &str,
) -> impl Fn(Task) -> HandlerFuture + Send + Sync + Clone {
    let url: Arc<str> = Arc::from(url);
    let confinement = confinement.clone();
    move |task: Task| -> HandlerFuture {
        let url = url.clone();
        let confinement = confinement.clone();
        Box::pin(off_the_runtime(move || handler(&confinement.check(task, uses)?, &url)))
    }
}

async fn off_the_runtime(work: impl FnOnce() -> Result<Value, TaskError> + Send + 'static) -> Result<Value, TaskError> {
    off_the_runtime_with(work).await
}

async fn off_the_runtime_with<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, TaskError> + Send + 'static,
) -> Result<T, TaskError> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| Err(TaskError::permanent("panic", format!("the handler failed: {e}"))))
}

/// A file-system error as a task error: a full disk is worth a retry (`disk_full`); anything else
/// is a permanent `io` error.
pub(crate) fn io_error(context: &str, e: &std::io::Error) -> TaskError {
    if e.raw_os_error() == Some(28) || e.kind() == std::io::ErrorKind::StorageFull {
        TaskError::retryable("disk_full", format!("{context}: {e}"))
    } else {
        TaskError::permanent("io", format!("{context}: {e}"))
    }
}

fn extract_metadata(task: &Task) -> Result<Value, TaskError> {
    raster::metadata(raster::param_str(task, "path")?)
}

/// What `stageflow geo-install` runs before registering the job types: PostGIS and the schema
/// `stageflow_geo`, where the geospatial job types keep their tables.
pub fn install_sql() -> String {
    ["CREATE EXTENSION IF NOT EXISTS postgis", "CREATE SCHEMA IF NOT EXISTS stageflow_geo", inventory::TABLE_SQL]
        .join(";\n")
}

/// The job types of this crate: (name, definition) for `stageflow.register_job_type`.
pub fn job_types() -> Vec<(&'static str, Value)> {
    vec![
        (
            "extract_metadata",
            json!({
                "description": "Reads a raster's metadata: CRS, bounds, size, bands, nodata, blocks, overviews, compression, COG or not.",
                "parameters": {"type": "object", "required": ["path"], "additionalProperties": false,
                               "properties": {"path": {"type": "string", "minLength": 1}}},
                "retry": {"max_attempts": 2},
                "stages": [{"name": "read", "handler": "geo.extract_metadata", "queue": "geo"}]
            }),
        ),
        (
            "process_raster",
            json!({
                "description": "Cuts a raster into Cloud-Optimized GeoTIFF tiles in parallel and catalogs them in STAC.",
                "parameters": {"type": "object", "required": ["source", "output"], "additionalProperties": false,
                               "properties": {"source": {"type": "string", "minLength": 1},
                                              "output": {"type": "string", "minLength": 1},
                                              "tile_size": {"type": "integer", "minimum": 64, "maximum": 16384, "default": 2048}}},
                "retry": {"max_attempts": 3, "backoff_base_seconds": 1, "backoff_max_seconds": 30},
                "stages": [
                    {"name": "validate", "handler": "geo.raster_validate", "queue": "geo"},
                    {"name": "plan", "handler": "geo.raster_plan", "queue": "geo"},
                    {"name": "cog", "handler": "geo.raster_cog", "queue": "geo", "fan_out": "dynamic"},
                    {"name": "stac", "handler": "geo.raster_stac", "queue": "geo", "fan_out": "fan_in"}
                ]
            }),
        ),
        ("container_inventory", inventory::job_type()),
        ("validate_stac", validate_stac::job_type()),
        ("stage_vector", vector::job_type()),
        ("export_geoparquet", geoparquet_export::job_type()),
    ]
}
