//! Job parameters: checked against the job type's schema ([`crate::schema`]), defaults filled in,
//! and the parameters a fan-out rule reads checked against the fan-out limit.

use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;
use serde_json::Value;

use crate::job_types::{Stage, MAX_FAN_OUT};
use crate::schema::{apply_defaults, type_name, validate, Problem};

/// Checks the parameters a fan-out rule reads: `count` needs an integer from 0 to the fan-out
/// limit, `each` an array no longer than it.
pub fn fan_out_problems(stages: &[Stage], params: &Value, errors: &mut Vec<Problem>) {
    for stage in stages {
        let Some(param) = stage.param.as_deref() else { continue };
        let value = params.get(param);
        let path = format!("params.{param}");
        match (stage.fan_out.as_str(), value) {
            ("count", Some(v)) if v.as_u64().is_some_and(|n| n <= MAX_FAN_OUT) => {}
            ("count", _) => errors.push(Problem::at(
                path,
                format!(
                    "stage {:?} fans out this many tasks: it must be an integer from 0 to {MAX_FAN_OUT}",
                    stage.name
                ),
            )),
            ("each", Some(Value::Array(items))) if items.len() as u64 <= MAX_FAN_OUT => {}
            ("each", _) => errors.push(Problem::at(
                path,
                format!(
                    "stage {:?} fans out one task per element: it must be an array of at most {MAX_FAN_OUT} elements",
                    stage.name
                ),
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
            format!(
                "params do not fit job type {job_type}: {}",
                errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
            ),
            "the parameters schema is in the definition shown by stageflow.job_types()",
        );
    }
    pgrx::JsonB(params)
}
