//! Reading the source: the file opened with GDAL, its layer, the layer's CRS and EPSG code, and
//! the features' geometries.

use std::path::Path;

use gdal::spatial_ref::{AxisMappingStrategy, SpatialRef};
use gdal::vector::{Feature, Geometry, Layer, LayerAccess};
use gdal::{Dataset, DatasetOptions, GdalOpenFlags};
use serde_json::Value;
use stageflow_worker::{Task, TaskError};

/// The only drivers a source may be opened with.
const DRIVERS: [&str; 3] = ["GeoJSON", "GPKG", "ESRI Shapefile"];

pub(super) fn open_source(path: &str) -> Result<Dataset, TaskError> {
    if !Path::new(path).exists() {
        return Err(TaskError::permanent("not_found", format!("{path}: no such file")));
    }
    let options = DatasetOptions {
        open_flags: GdalOpenFlags::GDAL_OF_VECTOR | GdalOpenFlags::GDAL_OF_READONLY,
        allowed_drivers: Some(&DRIVERS),
        ..Default::default()
    };
    Dataset::open_ex(path, options).map_err(|e| {
        TaskError::permanent(
            "unsupported_format",
            format!("{path} is not a GeoJSON, GeoPackage or Shapefile that GDAL can read ({e})"),
        )
    })
}

pub(super) fn source_layer<'a>(dataset: &'a Dataset, task: &Task, path: &str) -> Result<Layer<'a>, TaskError> {
    match task.params.get("layer").and_then(Value::as_str) {
        Some(name) => dataset.layer_by_name(name).map_err(|_| {
            let names: Vec<String> = dataset.layers().map(|l| l.name()).collect();
            TaskError::permanent("not_found", format!("{path} has no layer {name:?} (it has {})", names.join(", ")))
        }),
        None if dataset.layer_count() == 0 => {
            Err(TaskError::permanent("unsupported_format", format!("{path} has no vector layer")))
        }
        None => dataset.layer(0).map_err(|e| TaskError::permanent("unreadable", format!("{path}: {e}"))),
    }
}

/// The layer's CRS, if it has a usable one.
pub(super) fn layer_srs(layer: &Layer) -> Option<SpatialRef> {
    layer.spatial_ref().filter(|srs| srs.to_wkt().map(|w| !w.is_empty()).unwrap_or(false))
}

/// The EPSG code of a CRS, directly or as GDAL identifies it.
pub(super) fn epsg_of(srs: &SpatialRef) -> Option<i32> {
    if srs.auth_name().as_deref() == Some("EPSG") {
        if let Ok(code) = srs.auth_code() {
            return Some(code);
        }
    }
    let mut identified = srs.clone();
    if identified.auto_identify_epsg().is_ok() && identified.auth_name().as_deref() == Some("EPSG") {
        return identified.auth_code().ok();
    }
    None
}

/// The CRS with GIS's traditional axis order: x before y, longitude before latitude.
pub(super) fn traditional(mut srs: SpatialRef) -> SpatialRef {
    srs.set_axis_mapping_strategy(AxisMappingStrategy::TraditionalGisOrder);
    srs
}

/// The feature's geometry, unless it has none.
pub(super) fn geometry_of<'a>(feature: &'a Feature) -> Option<&'a Geometry> {
    // SAFETY: feature.c_feature() is the live feature `feature` borrows; only the returned pointer's
    // nullness is read.
    if unsafe { gdal_sys::OGR_F_GetGeometryRef(feature.c_feature()) }.is_null() {
        return None;
    }
    feature.geometry().filter(|g| g.has_gdal_ptr())
}
