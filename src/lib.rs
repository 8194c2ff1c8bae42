//! Stageflow: a workflow engine inside PostgreSQL.
//!
//! The state machine (submit, claim, complete, fail, advance) is set-based SQL in `sql/`, loaded
//! in file order. Rust does what SQL does poorly: canonical JSON and the job id hash
//! ([`job_id`]), the JSON Schema subset ([`schema`]) and the checks of parameters ([`params`]),
//! the validation of job type definitions ([`job_types`]), reading and deleting queue messages with
//! plans kept per backend ([`queues`]), the superuser-only test clock ([`clock`]), the tenant label
//! ([`ownership`]), the default quotas ([`quotas`]), and the background worker that runs
//! maintenance ([`maintenance`]).

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::{PgLogLevel, PgSqlErrorCode};

::pgrx::pg_module_magic!(name, version);

pub mod clock;
pub mod job_id;
pub mod job_types;
pub mod maintenance;
pub mod ownership;
pub mod params;
pub mod queues;
pub mod quotas;
pub mod schema;

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    clock::init();
    maintenance::init();
    ownership::init();
    quotas::init();
    queues::init();
    // No other stageflow.* setting can be made up: a typo is an error, and nobody can create a
    // placeholder for a setting the library defines later in the session.
    // SAFETY: called from _PG_init on the backend's one thread, with a static NUL-terminated name.
    unsafe { pg_sys::MarkGUCPrefixReserved(c"stageflow".as_ptr()) };
}

extension_sql_file!("../sql/0010_tables.sql", name = "tables", bootstrap);
extension_sql_file!("../sql/0015_statuses.sql", name = "statuses");
extension_sql_file!("../sql/0020_clock.sql", name = "clock", requires = [clock::fake_now]);
extension_sql_file!("../sql/0025_job_ids.sql", name = "job_ids");
extension_sql_file!("../sql/0030_errors.sql", name = "errors");
extension_sql_file!("../sql/0040_events.sql", name = "events");
extension_sql_file!(
    "../sql/0050_ownership_and_quotas.sql",
    name = "ownership_and_quotas",
    requires = [ownership::tenant, ownership::session_is_admin, quotas::default_quotas]
);
extension_sql_file!("../sql/0100_register_job_type.sql", name = "register_job_type");
extension_sql_file!("../sql/0150_shards.sql", name = "shards");
extension_sql_file!("../sql/0200_create_stage_tasks.sql", name = "create_stage_tasks");
extension_sql_file!("../sql/0210_advance_stage.sql", name = "advance_stage");
extension_sql_file!("../sql/0300_submit_job.sql", name = "submit_job");
extension_sql_file!("../sql/0400_claim_tasks.sql", name = "claim_tasks");
extension_sql_file!("../sql/0450_leases.sql", name = "leases");
extension_sql_file!("../sql/0460_queue_grants.sql", name = "queue_grants");
extension_sql_file!("../sql/0500_complete_task_and_check_stage.sql", name = "complete_task_and_check_stage");
extension_sql_file!("../sql/0550_complete_tasks.sql", name = "complete_tasks");
extension_sql_file!("../sql/0600_fail_task.sql", name = "fail_task");
extension_sql_file!("../sql/0700_job_status.sql", name = "job_status");
extension_sql_file!("../sql/0750_list_jobs.sql", name = "list_jobs");
extension_sql_file!("../sql/0800_cancel_and_retry.sql", name = "cancel_and_retry");
extension_sql_file!("../sql/0850_maintenance.sql", name = "maintenance");
extension_sql_file!("../sql/0870_webhooks.sql", name = "webhooks");
extension_sql_file!("../sql/0890_metrics.sql", name = "metrics");
extension_sql_file!(
    "../sql/0900_hello_world.sql",
    name = "hello_world",
    requires = ["register_job_type", job_types::normalize_definition_sql, params::validate_params_sql,]
);
extension_sql_file!("../sql/0950_roles_and_grants.sql", name = "roles_and_grants", finalize);

/// Parses JSON text that PostgreSQL produced (jsonb output), turning what serde_json cannot hold
/// into errors with a SQLSTATE: nesting deeper than 128 levels, numbers beyond 64-bit floats, and
/// numbers a 64-bit integer or float does not hold exactly (serde_json would round them: two
/// different params would make one job id, and the job's params would not be what was submitted).
pub(crate) fn parse_json(text: &str, what: &str) -> serde_json::Value {
    if let Some(number) = inexact_number(text) {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("{what} holds the number {number}, which a 64-bit float does not hold exactly"),
            "pass very large or very precise numbers as strings",
        )
    }
    serde_json::from_str(text).unwrap_or_else(|error| {
        let message = error.to_string();
        if message.contains("recursion limit") {
            raise(
                PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
                format!("{what} is nested more than 128 levels deep"),
                "flatten the document: Stageflow reads at most 128 levels of nested arrays and objects",
            )
        } else if message.contains("number out of range") {
            raise(
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                format!("{what} holds a number outside the range of a 64-bit float"),
                "pass very large or very precise numbers as strings",
            )
        } else {
            raise(
                PgSqlErrorCode::ERRCODE_INVALID_TEXT_REPRESENTATION,
                format!("{what} is not JSON: {message}"),
                "pass a JSON value",
            )
        }
    })
}

/// The first number in JSON text (outside its strings) that serde_json would not hold exactly:
/// not a 64-bit integer, and not a decimal whose 64-bit float prints back as the same number.
fn inexact_number(text: &str) -> Option<&str> {
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                i += 1;
                while i < bytes.len() {
                    match bytes[i] {
                        b'\\' => i += 2,
                        b'"' => {
                            i += 1;
                            break;
                        }
                        _ => i += 1,
                    }
                }
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < bytes.len() && matches!(bytes[i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9') {
                    i += 1;
                }
                let number = &text[start..i];
                let exact = number.parse::<i64>().is_ok()
                    || number.parse::<u64>().is_ok()
                    || number.parse::<f64>().is_ok_and(|float| {
                        // (out of range is parse_json's other error; -0 is 0)
                        !float.is_finite()
                            || decimal(number).is_some_and(|value| Some(value) == decimal(&float.to_string()))
                    });
                if !exact {
                    return Some(number);
                }
            }
            _ => i += 1,
        }
    }
    None
}

/// A decimal number as (negative, significant digits without leading or trailing zeros, power of
/// ten of the last digit); zero is (false, "", 0).
fn decimal(number: &str) -> Option<(bool, String, i64)> {
    let (negative, unsigned) = match number.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, number),
    };
    let (mantissa, exponent) = match unsigned.find(['e', 'E']) {
        Some(at) => (&unsigned[..at], unsigned[at + 1..].parse::<i64>().ok()?),
        None => (unsigned, 0),
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = format!("{whole}{fraction}");
    let significant = digits.trim_start_matches('0');
    if significant.is_empty() {
        return Some((false, String::new(), 0));
    }
    let trimmed = significant.trim_end_matches('0');
    let power = exponent - fraction.len() as i64 + (significant.len() - trimmed.len()) as i64;
    Some((negative, trimmed.to_owned(), power))
}

#[cfg(test)]
mod numbers {
    use super::inexact_number;

    #[test]
    fn numbers_held_exactly_pass_and_rounded_ones_are_named() {
        for exact in [
            "1",
            "-7",
            "0",
            "-0",
            "1.50",
            "0.1",
            "2.5e3",
            "18446744073709551615",
            "-9223372036854775808",
            "0.30000000000000004",
            "12.345678",
            "1e300",
            "100000000000000000000",
        ] {
            assert_eq!(inexact_number(&format!("{{\"a\": [{exact}]}}")), None, "{exact}");
        }
        for rounded in
            ["12345678901234567890123", "0.1000000000000000000001", "3.14159265358979323846", "18446744073709551617"]
        {
            assert_eq!(inexact_number(&format!("{{\"a\": {rounded}}}")), Some(rounded));
        }
        assert_eq!(
            inexact_number(r#"{"s": "12345678901234567890123 \" 0.1000000000000000000001", "n": 2}"#),
            None,
            "numbers inside strings are text"
        );
    }
}

/// Raises an ERROR with a SQLSTATE, a message and a hint. Never returns.
pub(crate) fn raise(code: PgSqlErrorCode, message: String, hint: &str) -> ! {
    ErrorReport::new(code, message, "stageflow").set_hint(hint).report(PgLogLevel::ERROR);
    unreachable!("an ERROR report does not return")
}

#[cfg(any(test, feature = "pg_test"))]
mod tests;

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}
