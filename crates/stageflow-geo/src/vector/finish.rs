//! Stage 3: finish.

use std::collections::BTreeMap;
use std::time::Instant;

use serde_json::{json, Value};
use stageflow_worker::{Task, TaskError};

use super::INVALID_EXAMPLES;
use crate::db::{connect, db_error, quote_ident, TableName};
use crate::raster::param_str;

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
