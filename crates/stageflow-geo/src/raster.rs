//! Raster reading and COG writing with GDAL.

use std::ffi::{CStr, CString};

use gdal::spatial_ref::{AxisMappingStrategy, CoordTransform, SpatialRef};
use gdal::{Dataset, Metadata};
use serde_json::{json, Value};
use stageflow_worker::{Task, TaskError};

/// The most pixels a side may have.
const MAX_SIDE: usize = 200_000;

pub fn param_str<'a>(task: &'a Task, name: &str) -> Result<&'a str, TaskError> {
    task.params[name]
        .as_str()
        .ok_or_else(|| TaskError::permanent("bad_params", format!("params.{name} must be a string")))
}

/// The only driver a raster is opened with: GeoTIFF (COGs are GeoTIFFs). A VRT, say, could read
/// any file the worker can as raw bands; other drivers fetch from the network.
const RASTER_DRIVERS: [&str; 1] = ["GTiff"];

/// What GDAL must not do whatever a file says, set once per process: a VRT's raw bands (which
/// read any local file) and pixel functions in Python are off. (Rasters open with the GeoTIFF
/// driver only; this is the second line, for any other code of the process that opens a VRT.)
pub fn harden_gdal() {
    static HARDENED: std::sync::Once = std::sync::Once::new();
    HARDENED.call_once(|| {
        let _ = gdal::config::set_config_option("GDAL_VRT_ENABLE_RAWRASTERBAND", "NO");
        let _ = gdal::config::set_config_option("GDAL_VRT_ENABLE_PYTHON", "NO");
    });
}

fn open(location: &str) -> Result<Dataset, TaskError> {
    let path = crate::vsi::gdal_path(location)?;
    if !crate::vsi::exists(&path) {
        return Err(TaskError::permanent("not_found", format!("{location}: no such file")));
    }
    let options = gdal::DatasetOptions {
        open_flags: gdal::GdalOpenFlags::GDAL_OF_RASTER | gdal::GdalOpenFlags::GDAL_OF_READONLY,
        allowed_drivers: Some(&RASTER_DRIVERS),
        ..Default::default()
    };
    Dataset::open_ex(&path, options)
        .map_err(|e| TaskError::permanent("unreadable", format!("{location} is not a GeoTIFF GDAL can read ({e})")))
}

/// Refuses a raster whose pixels (width x height x bands) exceed `max_pixels`: a small file can
/// declare a huge raster, and a task would read or write all of it.
pub fn check_budget(location: &str, max_pixels: u64) -> Result<(), TaskError> {
    let dataset = open(location)?;
    let (width, height) = dataset.raster_size();
    let pixels = (width as u64).saturating_mul(height as u64).saturating_mul(dataset.raster_count().max(1) as u64);
    if pixels > max_pixels {
        return Err(TaskError::permanent(
            "over_budget",
            format!(
                "{location} is {width}x{height} with {} bands ({pixels} pixels), over this worker's budget of \
                 {max_pixels} pixels (stageflow worker --geo-max-pixels)",
                dataset.raster_count()
            ),
        ));
    }
    Ok(())
}

fn srs_of(dataset: &Dataset, path: &str) -> Result<SpatialRef, TaskError> {
    let srs = dataset
        .spatial_ref()
        .map_err(|_| TaskError::permanent("missing_crs", format!("{path} has no coordinate reference system")))?;
    if srs.to_wkt().map(|w| w.is_empty()).unwrap_or(true) {
        return Err(TaskError::permanent("missing_crs", format!("{path} has no coordinate reference system")));
    }
    Ok(srs)
}

/// [minx, miny, maxx, maxy] of a window of the raster, in its CRS.
fn native_bounds(dataset: &Dataset, xoff: f64, yoff: f64, xsize: f64, ysize: f64) -> Result<[f64; 4], TaskError> {
    let gt = dataset.geo_transform().map_err(|e| TaskError::permanent("not_georeferenced", e.to_string()))?;
    let corners = [(xoff, yoff), (xoff + xsize, yoff), (xoff, yoff + ysize), (xoff + xsize, yoff + ysize)]
        .map(|(px, py)| (gt[0] + px * gt[1] + py * gt[2], gt[3] + px * gt[4] + py * gt[5]));
    let xs = corners.map(|c| c.0);
    let ys = corners.map(|c| c.1);
    Ok([
        xs.iter().cloned().fold(f64::INFINITY, f64::min),
        ys.iter().cloned().fold(f64::INFINITY, f64::min),
        xs.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
        ys.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
    ])
}

/// Bounds in WGS84 longitude/latitude.
pub fn to_wgs84(srs: &SpatialRef, bounds: &[f64; 4]) -> Result<[f64; 4], TaskError> {
    let mut source = srs.clone();
    source.set_axis_mapping_strategy(AxisMappingStrategy::TraditionalGisOrder);
    let mut wgs84 = SpatialRef::from_epsg(4326).map_err(|e| TaskError::permanent("crs", e.to_string()))?;
    wgs84.set_axis_mapping_strategy(AxisMappingStrategy::TraditionalGisOrder);
    let transform = CoordTransform::new(&source, &wgs84).map_err(|e| TaskError::permanent("crs", e.to_string()))?;
    transform.transform_bounds(bounds, 21).map_err(|e| TaskError::permanent("crs", e.to_string()))
}

/// A raster's metadata.
pub fn metadata(path: &str) -> Result<Value, TaskError> {
    let dataset = open(path)?;
    let srs = srs_of(&dataset, path)?;
    let (width, height) = dataset.raster_size();
    let bounds = native_bounds(&dataset, 0.0, 0.0, width as f64, height as f64)?;
    let mut bands = Vec::new();
    for index in 1..=dataset.raster_count() {
        let band = dataset.rasterband(index).map_err(|e| TaskError::permanent("unreadable", e.to_string()))?;
        let (bx, by) = band.block_size();
        bands.push(json!({
            "band": index,
            "data_type": band.band_type().name(),
            "nodata": band.no_data_value(),
            "block_size": [bx, by],
            "overviews": band.overview_count().unwrap_or(0),
        }));
    }
    let layout = dataset.metadata_item("LAYOUT", "IMAGE_STRUCTURE");
    Ok(json!({
        "path": path,
        "driver": dataset.driver().short_name(),
        "crs": {"epsg": srs.auth_code().ok(), "name": srs.name(), "projjson": serde_json::from_str::<Value>(&srs.to_projjson().unwrap_or_default()).ok()},
        "width": width,
        "height": height,
        "bounds": bounds,
        "bounds_wgs84": to_wgs84(&srs, &bounds)?,
        "bands": bands,
        "compression": dataset.metadata_item("COMPRESSION", "IMAGE_STRUCTURE"),
        "is_cog": layout.as_deref() == Some("COG"),
    }))
}

/// Stage 1: the source is readable, georeferenced and of a sane size.
pub fn validate(task: &Task) -> Result<Value, TaskError> {
    let source = param_str(task, "source")?;
    let info = metadata(source)?;
    let (w, h) = (info["width"].as_u64().unwrap_or(0) as usize, info["height"].as_u64().unwrap_or(0) as usize);
    if w == 0 || h == 0 || w > MAX_SIDE || h > MAX_SIDE {
        return Err(TaskError::permanent(
            "bad_size",
            format!("{source} is {w}x{h}: each side must be 1 to {MAX_SIDE} pixels"),
        ));
    }
    Ok(info)
}

/// Stage 2: the tile grid. Each entry becomes a cog task with key `tile_x{col}_y{row}`.
pub fn plan(task: &Task) -> Result<Value, TaskError> {
    let source = param_str(task, "source")?;
    let tile = task.params["tile_size"].as_u64().unwrap_or(2048) as usize;
    let dataset = open(source)?;
    let (width, height) = dataset.raster_size();
    let mut tasks = Vec::new();
    for row in 0..height.div_ceil(tile) {
        for col in 0..width.div_ceil(tile) {
            let (xoff, yoff) = (col * tile, row * tile);
            tasks.push(json!({
                "key": format!("tile_x{col}_y{row}"),
                "params": {"col": col, "row": row, "xoff": xoff, "yoff": yoff,
                           "xsize": tile.min(width - xoff), "ysize": tile.min(height - yoff)},
            }));
        }
    }
    Ok(json!({"tasks": tasks, "width": width, "height": height, "tile_size": tile}))
}

/// `gdal_translate` as a library call (the safe crate has no wrapper for it).
fn translate(source: &Dataset, destination: &str, args: &[String]) -> Result<(), TaskError> {
    let args: Vec<CString> = args.iter().map(|a| CString::new(a.as_str()).expect("no NUL in arguments")).collect();
    let mut argv: Vec<*mut std::ffi::c_char> = args.iter().map(|a| a.as_ptr() as *mut _).collect();
    argv.push(std::ptr::null_mut());
    let destination_c =
        CString::new(destination).map_err(|_| TaskError::permanent("bad_params", "NUL in the output path"))?;
    // SAFETY: argv is a NULL-terminated array of NUL-terminated strings (args) that outlive the call;
    // options is checked for NULL and freed once; the error handler's user data points to
    // `messages`, which lives until after the handler is popped on this thread; the dataset GDAL
    // returns is closed once.
    unsafe {
        let options = gdal_sys::GDALTranslateOptionsNew(argv.as_mut_ptr(), std::ptr::null_mut());
        if options.is_null() {
            return Err(TaskError::permanent(
                "gdal",
                format!("bad translate options: {}", crate::vsi::last_gdal_error()),
            ));
        }
        // Every error GDAL raises on this thread during the call, not only the last: a full disk
        // shows in an early one ("No space left on device"), the last one is often a seek error.
        let mut messages: Vec<String> = Vec::new();
        gdal_sys::CPLPushErrorHandlerEx(Some(collect_gdal_error), (&mut messages as *mut Vec<String>).cast());
        let mut usage_error = 0;
        let written = gdal_sys::GDALTranslate(destination_c.as_ptr(), source.c_dataset(), options, &mut usage_error);
        if !written.is_null() {
            gdal_sys::GDALClose(written);
        }
        gdal_sys::CPLPopErrorHandler();
        gdal_sys::GDALTranslateOptionsFree(options);
        if written.is_null() {
            let error = format!("writing {destination}: {}", messages.join("; "));
            return Err(if messages.iter().any(|m| m.contains("No space left")) {
                TaskError::retryable("disk_full", error)
            } else {
                TaskError::permanent("gdal", error)
            });
        }
    }
    Ok(())
}

/// A GDAL error handler (pushed for one call on one thread) that keeps the messages in the
/// `Vec<String>` given as its user data.
unsafe extern "C" fn collect_gdal_error(
    class: gdal_sys::CPLErr::Type,
    _number: std::ffi::c_int,
    message: *const std::ffi::c_char,
) {
    // SAFETY: GDAL calls this handler on the thread that pushed it, while it is pushed: the user data
    // is the `Vec<String>` translate() pushed with it, or NULL (checked below).
    let messages = unsafe { gdal_sys::CPLGetErrorHandlerUserData() }.cast::<Vec<String>>();
    if class >= gdal_sys::CPLErr::CE_Failure && !messages.is_null() && !message.is_null() {
        // SAFETY: both checked non-NULL above; `messages` is translate()'s live Vec, used by no one else
        // during the call; `message` is GDAL's NUL-terminated message, copied at once.
        unsafe { (*messages).push(CStr::from_ptr(message).to_string_lossy().into_owned()) };
    }
}

/// Stage 3: one tile as a Cloud-Optimized GeoTIFF (DEFLATE with a predictor, internal tiling,
/// overviews, nodata kept), written to `<output>/<key>.tif`; returns its metadata.
pub fn cog(task: &Task) -> Result<Value, TaskError> {
    let source = param_str(task, "source")?;
    let output = crate::vsi::gdal_path(param_str(task, "output")?)?;
    if !output.starts_with("/vsi") {
        std::fs::create_dir_all(&output).map_err(|e| crate::io_error(&output, &e))?;
    }
    let dataset = open(source)?;
    let p = &task.params;
    let window: Vec<String> = ["xoff", "yoff", "xsize", "ysize"]
        .iter()
        .map(|k| {
            p[*k]
                .as_u64()
                .map(|v| v.to_string())
                .ok_or_else(|| TaskError::permanent("bad_params", format!("params.{k} is missing")))
        })
        .collect::<Result<_, _>>()?;
    let predictor = match dataset.rasterband(1).map(|b| b.band_type().name()) {
        Ok(t) if t.starts_with("Float") => "3",
        _ => "2",
    };
    let destination = format!("{output}/{}.tif", task.task_key);
    let mut args = vec!["-srcwin".to_string()];
    args.extend(window);
    for option in [
        "-of",
        "COG",
        "-co",
        "COMPRESS=DEFLATE",
        "-co",
        &format!("PREDICTOR={predictor}"),
        "-co",
        "BLOCKSIZE=256",
        "-co",
        "OVERVIEWS=AUTO",
        "-co",
        "OVERVIEW_RESAMPLING=AVERAGE",
    ] {
        args.push(option.to_string());
    }
    translate(&dataset, &destination, &args)?;
    let mut info = metadata(&destination)?;
    info["key"] = json!(task.task_key);
    info["tile"] = json!({"col": p["col"], "row": p["row"]});
    Ok(info)
}

/// Writes a synthetic `size` x `size` UInt16 GeoTIFF (a gradient with pseudo-random noise, so that it
/// compresses like imagery rather than like a flat field, and a nodata border; UTM zone 33N) for
/// demos and benchmarks that need a large raster.
pub fn generate(path: &str, size: usize) -> Result<(), TaskError> {
    let gdal_error = |e: gdal::errors::GdalError| TaskError::permanent("gdal", e.to_string());
    let driver = gdal::DriverManager::get_driver_by_name("GTiff").map_err(gdal_error)?;
    let options = gdal::raster::RasterCreationOptions::from_iter(["TILED=YES", "COMPRESS=DEFLATE"]);
    let mut dataset =
        driver.create_with_band_type_with_options::<u16, _>(path, size, size, 1, &options).map_err(gdal_error)?;
    dataset.set_geo_transform(&[500_000.0, 10.0, 0.0, 5_000_000.0, 0.0, -10.0]).map_err(gdal_error)?;
    dataset.set_spatial_ref(&SpatialRef::from_epsg(32633).map_err(gdal_error)?).map_err(gdal_error)?;
    let mut band = dataset.rasterband(1).map_err(gdal_error)?;
    band.set_no_data_value(Some(0.0)).map_err(gdal_error)?;
    let rows = 512.min(size);
    for top in (0..size).step_by(rows) {
        let height = rows.min(size - top);
        let data: Vec<u16> = (0..height * size)
            .map(|i| {
                let (y, x) = (top + i / size, i % size);
                let mut h =
                    (x as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (y as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
                h ^= h >> 29;
                if x < 16 || y < 16 || x >= size - 16 || y >= size - 16 {
                    0
                } else {
                    (1 + (x + y) % 4000 + (h % 512) as usize) as u16
                }
            })
            .collect();
        let mut buffer = gdal::raster::Buffer::new((size, height), data);
        band.write((0, top as isize), (size, height), &mut buffer).map_err(gdal_error)?;
    }
    Ok(())
}
