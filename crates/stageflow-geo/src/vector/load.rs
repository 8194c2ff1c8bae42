//! Stage 2: load one chunk.

use std::time::Instant;

use gdal::spatial_ref::{CoordTransform, SpatialRef};
use gdal::vector::LayerAccess;
use postgres::binary_copy::BinaryCopyInWriter;
use postgres::types::{ToSql, Type};
use serde_json::{json, Value};
use stageflow_worker::{Task, TaskError};

use super::columns::Column;
use super::copy::{ewkb, read_cell, Cell};
use super::source::{geometry_of, layer_srs, open_source, source_layer, traditional};
use super::{param_u64, INVALID_EXAMPLES, MAX_CHUNK_SIZE};
use crate::db::{check_table_owner, connect, db_error, quote_ident, TableName};
use crate::raster::param_str;

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
    check_table_owner(&mut client, &table, &task.job_id)?;
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
