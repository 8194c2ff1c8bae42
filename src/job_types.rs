//! Job type definitions: validated when registered, stored with every default filled in.
//!
//! ```json
//! {
//!   "description": "what the job does",
//!   "parameters": { JSON Schema of the params (see `params`) },
//!   "retry": {"max_attempts": 3, "backoff_base_seconds": 1, "backoff_max_seconds": 300},
//!   "stages": [
//!     {"name": "greet", "handler": "hello_world.greet", "queue": "default",
//!      "fan_out": "count", "param": "n", "retry": { overrides the job type's retry },
//!      "max_failed_tasks": 0, "max_failure_ratio": 0,
//!      "lease_seconds": 120, "timeout_seconds": 60},
//!     ...
//!   ],
//!   "lease_seconds": 300,          (default for stages without their own)
//!   "task_timeout_seconds": 600,   (default handler timeout for stages without their own)
//!   "timeout_seconds": 3600        (the job's deadline)
//! }
//! ```

use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;
use serde_json::{json, Map, Value};

/// The most tasks one stage may fan out to.
pub const MAX_FAN_OUT: u64 = 1_000_000;
/// The most stages a job type may have.
pub const MAX_STAGES: usize = 100;
const FAN_OUTS: &[&str] = &["single", "count", "each", "dynamic", "lineage", "fan_in"];
const NEEDS_PREVIOUS: &[&str] = &["dynamic", "lineage", "fan_in"];

/// A stage as the parameter checks need it.
pub struct Stage {
    pub name: String,
    pub fan_out: String,
    pub param: Option<String>,
}

/// The stages of a normalised definition.
pub fn stages_of(definition: &Value) -> Vec<Stage> {
    definition["stages"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|stage| Stage {
            name: stage["name"].as_str().unwrap_or_default().to_owned(),
            fan_out: stage["fan_out"].as_str().unwrap_or_default().to_owned(),
            param: stage.get("param").and_then(Value::as_str).map(str::to_owned),
        })
        .collect()
}

/// Why a definition was refused: the field's path and what is wrong with it.
#[derive(Debug, PartialEq)]
pub struct Invalid {
    pub field: String,
    pub problem: String,
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> Invalid {
    Invalid { field: field.into(), problem: problem.into() }
}

fn is_identifier(name: &str, max_len: usize) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some('a'..='z' | '_'))
        && name.len() <= max_len
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
}

/// Whether `name` can name a job type: 1 to 63 lowercase letters, digits or underscores,
/// starting with a letter.
pub fn is_job_type_name(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_lowercase()) && is_identifier(name, 63)
}

fn check_fields(object: &Map<String, Value>, path: &str, allowed: &[&str]) -> Result<(), Invalid> {
    match object.keys().find(|key| !allowed.contains(&key.as_str())) {
        Some(key) => Err(invalid(format!("{path}.{key}"), format!("unknown field (allowed: {})", allowed.join(", ")))),
        None => Ok(()),
    }
}

fn number_in(value: Option<&Value>, path: &str, default: f64, min: f64, max: f64) -> Result<f64, Invalid> {
    match value {
        None => Ok(default),
        Some(v) => match v.as_f64() {
            Some(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err(invalid(path, format!("must be a number from {min} to {max}, got {v}"))),
        },
    }
}

fn normalize_retry(retry: Option<&Value>, inherited: &Value, path: &str) -> Result<Value, Invalid> {
    let empty = Map::new();
    let retry = match retry {
        None => &empty,
        Some(Value::Object(map)) => map,
        Some(other) => return Err(invalid(path, format!("must be an object, got {other}"))),
    };
    check_fields(retry, path, &["max_attempts", "backoff_base_seconds", "backoff_max_seconds"])?;
    let inherited_f = |key: &str, fallback: f64| inherited.get(key).and_then(Value::as_f64).unwrap_or(fallback);
    let max_attempts = match retry.get("max_attempts") {
        None => inherited_f("max_attempts", 3.0) as u64,
        Some(v) => v.as_u64().filter(|n| (1..=100).contains(n)).ok_or_else(|| {
            invalid(format!("{path}.max_attempts"), format!("must be an integer from 1 to 100, got {v}"))
        })?,
    };
    let base = number_in(
        retry.get("backoff_base_seconds"),
        &format!("{path}.backoff_base_seconds"),
        inherited_f("backoff_base_seconds", 1.0),
        0.0,
        86_400.0,
    )?;
    let max = number_in(
        retry.get("backoff_max_seconds"),
        &format!("{path}.backoff_max_seconds"),
        inherited_f("backoff_max_seconds", 300.0).max(base),
        base,
        604_800.0,
    )?;
    Ok(json!({"max_attempts": max_attempts, "backoff_base_seconds": base, "backoff_max_seconds": max}))
}

fn required_string<'a>(stage: &'a Map<String, Value>, path: &str, key: &str) -> Result<&'a str, Invalid> {
    match stage.get(key) {
        Some(Value::String(s)) if !s.is_empty() && s.len() <= 200 => Ok(s),
        Some(other) => {
            Err(invalid(format!("{path}.{key}"), format!("must be a string of 1 to 200 bytes, got {other}")))
        }
        None => Err(invalid(format!("{path}.{key}"), "is required")),
    }
}

/// An optional whole number of seconds from 1 to `max` at `path`.
fn seconds(value: Option<&Value>, path: &str, max: u64) -> Result<Option<u64>, Invalid> {
    match value {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .filter(|n| (1..=max).contains(n))
            .map(Some)
            .ok_or_else(|| invalid(path, format!("must be an integer from 1 to {max}, got {v}"))),
    }
}

/// What stages inherit from their job type.
struct StageDefaults<'a> {
    retry: &'a Value,
    lease_seconds: Option<u64>,
    timeout_seconds: Option<u64>,
}

fn normalize_stage(
    stage: &Value,
    index: usize,
    defaults: &StageDefaults,
    schema: Option<&Value>,
    seen: &mut Vec<String>,
) -> Result<Value, Invalid> {
    let path = format!("definition.stages[{index}]");
    let Some(stage) = stage.as_object() else {
        return Err(invalid(path, "must be an object"));
    };
    check_fields(
        stage,
        &path,
        &[
            "name",
            "description",
            "handler",
            "queue",
            "fan_out",
            "param",
            "retry",
            "max_failed_tasks",
            "max_failure_ratio",
            "lease_seconds",
            "timeout_seconds",
        ],
    )?;

    let name = required_string(stage, &path, "name")?;
    if !is_job_type_name(name) {
        return Err(invalid(
            format!("{path}.name"),
            format!("{name:?} is not 1 to 63 lowercase letters, digits or underscores starting with a letter"),
        ));
    }
    if seen.iter().any(|other| other == name) {
        return Err(invalid(format!("{path}.name"), format!("{name:?} names an earlier stage too")));
    }
    seen.push(name.to_owned());
    let handler = required_string(stage, &path, "handler")?;

    let queue = match stage.get("queue") {
        None => "default",
        Some(Value::String(q)) if is_identifier(q, 47) => q,
        Some(other) => {
            return Err(invalid(format!("{path}.queue"), format!("{other} is not a pgmq queue name: 1 to 47 lowercase letters, digits or underscores, not starting with a digit")))
        }
    };

    let fan_out = match stage.get("fan_out") {
        None => "single",
        Some(Value::String(f)) if FAN_OUTS.contains(&f.as_str()) => f,
        Some(other) => {
            return Err(invalid(format!("{path}.fan_out"), format!("{other} is not one of {}", FAN_OUTS.join(", "))))
        }
    };
    if index == 0 && NEEDS_PREVIOUS.contains(&fan_out) {
        return Err(invalid(
            format!("{path}.fan_out"),
            format!("{fan_out:?} fans out from a previous stage, and the first stage has none"),
        ));
    }

    let param = match (fan_out, stage.get("param")) {
        ("count" | "each", Some(Value::String(p))) if !p.is_empty() => Some(p.clone()),
        ("count" | "each", Some(other)) => {
            return Err(invalid(format!("{path}.param"), format!("must name a parameter, got {other}")))
        }
        ("count" | "each", None) => {
            return Err(invalid(
                format!("{path}.param"),
                format!("a {fan_out:?} stage needs the name of the parameter it fans out over"),
            ))
        }
        (_, Some(_)) => {
            return Err(invalid(
                format!("{path}.param"),
                format!("only count and each stages read a parameter, this stage is {fan_out:?}"),
            ))
        }
        (_, None) => None,
    };
    if let (Some(p), Some(properties)) = (&param, schema.and_then(|s| s.get("properties")).and_then(Value::as_object)) {
        if !properties.contains_key(p) {
            return Err(invalid(format!("{path}.param"), format!("{p:?} is not a property of definition.parameters")));
        }
    }

    let max_failed_tasks = match stage.get("max_failed_tasks") {
        None => 0,
        Some(v) => v.as_u64().filter(|n| *n <= MAX_FAN_OUT).ok_or_else(|| {
            invalid(format!("{path}.max_failed_tasks"), format!("must be an integer from 0 to {MAX_FAN_OUT}, got {v}"))
        })?,
    };
    let max_failure_ratio =
        number_in(stage.get("max_failure_ratio"), &format!("{path}.max_failure_ratio"), 0.0, 0.0, 1.0)?;

    let mut normalized = json!({
        "name": name,
        "handler": handler,
        "queue": queue,
        "fan_out": fan_out,
        "retry": normalize_retry(stage.get("retry"), defaults.retry, &format!("{path}.retry"))?,
        "max_failed_tasks": max_failed_tasks,
        "max_failure_ratio": max_failure_ratio,
    });
    if let Some(p) = param {
        normalized["param"] = Value::String(p);
    }
    if let Some(lease) =
        seconds(stage.get("lease_seconds"), &format!("{path}.lease_seconds"), 604_800)?.or(defaults.lease_seconds)
    {
        normalized["lease_seconds"] = json!(lease);
    }
    if let Some(timeout) =
        seconds(stage.get("timeout_seconds"), &format!("{path}.timeout_seconds"), 604_800)?.or(defaults.timeout_seconds)
    {
        normalized["timeout_seconds"] = json!(timeout);
    }
    if let Some(description) = stage.get("description") {
        normalized["description"] = description.clone();
    }
    Ok(normalized)
}

/// Validates a definition and returns it with every default filled in.
pub fn normalize(definition: &Value) -> Result<Value, Invalid> {
    let Some(object) = definition.as_object() else {
        return Err(invalid("definition", "must be a JSON object"));
    };
    check_fields(
        object,
        "definition",
        &[
            "description",
            "parameters",
            "retry",
            "stages",
            "timeout_seconds",
            "lease_seconds",
            "task_timeout_seconds",
            "webhook_url",
        ],
    )?;
    let webhook_url = match object.get("webhook_url") {
        None => None,
        Some(Value::String(url))
            if (url.starts_with("http://") || url.starts_with("https://"))
                && url.len() <= 2048
                && !url.contains(char::is_whitespace) =>
        {
            Some(url.clone())
        }
        Some(other) => return Err(invalid("definition.webhook_url", format!("must be an http(s) URL, got {other}"))),
    };
    let timeout_seconds = match object.get("timeout_seconds") {
        None => None,
        Some(v) => Some(v.as_u64().filter(|n| (1..=31_536_000).contains(n)).ok_or_else(|| {
            invalid("definition.timeout_seconds", format!("must be an integer from 1 to 31536000 (a year), got {v}"))
        })?),
    };
    let description = match object.get("description") {
        None => "",
        Some(Value::String(s)) => s,
        Some(other) => return Err(invalid("definition.description", format!("must be a string, got {other}"))),
    };
    let schema = object.get("parameters");
    if let Some(schema) = schema {
        if let Some(problem) = crate::schema::schema_problems(schema, "definition.parameters").into_iter().next() {
            return Err(invalid(problem.path, problem.message));
        }
    }
    let retry = normalize_retry(object.get("retry"), &Value::Null, "definition.retry")?;
    let stages = match object.get("stages") {
        Some(Value::Array(stages)) if !stages.is_empty() && stages.len() <= MAX_STAGES => stages,
        Some(Value::Array(stages)) => {
            return Err(invalid("definition.stages", format!("needs 1 to {MAX_STAGES} stages, got {}", stages.len())))
        }
        Some(other) => return Err(invalid("definition.stages", format!("must be an array of stages, got {other}"))),
        None => return Err(invalid("definition.stages", "is required")),
    };
    let defaults = StageDefaults {
        retry: &retry,
        lease_seconds: seconds(object.get("lease_seconds"), "definition.lease_seconds", 604_800)?,
        timeout_seconds: seconds(object.get("task_timeout_seconds"), "definition.task_timeout_seconds", 604_800)?,
    };
    let mut seen = Vec::new();
    let stages = stages
        .iter()
        .enumerate()
        .map(|(i, stage)| normalize_stage(stage, i, &defaults, schema, &mut seen))
        .collect::<Result<Vec<_>, _>>()?;

    let mut normalized = json!({"description": description, "retry": retry, "stages": stages});
    if let Some(schema) = schema {
        normalized["parameters"] = schema.clone();
    }
    if let Some(timeout) = timeout_seconds {
        normalized["timeout_seconds"] = json!(timeout);
    }
    if let Some(url) = webhook_url {
        normalized["webhook_url"] = json!(url);
    }
    Ok(normalized)
}

/// `stageflow._normalize_definition(name, definition)`: the definition with defaults filled in,
/// or an error naming the bad field.
#[pg_extern(immutable, parallel_safe, name = "_normalize_definition")]
fn normalize_definition_sql(name: Option<&str>, definition: Option<pgrx::JsonB>) -> pgrx::JsonB {
    let name = name.unwrap_or_default();
    if !is_job_type_name(name) {
        crate::raise(
            PgSqlErrorCode::ERRCODE_INVALID_NAME,
            format!("invalid job type name {name:?}"),
            "job type names are 1 to 63 lowercase letters, digits or underscores, starting with a letter",
        );
    }
    let Some(pgrx::JsonB(definition)) = definition else {
        crate::raise(
            PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
            format!("the definition of job type {name} is NULL"),
            "a definition is a JSON object with at least \"stages\"",
        );
    };
    match normalize(&definition) {
        Ok(normalized) => pgrx::JsonB(normalized),
        Err(Invalid { field, problem }) => crate::raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("invalid definition of job type {name}: {field}: {problem}"),
            "see \"Job type definitions\" in the README for the fields a definition takes",
        ),
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    fn field_of(definition: Value) -> String {
        normalize(&definition).expect_err("definition should be refused").field
    }

    #[test]
    fn defaults_are_filled_in() {
        let normalized = normalize(&json!({"stages": [{"name": "a", "handler": "h"}]})).unwrap();
        assert_eq!(
            normalized,
            json!({
                "description": "",
                "retry": {"max_attempts": 3, "backoff_base_seconds": 1.0, "backoff_max_seconds": 300.0},
                "stages": [{"name": "a", "handler": "h", "queue": "default", "fan_out": "single",
                            "retry": {"max_attempts": 3, "backoff_base_seconds": 1.0, "backoff_max_seconds": 300.0},
                            "max_failed_tasks": 0, "max_failure_ratio": 0.0}]
            })
        );
    }

    #[test]
    fn stage_retry_overrides_the_job_type_retry() {
        let normalized = normalize(&json!({
            "retry": {"max_attempts": 5, "backoff_base_seconds": 2},
            "stages": [{"name": "a", "handler": "h", "retry": {"max_attempts": 1}}]
        }))
        .unwrap();
        assert_eq!(normalized["stages"][0]["retry"]["max_attempts"], 1);
        assert_eq!(normalized["stages"][0]["retry"]["backoff_base_seconds"], 2.0);
    }

    #[test]
    fn stages_inherit_lease_and_timeout_unless_they_set_their_own() {
        let normalized = normalize(&json!({
            "lease_seconds": 30, "task_timeout_seconds": 10,
            "stages": [{"name": "a", "handler": "h"}, {"name": "b", "handler": "h", "lease_seconds": 5, "timeout_seconds": 2}]
        }))
        .unwrap();
        assert_eq!(
            (&normalized["stages"][0]["lease_seconds"], &normalized["stages"][0]["timeout_seconds"]),
            (&json!(30), &json!(10))
        );
        assert_eq!(
            (&normalized["stages"][1]["lease_seconds"], &normalized["stages"][1]["timeout_seconds"]),
            (&json!(5), &json!(2))
        );
        assert_eq!(
            field_of(json!({"stages": [{"name": "a", "handler": "h", "lease_seconds": 0}]})),
            "definition.stages[0].lease_seconds"
        );
    }

    #[test]
    fn the_bad_field_is_named() {
        assert_eq!(field_of(json!([])), "definition");
        assert_eq!(field_of(json!({"stages": [], "x": 1})), "definition.x");
        assert_eq!(field_of(json!({"stages": []})), "definition.stages");
        assert_eq!(field_of(json!({"stages": [{"handler": "h"}]})), "definition.stages[0].name");
        assert_eq!(field_of(json!({"stages": [{"name": "a"}]})), "definition.stages[0].handler");
        assert_eq!(
            field_of(json!({"stages": [{"name": "a", "handler": "h", "fan_out": "lineage"}]})),
            "definition.stages[0].fan_out"
        );
        assert_eq!(
            field_of(json!({"stages": [{"name": "a", "handler": "h", "fan_out": "many"}]})),
            "definition.stages[0].fan_out"
        );
        assert_eq!(
            field_of(json!({"stages": [{"name": "a", "handler": "h", "fan_out": "count"}]})),
            "definition.stages[0].param"
        );
        assert_eq!(
            field_of(json!({"stages": [{"name": "a", "handler": "h", "queue": "Bad;q"}]})),
            "definition.stages[0].queue"
        );
        assert_eq!(
            field_of(json!({"stages": [{"name": "a", "handler": "h"}, {"name": "a", "handler": "h"}]})),
            "definition.stages[1].name"
        );
        assert_eq!(
            field_of(json!({"retry": {"max_attempts": 0}, "stages": [{"name": "a", "handler": "h"}]})),
            "definition.retry.max_attempts"
        );
        assert_eq!(
            field_of(
                json!({"parameters": {"properties": {"m": {}}}, "stages": [{"name": "a", "handler": "h", "fan_out": "count", "param": "n"}]})
            ),
            "definition.stages[0].param"
        );
        assert_eq!(
            field_of(json!({"parameters": {"anyOf": []}, "stages": [{"name": "a", "handler": "h"}]})),
            "definition.parameters"
        );
        assert_eq!(
            field_of(json!({"timeout_seconds": 0, "stages": [{"name": "a", "handler": "h"}]})),
            "definition.timeout_seconds"
        );
        assert_eq!(
            field_of(json!({"stages": [{"name": "a", "handler": "h", "max_failure_ratio": 1.5}]})),
            "definition.stages[0].max_failure_ratio"
        );
    }

    #[test]
    fn names_follow_the_documented_rules() {
        assert!(is_job_type_name("process_raster2"));
        assert!(!is_job_type_name("2raster"));
        assert!(!is_job_type_name("_x"));
        assert!(!is_job_type_name("Raster"));
        assert!(!is_job_type_name(&"a".repeat(64)));
    }
}
