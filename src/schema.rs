//! The subset of JSON Schema that job types' `parameters` use: checking a schema when a job type
//! is registered ([`schema_problems`]), filling in defaults ([`apply_defaults`]) and checking a
//! value ([`validate`]). Problems are values with a path and a message ([`Problem`]).
//!
//! The supported subset: `type` (a name or a list of names), `properties`, `required`,
//! `additionalProperties` (boolean or schema), `items`, `minItems`, `maxItems`, `enum`, `const`,
//! `minimum`, `maximum`, `exclusiveMinimum`, `exclusiveMaximum`, `minLength`, `maxLength` (in
//! characters), `pattern`; the annotations `title`, `description`, `default`, `examples`,
//! `format`, `$schema`, `$id`, `$comment` are accepted and ignored (`default` fills in a missing
//! property before validation). Any other keyword is refused when the job type is registered, so
//! a schema never silently checks less than it says.

use std::fmt;

use serde_json::{Map, Value};

/// One problem of a schema or a value: where (a path such as `params.tiles[3]`) and what.
#[derive(Clone, Debug, PartialEq)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

impl Problem {
    pub fn at(path: impl Into<String>, message: impl Into<String>) -> Self {
        Problem { path: path.into(), message: message.into() }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

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
pub fn schema_problems(schema: &Value, path: &str) -> Vec<Problem> {
    let mut problems = Vec::new();
    check_schema(schema, path, &mut problems);
    problems
}

fn check_schema(schema: &Value, path: &str, problems: &mut Vec<Problem>) {
    let Some(map) = schema.as_object() else {
        problems.push(Problem::at(path, "a schema must be an object"));
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
                        problems.push(Problem::at(&here, format!("{name} is not one of {}", TYPES.join(", "))));
                    }
                }
            }
            "properties" => match value.as_object() {
                Some(properties) => {
                    for (name, sub) in properties {
                        check_schema(sub, &format!("{here}.{name}"), problems);
                    }
                }
                None => problems.push(Problem::at(&here, "must be an object of schemas")),
            },
            "required" => {
                if !value.as_array().is_some_and(|names| names.iter().all(Value::is_string)) {
                    problems.push(Problem::at(&here, "must be an array of property names"));
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
                    problems.push(Problem::at(&here, "must be an array"));
                }
            }
            "minimum" | "maximum" | "exclusiveMinimum" | "exclusiveMaximum" => {
                if !value.is_number() {
                    problems.push(Problem::at(&here, "must be a number"));
                }
            }
            "minLength" | "maxLength" | "minItems" | "maxItems" => {
                if value.as_u64().is_none() {
                    problems.push(Problem::at(&here, "must be a non-negative integer"));
                }
            }
            "pattern" => match value.as_str().map(regex::Regex::new) {
                Some(Ok(_)) => {}
                _ => problems.push(Problem::at(&here, "must be a valid regular expression")),
            },
            "const" => {}
            other if ANNOTATIONS.contains(&other) => {}
            other => problems
                .push(Problem::at(path, format!("unsupported keyword {other:?} (supported: {})", KEYWORDS.join(", ")))),
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

pub(crate) fn type_name(value: &Value) -> &'static str {
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
pub fn validate(schema: &Value, value: &Value, path: &str, errors: &mut Vec<Problem>) {
    let Some(schema) = schema.as_object() else { return };
    if let Some(expected) = schema.get("type") {
        let names: Vec<&str> = match expected {
            Value::Array(items) => items.iter().filter_map(Value::as_str).collect(),
            other => other.as_str().into_iter().collect(),
        };
        if !names.iter().any(|name| has_type(value, name)) {
            errors.push(Problem::at(path, format!("expected {}, got {}", names.join(" or "), type_name(value))));
            return;
        }
    }
    if let Some(options) = schema.get("enum").and_then(Value::as_array) {
        if !options.contains(value) {
            errors.push(Problem::at(path, format!("{value} is not one of {}", Value::Array(options.clone()))));
        }
    }
    if let Some(expected) = schema.get("const") {
        if expected != value {
            errors.push(Problem::at(path, format!("must be {expected}, got {value}")));
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

fn validate_number(schema: &Map<String, Value>, n: f64, path: &str, errors: &mut Vec<Problem>) {
    let bound = |key: &str| schema.get(key).and_then(Value::as_f64);
    if let Some(min) = bound("minimum").filter(|min| n < *min) {
        errors.push(Problem::at(path, format!("{n} is less than the minimum {min}")));
    }
    if let Some(max) = bound("maximum").filter(|max| n > *max) {
        errors.push(Problem::at(path, format!("{n} is greater than the maximum {max}")));
    }
    if let Some(min) = bound("exclusiveMinimum").filter(|min| n <= *min) {
        errors.push(Problem::at(path, format!("{n} must be greater than {min}")));
    }
    if let Some(max) = bound("exclusiveMaximum").filter(|max| n >= *max) {
        errors.push(Problem::at(path, format!("{n} must be less than {max}")));
    }
}

fn validate_string(schema: &Map<String, Value>, s: &str, path: &str, errors: &mut Vec<Problem>) {
    let length = s.chars().count() as u64;
    if let Some(min) = schema.get("minLength").and_then(Value::as_u64).filter(|min| length < *min) {
        errors.push(Problem::at(path, format!("{length} characters, fewer than minLength {min}")));
    }
    if let Some(max) = schema.get("maxLength").and_then(Value::as_u64).filter(|max| length > *max) {
        errors.push(Problem::at(path, format!("{length} characters, more than maxLength {max}")));
    }
    if let Some(pattern) = schema.get("pattern").and_then(Value::as_str) {
        if let Ok(re) = regex::Regex::new(pattern) {
            if !re.is_match(s) {
                errors.push(Problem::at(path, format!("does not match the pattern {pattern:?}")));
            }
        }
    }
}

fn validate_array(schema: &Map<String, Value>, items: &[Value], path: &str, errors: &mut Vec<Problem>) {
    let count = items.len() as u64;
    if let Some(min) = schema.get("minItems").and_then(Value::as_u64).filter(|min| count < *min) {
        errors.push(Problem::at(path, format!("{count} items, fewer than minItems {min}")));
    }
    if let Some(max) = schema.get("maxItems").and_then(Value::as_u64).filter(|max| count > *max) {
        errors.push(Problem::at(path, format!("{count} items, more than maxItems {max}")));
    }
    if let Some(item_schema) = schema.get("items") {
        for (i, item) in items.iter().enumerate() {
            validate(item_schema, item, &format!("{path}[{i}]"), errors);
        }
    }
}

fn validate_object(schema: &Map<String, Value>, object: &Map<String, Value>, path: &str, errors: &mut Vec<Problem>) {
    for name in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
        if let Some(name) = name.as_str().filter(|name| !object.contains_key(*name)) {
            errors.push(Problem::at(format!("{path}.{name}"), "required property is missing"));
        }
    }
    let properties = schema.get("properties").and_then(Value::as_object);
    let mut names: Vec<&String> = object.keys().collect();
    names.sort();
    for (name, item) in names.into_iter().map(|name| (name, &object[name])) {
        match properties.and_then(|p| p.get(name)) {
            Some(sub) => validate(sub, item, &format!("{path}.{name}"), errors),
            None => match schema.get("additionalProperties") {
                Some(Value::Bool(false)) => errors
                    .push(Problem::at(format!("{path}.{name}"), "unknown property (additionalProperties is false)")),
                Some(sub @ Value::Object(_)) => validate(sub, item, &format!("{path}.{name}"), errors),
                _ => {}
            },
        }
    }
}

#[cfg(test)]
mod unit {
    use super::*;
    use serde_json::json;

    fn errors_of(schema: Value, value: Value) -> Vec<String> {
        let mut errors = Vec::new();
        validate(&schema, &value, "params", &mut errors);
        errors.iter().map(ToString::to_string).collect()
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
        let problems: Vec<String> = schema_problems(
            &json!({"type": "obj", "oneOf": [], "properties": {"a": {"minLength": -1}}, "pattern": "("}),
            "parameters",
        )
        .iter()
        .map(ToString::to_string)
        .collect();
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(problems.iter().any(|p| p.contains("unsupported keyword \"oneOf\"")));
        assert!(problems.iter().any(|p| p.starts_with("parameters.properties.a.minLength")));
    }
}
