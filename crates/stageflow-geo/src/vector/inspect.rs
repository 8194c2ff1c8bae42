//! Stage 1: inspect.

use std::collections::BTreeSet;
use std::time::Instant;

use gdal::spatial_ref::{CoordTransform, SpatialRef};
use gdal::vector::LayerAccess;
use postgres::Client;
use serde_json::{json, Value};
use stageflow_worker::{Task, TaskError};

use super::columns::{column_geometry_type, columns_of, Column};
use super::source::{epsg_of, geometry_of, layer_srs, open_source, source_layer, traditional};
use super::{param_u64, DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
use crate::db::{
    check_table_owner, connect, db_error, quote_ident, quote_literal, table_mark, TableName, DEFAULT_SCHEMA,
};
use crate::raster::param_str;

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
    let created = create_table(&mut client, &table, &columns, &column_type, target_srid, &task.job_id)?;
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

/// Creates the table with this job's mark, or checks that the existing one has exactly this
/// definition and this job's mark (a retry of this task). Returns whether it was created.
fn create_table(
    client: &mut Client,
    table: &TableName,
    columns: &[Column],
    column_type: &str,
    srid: i32,
    job_id: &str,
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
    expected.extend(columns.iter().map(|c| (c.name.clone(), c.pg_type.sql_name().to_owned())));
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
    if !existed {
        // Created and marked in one transaction: no one sees it unmarked. (Another job creating
        // the same name at the same time wins or loses here; the loser then finds it not its own.)
        let created = client.batch_execute(&format!(
            "BEGIN; CREATE TABLE {} ({}); COMMENT ON TABLE {} IS {}; COMMIT",
            table.quoted(),
            definition.join(", "),
            table.quoted(),
            quote_literal(&table_mark(job_id))
        ));
        if let Err(e) = created {
            let _ = client.batch_execute("ROLLBACK");
            if current_columns(client, table)?.is_none() {
                return Err(db("creating the table")(e));
            }
        }
    }
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
    check_table_owner(client, table, job_id)?;
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
