//! `validate_stac {path}`: a STAC 1.0.0 Catalog, Collection or Item and everything it links to with
//! relative `child` and `item` hrefs, validated offline against the JSON Schemas shipped in
//! `schemas/` (see its README for where each comes from).
//!
//! - `discover` (one task): reads the root document and follows `child` and `item` links
//!   recursively; plans one `validate` task per document;
//! - `validate` (dynamic): the core schema of the document's `type` and the schema of each
//!   `stac_extensions` entry that is shipped; an extension that is not shipped is an error, never
//!   fetched. A document that is missing, not JSON or of no STAC type is an error in the report;
//! - `report` (fan-in): documents checked, how many are valid, and every error with its document,
//!   the JSON pointer of the instance and the message.
//!
//! The schemas are compiled once per process with the `jsonschema` crate built without its network
//! features and in offline mode: a `$ref` outside the shipped set fails at compile time instead of
//! being fetched.

use std::collections::{HashSet, VecDeque};
use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;

use jsonschema::error::ValidationErrorKind;
use jsonschema::{Registry, ValidationError, Validator};
use serde_json::{json, Value};
use stageflow_worker::{Task, TaskError};

use crate::inventory::task_key;
use crate::raster::param_str;

/// The shipped schemas, registered under their own `$id`.
const SCHEMAS: [&str; 13] = [
    include_str!("../schemas/stac/v1.0.0/catalog.json"),
    include_str!("../schemas/stac/v1.0.0/collection.json"),
    include_str!("../schemas/stac/v1.0.0/item.json"),
    include_str!("../schemas/stac/v1.0.0/basics.json"),
    include_str!("../schemas/stac/v1.0.0/datetime.json"),
    include_str!("../schemas/stac/v1.0.0/instrument.json"),
    include_str!("../schemas/stac/v1.0.0/licensing.json"),
    include_str!("../schemas/stac/v1.0.0/provider.json"),
    include_str!("../schemas/geojson/Feature.json"),
    include_str!("../schemas/geojson/Geometry.json"),
    include_str!("../schemas/projjson/v0.5/projjson.schema.json"),
    include_str!("../schemas/extensions/projection/v1.1.0/schema.json"),
    include_str!("../schemas/extensions/raster/v1.1.0/schema.json"),
];

pub const CATALOG: &str = "https://schemas.stacspec.org/v1.0.0/catalog-spec/json-schema/catalog.json";
pub const COLLECTION: &str = "https://schemas.stacspec.org/v1.0.0/collection-spec/json-schema/collection.json";
pub const ITEM: &str = "https://schemas.stacspec.org/v1.0.0/item-spec/json-schema/item.json";
/// The extension schemas that are shipped (the ones `stac::write_catalog` declares).
pub const EXTENSIONS: [&str; 2] = [
    "https://stac-extensions.github.io/projection/v1.1.0/schema.json",
    "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
];
/// The most documents one validation follows.
const MAX_DOCUMENTS: usize = 100_000;

/// The definition of `validate_stac`.
pub fn job_type() -> Value {
    json!({
        "description": "Validates a STAC 1.0.0 catalog, collection or item and the documents it links to, offline, against the shipped core, GeoJSON, projection and raster schemas.",
        "parameters": {"type": "object", "required": ["path"], "additionalProperties": false,
                       "properties": {"path": {"type": "string", "minLength": 1}}},
        "retry": {"max_attempts": 2, "backoff_base_seconds": 1, "backoff_max_seconds": 10},
        "stages": [
            {"name": "discover", "handler": "geo.stac_discover", "queue": "geo"},
            {"name": "validate", "handler": "geo.stac_validate", "queue": "geo", "fan_out": "dynamic"},
            {"name": "report", "handler": "geo.stac_report", "queue": "geo", "fan_out": "fan_in"}
        ]
    })
}

fn canonical(id: &str) -> &str {
    id.trim_end_matches('#')
}

/// The compiled validators: the three core ones and the shipped extensions, by canonical URL.
pub struct Schemas {
    validators: Vec<(String, Validator)>,
}

impl Schemas {
    pub fn get(&self, url: &str) -> Option<&Validator> {
        let url = canonical(url);
        self.validators.iter().find(|(id, _)| id == url).map(|(_, v)| v)
    }
}

fn compile() -> Result<Schemas, String> {
    let documents: Vec<Value> = SCHEMAS
        .iter()
        .map(|text| serde_json::from_str::<Value>(text).map_err(|e| format!("a shipped schema is not JSON: {e}")))
        .collect::<Result<_, _>>()?;
    let mut builder = Registry::new();
    for document in &documents {
        let id = document["$id"].as_str().ok_or("a shipped schema has no $id")?;
        builder = builder.add(canonical(id), document.clone()).map_err(|e| format!("registering {id}: {e}"))?;
    }
    let registry: &'static Registry<'static> =
        Box::leak(Box::new(builder.prepare().map_err(|e| format!("preparing the schema registry: {e}"))?));
    let mut validators = Vec::new();
    for url in [CATALOG, COLLECTION, ITEM].into_iter().chain(EXTENSIONS) {
        let document = documents
            .iter()
            .find(|d| d["$id"].as_str().map(canonical) == Some(url))
            .ok_or_else(|| format!("{url} is not shipped"))?;
        let validator = jsonschema::options()
            .with_registry(registry)
            .offline()
            .build(document)
            .map_err(|e| format!("compiling {url}: {e}"))?;
        validators.push((url.to_owned(), validator));
    }
    Ok(Schemas { validators })
}

/// The validators, compiled on first use.
pub fn schemas() -> Result<&'static Schemas, TaskError> {
    static SCHEMAS: OnceLock<Result<Schemas, String>> = OnceLock::new();
    SCHEMAS.get_or_init(compile).as_ref().map_err(|e| TaskError::permanent("schemas", e.clone()))
}

/// `a/./b/../c` as `a/c`, without touching the filesystem.
fn normalise(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

fn is_relative_href(href: &str) -> bool {
    !href.contains("://") && !href.starts_with('/') && !href.is_empty()
}

/// Stage 1: the root and every document reachable through relative `child` and `item` links.
pub fn discover(task: &Task) -> Result<Value, TaskError> {
    let root_text = param_str(task, "path")?;
    let root = std::fs::canonicalize(root_text).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => TaskError::permanent("not_found", format!("{root_text}: no such file")),
        _ => TaskError::permanent("unreadable", format!("{root_text}: {e}")),
    })?;
    if !root.is_file() {
        return Err(TaskError::permanent("not_a_file", format!("{root_text} is not a file")));
    }
    let base = root.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut seen: HashSet<PathBuf> = HashSet::from([root.clone()]);
    let mut queue = VecDeque::from([root.clone()]);
    let mut documents = Vec::new();
    let mut skipped = Vec::new();
    while let Some(path) = queue.pop_front() {
        documents.push(path.clone());
        if documents.len() > MAX_DOCUMENTS {
            return Err(TaskError::permanent(
                "too_many_documents",
                format!("{root_text} links more than {MAX_DOCUMENTS} documents"),
            ));
        }
        // What cannot be read or parsed is reported by its validate task; it has no links to follow.
        let Ok(bytes) = std::fs::read(&path) else { continue };
        let Ok(document) = serde_json::from_slice::<Value>(&bytes) else { continue };
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        for link in document["links"].as_array().into_iter().flatten() {
            if !matches!(link["rel"].as_str(), Some("child") | Some("item")) {
                continue;
            }
            let Some(href) = link["href"].as_str() else { continue };
            if !is_relative_href(href) {
                skipped.push(json!({"from": path.to_string_lossy(), "href": href}));
                continue;
            }
            let href = href.split(['#', '?']).next().unwrap_or(href);
            let target = normalise(&dir.join(href));
            let target = std::fs::canonicalize(&target).unwrap_or(target);
            // Only documents inside the root's directory are read (a link climbing out of the
            // catalog, or a symbolic link leading out of it, is reported, not followed).
            if !target.starts_with(&base) {
                skipped.push(
                    json!({"from": path.to_string_lossy(), "href": href, "reason": "outside the catalog's directory"}),
                );
                continue;
            }
            if seen.insert(target.clone()) {
                queue.push_back(target);
            }
        }
    }
    let mut used = HashSet::new();
    let tasks: Vec<Value> = documents
        .iter()
        .map(|path| {
            let relative = path.strip_prefix(&base).map(|p| p.to_string_lossy().into_owned()).unwrap_or_else(|_| path.to_string_lossy().into_owned());
            json!({"key": task_key(&relative, &mut used), "params": {"document": path.to_string_lossy(), "relative": relative}})
        })
        .collect();
    Ok(json!({"root": root.to_string_lossy(), "documents": tasks.len(), "skipped_links": skipped, "tasks": tasks}))
}

/// Depth of an instance path (how specific an error is).
fn depth(error: &ValidationError) -> usize {
    error.instance_path().segments().count()
}

/// The errors worth showing: an `anyOf`/`oneOf` that no branch satisfied is replaced by the errors
/// of its most specific branches (those whose errors reach deepest into the instance, then those
/// with the fewest; all of them on a tie), so that a bad `proj:epsg` is reported at
/// `/properties/proj:epsg` rather than as "not valid under any of the schemas" at the root.
fn leaf_errors(error: &ValidationError, out: &mut Vec<(String, String)>) {
    let branches = match error.kind() {
        ValidationErrorKind::AnyOf { context } | ValidationErrorKind::OneOfNotValid { context } => {
            context.iter().filter(|branch| !branch.is_empty()).collect::<Vec<_>>()
        }
        _ => Vec::new(),
    };
    let rank =
        |branch: &&Vec<ValidationError>| (branch.iter().map(depth).max().unwrap_or(0), std::cmp::Reverse(branch.len()));
    match branches.iter().map(rank).max() {
        Some(best) => {
            for branch in branches.iter().filter(|b| rank(b) == best) {
                branch.iter().for_each(|e| leaf_errors(e, out));
            }
        }
        None => out.push((error.instance_path().to_string(), error.to_string())),
    }
}

fn errors_of(validator: &Validator, instance: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for error in validator.iter_errors(instance) {
        leaf_errors(&error, &mut out);
    }
    let mut seen = HashSet::new();
    out.retain(|e| seen.insert(e.clone()));
    out
}

/// Stage 2: one document.
pub fn validate(task: &Task) -> Result<Value, TaskError> {
    let path = param_str(task, "document")?;
    let relative = param_str(task, "relative")?;
    let schemas = schemas()?;
    let mut errors: Vec<Value> = Vec::new();
    let mut checked: Vec<String> = Vec::new();
    let mut error = |pointer: &str, message: String| {
        errors.push(json!({"document": relative, "pointer": pointer, "message": message}))
    };
    let mut kind = Value::Null;
    match std::fs::read(path) {
        Err(e) => error("", format!("cannot read {relative}: {e}")),
        Ok(bytes) => match serde_json::from_slice::<Value>(&bytes) {
            Err(e) => error("", format!("not JSON: {e}")),
            Ok(document) => {
                let core = match document["type"].as_str() {
                    Some("Catalog") => Some(CATALOG),
                    Some("Collection") => Some(COLLECTION),
                    Some("Feature") => Some(ITEM),
                    Some(other) => {
                        error("/type", format!("{other:?} is not a STAC type (Catalog, Collection or Feature)"));
                        None
                    }
                    None => {
                        error("", "no recognisable STAC type: \"type\" must be Catalog, Collection or Feature".into());
                        None
                    }
                };
                kind = document["type"].clone();
                let version = document["stac_version"].as_str();
                match (core, version) {
                    (Some(url), Some("1.0.0")) => {
                        checked.push(url.to_owned());
                        let validator = schemas
                            .get(url)
                            .ok_or_else(|| TaskError::permanent("schemas", format!("{url} is not compiled")))?;
                        for (pointer, message) in errors_of(validator, &document) {
                            error(&pointer, message);
                        }
                    }
                    (Some(_), Some(other)) => {
                        error("/stac_version", format!("STAC {other}: only the 1.0.0 schemas are shipped"))
                    }
                    (Some(_), None) => error("/stac_version", "stac_version is missing or not a string".into()),
                    (None, _) => {}
                }
                if core.is_some() {
                    for (index, extension) in document["stac_extensions"].as_array().into_iter().flatten().enumerate() {
                        let Some(url) = extension.as_str() else { continue };
                        match schemas.get(url).filter(|_| EXTENSIONS.contains(&canonical(url))) {
                            Some(validator) => {
                                checked.push(canonical(url).to_owned());
                                for (pointer, message) in errors_of(validator, &document) {
                                    error(&pointer, message);
                                }
                            }
                            None => error(
                                &format!("/stac_extensions/{index}"),
                                format!("the extension schema {url} is not shipped with Stageflow (not fetched: validation is offline)"),
                            ),
                        }
                    }
                }
            }
        },
    }
    Ok(json!({"document": relative, "type": kind, "valid": errors.is_empty(), "schemas": checked, "errors": errors}))
}

/// Stage 3: the report.
pub fn report(task: &Task) -> Result<Value, TaskError> {
    let root = param_str(task, "path")?;
    let results = task.inputs.as_ref().and_then(Value::as_array).cloned().unwrap_or_default();
    let valid = results.iter().filter(|r| r["valid"] == json!(true)).count();
    let errors: Vec<Value> = results.iter().flat_map(|r| r["errors"].as_array().cloned().unwrap_or_default()).collect();
    let invalid: Vec<Value> =
        results.iter().filter(|r| r["valid"] != json!(true)).map(|r| r["document"].clone()).collect();
    Ok(json!({
        "root": root,
        "documents": results.len(),
        "valid": valid,
        "invalid": invalid,
        "error_count": errors.len(),
        "errors": errors,
    }))
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn the_shipped_schemas_compile_offline() {
        let schemas = schemas().unwrap();
        for url in [CATALOG, COLLECTION, ITEM].into_iter().chain(EXTENSIONS) {
            assert!(schemas.get(url).is_some(), "{url}");
        }
        assert!(schemas.get("https://stac-extensions.github.io/eo/v1.0.0/schema.json").is_none());
    }

    #[test]
    fn paths_normalise() {
        assert_eq!(normalise(Path::new("/a/b/./../c/d.json")), PathBuf::from("/a/c/d.json"));
        assert!(
            is_relative_href("./items/x.json")
                && !is_relative_href("https://x/y.json")
                && !is_relative_href("/abs.json")
        );
    }
}
