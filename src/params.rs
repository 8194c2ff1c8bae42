//! Job parameters: checked against the job type's JSON Schema, defaults filled in.
//!
//! The supported subset of JSON Schema: `type` (a name or a list of names), `properties`,
//! `required`, `additionalProperties` (boolean or schema), `items`, `minItems`, `maxItems`, `enum`,
//! `const`, `minimum`, `maximum`, `exclusiveMinimum`, `exclusiveMaximum`, `minLength`,
//! `maxLength` (in characters), `pattern`; the annotations `title`, `description`, `default`,
//! `examples`, `format`, `$schema`, `$id`, `$comment` are accepted and ignored (`default` fills in a
//! missing property before validation). Any other keyword is refused when the job type is
//! registered, so a schema never silently checks less than it says.

use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;
use serde_json::{Map, Value};

use crate::job_types::{Stage, MAX_FAN_OUT};

const KEYWORDS: &[&str] = &[
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "minItems",
    "maxItems",
    "enum",
    "const",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
];
const ANNOTATIONS: &[&str] = &["title", "description", "default", "examples", "format", "$schema", "$id", "$comment"];
const TYPES: &[&str] = &["object", "array", "string", "integer", "number", "boolean", "null"];

/// What is wrong with a schema itself, each problem prefixed by its path.
pub fn schema_problems(schema: &Value, path: &str) -> Vec<String> {
    let mut problems = Vec::new();
    check_schema(schema, path, &mut problems);
    problems
}

fn check_schema(schema: &Value, path: &str, problems: &mut Vec<String>) {
    let Some(map) = schema.as_object() else {
        problems.push(format!("{path}: a schema must be an object"));
        return;
    };
    for (keyword, value) in map {
        let here = format!("{path}.{keyword}");
        match keyword.as_str() {
            "type" => {
                let names: Vec<&Value> = match value {
                    Value::Array(items) => items.iter().collect(),
                    other => vec![other],
                };
                for name in names {
                    if !name.as_str().is_some_and(|n| TYPES.contains(&n)) {
                        problems.push(format!("{here}: {name} is not one of {}", TYPES.join(", ")));
                    }
                }
            }
            "properties" => match value.as_object() {
                Some(properties) => {
                    for (name, sub) in properties {
                        check_schema(sub, &format!("{here}.{name}"), problems);
                    }
                }
                None => problems.push(format!("{here}: must be an object of schemas")),
            },
            "required" => {
                if !value.as_array().is_some_and(|names| names.iter().all(Value::is_string)) {
                    problems.push(format!("{here}: must be an array of property names"));
                }
            }
            "additionalProperties" => {
                if !value.is_boolean() {
                    check_schema(value, &here, problems);
                }
            }
            "items" => check_schema(value, &here, problems),
            "enum" => {
                if !value.is_array() {
                    problems.push(format!("{here}: must be an array"));
                }
            }
            "minimum" | "maximum" | "exclusiveMinimum" | "exclusiveMaximum" => {
                if !value.is_number() {
                    problems.push(format!("{here}: must be a number"));
                }
            }
            "minLength" | "maxLength" | "minItems" | "maxItems" => {
                if value.as_u64().is_none() {
                    problems.push(format!("{here}: must be a non-negative integer"));
                }
            }
            "pattern" => match value.as_str().map(regex::Regex::new) {
                Some(Ok(_)) => {}
                _ => problems.push(format!("{here}: must be a valid regular expression")),
            },
            "const" => {}
            other if ANNOTATIONS.contains(&other) => {}
            other => {
                problems.push(format!("{path}: unsupported keyword {other:?} (supported: {})", KEYWORDS.join(", ")))
            }
        }
    }
}

/// Fills in `default`s of missing properties, at every level of nested objects.
pub fn apply_defaults(schema: &Value, value: &mut Value) {
    let (Some(properties), Some(object)) = (schema.get("properties").and_then(Value::as_object), value.as_object_mut())
    else {
        return;
    };
    for (name, sub) in properties {
        if !object.contains_key(name) {
            if let Some(default) = sub.get("default") {
                object.insert(name.clone(), default.clone());
            }
        }
        if let Some(child) = object.get_mut(name) {
            apply_defaults(sub, child);
        }
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if is_integer(n) => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn is_integer(n: &serde_json::Number) -> bool {
    n.is_i64() || n.is_u64() || n.as_f64().is_some_and(|f| f.fract() == 0.0)
}

fn has_type(value: &Value, name: &str) -> bool {
    let actual = type_name(value);
    actual == name || (name == "number" && actual == "integer")
}

/// Checks `value` against `schema`, adding one message per problem, each prefixed by its path.
pub fn validate(schema: &Value, value: &Value, path: &str, errors: &mut Vec<String>) {
    let Some(schema) = schema.as_object() else { return };
    if let Some(expected) = schema.get("type") {
        let names: Vec<&str> = match expected {
            Value::Array(items) => items.iter().filter_map(Value::as_str).collect(),
            other => other.as_str().into_iter().collect(),
        };
        if !names.iter().any(|name| has_type(value, name)) {
            errors.push(format!("{path}: expected {}, got {}", names.join(" or "), type_name(value)));
            return;
        }
    }
    if let Some(options) = schema.get("enum").and_then(Value::as_array) {
        if !options.contains(value) {
            errors.push(format!("{path}: {value} is not one of {}", Value::Array(options.clone())));
        }
    }
    if let Some(expected) = schema.get("const") {
        if expected != value {
            errors.push(format!("{path}: must be {expected}, got {value}"));
        }
    }
    match value {
        Value::Number(n) => validate_number(schema, n.as_f64().unwrap_or(f64::NAN), path, errors),
        Value::String(s) => validate_string(schema, s, path, errors),
        Value::Array(items) => validate_array(schema, items, path, errors),
        Value::Object(object) => validate_object(schema, object, path, errors),
        Value::Null | Value::Bool(_) => {}
    }
}

fn validate_number(schema: &Map<String, Value>, n: f64, path: &str, errors: &mut Vec<String>) {
    let bound = |key: &str| schema.get(key).and_then(Value::as_f64);
    if let Some(min) = bound("minimum").filter(|min| n < *min) {
        errors.push(format!("{path}: {n} is less than the minimum {min}"));
    }
    if let Some(max) = bound("maximum").filter(|max| n > *max) {
        errors.push(format!("{path}: {n} is greater than the maximum {max}"));
    }
    if let Some(min) = bound("exclusiveMinimum").filter(|min| n <= *min) {
        errors.push(format!("{path}: {n} must be greater than {min}"));
    }
    if let Some(max) = bound("exclusiveMaximum").filter(|max| n >= *max) {
        errors.push(format!("{path}: {n} must be less than {max}"));
    }
}

fn validate_string(schema: &Map<String, Value>, s: &str, path: &str, errors: &mut Vec<String>) {
    let length = s.chars().count() as u64;
    if let Some(min) = schema.get("minLength").and_then(Value::as_u64).filter(|min| length < *min) {
        errors.push(format!("{path}: {length} characters, fewer than minLength {min}"));
    }
    if let Some(max) = schema.get("maxLength").and_then(Value::as_u64).filter(|max| length > *max) {
        errors.push(format!("{path}: {length} characters, more than maxLength {max}"));
    }
    if let Some(pattern) = schema.get("pattern").and_then(Value::as_str) {
        if let Ok(re) = regex::Regex::new(pattern) {
            if !re.is_match(s) {
                errors.push(format!("{path}: does not match the pattern {pattern:?}"));
            }
        }
    }
}

fn validate_array(schema: &Map<String, Value>, items: &[Value], path: &str, errors: &mut Vec<String>) {
    let count = items.len() as u64;
    if let Some(min) = schema.get("minItems").and_then(Value::as_u64).filter(|min| count < *min) {
        errors.push(format!("{path}: {count} items, fewer than minItems {min}"));
    }
    if let Some(max) = schema.get("maxItems").and_then(Value::as_u64).filter(|max| count > *max) {
        errors.push(format!("{path}: {count} items, more than maxItems {max}"));
    }
    if let Some(item_schema) = schema.get("items") {
        for (i, item) in items.iter().enumerate() {
            validate(item_schema, item, &format!("{path}[{i}]"), errors);
        }
    }
}

fn validate_object(schema: &Map<String, Value>, object: &Map<String, Value>, path: &str, errors: &mut Vec<String>) {
    for name in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
        if let Some(name) = name.as_str().filter(|name| !object.contains_key(*name)) {
            errors.push(format!("{path}.{name}: required property is missing"));
        }
    }
    let properties = schema.get("properties").and_then(Value::as_object);
    let mut names: Vec<&String> = object.keys().collect();
    names.sort();
    for (name, item) in names.into_iter().map(|name| (name, &object[name])) {
        match properties.and_then(|p| p.get(name)) {
            Some(sub) => validate(sub, item, &format!("{path}.{name}"), errors),
            None => match schema.get("additionalProperties") {
                Some(Value::Bool(false)) => {
                    errors.push(format!("{path}.{name}: unknown property (additionalProperties is false)"))
                }
                Some(sub @ Value::Object(_)) => validate(sub, item, &format!("{path}.{name}"), errors),
                _ => {}
            },
        }
    }
}

/// Checks the parameters a fan-out rule reads: `count` needs an integer from 0 to the fan-out
/// limit, `each` an array no longer than it.
pub fn fan_out_problems(stages: &[Stage], params: &Value, errors: &mut Vec<String>) {
    for stage in stages {
        let Some(param) = stage.param.as_deref() else { continue };
        let value = params.get(param);
        let path = format!("params.{param}");
        match (stage.fan_out.as_str(), value) {
            ("count", Some(v)) if v.as_u64().is_some_and(|n| n <= MAX_FAN_OUT) => {}
            ("count", _) => errors.push(format!(
                "{path}: stage {:?} fans out this many tasks: it must be an integer from 0 to {MAX_FAN_OUT}",
                stage.name
            )),
            ("each", Some(Value::Array(items))) if items.len() as u64 <= MAX_FAN_OUT => {}
            ("each", _) => errors.push(format!(
                "{path}: stage {:?} fans out one task per element: it must be an array of at most {MAX_FAN_OUT} elements",
                stage.name
            )),
            _ => {}
        }
    }
}

/// `stageflow._validate_params(job_type, definition, params_text)`: the params with defaults
/// filled in, or an error (22023) listing every problem.
#[pg_extern(immutable, parallel_safe, name = "_validate_params")]
fn validate_params_sql(job_type: &str, definition: pgrx::JsonB, params: Option<&str>) -> pgrx::JsonB {
    let Some(mut params) = params.map(|text| crate::parse_json(text, "params")) else {
        crate::raise(
            PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
            format!("params of a {job_type} job must be a JSON object, got NULL"),
            "pass '{}' for a job type without parameters",
        );
    };
    if !params.is_object() {
        crate::raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("params of a {job_type} job must be a JSON object, got {}", type_name(&params)),
            "pass the parameters as a JSON object, e.g. '{\"n\": 3}'",
        );
    }
    let definition = definition.0;
    let mut errors = Vec::new();
    if let Some(schema) = definition.get("parameters") {
        apply_defaults(schema, &mut params);
        validate(schema, &params, "params", &mut errors);
    }
    if errors.is_empty() {
        let stages = crate::job_types::stages_of(&definition);
        fan_out_problems(&stages, &params, &mut errors);
    }
    if !errors.is_empty() {
        crate::raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("params do not fit job type {job_type}: {}", errors.join("; ")),
            "the parameters schema is in the definition shown by stageflow.job_types()",
        );
    }
    pgrx::JsonB(params)
}

#[cfg(test)]
mod unit {
    use super::*;
    use serde_json::json;

    fn errors_of(schema: Value, value: Value) -> Vec<String> {
        let mut errors = Vec::new();
        validate(&schema, &value, "params", &mut errors);
        errors
    }

    #[test]
    fn each_keyword_reports_its_path() {
        let schema = json!({
            "type": "object",
            "required": ["n", "name"],
            "additionalProperties": false,
            "properties": {
                "n": {"type": "integer", "minimum": 1, "maximum": 10},
                "name": {"type": "string", "minLength": 2, "maxLength": 3, "pattern": "^[a-z]+$"},
                "mode": {"enum": ["fast", "slow"]},
                "files": {"type": "array", "maxItems": 2, "items": {"type": "string"}},
                "ratio": {"type": "number", "exclusiveMaximum": 1}
            }
        });
        assert!(errors_of(schema.clone(), json!({"n": 3, "name": "ab"})).is_empty());
        assert_eq!(
            errors_of(
                schema.clone(),
                json!({"n": 0, "name": "ABCD", "mode": "x", "files": [1, "a", "b"], "ratio": 1, "z": 1})
            ),
            vec![
                "params.files: 3 items, more than maxItems 2",
                "params.files[0]: expected string, got integer",
                "params.mode: \"x\" is not one of [\"fast\",\"slow\"]",
                "params.n: 0 is less than the minimum 1",
                "params.name: 4 characters, more than maxLength 3",
                "params.name: does not match the pattern \"^[a-z]+$\"",
                "params.ratio: 1 must be less than 1",
                "params.z: unknown property (additionalProperties is false)",
            ]
        );
        assert_eq!(
            errors_of(schema.clone(), json!({})),
            vec!["params.n: required property is missing", "params.name: required property is missing",]
        );
        assert_eq!(errors_of(schema, json!({"n": 2.5, "name": "ab"})), vec!["params.n: expected integer, got number",]);
    }

    #[test]
    fn integers_are_numbers_and_whole_floats_are_integers() {
        assert!(errors_of(json!({"type": "number"}), json!(3)).is_empty());
        assert!(errors_of(json!({"type": "integer"}), json!(3.0)).is_empty());
        assert!(errors_of(json!({"type": ["string", "null"]}), json!(null)).is_empty());
    }

    #[test]
    fn defaults_fill_missing_properties_at_every_level() {
        let schema = json!({"properties": {
            "n": {"default": 3},
            "opts": {"default": {}, "properties": {"deep": {"default": true}}}
        }});
        let mut params = json!({"n": 5});
        apply_defaults(&schema, &mut params);
        assert_eq!(params, json!({"n": 5, "opts": {"deep": true}}));
    }

    #[test]
    fn unsupported_keywords_and_bad_values_are_refused() {
        let problems = schema_problems(
            &json!({"type": "obj", "oneOf": [], "properties": {"a": {"minLength": -1}}, "pattern": "("}),
            "parameters",
        );
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(problems.iter().any(|p| p.contains("unsupported keyword \"oneOf\"")));
        assert!(problems.iter().any(|p| p.starts_with("parameters.properties.a.minLength")));
    }
}
