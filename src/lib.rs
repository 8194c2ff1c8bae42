//! Stageflow: a workflow engine inside PostgreSQL.
//!
//! The state machine (submit, claim, complete, fail, advance) is set-based SQL in `sql/`, loaded
//! in file order. Rust does what SQL does poorly: canonical JSON and the job id hash
//! ([`job_id`]), JSON Schema checks of parameters ([`params`]) and the validation of job type
//! definitions ([`job_types`]).

use pgrx::prelude::*;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

::pgrx::pg_module_magic!(name, version);

pub mod job_id;
pub mod job_types;
pub mod params;

extension_sql_file!("../sql/0010_tables.sql", name = "tables", bootstrap);
extension_sql_file!("../sql/0100_register_job_type.sql", name = "register_job_type");
extension_sql_file!("../sql/0200_create_stage_tasks.sql", name = "create_stage_tasks");
extension_sql_file!("../sql/0210_advance_stage.sql", name = "advance_stage");
extension_sql_file!("../sql/0300_submit_job.sql", name = "submit_job");
extension_sql_file!("../sql/0400_claim_tasks.sql", name = "claim_tasks");
extension_sql_file!("../sql/0450_leases.sql", name = "leases");
extension_sql_file!("../sql/0500_complete_task_and_check_stage.sql", name = "complete_task_and_check_stage");
extension_sql_file!("../sql/0600_fail_task.sql", name = "fail_task");
extension_sql_file!("../sql/0700_job_status.sql", name = "job_status");
extension_sql_file!("../sql/0750_list_jobs.sql", name = "list_jobs");
extension_sql_file!("../sql/0900_hello_world.sql", name = "hello_world", finalize);

/// Raises an ERROR with a SQLSTATE, a message and a hint. Never returns.
pub(crate) fn raise(code: PgSqlErrorCode, message: String, hint: &str) -> ! {
    ErrorReport::new(code, message, "stageflow")
        .set_hint(hint)
        .report(PgLogLevel::ERROR);
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
