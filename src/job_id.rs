//! Job ids: the lowercase hex SHA-256 of the canonical JSON of `{"job_type": ..., "params": ...}`.
//!
//! Canonical JSON here: object keys sorted by their UTF-8 bytes at every level, no whitespace,
//! strings escaped as JSON requires (non-ASCII kept as UTF-8), integers that fit 64 bits printed
//! as integers and other numbers in their shortest round-trip form (`1.5`, `1e300`).

use pgrx::prelude::*;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Writes `value` as canonical JSON.
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push('{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(item, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// The job id of `params` submitted as `job_type`.
pub fn job_id(job_type: &str, params: &Value) -> String {
    let document = serde_json::json!({ "job_type": job_type, "params": params });
    let digest = Sha256::digest(canonical_json(&document).as_bytes());
    digest.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// `stageflow._job_id(job_type, params_text)`, behind `stageflow.job_id(job_type, params)`.
#[pg_extern(immutable, parallel_safe, name = "_job_id")]
fn job_id_sql(job_type: &str, params: &str) -> String {
    job_id(job_type, &crate::parse_json(params, "params"))
}

/// `stageflow._canonical_json(text)`, behind `stageflow.canonical_json(value)`.
#[pg_extern(immutable, parallel_safe, name = "_canonical_json")]
fn canonical_json_sql(value: &str) -> String {
    canonical_json(&crate::parse_json(value, "the value"))
}

#[cfg(test)]
mod unit {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_are_sorted_at_every_level_without_whitespace() {
        let value = json!({"b": 1, "a": {"z": [1, {"y": 2, "x": "é"}], "m": null}});
        assert_eq!(canonical_json(&value), r#"{"a":{"m":null,"z":[1,{"x":"é","y":2}]},"b":1}"#);
    }

    #[test]
    fn key_order_of_the_input_does_not_change_the_id() {
        let one = job_id("hello_world", &json!({"message": "hi", "n": 3}));
        let two = job_id("hello_world", &json!({"n": 3, "message": "hi"}));
        assert_eq!(one, two);
        assert_eq!(one.len(), 64);
        assert!(one.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_ne!(one, job_id("hello_world", &json!({"n": 4, "message": "hi"})));
        assert_ne!(one, job_id("other", &json!({"n": 3, "message": "hi"})));
    }

    #[test]
    fn id_is_the_sha256_of_the_documented_text() {
        // printf '%s' '{"job_type":"t","params":{}}' | sha256sum
        assert_eq!(job_id("t", &json!({})), "426e1c5b175797ae9fecbbcc947bdcacee712fa428b2ce8780767cea16dfb21c");
    }
}
