//! `stage_vector {source, table, srid?, layer?, chunk_size?}`: a GeoJSON, GeoPackage or Shapefile
//! into a PostGIS table, in chunks loaded in parallel.
//!
//! - `inspect` (one task) opens the file with GDAL, maps the layer's fields to PostgreSQL types,
//!   finds the geometry type (promoted to Multi* when the layer mixes single and multi parts) and
//!   the source EPSG code, creates the table (or reuses one of exactly the same definition) and
//!   plans chunks `chunk_<n>` of `{start, count}` features;
//! - `load` (dynamic: one task per chunk) reads its features, reprojects them when asked, and in
//!   one transaction deletes the chunk's `fid` range and binary-COPYs its rows (geometries as
//!   EWKB), so a chunk run twice leaves its rows once; it counts invalid, null and empty geometries
//!   in that same transaction;
//! - `finish` (fan-in) builds the GiST index, analyzes, checks that the table has as many rows as
//!   features were read and reports the table.
//!
//! `fid` is a feature's position in the layer's reading order, from 1: the chunks' ranges are
//! exact whatever the source's own feature ids are.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::error::Error;
use std::path::Path;
use std::time::Instant;

use bytes::{BufMut, BytesMut};
use chrono::{DateTime, NaiveDate, Utc};
use gdal::spatial_ref::{AxisMappingStrategy, CoordTransform, SpatialRef};
use gdal::vector::{Feature, Geometry, Layer, LayerAccess};
use gdal::{Dataset, DatasetOptions, GdalOpenFlags};
use gdal_sys::{OGRFieldSubType, OGRFieldType};
use postgres::binary_copy::BinaryCopyInWriter;
use postgres::types::{to_sql_checked, IsNull, ToSql, Type};
use postgres::Client;
use serde_json::{json, Value};
use stageflow_worker::{Task, TaskError};

use crate::db::{connect, db_error, plain_identifier, quote_ident, TableName, DEFAULT_SCHEMA, TABLE_PATTERN};
use crate::raster::param_str;

pub const DEFAULT_CHUNK_SIZE: u64 = 2000;
pub const MIN_CHUNK_SIZE: u64 = 10;
pub const MAX_CHUNK_SIZE: u64 = 100_000;
/// Invalid geometries reported by fid and reason, per chunk and in the job's result.
const INVALID_EXAMPLES: usize = 5;
/// The only drivers a source may be opened with.
const DRIVERS: [&str; 3] = ["GeoJSON", "GPKG", "ESRI Shapefile"];

/// The job type definition.
pub fn job_type() -> Value {
    json!({
        "description": "Loads a GeoJSON, GeoPackage or Shapefile layer into a PostGIS table in parallel chunks, reprojected on request, with invalid geometries reported.",
        "parameters": {"type": "object", "required": ["source", "table"], "additionalProperties": false,
                       "properties": {"source": {"type": "string", "minLength": 1},
                                      "table": {"type": "string", "pattern": TABLE_PATTERN, "maxLength": 127},
                                      "srid": {"type": "integer", "minimum": 1, "maximum": 998999},
                                      "layer": {"type": "string", "minLength": 1},
                                      "chunk_size": {"type": "integer", "minimum": MIN_CHUNK_SIZE, "maximum": MAX_CHUNK_SIZE, "default": DEFAULT_CHUNK_SIZE}}},
        "retry": {"max_attempts": 3, "backoff_base_seconds": 1, "backoff_max_seconds": 30},
        "stages": [
            {"name": "inspect", "handler": "geo.vector_inspect", "queue": "geo"},
            {"name": "load", "handler": "geo.vector_load", "queue": "geo", "fan_out": "dynamic"},
            {"name": "finish", "handler": "geo.vector_finish", "queue": "geo", "fan_out": "fan_in"}
        ]
    })
}

pub(crate) fn param_u64(task: &Task, name: &str) -> Result<u64, TaskError> {
    task.params[name]
        .as_u64()
        .ok_or_else(|| TaskError::permanent("bad_params", format!("params.{name} must be a non-negative integer")))
}

// ---------------------------------------------------------------------------------------------
// Reading the source.

fn open_source(path: &str) -> Result<Dataset, TaskError> {
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

fn source_layer<'a>(dataset: &'a Dataset, task: &Task, path: &str) -> Result<Layer<'a>, TaskError> {
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
fn layer_srs(layer: &Layer) -> Option<SpatialRef> {
    layer.spatial_ref().filter(|srs| srs.to_wkt().map(|w| !w.is_empty()).unwrap_or(false))
}

/// The EPSG code of a CRS, directly or as GDAL identifies it.
fn epsg_of(srs: &SpatialRef) -> Option<i32> {
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

fn traditional(mut srs: SpatialRef) -> SpatialRef {
    srs.set_axis_mapping_strategy(AxisMappingStrategy::TraditionalGisOrder);
    srs
}

/// An attribute column: the source field's index and name, the column's name and type.
#[derive(Debug, Clone, PartialEq)]
struct Column {
    index: usize,
    source: String,
    name: String,
    pg_type: String,
}

impl Column {
    fn to_json(&self) -> Value {
        json!({"index": self.index, "source": self.source, "name": self.name, "type": self.pg_type})
    }

    fn from_json(value: &Value) -> Result<Column, TaskError> {
        let bad = || TaskError::permanent("bad_params", format!("a malformed column in the plan: {value}"));
        Ok(Column {
            index: value["index"].as_u64().ok_or_else(bad)? as usize,
            source: value["source"].as_str().ok_or_else(bad)?.to_owned(),
            name: value["name"].as_str().filter(|n| plain_identifier(n)).ok_or_else(bad)?.to_owned(),
            pg_type: value["type"].as_str().filter(|t| PG_TYPES.contains(t)).ok_or_else(bad)?.to_owned(),
        })
    }
}

const PG_TYPES: [&str; 8] =
    ["integer", "bigint", "double precision", "numeric", "text", "date", "timestamp with time zone", "boolean"];

/// The PostgreSQL type of an OGR field. Reals with a declared width (Shapefile's decimals) become
/// `numeric` without a precision, so that values wider than the declaration (Natural Earth's
/// `pop_est`) still fit; other reals are `double precision`.
fn pg_type(field_type: OGRFieldType::Type, subtype: OGRFieldSubType::Type, width: i32) -> &'static str {
    match field_type {
        OGRFieldType::OFTInteger if subtype == OGRFieldSubType::OFSTBoolean => "boolean",
        OGRFieldType::OFTInteger => "integer",
        OGRFieldType::OFTInteger64 => "bigint",
        OGRFieldType::OFTReal if width > 0 => "numeric",
        OGRFieldType::OFTReal => "double precision",
        OGRFieldType::OFTDate => "date",
        OGRFieldType::OFTDateTime => "timestamp with time zone",
        _ => "text",
    }
}

/// A field name as a plain lowercase identifier.
fn launder(name: &str) -> String {
    let mut out: String = name
        .to_lowercase()
        .chars()
        .map(|c| if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' { c } else { '_' })
        .collect();
    if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out.truncate(58);
    out
}

fn columns_of(layer: &Layer) -> Vec<Column> {
    let mut used: HashSet<String> = ["fid".to_owned(), "geom".to_owned()].into();
    // SAFETY: layer.c_layer() is the live layer `layer` borrows; the definition it returns belongs
    // to the layer and is only read while `layer` is borrowed here.
    let defn = unsafe { gdal_sys::OGR_L_GetLayerDefn(layer.c_layer()) };
    let mut columns = Vec::new();
    for (index, field) in layer.defn().fields().enumerate() {
        // SAFETY: `index` comes from enumerating this layer's fields, so it is a valid field index of
        // `defn`, which the borrowed layer keeps alive.
        let subtype = unsafe { gdal_sys::OGR_Fld_GetSubType(gdal_sys::OGR_FD_GetFieldDefn(defn, index as i32)) };
        let base = launder(&field.name());
        let mut name = base.clone();
        let mut n = 2;
        while used.contains(&name) {
            name = format!("{base}_{n}");
            n += 1;
        }
        used.insert(name.clone());
        columns.push(Column {
            index,
            source: field.name(),
            name,
            pg_type: pg_type(field.field_type(), subtype, field.width()).to_owned(),
        });
    }
    columns
}

const GEOMETRY_NAMES: [&str; 8] = [
    "Geometry",
    "Point",
    "LineString",
    "Polygon",
    "MultiPoint",
    "MultiLineString",
    "MultiPolygon",
    "GeometryCollection",
];

/// The column's geometry type for the flat OGR types seen (`declared` when no feature has a
/// geometry) and whether single parts must be promoted to multi.
fn column_geometry_type(seen: &BTreeSet<u32>, declared: u32) -> (&'static str, bool) {
    let name = |t: u32| GEOMETRY_NAMES.get(t as usize).copied().unwrap_or("Geometry");
    match seen.len() {
        0 => (name(declared), false),
        1 => (name(*seen.iter().next().unwrap_or(&0)), false),
        2 => {
            let (a, b) = (*seen.iter().next().unwrap_or(&0), *seen.iter().nth(1).unwrap_or(&0));
            if (1..=3).contains(&a) && b == a + 3 {
                (name(b), true)
            } else {
                ("Geometry", false)
            }
        }
        _ => ("Geometry", false),
    }
}

/// The WKB of a geometry as PostGIS's EWKB with `srid`: Z kept or dropped, M dropped, a single part
/// wrapped into a one-part multi when `promote`.
fn ewkb(geometry: &Geometry, srid: i32, keep_z: bool, promote: bool) -> Result<Vec<u8>, TaskError> {
    let geometry = geometry.clone();
    // SAFETY: `geometry` is an owned clone; these calls only change that clone, which stays alive
    // for the whole block.
    unsafe {
        gdal_sys::OGR_G_SetMeasured(geometry.c_geometry(), 0);
        if !keep_z {
            gdal_sys::OGR_G_Set3D(geometry.c_geometry(), 0);
        }
    }
    let wkb =
        geometry.iso_wkb().map_err(|e| TaskError::permanent("unreadable", format!("a geometry has no WKB: {e}")))?;
    if wkb.len() < 5 {
        return Err(TaskError::permanent("unreadable", "a geometry's WKB is truncated"));
    }
    let little = wkb[0] == 1;
    let raw = [wkb[1], wkb[2], wkb[3], wkb[4]];
    let iso_type = if little { u32::from_le_bytes(raw) } else { u32::from_be_bytes(raw) };
    let (flat, dims) = (iso_type % 1000, iso_type / 1000);
    let z_flag = if dims == 1 || dims == 3 { 0x8000_0000u32 } else { 0 };
    let mut out = Vec::with_capacity(wkb.len() + 13);
    if promote && (1..=3).contains(&flat) {
        // A one-part multi (little-endian header, one part), the part's own WKB after it.
        out.push(1);
        out.extend_from_slice(&((flat + 3) | z_flag | 0x2000_0000).to_le_bytes());
        out.extend_from_slice(&srid.to_le_bytes());
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&wkb);
    } else {
        // The same geometry with EWKB's type flags and the SRID, in the WKB's own byte order.
        let ewkb_type = flat | z_flag | 0x2000_0000;
        out.push(wkb[0]);
        out.extend_from_slice(&if little { ewkb_type.to_le_bytes() } else { ewkb_type.to_be_bytes() });
        out.extend_from_slice(&if little { srid.to_le_bytes() } else { srid.to_be_bytes() });
        out.extend_from_slice(&wkb[5..]);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Values for the binary COPY.

/// One value of a row for `COPY ... (FORMAT binary)`.
#[derive(Debug)]
enum Cell {
    Null,
    Int(i32),
    Big(i64),
    Float(f64),
    /// A `numeric`, from a double (what OGR gives for Shapefile decimals).
    Numeric(f64),
    Text(String),
    Date(NaiveDate),
    Timestamp(DateTime<Utc>),
    Bool(bool),
    /// EWKB with an SRID, for a `geometry` column.
    Geometry(Vec<u8>),
}

impl ToSql for Cell {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        match self {
            Cell::Null => Ok(IsNull::Yes),
            Cell::Int(v) => v.to_sql_checked(ty, out),
            Cell::Big(v) => v.to_sql_checked(ty, out),
            Cell::Float(v) => v.to_sql_checked(ty, out),
            Cell::Text(v) => v.to_sql_checked(ty, out),
            Cell::Date(v) => v.to_sql_checked(ty, out),
            Cell::Timestamp(v) => v.to_sql_checked(ty, out),
            Cell::Bool(v) => v.to_sql_checked(ty, out),
            Cell::Numeric(v) if *ty == Type::NUMERIC => {
                encode_numeric(*v, out);
                Ok(IsNull::No)
            }
            Cell::Geometry(bytes) if ty.name() == "geometry" => {
                out.put_slice(bytes);
                Ok(IsNull::No)
            }
            other => Err(format!("cannot write {other:?} into a column of type {ty}").into()),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

/// PostgreSQL's binary `numeric`: digit count, weight, sign, display scale, base-10000 digits.
pub(crate) fn encode_numeric(value: f64, out: &mut BytesMut) {
    const NAN: u16 = 0xC000;
    const PINF: u16 = 0xD000;
    const NINF: u16 = 0xF000;
    let special = if value.is_nan() {
        Some(NAN)
    } else if value.is_infinite() {
        Some(if value > 0.0 { PINF } else { NINF })
    } else {
        None
    };
    if let Some(sign) = special {
        out.put_i16(0);
        out.put_i16(0);
        out.put_u16(sign);
        out.put_u16(0);
        return;
    }
    // Rust prints a finite double as the shortest decimal that reads back the same, never with an
    // exponent.
    let text = format!("{}", value.abs());
    let (int_part, frac_part) = text.split_once('.').unwrap_or((&text, ""));
    let int_part = int_part.trim_start_matches('0');
    let dscale = frac_part.len() as u16;
    let int_padded = format!("{}{int_part}", "0".repeat((4 - int_part.len() % 4) % 4));
    let frac_padded = format!("{frac_part}{}", "0".repeat((4 - frac_part.len() % 4) % 4));
    let mut digits: Vec<i16> = int_padded
        .as_bytes()
        .chunks(4)
        .chain(frac_padded.as_bytes().chunks(4))
        .map(|chunk| chunk.iter().fold(0i16, |acc, d| acc * 10 + (d - b'0') as i16))
        .collect();
    let mut weight = (int_padded.len() / 4) as i16 - 1;
    while digits.first() == Some(&0) {
        digits.remove(0);
        weight -= 1;
    }
    while digits.last() == Some(&0) {
        digits.pop();
    }
    if digits.is_empty() {
        weight = 0;
    }
    out.put_i16(digits.len() as i16);
    out.put_i16(weight);
    out.put_u16(if value < 0.0 && !digits.is_empty() { 0x4000 } else { 0 });
    out.put_u16(dscale);
    for d in digits {
        out.put_i16(d);
    }
}

fn read_cell(feature: &Feature, column: &Column) -> Result<Cell, TaskError> {
    let unreadable =
        |e: gdal::errors::GdalError| TaskError::permanent("unreadable", format!("field {:?}: {e}", column.source));
    let i = column.index;
    Ok(match column.pg_type.as_str() {
        "integer" => feature.field_as_integer(i).map_err(unreadable)?.map_or(Cell::Null, Cell::Int),
        "boolean" => feature.field_as_integer(i).map_err(unreadable)?.map_or(Cell::Null, |v| Cell::Bool(v != 0)),
        "bigint" => feature.field_as_integer64(i).map_err(unreadable)?.map_or(Cell::Null, Cell::Big),
        "double precision" => feature.field_as_double(i).map_err(unreadable)?.map_or(Cell::Null, Cell::Float),
        "numeric" => feature.field_as_double(i).map_err(unreadable)?.map_or(Cell::Null, Cell::Numeric),
        "date" => feature.field_as_datetime(i).map_err(unreadable)?.map_or(Cell::Null, |d| Cell::Date(d.date_naive())),
        "timestamp with time zone" => feature
            .field_as_datetime(i)
            .map_err(unreadable)?
            .map_or(Cell::Null, |d| Cell::Timestamp(d.with_timezone(&Utc))),
        _ => feature.field_as_string(i).map_err(unreadable)?.map_or(Cell::Null, Cell::Text),
    })
}

/// The feature's geometry, unless it has none.
fn geometry_of<'a>(feature: &'a Feature) -> Option<&'a Geometry> {
    // SAFETY: feature.c_feature() is the live feature `feature` borrows; only the returned pointer's
    // nullness is read.
    if unsafe { gdal_sys::OGR_F_GetGeometryRef(feature.c_feature()) }.is_null() {
        return None;
    }
    feature.geometry().filter(|g| g.has_gdal_ptr())
}

// ---------------------------------------------------------------------------------------------
// Stage 1: inspect.

/// Stage 1: reads the layer's schema, geometry types, CRS and feature count, creates (or reuses)
/// the table and plans the chunks.
pub fn inspect(task: &Task, url: &str) -> Result<Value, TaskError> {
    let started = Instant::now();
    let source = param_str(task, "source")?;
    let table = TableName::parse(param_str(task, "table")?)?;
    let chunk_size = match task.params.get("chunk_size") {
        None | Some(Value::Null) => DEFAULT_CHUNK_SIZE,
        Some(_) => param_u64(task, "chunk_size")?,
    };
    if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
        return Err(TaskError::permanent(
            "bad_params",
            format!("chunk_size must be {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE}"),
        ));
    }
    let requested_srid = match task.params.get("srid") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_i64()
                .filter(|s| (1..=998_999).contains(s))
                .ok_or_else(|| TaskError::permanent("bad_params", "srid must be an integer from 1 to 998999"))?
                as i32,
        ),
    };

    let dataset = open_source(source)?;
    let mut layer = source_layer(&dataset, task, source)?;
    if layer.defn().geom_fields().count() == 0 {
        return Err(TaskError::permanent(
            "unsupported_format",
            format!("layer {} of {source} has no geometry", layer.name()),
        ));
    }
    let columns = columns_of(&layer);

    // The CRS: the layer's EPSG code, reprojected to srid when they differ.
    let source_srs = layer_srs(&layer);
    let source_epsg = source_srs.as_ref().and_then(epsg_of);
    let (target_srid, reproject) = match (&source_srs, source_epsg, requested_srid) {
        (None, _, None) => {
            return Err(TaskError::permanent(
                "missing_crs",
                format!("{source} has no coordinate reference system: give srid"),
            ))
        }
        (Some(_), None, None) => {
            return Err(TaskError::permanent(
                "missing_crs",
                format!("{source}'s coordinate reference system has no EPSG code: give srid to reproject to one"),
            ))
        }
        (None, _, Some(srid)) => (srid, false),
        (Some(_), Some(epsg), None) => (epsg, false),
        (Some(_), Some(epsg), Some(srid)) => (srid, epsg != srid),
        (Some(_), None, Some(srid)) => (srid, true),
    };
    let target_srs = SpatialRef::from_epsg(target_srid as u32)
        .map_err(|e| TaskError::permanent("bad_params", format!("EPSG:{target_srid} is not a CRS GDAL knows: {e}")))?;
    if reproject {
        let from = traditional(
            source_srs.clone().ok_or_else(|| TaskError::permanent("missing_crs", "reprojecting needs a source CRS"))?,
        );
        CoordTransform::new(&from, &traditional(target_srs))
            .map_err(|e| TaskError::permanent("bad_params", format!("cannot reproject to EPSG:{target_srid}: {e}")))?;
    }

    // Every feature once: the count and the geometry types.
    // SAFETY: OGR_GT_Flatten is a pure function of a geometry type value: no pointers.
    let declared = unsafe { gdal_sys::OGR_GT_Flatten(layer.defn().geometry_type()) };
    let mut seen = BTreeSet::new();
    let (mut features, mut with_z, mut with_geometry) = (0u64, 0u64, 0u64);
    layer.reset_feature_reading();
    for feature in layer.features() {
        features += 1;
        if let Some(geometry) = geometry_of(&feature) {
            let t = geometry.geometry_type();
            // SAFETY: a pure function of a geometry type value: no pointers.
            seen.insert(unsafe { gdal_sys::OGR_GT_Flatten(t) });
            with_geometry += 1;
            // SAFETY: a pure function of a geometry type value: no pointers.
            if unsafe { gdal_sys::OGR_GT_HasZ(t) } != 0 {
                with_z += 1;
            }
        }
    }
    let (geometry_type, promote) = column_geometry_type(&seen, declared);
    let keep_z = with_geometry > 0 && with_z == with_geometry;
    let column_type = format!("geometry({geometry_type}{},{target_srid})", if keep_z { "Z" } else { "" });

    // The table: created, or reused when its definition is exactly this one. A reused table is
    // reloaded: the chunks replace rows 1..=features, and rows past them (an earlier, longer
    // source) go now, so the table ends up holding this source and nothing else.
    let mut client = connect(url)?;
    let created = create_table(&mut client, &table, &columns, &column_type, target_srid)?;
    if !created {
        let beyond =
            i64::try_from(features).map_err(|_| TaskError::permanent("bad_size", format!("{features} features")))?;
        client
            .execute(&format!("DELETE FROM {} WHERE fid > $1", table.quoted()), &[&beyond])
            .map_err(|e| db_error("emptying the rows past this source", e))?;
    }

    let tasks: Vec<Value> = (0..features.div_ceil(chunk_size))
        .map(|n| {
            let start = n * chunk_size;
            json!({
                "key": format!("chunk_{n}"),
                "params": {
                    "start": start,
                    "count": chunk_size.min(features - start),
                    "layer_name": layer.name(),
                    "columns": columns.iter().map(Column::to_json).collect::<Vec<_>>(),
                    "geometry_type": geometry_type,
                    "has_z": keep_z,
                    "promote_to_multi": promote,
                    "target_srid": target_srid,
                    "reproject": reproject,
                },
            })
        })
        .collect();
    Ok(json!({
        "tasks": tasks,
        "table": table.display(),
        "created": created,
        "driver": dataset.driver().short_name(),
        "layer": layer.name(),
        "features": features,
        "columns": columns.iter().map(Column::to_json).collect::<Vec<_>>(),
        "geometry_column": column_type,
        "source_epsg": source_epsg,
        "srid": target_srid,
        "reprojected": reproject,
        "seconds": started.elapsed().as_secs_f64(),
    }))
}

/// Creates the table, or checks that the existing one has exactly this definition. Returns whether
/// it was created.
fn create_table(
    client: &mut Client,
    table: &TableName,
    columns: &[Column],
    column_type: &str,
    srid: i32,
) -> Result<bool, TaskError> {
    let db = |context: &str| {
        let context = context.to_owned();
        move |e: postgres::Error| db_error(&context, e)
    };
    let postgis: Option<String> =
        client.query_one("SELECT to_regtype('geometry')::text", &[]).map_err(db("checking for PostGIS"))?.get(0);
    if postgis.is_none() {
        return Err(TaskError::permanent(
            "database",
            "PostGIS is not installed in this database: run `stageflow geo-install`",
        ));
    }
    let known: bool = client
        .query_one("SELECT EXISTS (SELECT FROM spatial_ref_sys WHERE srid = $1)", &[&srid])
        .map_err(db("reading spatial_ref_sys"))?
        .get(0);
    if !known {
        return Err(TaskError::permanent("bad_params", format!("PostGIS does not know SRID {srid}")));
    }
    if table.schema == DEFAULT_SCHEMA {
        client
            .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {}", quote_ident(DEFAULT_SCHEMA)))
            .map_err(db("creating the schema"))?;
    }
    let schema_exists: bool = client
        .query_one("SELECT EXISTS (SELECT FROM pg_namespace WHERE nspname = $1)", &[&table.schema])
        .map_err(db("reading pg_namespace"))?
        .get(0);
    if !schema_exists {
        return Err(TaskError::permanent("not_found", format!("schema {} does not exist", table.schema)));
    }

    let mut expected = vec![("fid".to_owned(), "bigint".to_owned())];
    expected.extend(columns.iter().map(|c| (c.name.clone(), c.pg_type.clone())));
    expected.push(("geom".to_owned(), column_type.to_owned()));
    let definition: Vec<String> =
        expected
            .iter()
            .map(|(name, ty)| {
                if name == "fid" {
                    "fid bigint PRIMARY KEY".to_owned()
                } else {
                    format!("{} {ty}", quote_ident(name))
                }
            })
            .collect();
    let existed = current_columns(client, table)?.is_some();
    client
        .batch_execute(&format!("CREATE TABLE IF NOT EXISTS {} ({})", table.quoted(), definition.join(", ")))
        .map_err(db("creating the table"))?;
    let actual = current_columns(client, table)?.unwrap_or_default();
    if actual != expected {
        let show =
            |cols: &[(String, String)]| cols.iter().map(|(n, t)| format!("{n} {t}")).collect::<Vec<_>>().join(", ");
        return Err(TaskError::permanent(
            "table_exists",
            format!(
                "{} exists with another definition ({}) than this source needs ({})",
                table.display(),
                show(&actual),
                show(&expected)
            ),
        ));
    }
    Ok(!existed)
}

/// The table's columns and types in order, or None when it does not exist.
fn current_columns(client: &mut Client, table: &TableName) -> Result<Option<Vec<(String, String)>>, TaskError> {
    let rows = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a \
             JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            &[&table.schema, &table.name],
        )
        .map_err(|e| db_error("reading the table's columns", e))?;
    if rows.is_empty() {
        let exists: bool = client
            .query_one(
                "SELECT EXISTS (SELECT FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2)",
                &[&table.schema, &table.name],
            )
            .map_err(|e| db_error("reading pg_class", e))?
            .get(0);
        return Ok(exists.then(Vec::new));
    }
    Ok(Some(rows.iter().map(|r| (r.get(0), r.get(1))).collect()))
}

// ---------------------------------------------------------------------------------------------
// Stage 2: load one chunk.

/// Stage 2: one chunk of features, replaced in one transaction.
pub fn load(task: &Task, url: &str) -> Result<Value, TaskError> {
    let started = Instant::now();
    let source = param_str(task, "source")?;
    let table = TableName::parse(param_str(task, "table")?)?;
    let start = param_u64(task, "start")?;
    let count = param_u64(task, "count")?;
    // Untrusted: bounded before they size a buffer or are added and cast to i64.
    if count > MAX_CHUNK_SIZE || start > i64::MAX as u64 - MAX_CHUNK_SIZE {
        return Err(TaskError::permanent(
            "bad_params",
            format!("a chunk of {count} features from {start} is out of range"),
        ));
    }
    let srid =
        task.params["target_srid"].as_i64().and_then(|s| i32::try_from(s).ok()).filter(|s| *s > 0).ok_or_else(
            || TaskError::permanent("bad_params", "params.target_srid must be a positive 32-bit integer"),
        )?;
    let columns = task.params["columns"]
        .as_array()
        .ok_or_else(|| TaskError::permanent("bad_params", "params.columns must be an array"))?
        .iter()
        .map(Column::from_json)
        .collect::<Result<Vec<_>, _>>()?;
    let keep_z = task.params["has_z"].as_bool().unwrap_or(false);
    let promote = task.params["promote_to_multi"].as_bool().unwrap_or(false);
    let reproject = task.params["reproject"].as_bool().unwrap_or(false);

    let dataset = open_source(source)?;
    let mut layer = match task.params["layer_name"].as_str() {
        Some(name) => dataset
            .layer_by_name(name)
            .map_err(|_| TaskError::permanent("not_found", format!("{source} has no layer {name:?}")))?,
        None => source_layer(&dataset, task, source)?,
    };
    let transform = if reproject {
        let from = layer_srs(&layer).ok_or_else(|| {
            TaskError::permanent("missing_crs", format!("{source} has no coordinate reference system"))
        })?;
        let to = SpatialRef::from_epsg(srid as u32).map_err(|e| TaskError::permanent("bad_params", e.to_string()))?;
        Some(
            CoordTransform::new(&traditional(from), &traditional(to))
                .map_err(|e| TaskError::permanent("bad_params", format!("cannot reproject to EPSG:{srid}: {e}")))?,
        )
    } else {
        None
    };

    // Read the chunk.
    layer.reset_feature_reading();
    // SAFETY: layer.c_layer() is the live layer `layer` borrows; an index past its end is reported
    // as an error (checked below), not undefined behaviour.
    let err = unsafe { gdal_sys::OGR_L_SetNextByIndex(layer.c_layer(), start as i64) };
    if err != gdal_sys::OGRErr::OGRERR_NONE {
        return Err(TaskError::permanent("unreadable", format!("{source}: cannot seek to feature {start}")));
    }
    let mut rows: Vec<Vec<Cell>> = Vec::with_capacity(count as usize);
    for (i, feature) in layer.features().take(count as usize).enumerate() {
        let mut row = Vec::with_capacity(columns.len() + 2);
        row.push(Cell::Big((start + i as u64 + 1) as i64));
        for column in &columns {
            row.push(read_cell(&feature, column)?);
        }
        row.push(match geometry_of(&feature) {
            None => Cell::Null,
            Some(geometry) => match &transform {
                None => Cell::Geometry(ewkb(geometry, srid, keep_z, promote)?),
                Some(transform) => {
                    let projected = geometry.transform(transform).map_err(|e| {
                        TaskError::permanent(
                            "reprojection",
                            format!("feature {}: cannot reproject to EPSG:{srid}: {e}", start + i as u64 + 1),
                        )
                    })?;
                    Cell::Geometry(ewkb(&projected, srid, keep_z, promote)?)
                }
            },
        });
        rows.push(row);
    }
    if rows.len() as u64 != count {
        return Err(TaskError::permanent(
            "unreadable",
            format!(
                "{source} has {} features from {start} where {count} were planned: did the file change?",
                rows.len()
            ),
        ));
    }
    let read_seconds = started.elapsed().as_secs_f64();

    // Replace the chunk's rows in one transaction.
    let (first, last) = (start as i64 + 1, (start + count) as i64);
    let mut client = connect(url)?;
    let mut tx = client.transaction().map_err(|e| db_error("beginning", e))?;
    let column_list = std::iter::once("fid".to_owned())
        .chain(columns.iter().map(|c| quote_ident(&c.name)))
        .chain(std::iter::once("geom".to_owned()))
        .collect::<Vec<_>>()
        .join(", ");
    let types: Vec<Type> = tx
        .prepare(&format!("SELECT {column_list} FROM {} LIMIT 0", table.quoted()))
        .map_err(|e| db_error("reading the table's types", e))?
        .columns()
        .iter()
        .map(|c| c.type_().clone())
        .collect();
    let deleted = tx
        .execute(&format!("DELETE FROM {} WHERE fid BETWEEN $1 AND $2", table.quoted()), &[&first, &last])
        .map_err(|e| db_error("deleting the chunk's earlier rows", e))?;
    let copy = tx
        .copy_in(&format!("COPY {} ({column_list}) FROM STDIN (FORMAT binary)", table.quoted()))
        .map_err(|e| db_error("starting COPY", e))?;
    let mut writer = BinaryCopyInWriter::new(copy, &types);
    for row in &rows {
        let values: Vec<&(dyn ToSql + Sync)> = row.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
        writer.write(&values).map_err(|e| db_error("COPY", e))?;
    }
    let copied = writer.finish().map_err(|e| db_error("COPY", e))?;
    let stats = tx
        .query_one(
            &format!(
                "SELECT count(*) FILTER (WHERE geom IS NULL), count(*) FILTER (WHERE ST_IsEmpty(geom)), \
                 count(*) FILTER (WHERE NOT ST_IsValid(geom)) FROM {} WHERE fid BETWEEN $1 AND $2",
                table.quoted()
            ),
            &[&first, &last],
        )
        .map_err(|e| db_error("checking the geometries", e))?;
    let (nulls, empties, invalid): (i64, i64, i64) = (stats.get(0), stats.get(1), stats.get(2));
    let examples: Vec<Value> = tx
        .query(
            &format!(
                "SELECT fid, ST_IsValidReason(geom) FROM {} WHERE fid BETWEEN $1 AND $2 AND NOT ST_IsValid(geom) ORDER BY fid LIMIT {INVALID_EXAMPLES}",
                table.quoted()
            ),
            &[&first, &last],
        )
        .map_err(|e| db_error("describing invalid geometries", e))?
        .iter()
        .map(|r| json!({"fid": r.get::<_, i64>(0), "reason": r.get::<_, String>(1)}))
        .collect();
    tx.commit().map_err(|e| db_error("committing", e))?;
    Ok(json!({
        "table": table.display(),
        "start": start,
        "features": rows.len(),
        "rows": copied,
        "replaced": deleted,
        "null_geometries": nulls,
        "empty_geometries": empties,
        "invalid_geometries": invalid,
        "invalid_examples": examples,
        "srid": srid,
        "reprojected": reproject,
        "read_seconds": read_seconds,
        "seconds": started.elapsed().as_secs_f64(),
    }))
}

// ---------------------------------------------------------------------------------------------
// Stage 3: finish.

/// Stage 3: the spatial index, statistics, the row count check and the table's report.
pub fn finish(task: &Task, url: &str) -> Result<Value, TaskError> {
    let started = Instant::now();
    let table = TableName::parse(param_str(task, "table")?)?;
    let empty = Vec::new();
    let inputs = match &task.inputs {
        Some(Value::Array(inputs)) => inputs,
        Some(Value::Null) | None => &empty,
        Some(other) => return Err(TaskError::permanent("bad_params", format!("inputs must be an array, not {other}"))),
    };
    let sum = |key: &str| inputs.iter().map(|r| r[key].as_i64().unwrap_or(0)).sum::<i64>();
    let features = sum("features");
    let mut examples: BTreeMap<i64, Value> = BTreeMap::new();
    for input in inputs {
        for example in input["invalid_examples"].as_array().into_iter().flatten() {
            if let Some(fid) = example["fid"].as_i64() {
                examples.insert(fid, example.clone());
            }
        }
    }

    let mut client = connect(url)?;
    // `<table>_geom_gist`, or for a name too long for that (63 bytes at most) its first 40
    // characters and a hash of the whole name, so that two long names never share an index name.
    let index = if table.name.len() <= 53 {
        format!("{}_geom_gist", table.name)
    } else {
        use sha2::Digest;
        format!("{}_{}_geom_gist", &table.name[..40], &hex::encode(sha2::Sha256::digest(table.name.as_bytes()))[..8])
    };
    let index = quote_ident(&index);
    client
        .batch_execute(&format!(
            "CREATE INDEX IF NOT EXISTS {index} ON {} USING gist (geom); ANALYZE {}",
            table.quoted(),
            table.quoted()
        ))
        .map_err(|e| db_error("indexing", e))?;
    let row = client
        .query_one(
            &format!(
                "SELECT n, ST_XMin(e), ST_YMin(e), ST_XMax(e), ST_YMax(e) \
                 FROM (SELECT count(*) AS n, ST_Extent(geom)::box3d AS e FROM {}) s",
                table.quoted()
            ),
            &[],
        )
        .map_err(|e| db_error("counting rows", e))?;
    let rows: i64 = row.get(0);
    let corners: [Option<f64>; 4] = [row.get(1), row.get(2), row.get(3), row.get(4)];
    let bbox = if corners.iter().all(Option::is_some) { json!(corners) } else { Value::Null };
    if rows != features {
        return Err(TaskError::permanent(
            "row_count_mismatch",
            format!("{} has {rows} rows but {features} features were read", table.display()),
        ));
    }
    let geometry = client
        .query_opt(
            "SELECT srid, type, coord_dimension FROM geometry_columns WHERE f_table_schema = $1 AND f_table_name = $2 AND f_geometry_column = 'geom'",
            &[&table.schema, &table.name],
        )
        .map_err(|e| db_error("reading geometry_columns", e))?
        .ok_or_else(|| TaskError::permanent("not_found", format!("{} has no geometry column geom", table.display())))?;
    let (srid, geometry_type, dims): (i32, String, i32) = (geometry.get(0), geometry.get(1), geometry.get(2));
    Ok(json!({
        "table": table.display(),
        "rows": rows,
        "srid": srid,
        "geometry_type": geometry_type,
        "coord_dimension": dims,
        "invalid_geometries": {
            "count": sum("invalid_geometries"),
            "examples": examples.into_values().take(2 * INVALID_EXAMPLES).collect::<Vec<_>>(),
        },
        "null_geometries": sum("null_geometries"),
        "empty_geometries": sum("empty_geometries"),
        "bbox": bbox,
        "chunks": inputs.len(),
        "seconds": started.elapsed().as_secs_f64(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numeric_text(v: f64) -> (i16, i16, u16, u16, Vec<i16>) {
        let mut out = BytesMut::new();
        encode_numeric(v, &mut out);
        let b = out.to_vec();
        let word = |i: usize| i16::from_be_bytes([b[2 * i], b[2 * i + 1]]);
        let n = word(0);
        (n, word(1), word(2) as u16, word(3) as u16, (0..n as usize).map(|i| word(4 + i)).collect())
    }

    #[test]
    fn numerics_in_postgres_binary_form() {
        // 35623680 = 3562 * 10000 + 3680: two digits, weight 1.
        assert_eq!(numeric_text(35623680.0), (2, 1, 0, 0, vec![3562, 3680]));
        // -12.345 = -(12 + 3450/10000): scale 3.
        assert_eq!(numeric_text(-12.345), (2, 0, 0x4000, 3, vec![12, 3450]));
        // 0.00012 = 1.2 * 10^-4: weight -1, digit 1 then 2000.
        assert_eq!(numeric_text(0.00012), (2, -1, 0, 5, vec![1, 2000]));
        assert_eq!(numeric_text(0.0), (0, 0, 0, 0, vec![]));
        assert_eq!(numeric_text(1e20), (1, 5, 0, 0, vec![1]));
        assert_eq!(numeric_text(f64::NAN).2, 0xC000);
    }

    #[test]
    fn table_names() {
        assert_eq!(TableName::parse("nc").unwrap(), TableName { schema: DEFAULT_SCHEMA.into(), name: "nc".into() });
        assert_eq!(TableName::parse("public.nc_2").unwrap().quoted(), "\"public\".\"nc_2\"");
        for bad in ["", "NC", "a.b.c", "1nc", "nc;drop table x", "a-b", "x\"y", ".nc", "nc."] {
            assert_eq!(TableName::parse(bad).unwrap_err().kind, "bad_params", "{bad:?}");
        }
    }

    #[test]
    fn geometry_types_promote_within_one_family() {
        let set = |v: &[u32]| v.iter().copied().collect::<BTreeSet<u32>>();
        assert_eq!(column_geometry_type(&set(&[3, 6]), 3), ("MultiPolygon", true));
        assert_eq!(column_geometry_type(&set(&[1]), 0), ("Point", false));
        assert_eq!(column_geometry_type(&set(&[1, 3]), 0), ("Geometry", false));
        assert_eq!(column_geometry_type(&set(&[]), 2), ("LineString", false));
        assert_eq!(launder("CNTY_ID"), "cnty_id");
        assert_eq!(launder("1st name"), "_1st_name");
    }
}
