//! `export_geoparquet {table, output}`: a PostGIS table to a GeoParquet 1.1 file.
//!
//! - `inspect` (one task): the table's columns and types, its geometry column, SRID and row count;
//!   an unknown table is a permanent `not_found`;
//! - `write` (fan-in: gets the inspection in `inputs`, and the job's result is its own): streams the rows with a binary
//!   `COPY ... TO STDOUT` in one snapshot, builds Arrow record batches (geometry as WKB) and writes
//!   them with the `geoparquet` crate, with the CRS as PROJJSON from GDAL, the bbox and the
//!   geometry types in the `geo` metadata. The file is written to `<output>.<task>-<attempt>.tmp`, synced and
//!   renamed, so a killed task never leaves half a file under `output`.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use arrow_array::builder::{
    BinaryBuilder, BooleanBuilder, Date32Builder, Float32Builder, Float64Builder, Int16Builder, Int32Builder,
    Int64Builder, StringBuilder, TimestampMicrosecondBuilder,
};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use gdal::spatial_ref::SpatialRef;
use geoarrow_array::array::WkbArray;
use geoarrow_array::GeoArrowArray;
use geoarrow_schema::{Crs, GeoArrowType, Metadata, WkbType};
use geoparquet::writer::{GeoParquetRecordBatchEncoder, GeoParquetWriterEncoding, GeoParquetWriterOptionsBuilder};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use postgres::binary_copy::{BinaryCopyOutIter, BinaryCopyOutRow};
use postgres::fallible_iterator::FallibleIterator;
use postgres::types::Type;
use postgres::{GenericClient, IsolationLevel};
use serde_json::{json, Value};
use stageflow_worker::{Task, TaskError};

use crate::db::{connect, db_error, quote_ident, TableName, TABLE_PATTERN};
use crate::raster::param_str;

/// Rows per Arrow record batch (and Parquet row group at most).
const BATCH_ROWS: usize = 8192;

/// The job type definition.
pub fn job_type() -> Value {
    json!({
        "description": "Writes a PostGIS table to a GeoParquet 1.1 file (WKB geometry, PROJJSON CRS, bbox and geometry types in the metadata).",
        "parameters": {"type": "object", "required": ["table", "output"], "additionalProperties": false,
                       "properties": {"table": {"type": "string", "pattern": TABLE_PATTERN, "maxLength": 127},
                                      "output": {"type": "string", "minLength": 1}}},
        "retry": {"max_attempts": 3, "backoff_base_seconds": 1, "backoff_max_seconds": 30},
        "stages": [
            {"name": "inspect", "handler": "geo.geoparquet_inspect", "queue": "geo"},
            {"name": "write", "handler": "geo.geoparquet_write", "queue": "geo", "fan_out": "fan_in"}
        ]
    })
}

/// How a column is read (the SQL type it is cast to for the COPY) and written (its Arrow type).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Bool,
    Int16,
    Int32,
    Int64,
    Float32,
    Float64,
    Text,
    Date,
    Timestamp,
    TimestampTz,
    Binary,
    /// The primary geometry column, as WKB.
    Geometry,
}

impl Kind {
    /// By PostgreSQL type name (`pg_type.typname`): unconstrained `numeric` becomes a double, types
    /// Arrow has no counterpart for become text.
    fn of(typname: &str) -> Kind {
        match typname {
            "bool" => Kind::Bool,
            "int2" => Kind::Int16,
            "int4" => Kind::Int32,
            "int8" | "oid" => Kind::Int64,
            "float4" => Kind::Float32,
            "float8" | "numeric" => Kind::Float64,
            "date" => Kind::Date,
            "timestamp" => Kind::Timestamp,
            "timestamptz" => Kind::TimestampTz,
            "bytea" | "geometry" => Kind::Binary,
            _ => Kind::Text,
        }
    }

    fn pg_type(self) -> Type {
        match self {
            Kind::Bool => Type::BOOL,
            Kind::Int16 => Type::INT2,
            Kind::Int32 => Type::INT4,
            Kind::Int64 => Type::INT8,
            Kind::Float32 => Type::FLOAT4,
            Kind::Float64 => Type::FLOAT8,
            Kind::Text => Type::TEXT,
            Kind::Date => Type::DATE,
            Kind::Timestamp => Type::TIMESTAMP,
            Kind::TimestampTz => Type::TIMESTAMPTZ,
            Kind::Binary | Kind::Geometry => Type::BYTEA,
        }
    }

    /// The column in the COPY's SELECT list.
    fn select(self, typname: &str, column: &str) -> String {
        let c = quote_ident(column);
        match (self, typname) {
            (Kind::Geometry, _) | (Kind::Binary, "geometry") => format!("ST_AsBinary({c})"),
            _ => format!("{c}::{}", self.pg_type().name()),
        }
    }

    fn data_type(self) -> DataType {
        match self {
            Kind::Bool => DataType::Boolean,
            Kind::Int16 => DataType::Int16,
            Kind::Int32 => DataType::Int32,
            Kind::Int64 => DataType::Int64,
            Kind::Float32 => DataType::Float32,
            Kind::Float64 => DataType::Float64,
            Kind::Text => DataType::Utf8,
            Kind::Date => DataType::Date32,
            Kind::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, None),
            Kind::TimestampTz => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            Kind::Binary | Kind::Geometry => DataType::Binary,
        }
    }
}

/// The table as `inspect` describes it.
struct Described {
    /// (name, typname, format_type)
    columns: Vec<(String, String, String)>,
    geometry_column: String,
    geometry_type: String,
    srid: i32,
    rows: i64,
}

fn describe<C: GenericClient>(client: &mut C, table: &TableName) -> Result<Described, TaskError> {
    let columns: Vec<(String, String, String)> = client
        .query(
            "SELECT a.attname::text, t.typname::text, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a \
             JOIN pg_type t ON t.oid = a.atttypid JOIN pg_class c ON c.oid = a.attrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p', 'v', 'm', 'f') \
               AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            &[&table.schema, &table.name],
        )
        .map_err(|e| db_error("reading the table's columns", e))?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    if columns.is_empty() {
        return Err(TaskError::permanent("not_found", format!("no table {}", table.display())));
    }
    let has_postgis: bool = client
        .query_one("SELECT to_regclass('geometry_columns') IS NOT NULL", &[])
        .map_err(|e| db_error("checking for PostGIS", e))?
        .get(0);
    let geometry = if has_postgis {
        client
            .query_opt(
                "SELECT f_geometry_column::text, type, srid FROM geometry_columns WHERE f_table_schema = $1 AND f_table_name = $2 \
                 ORDER BY f_geometry_column <> 'geom', f_geometry_column LIMIT 1",
                &[&table.schema, &table.name],
            )
            .map_err(|e| db_error("reading geometry_columns", e))?
    } else {
        None
    };
    let geometry = geometry.ok_or_else(|| {
        TaskError::permanent("unsupported_format", format!("{} has no geometry column", table.display()))
    })?;
    let (geometry_column, geometry_type, mut srid): (String, String, i32) =
        (geometry.get(0), geometry.get(1), geometry.get(2));
    if srid == 0 {
        // An unconstrained column: the SRID of its rows, when they agree.
        let srids: Vec<i32> = client
            .query(
                &format!(
                    "SELECT DISTINCT ST_SRID({c}) FROM {} WHERE {c} IS NOT NULL LIMIT 2",
                    table.quoted(),
                    c = quote_ident(&geometry_column)
                ),
                &[],
            )
            .map_err(|e| db_error("reading SRIDs", e))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        srid = match srids.as_slice() {
            [one] if *one > 0 => *one,
            _ => {
                return Err(TaskError::permanent(
                    "missing_crs",
                    format!("{}.{geometry_column} has no single SRID", table.display()),
                ))
            }
        };
    }
    let rows: i64 = client
        .query_one(&format!("SELECT count(*) FROM {}", table.quoted()), &[])
        .map_err(|e| db_error("counting rows", e))?
        .get(0);
    Ok(Described { columns, geometry_column, geometry_type, srid, rows })
}

/// Stage 1: what the table holds.
pub fn inspect(task: &Task, url: &str) -> Result<Value, TaskError> {
    let table = TableName::parse(param_str(task, "table")?)?;
    let output = param_str(task, "output")?;
    let mut client = connect(url)?;
    let d = describe(&mut client, &table)?;
    crs_projjson(d.srid)?;
    Ok(json!({
        "table": table.display(),
        "output": output,
        "columns": d.columns.iter().map(|(name, _, ty)| json!({"name": name, "type": ty})).collect::<Vec<_>>(),
        "geometry_column": d.geometry_column,
        "geometry_type": d.geometry_type,
        "srid": d.srid,
        "rows": d.rows,
    }))
}

fn crs_projjson(srid: i32) -> Result<Value, TaskError> {
    let text = SpatialRef::from_epsg(srid as u32)
        .and_then(|srs| srs.to_projjson())
        .map_err(|e| TaskError::permanent("missing_crs", format!("EPSG:{srid} has no PROJJSON in GDAL: {e}")))?;
    serde_json::from_str(&text)
        .map_err(|e| TaskError::permanent("missing_crs", format!("EPSG:{srid}: GDAL's PROJJSON is not JSON: {e}")))
}

/// An error of writing the file as a task error: the file-system error inside it, if any, as
/// [`crate::io_error`] sees it (a missing directory is `not_found`).
fn io_error(context: &str, e: &(dyn std::error::Error + 'static)) -> TaskError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(error) = source {
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::NotFound {
                return TaskError::permanent("not_found", format!("{context}: {io}"));
            }
            return crate::io_error(context, io);
        }
        source = error.source();
    }
    if e.to_string().contains("No space left on device") {
        return TaskError::retryable("disk_full", format!("{context}: {e}"));
    }
    TaskError::permanent("geoparquet", format!("{context}: {e}"))
}

/// One column's Arrow builder.
enum Builder {
    Bool(BooleanBuilder),
    Int16(Int16Builder),
    Int32(Int32Builder),
    Int64(Int64Builder),
    Float32(Float32Builder),
    Float64(Float64Builder),
    Text(StringBuilder),
    Date(Date32Builder),
    Timestamp(TimestampMicrosecondBuilder),
    TimestampTz(TimestampMicrosecondBuilder),
    Binary(BinaryBuilder),
}

impl Builder {
    fn new(kind: Kind) -> Builder {
        match kind {
            Kind::Bool => Builder::Bool(BooleanBuilder::new()),
            Kind::Int16 => Builder::Int16(Int16Builder::new()),
            Kind::Int32 => Builder::Int32(Int32Builder::new()),
            Kind::Int64 => Builder::Int64(Int64Builder::new()),
            Kind::Float32 => Builder::Float32(Float32Builder::new()),
            Kind::Float64 => Builder::Float64(Float64Builder::new()),
            Kind::Text => Builder::Text(StringBuilder::new()),
            Kind::Date => Builder::Date(Date32Builder::new()),
            Kind::Timestamp => Builder::Timestamp(TimestampMicrosecondBuilder::new()),
            Kind::TimestampTz => Builder::TimestampTz(TimestampMicrosecondBuilder::new().with_timezone("UTC")),
            Kind::Binary | Kind::Geometry => Builder::Binary(BinaryBuilder::new()),
        }
    }

    fn append(&mut self, row: &BinaryCopyOutRow, i: usize) -> Result<(), postgres::Error> {
        let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).unwrap_or_default();
        match self {
            Builder::Bool(b) => b.append_option(row.try_get::<Option<bool>>(i)?),
            Builder::Int16(b) => b.append_option(row.try_get::<Option<i16>>(i)?),
            Builder::Int32(b) => b.append_option(row.try_get::<Option<i32>>(i)?),
            Builder::Int64(b) => b.append_option(row.try_get::<Option<i64>>(i)?),
            Builder::Float32(b) => b.append_option(row.try_get::<Option<f32>>(i)?),
            Builder::Float64(b) => b.append_option(row.try_get::<Option<f64>>(i)?),
            Builder::Text(b) => b.append_option(row.try_get::<Option<&str>>(i)?),
            Builder::Date(b) => {
                b.append_option(row.try_get::<Option<NaiveDate>>(i)?.map(|d| (d - epoch).num_days() as i32))
            }
            Builder::Timestamp(b) => {
                b.append_option(row.try_get::<Option<NaiveDateTime>>(i)?.map(|t| t.and_utc().timestamp_micros()))
            }
            Builder::TimestampTz(b) => {
                b.append_option(row.try_get::<Option<DateTime<Utc>>>(i)?.map(|t| t.timestamp_micros()))
            }
            Builder::Binary(b) => b.append_option(row.try_get::<Option<&[u8]>>(i)?),
        }
        Ok(())
    }

    fn finish(&mut self) -> ArrayRef {
        match self {
            Builder::Bool(b) => Arc::new(b.finish()),
            Builder::Int16(b) => Arc::new(b.finish()),
            Builder::Int32(b) => Arc::new(b.finish()),
            Builder::Int64(b) => Arc::new(b.finish()),
            Builder::Float32(b) => Arc::new(b.finish()),
            Builder::Float64(b) => Arc::new(b.finish()),
            Builder::Text(b) => Arc::new(b.finish()),
            Builder::Date(b) => Arc::new(b.finish()),
            Builder::Timestamp(b) => Arc::new(b.finish()),
            Builder::TimestampTz(b) => Arc::new(b.finish()),
            Builder::Binary(b) => Arc::new(b.finish()),
        }
    }
}

/// Stage 2: the file.
pub fn write(task: &Task, url: &str) -> Result<Value, TaskError> {
    let started = Instant::now();
    let table = TableName::parse(param_str(task, "table")?)?;
    let output = param_str(task, "output")?.to_owned();
    // One temporary file per attempt: two attempts running at once (a lease that expired) never
    // write into the same file; the rename makes whichever finishes last the output.
    let tmp = format!("{output}.{}-{}.tmp", task.task_id, task.attempt);
    let result = write_file(task, url, &table, &output, &tmp, started);
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn write_file(
    task: &Task,
    url: &str,
    table: &TableName,
    output: &str,
    tmp: &str,
    started: Instant,
) -> Result<Value, TaskError> {
    let mut client = connect(url)?;
    // One snapshot for the description and the rows.
    let mut tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .map_err(|e| db_error("beginning", e))?;
    let d = describe(&mut tx, table)?;
    if let Some(inspected) = task.inputs.as_ref().and_then(|inputs| inputs.get(0)) {
        if inspected["geometry_column"].as_str().is_some_and(|c| c != d.geometry_column)
            || inspected["srid"].as_i64().is_some_and(|s| s != d.srid as i64)
        {
            return Err(TaskError::permanent(
                "table_changed",
                format!("{}'s geometry column changed since it was inspected ({inspected})", table.display()),
            ));
        }
    }
    let projjson = crs_projjson(d.srid)?;
    let metadata = Arc::new(Metadata::new(Crs::from_projjson(projjson), None));

    // Arrow schema and the COPY's SELECT list.
    let mut kinds = Vec::new();
    let mut fields = Vec::new();
    let mut select = Vec::new();
    for (name, typname, _) in &d.columns {
        let kind = if *name == d.geometry_column { Kind::Geometry } else { Kind::of(typname) };
        select.push(kind.select(typname, name));
        fields.push(if kind == Kind::Geometry {
            GeoArrowType::Wkb(WkbType::new(metadata.clone())).to_field(name.clone(), true)
        } else {
            Field::new(name.clone(), kind.data_type(), true)
        });
        kinds.push(kind);
    }
    let schema: SchemaRef = Arc::new(Schema::new(fields));
    let options = GeoParquetWriterOptionsBuilder::default()
        .set_primary_column(d.geometry_column.clone())
        .set_encoding(GeoParquetWriterEncoding::WKB)
        .build();
    let mut encoder = GeoParquetRecordBatchEncoder::try_new(&schema, &options)
        .map_err(|e| TaskError::permanent("geoparquet", format!("the schema: {e}")))?;

    if let Some(parent) = Path::new(output).parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| io_error(&format!("creating {}", parent.display()), &e))?;
    }
    // A new file of this attempt's own, never through a link planted at its name.
    let file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(tmp)
            .map_err(|e| io_error(&format!("creating {tmp}"), &e))?
    };
    let properties = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(64 * 1024))
        .build();
    let mut writer = ArrowWriter::try_new(file, encoder.target_schema(), Some(properties))
        .map_err(|e| io_error(&format!("starting {tmp}"), &e))?;

    // Stream the rows.
    let types: Vec<Type> = kinds.iter().map(|k| k.pg_type()).collect();
    let reader = tx
        .copy_out(&format!("COPY (SELECT {} FROM {}) TO STDOUT (FORMAT binary)", select.join(", "), table.quoted()))
        .map_err(|e| db_error("starting COPY", e))?;
    let mut rows_iter = BinaryCopyOutIter::new(reader, &types);
    let mut builders: Vec<Builder> = kinds.iter().map(|k| Builder::new(*k)).collect();
    let (mut rows, mut in_batch) = (0u64, 0usize);
    let mut flush = |builders: &mut Vec<Builder>, writer: &mut ArrowWriter<File>| -> Result<(), TaskError> {
        let columns: Vec<ArrayRef> = builders
            .iter_mut()
            .zip(&kinds)
            .map(|(b, k)| {
                let array = b.finish();
                if *k == Kind::Geometry {
                    match array.as_any().downcast_ref::<arrow_array::BinaryArray>() {
                        Some(binary) => WkbArray::new(binary.clone(), metadata.clone()).to_array_ref(),
                        None => array,
                    }
                } else {
                    array
                }
            })
            .collect();
        let batch = RecordBatch::try_new(schema.clone(), columns)
            .map_err(|e| TaskError::permanent("geoparquet", format!("a record batch: {e}")))?;
        let encoded = encoder
            .encode_record_batch(&batch)
            .map_err(|e| TaskError::permanent("geoparquet", format!("encoding a batch: {e}")))?;
        writer.write(&encoded).map_err(|e| io_error(&format!("writing {tmp}"), &e))
    };
    while let Some(row) = rows_iter.next().map_err(|e| db_error("reading rows", e))? {
        for (i, builder) in builders.iter_mut().enumerate() {
            builder.append(&row, i).map_err(|e| db_error("decoding a row", e))?;
        }
        rows += 1;
        in_batch += 1;
        if in_batch == BATCH_ROWS {
            flush(&mut builders, &mut writer)?;
            in_batch = 0;
        }
    }
    if in_batch > 0 || rows == 0 {
        flush(&mut builders, &mut writer)?;
    }
    drop(rows_iter);
    tx.commit().map_err(|e| db_error("ending the snapshot", e))?;

    // The geo metadata, then the footer; synced before the rename.
    let geo =
        encoder.into_keyvalue().map_err(|e| TaskError::permanent("geoparquet", format!("the geo metadata: {e}")))?;
    let geo_json: Value = geo.value.as_deref().and_then(|v| serde_json::from_str(v).ok()).unwrap_or(Value::Null);
    writer.append_key_value_metadata(geo);
    writer.finish().map_err(|e| io_error(&format!("finishing {tmp}"), &e))?;
    writer.inner_mut().sync_all().map_err(|e| io_error(&format!("syncing {tmp}"), &e))?;
    drop(writer);
    // Marked as this job's before it takes the output's name: a later run of the job may replace
    // it, another job may not (see confine).
    crate::confine::mark_file(Path::new(tmp), &task.job_id)?;
    crate::confine::place_output(Path::new(tmp), Path::new(output), &task.job_id)?;
    if let Some(parent) = Path::new(output).parent().filter(|p| !p.as_os_str().is_empty()) {
        if let Ok(dir) = File::open(parent) {
            let _ = dir.sync_all();
        }
    }
    let bytes = std::fs::metadata(output).map_err(|e| io_error(&format!("reading {output}"), &e))?.len();
    let column = &geo_json["columns"][&d.geometry_column];
    Ok(json!({
        "output": output,
        "table": table.display(),
        "rows": rows,
        "bytes": bytes,
        "crs": {"epsg": d.srid},
        "bbox": column["bbox"],
        "geometry_types": column["geometry_types"],
        "geometry_column": d.geometry_column,
        "seconds": started.elapsed().as_secs_f64(),
    }))
}
