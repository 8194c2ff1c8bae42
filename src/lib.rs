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
/// into errors with a SQLSTATE: nesting deeper than 128 levels, numbers beyond 64-bit floats.
pub(crate) fn parse_json(text: &str, what: &str) -> serde_json::Value {
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
