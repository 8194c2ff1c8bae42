//! `container_inventory {source}`: every file of a local directory or an S3-compatible prefix, with
//! its size, modification time, SHA-256 and media type (from its content, not its name), cataloged
//! in the job's result and in `stageflow_geo.inventory`.
//!
//! - `list` (one task): lists the objects under the source recursively and plans one `inspect` task
//!   per file (keys from the path: [`task_key`]);
//! - `inspect` (dynamic): streams the file once through SHA-256 while keeping its first bytes and,
//!   for what looks like JSON, up to [`JSON_LIMIT`] bytes to parse; guesses the media type; reads a
//!   local raster's metadata with GDAL;
//! - `catalog` (fan-in): the summary as the job's result, and one row per file, upserted so that a
//!   retried task changes nothing.
//!
//! Both kinds of source go through `object_store`: `LocalFileSystem` for a directory,
//! `AmazonS3Builder::from_env()` for `s3://bucket/prefix` (endpoint and credentials from the usual
//! `AWS_*` variables; `AWS_ENDPOINT` and `AWS_ALLOW_HTTP=true` for a local server). A missing
//! source, a bad URL, an unreadable file are permanent errors; network and S3 server errors are
//! retryable.

use std::collections::{BTreeMap, HashSet};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, RetryConfig};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use stageflow_worker::{Task, TaskError};

use crate::raster::param_str;

/// How many leading bytes of each file are kept for the media type.
const HEAD: usize = 64 * 1024;
/// The largest file that looks like JSON and is parsed to tell GeoJSON from JSON.
pub const JSON_LIMIT: usize = 32 * 1024 * 1024;
/// The most files one inventory plans.
const MAX_FILES: usize = 1_000_000;

/// The table the catalog stage writes (part of `install_sql`).
pub const TABLE_SQL: &str = "CREATE TABLE IF NOT EXISTS stageflow_geo.inventory (\
    job_id text NOT NULL, path text NOT NULL, size bigint NOT NULL, modified timestamptz, sha256 text NOT NULL, \
    media_type text NOT NULL, metadata jsonb NOT NULL DEFAULT '{}', PRIMARY KEY (job_id, path))";

/// The definition of `container_inventory`.
pub fn job_type() -> Value {
    json!({
        "description": "Lists every file of a local directory or an s3://bucket/prefix with size, modification time, SHA-256 and media type, into the result and stageflow_geo.inventory.",
        "parameters": {"type": "object", "required": ["source"], "additionalProperties": false,
                       "properties": {"source": {"type": "string", "minLength": 1}}},
        "retry": {"max_attempts": 3, "backoff_base_seconds": 1, "backoff_max_seconds": 30},
        "stages": [
            {"name": "list", "handler": "geo.inventory_list", "queue": "geo"},
            {"name": "inspect", "handler": "geo.inventory_inspect", "queue": "geo", "fan_out": "dynamic"},
            {"name": "catalog", "handler": "geo.inventory_catalog", "queue": "geo", "fan_out": "fan_in"}
        ]
    })
}

/// Where the files are.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    Local(PathBuf),
    S3 { bucket: String, prefix: String },
}

impl Source {
    pub fn parse(source: &str) -> Result<Source, TaskError> {
        if let Some(rest) = source.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let valid_bucket = (3..=63).contains(&bucket.len())
                && bucket.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
            if !valid_bucket {
                return Err(TaskError::permanent("bad_url", format!("{source}: {bucket:?} is not an S3 bucket name")));
            }
            let prefix = prefix.trim_matches('/');
            if prefix.split('/').any(|part| part == "." || part == "..") || prefix.contains("//") {
                return Err(TaskError::permanent(
                    "bad_url",
                    format!("{source}: the prefix has empty, . or .. segments"),
                ));
            }
            return Ok(Source::S3 { bucket: bucket.to_owned(), prefix: prefix.to_owned() });
        }
        if source.contains("://") {
            return Err(TaskError::permanent(
                "bad_url",
                format!("{source}: only local directories and s3://bucket/prefix are supported"),
            ));
        }
        let path = PathBuf::from(source);
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_dir() => std::fs::canonicalize(&path)
                .map(Source::Local)
                .map_err(|e| TaskError::permanent("unreadable", format!("{source}: {e}"))),
            Ok(_) => Err(TaskError::permanent("not_a_directory", format!("{source} is not a directory"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(TaskError::permanent("not_found", format!("{source}: no such directory")))
            }
            Err(e) => Err(TaskError::permanent("unreadable", format!("{source}: {e}"))),
        }
    }

    fn is_remote(&self) -> bool {
        matches!(self, Source::S3 { .. })
    }

    /// The store and the prefix to list under.
    fn open(&self) -> Result<(Arc<dyn ObjectStore>, Option<ObjectPath>), TaskError> {
        match self {
            Source::Local(dir) => {
                let store = LocalFileSystem::new_with_prefix(dir)
                    .map_err(|e| TaskError::permanent("unreadable", format!("{}: {e}", dir.display())))?;
                Ok((Arc::new(store), None))
            }
            Source::S3 { bucket, prefix } => {
                let retry =
                    RetryConfig { max_retries: 3, retry_timeout: Duration::from_secs(30), ..RetryConfig::default() };
                let store = AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_retry(retry)
                    .build()
                    .map_err(|e| TaskError::permanent("s3_config", format!("s3://{bucket}: {e}")))?;
                let prefix = if prefix.is_empty() { None } else { Some(ObjectPath::from(prefix.as_str())) };
                Ok((Arc::new(store), prefix))
            }
        }
    }

    /// A file's location for people: its filesystem path or its `s3://` URL.
    fn display(&self, object: &str) -> String {
        match self {
            Source::Local(dir) => dir.join(object).to_string_lossy().into_owned(),
            Source::S3 { bucket, .. } => format!("s3://{bucket}/{object}"),
        }
    }
}

/// An `object_store` error as a task error: what the store refuses is permanent; for a local
/// source every other error is too (a disk does not get better by waiting), for S3 it is retryable
/// (the network, a server error, a timeout).
fn store_error(source: &Source, what: &str, error: object_store::Error) -> TaskError {
    let message = format!("{what}: {error}");
    match error {
        object_store::Error::NotFound { .. } => TaskError::permanent("not_found", message),
        object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. } => {
            TaskError::permanent("access_denied", message)
        }
        object_store::Error::InvalidPath { .. } => TaskError::permanent("bad_path", message),
        object_store::Error::NotSupported { .. } | object_store::Error::NotImplemented { .. } => {
            TaskError::permanent("unsupported", message)
        }
        _ if source.is_remote() => match http_status(&message) {
            // object_store reports an S3 answer it does not map (a missing bucket, a refused
            // request) as a generic error whose text carries the HTTP status: its own error type
            // for it is private.
            Some(404) => TaskError::permanent("not_found", message),
            Some(401 | 403) => TaskError::permanent("access_denied", message),
            Some(429 | 503) => TaskError::throttled("throttled", message, 5.0),
            Some(408) => TaskError::retryable("storage", message),
            Some(status) if (400..500).contains(&status) => TaskError::permanent("rejected", message),
            _ => TaskError::retryable("storage", message),
        },
        _ => TaskError::permanent("unreadable", message),
    }
}

/// The HTTP status in an object_store error's text ("... status code: 404 Not Found ...").
fn http_status(message: &str) -> Option<u16> {
    let at = message.find("status code: ")? + "status code: ".len();
    message.get(at..at + 3)?.parse().ok()
}

fn is_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-')
}

/// The task key of a file: its relative path with `/` as `:` when that is a valid key (1–128 of
/// `A-Za-z0-9_.:-`) and the path has no `:` of its own; otherwise the sanitised end of the path and
/// 16 hex digits of its SHA-256. `used` keeps keys unique (a clash falls back to the whole hash).
pub fn task_key(path: &str, used: &mut HashSet<String>) -> String {
    let digest = hex::encode(Sha256::digest(path.as_bytes()));
    let joined = path.replace('/', ":");
    let plain = !path.contains(':') && !joined.is_empty() && joined.len() <= 128 && joined.chars().all(is_key_char);
    let key = if plain {
        joined
    } else {
        let sanitised: String = joined.chars().map(|c| if is_key_char(c) { c } else { '_' }).collect();
        let tail = &sanitised[sanitised.len().saturating_sub(100)..];
        format!("{tail}-{}", &digest[..16])
    };
    if used.insert(key.clone()) {
        return key;
    }
    let fallback = format!("h-{digest}");
    used.insert(fallback.clone());
    fallback
}

/// Stage 1: the files under the source, one planned `inspect` task each.
pub async fn list(task: Task) -> Result<Value, TaskError> {
    let text = param_str(&task, "source")?;
    let source = Source::parse(text)?;
    let (store, prefix) = source.open()?;
    let mut listing = store.list(prefix.as_ref());
    let mut objects = Vec::new();
    while let Some(meta) = listing.next().await {
        let meta = meta.map_err(|e| store_error(&source, &format!("listing {text}"), e))?;
        objects.push((meta.location.to_string(), meta.size));
        if objects.len() > MAX_FILES {
            return Err(TaskError::permanent("too_many_files", format!("{text} has more than {MAX_FILES} files")));
        }
    }
    if objects.is_empty() && source.is_remote() {
        // S3 has no directories: an empty listing is the only sign of a missing prefix or bucket.
        return Err(TaskError::permanent("not_found", format!("{text}: no objects under this prefix")));
    }
    objects.sort();
    let strip = match &prefix {
        Some(p) => format!("{p}/"),
        None => String::new(),
    };
    let mut used = HashSet::new();
    let tasks: Vec<Value> = objects
        .iter()
        .map(|(object, size)| {
            let relative = object.strip_prefix(&strip).unwrap_or(object);
            json!({"key": task_key(relative, &mut used), "params": {"path": relative, "object": object, "listed_size": size}})
        })
        .collect();
    Ok(json!({"source": text, "count": tasks.len(), "tasks": tasks}))
}

/// Reads `range` of an object, from the bytes already read when they cover it.
async fn read_range(store: &dyn ObjectStore, location: &ObjectPath, head: &[u8], range: Range<u64>) -> Option<Vec<u8>> {
    if range.end <= head.len() as u64 {
        return Some(head[range.start as usize..range.end as usize].to_vec());
    }
    store.get_range(location, range).await.ok().map(|b| b.to_vec())
}

/// Whether a TIFF's first IFD has GeoTIFF tags (ModelPixelScale, ModelTiepoint,
/// ModelTransformation, GeoKeyDirectory); reads the IFD with ranged reads when it is not in `head`.
async fn tiff_is_geotiff(store: &dyn ObjectStore, location: &ObjectPath, head: &[u8], size: u64) -> bool {
    const GEO_TAGS: [u16; 4] = [33550, 33922, 34264, 34735];
    if head.len() < 16 {
        return false;
    }
    let little = head[0] == b'I';
    let u16_at = |b: &[u8], i: usize| {
        let v = [b[i], b[i + 1]];
        if little {
            u16::from_le_bytes(v)
        } else {
            u16::from_be_bytes(v)
        }
    };
    let u32_at = |b: &[u8], i: usize| {
        let v = [b[i], b[i + 1], b[i + 2], b[i + 3]];
        if little {
            u32::from_le_bytes(v)
        } else {
            u32::from_be_bytes(v)
        }
    };
    let u64_at = |b: &[u8], i: usize| {
        let mut v = [0u8; 8];
        v.copy_from_slice(&b[i..i + 8]);
        if little {
            u64::from_le_bytes(v)
        } else {
            u64::from_be_bytes(v)
        }
    };
    let big = u16_at(head, 2) == 43;
    let (ifd, count_size, entry_size) =
        if big { (u64_at(head, 8), 8u64, 20u64) } else { (u32_at(head, 4) as u64, 2, 12) };
    // The offset is untrusted: `ifd + count_size` may overflow.
    if ifd < 8 || ifd.checked_add(count_size).is_none_or(|end| end > size) {
        return false;
    }
    let Some(count) = read_range(store, location, head, ifd..ifd + count_size).await else { return false };
    if count.len() < count_size as usize {
        return false;
    }
    let entries = if big { u64_at(&count, 0) } else { u16_at(&count, 0) as u64 }.min(4096);
    let start = ifd + count_size;
    let end = (start + entries * entry_size).min(size);
    let Some(table) = read_range(store, location, head, start..end).await else { return false };
    table.chunks_exact(entry_size as usize).any(|entry| GEO_TAGS.contains(&u16_at(entry, 0)))
}

const GEOJSON_TYPES: [&str; 9] = [
    "FeatureCollection",
    "Feature",
    "Point",
    "MultiPoint",
    "LineString",
    "MultiLineString",
    "Polygon",
    "MultiPolygon",
    "GeometryCollection",
];

/// What the content says a file is: a media type and details worth keeping. `head` holds the first
/// bytes, `whole` the whole content when it looked like JSON and was small enough, `tail` the last
/// 4 bytes.
pub fn sniff(head: &[u8], whole: Option<&[u8]>, tail: &[u8], size: u64, path: &str) -> (String, Value) {
    let be32 = |i: usize| head.get(i..i + 4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
    let le32 = |i: usize| head.get(i..i + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let le16 = |i: usize| head.get(i..i + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    if size == 0 {
        return ("application/x-empty".into(), json!({}));
    }
    if head.starts_with(b"II*\0")
        || head.starts_with(b"MM\0*")
        || head.starts_with(b"II+\0")
        || head.starts_with(b"MM\0+")
    {
        return ("image/tiff".into(), json!({"bigtiff": head[2] == b'+' || head[3] == b'+'}));
    }
    if head.starts_with(b"SQLite format 3\0") {
        let application_id = be32(68).unwrap_or(0);
        let tag = String::from_utf8_lossy(&application_id.to_be_bytes()).into_owned();
        return if matches!(&application_id.to_be_bytes(), b"GPKG" | b"GP10" | b"GP11") {
            ("application/geopackage+sqlite3".into(), json!({"application_id": tag}))
        } else {
            ("application/vnd.sqlite3".into(), json!({}))
        };
    }
    if head.starts_with(b"\x89PNG\r\n\x1a\n") {
        return ("image/png".into(), json!({}));
    }
    if head.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return ("image/jpeg".into(), json!({}));
    }
    if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        return ("application/zip".into(), json!({}));
    }
    if head.starts_with(b"PAR1") {
        return ("application/vnd.apache.parquet".into(), json!({"footer": tail == b"PAR1"}));
    }
    // ESRI shapefile main file and index share file code 9994 and version 1000; the first record
    // tells them apart (a record number 1 in .shp, the offset 50 words in .shx).
    if be32(0) == Some(9994) && le32(28) == Some(1000) && head.len() >= 100 {
        let shape_type = le32(32).unwrap_or(0);
        let index = match be32(100) {
            Some(1) => false,
            Some(50) => true,
            _ => path.to_ascii_lowercase().ends_with(".shx"),
        };
        let media = if index { "application/vnd.shx" } else { "application/vnd.shp" };
        return (media.into(), json!({"shape_type": shape_type}));
    }
    // dBase (a shapefile's attributes): a version byte, a date, and a header whose sizes add up to
    // the file's.
    if let (Some(records), Some(header), Some(record)) = (le32(4), le16(8), le16(10)) {
        let versions = [0x02u8, 0x03, 0x04, 0x05, 0x30, 0x31, 0x32, 0x43, 0x63, 0x83, 0x8B, 0xCB, 0xF5, 0xFB];
        let body = header as u64 + records as u64 * record as u64;
        if versions.contains(&head[0])
            && (1..=12).contains(&head[2])
            && (1..=31).contains(&head[3])
            && header >= 33
            && record > 0
            && (size == body || size == body + 1)
        {
            return ("application/vnd.dbf".into(), json!({"records": records}));
        }
    }
    let first = head.iter().find(|b| !b.is_ascii_whitespace()).copied();
    if matches!(first, Some(b'{') | Some(b'[')) {
        match whole.map(serde_json::from_slice::<Value>) {
            Some(Ok(document)) => {
                let kind = document["type"].as_str().filter(|t| GEOJSON_TYPES.contains(t));
                return match kind {
                    Some(kind) => {
                        let features = document["features"].as_array().map(Vec::len);
                        ("application/geo+json".into(), json!({"geojson_type": kind, "features": features}))
                    }
                    None => ("application/json".into(), json!({})),
                };
            }
            Some(Err(_)) => {}
            None => {
                // Too large to parse here: say what its first bytes say, and that it was not parsed.
                let text = String::from_utf8_lossy(head);
                let geo = GEOJSON_TYPES.iter().any(|t| {
                    text.contains(&format!("\"type\": \"{t}\"")) || text.contains(&format!("\"type\":\"{t}\""))
                });
                let media = if geo { "application/geo+json" } else { "application/json" };
                return (media.into(), json!({"parsed": false}));
            }
        }
    }
    if let Some(kind) = infer::get(head) {
        return (kind.mime_type().to_owned(), json!({}));
    }
    // Text: UTF-8 without NULs (the head may end inside a character).
    let text = match std::str::from_utf8(head) {
        Ok(_) => true,
        Err(e) => e.error_len().is_none() && head.len() == HEAD,
    };
    if text && !head.contains(&0) {
        return ("text/plain".into(), json!({}));
    }
    ("application/octet-stream".into(), json!({}))
}

/// Stage 2: one file.
pub async fn inspect(task: Task) -> Result<Value, TaskError> {
    let text = param_str(&task, "source")?;
    let path = param_str(&task, "path")?.to_owned();
    let object = param_str(&task, "object")?;
    let source = Source::parse(text)?;
    let (store, _) = source.open()?;
    let shown = source.display(object);
    let location =
        ObjectPath::parse(object).map_err(|e| TaskError::permanent("bad_params", format!("{object}: {e}")))?;
    let got = store.get(&location).await.map_err(|e| store_error(&source, &format!("reading {shown}"), e))?;
    let modified = got.meta.last_modified;
    let mut stream = got.into_stream();
    let mut hasher = Sha256::new();
    let mut head: Vec<u8> = Vec::new();
    let mut whole: Option<Vec<u8>> = Some(Vec::new());
    let mut tail: Vec<u8> = Vec::new();
    let mut size: u64 = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| store_error(&source, &format!("reading {shown}"), e))?;
        hasher.update(&chunk);
        size += chunk.len() as u64;
        if head.len() < HEAD {
            head.extend_from_slice(&chunk[..chunk.len().min(HEAD - head.len())]);
        }
        tail.extend_from_slice(&chunk[chunk.len().saturating_sub(4)..]);
        tail.drain(..tail.len().saturating_sub(4));
        if let Some(buffer) = whole.as_mut() {
            let looks_like_json = match head.iter().find(|b| !b.is_ascii_whitespace()) {
                Some(b) => *b == b'{' || *b == b'[',
                None => true,
            };
            if looks_like_json && buffer.len() + chunk.len() <= JSON_LIMIT {
                buffer.extend_from_slice(&chunk);
            } else {
                whole = None;
            }
        }
    }
    let (mut media_type, mut metadata) = sniff(&head, whole.as_deref(), &tail, size, &path);
    if media_type == "image/tiff" && tiff_is_geotiff(store.as_ref(), &location, &head, size).await {
        media_type = "image/tiff; application=geotiff".into();
    }
    if media_type.starts_with("image/tiff") {
        if let Source::Local(_) = source {
            let file = shown.clone();
            let raster = tokio::task::spawn_blocking(move || crate::raster::metadata(&file))
                .await
                .unwrap_or_else(|e| Err(TaskError::permanent("panic", format!("reading the raster failed: {e}"))));
            metadata["raster"] = match raster {
                Ok(info) => info,
                Err(e) => json!({"error": e.to_json()}),
            };
        }
    }
    Ok(json!({
        "path": path,
        "location": shown,
        "size": size,
        "modified": modified.to_rfc3339(),
        "sha256": hex::encode(hasher.finalize()),
        "media_type": media_type,
        "metadata": metadata,
    }))
}

/// Stage 3: the catalog, as the job's result and as rows of `stageflow_geo.inventory`.
pub fn catalog(task: &Task, database_url: &str) -> Result<Value, TaskError> {
    let source = param_str(task, "source")?.to_owned();
    let mut files: Vec<Value> = task.inputs.as_ref().and_then(Value::as_array).cloned().unwrap_or_default();
    files.sort_by(|a, b| a["path"].as_str().cmp(&b["path"].as_str()));
    let mut by_type: BTreeMap<String, u64> = BTreeMap::new();
    let mut total: u64 = 0;
    for file in &files {
        let media = file["media_type"].as_str().ok_or_else(|| {
            TaskError::permanent("bad_input", format!("an inspect result without media_type: {file}"))
        })?;
        *by_type.entry(media.to_owned()).or_default() += 1;
        total += file["size"].as_u64().unwrap_or(0);
    }
    let written = write_rows(database_url, &task.job_id, &Value::Array(files.clone()))?;
    Ok(json!({
        "source": source,
        "count": files.len(),
        "total_bytes": total,
        "media_types": by_type,
        "table": "stageflow_geo.inventory",
        "rows_written": written,
        "files": files,
    }))
}

/// Upserts the rows in one statement and one transaction: a retried catalog task rewrites the same
/// rows.
fn write_rows(database_url: &str, job_id: &str, rows: &Value) -> Result<u64, TaskError> {
    let mut client = crate::db::connect(database_url)?;
    client
        .execute(
            "INSERT INTO stageflow_geo.inventory (job_id, path, size, modified, sha256, media_type, metadata) \
             SELECT $1, f.path, f.size, f.modified, f.sha256, f.media_type, coalesce(f.metadata, '{}') \
             FROM jsonb_to_recordset($2::jsonb) AS f(path text, size bigint, modified timestamptz, sha256 text, media_type text, metadata jsonb) \
             ON CONFLICT (job_id, path) DO UPDATE SET size = EXCLUDED.size, modified = EXCLUDED.modified, \
             sha256 = EXCLUDED.sha256, media_type = EXCLUDED.media_type, metadata = EXCLUDED.metadata",
            &[&job_id, rows],
        )
        .map_err(|e| database_error("writing stageflow_geo.inventory", e))
}

/// [`crate::db::db_error`]'s categories, with a hint when the table is not installed.
fn database_error(what: &str, error: postgres::Error) -> TaskError {
    match error.code().map(|c| c.code()) {
        Some("42P01" | "3F000") => TaskError::permanent(
            "not_installed",
            format!("{what}: {error} (run `stageflow geo-install`, which creates stageflow_geo.inventory)"),
        ),
        _ => crate::db::db_error(what, error),
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn keys_are_valid_and_unique() {
        let mut used = HashSet::new();
        assert_eq!(task_key("a/b/c.tif", &mut used), "a:b:c.tif");
        let odd = task_key("dir with space/ñ.tif", &mut used);
        assert!(odd.ends_with(&hex::encode(Sha256::digest("dir with space/ñ.tif".as_bytes()))[..16]), "{odd}");
        let long = "x/".repeat(200) + "file.tif";
        let key = task_key(&long, &mut used);
        assert!(key.len() <= 128 && key.chars().all(is_key_char) && key.contains("file.tif"), "{key}");
        // A path with a colon cannot clash with a directory path.
        let colon = task_key("a:b:c.tif", &mut used);
        assert_ne!(colon, "a:b:c.tif");
        // A clash falls back to the whole hash.
        let mut used = HashSet::from(["a:b".to_owned()]);
        assert!(task_key("a/b", &mut used).starts_with("h-"));
    }

    #[test]
    fn sources_parse() {
        assert_eq!(
            Source::parse("s3://bucket-1/a/b/").unwrap(),
            Source::S3 { bucket: "bucket-1".into(), prefix: "a/b".into() }
        );
        assert_eq!(Source::parse("s3://Bad_Bucket/x").unwrap_err().kind, "bad_url");
        assert_eq!(Source::parse("gs://b/x").unwrap_err().kind, "bad_url");
        assert_eq!(Source::parse("/nonexistent/dir").unwrap_err().kind, "not_found");
        assert_eq!(
            Source::parse(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")).unwrap_err().kind,
            "not_a_directory"
        );
    }

    #[test]
    fn s3_statuses_are_categorised() {
        let s3 = Source::S3 { bucket: "b".into(), prefix: String::new() };
        let generic = |text: &str| object_store::Error::Generic { store: "S3", source: text.to_owned().into() };
        let missing =
            store_error(&s3, "listing", generic("Server returned non-2xx status code: 404 Not Found: NoSuchBucket"));
        assert_eq!((missing.kind.as_str(), missing.category.as_str()), ("not_found", "permanent"));
        let denied = store_error(&s3, "listing", generic("Server returned non-2xx status code: 403 Forbidden"));
        assert_eq!(denied.kind, "access_denied");
        let slow = store_error(&s3, "listing", generic("Server returned non-2xx status code: 503 Service Unavailable"));
        assert_eq!(slow.category.as_str(), "throttling");
        let network = store_error(&s3, "listing", generic("error sending request: connection refused"));
        assert_eq!((network.kind.as_str(), network.category.as_str()), ("storage", "transient"));
        let local = store_error(&Source::Local("/x".into()), "reading", generic("Permission denied"));
        assert_eq!((local.kind.as_str(), local.category.as_str()), ("unreadable", "permanent"));
    }

    #[test]
    fn sniffing() {
        let (media, _) = sniff(b"{\"a\": 1}", Some(b"{\"a\": 1}"), b"1}", 8, "x");
        assert_eq!(media, "application/json");
        let geo = br#"{"type": "FeatureCollection", "features": []}"#;
        assert_eq!(sniff(geo, Some(geo), b"", geo.len() as u64, "x").0, "application/geo+json");
        assert_eq!(sniff(b"hello\n", None, b"", 6, "x").0, "text/plain");
        assert_eq!(sniff(b"\0\x01\x02\x03", None, b"", 4, "x").0, "application/octet-stream");
        assert_eq!(sniff(b"PAR1....", None, b"PAR1", 8, "x").0, "application/vnd.apache.parquet");
    }
}
