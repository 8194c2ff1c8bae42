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
//!
//! The stages read the file through [`source`] (the layer, its CRS, the features' geometries), map
//! its fields to table columns with [`columns`] and write rows as binary COPY cells with [`copy`].

mod columns;
mod copy;
mod finish;
mod inspect;
mod load;
mod source;

use serde_json::{json, Value};
use stageflow_worker::{Task, TaskError};

use crate::db::TABLE_PATTERN;

pub use finish::finish;
pub use inspect::inspect;
pub use load::load;

pub const DEFAULT_CHUNK_SIZE: u64 = 2000;
pub const MIN_CHUNK_SIZE: u64 = 10;
pub const MAX_CHUNK_SIZE: u64 = 100_000;
/// Invalid geometries reported by fid and reason, per chunk and in the job's result.
const INVALID_EXAMPLES: usize = 5;

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

fn param_u64(task: &Task, name: &str) -> Result<u64, TaskError> {
    task.params[name]
        .as_u64()
        .ok_or_else(|| TaskError::permanent("bad_params", format!("params.{name} must be a non-negative integer")))
}

#[cfg(test)]
mod tests {
    use crate::db::{TableName, DEFAULT_SCHEMA};

    /// The `table` parameter, as the three stages parse it.
    #[test]
    fn table_names() {
        assert_eq!(TableName::parse("nc").unwrap(), TableName { schema: DEFAULT_SCHEMA.into(), name: "nc".into() });
        assert_eq!(TableName::parse("public.nc_2").unwrap().quoted(), "\"public\".\"nc_2\"");
        for bad in ["", "NC", "a.b.c", "1nc", "nc;drop table x", "a-b", "x\"y", ".nc", "nc."] {
            assert_eq!(TableName::parse(bad).unwrap_err().kind, "bad_params", "{bad:?}");
        }
    }
}
