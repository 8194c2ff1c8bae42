//! Maintenance by hand: what the background worker runs every second.

use serde::Deserialize;
use serde_json::Value;
use tokio_postgres::GenericClient;

use crate::{Api, Error};

/// What `run_maintenance` did: counts of each kind of work (0 when absent), or the `error` that
/// stopped the round.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct MaintenanceReport {
    pub retries_released: i64,
    pub leases_expired: i64,
    pub dead_lettered: i64,
    pub jobs_timed_out: i64,
    /// Big stages' message windows sent by the round (no claim had sent them).
    pub windows_sent: i64,
    pub jobs_deleted: i64,
    pub tasks_cancelled: i64,
    pub messages_resent: i64,
    pub messages_deleted: i64,
    /// Units that failed (logged, the round went on).
    pub errors: i64,
    /// `{"message", "sqlstate"}` when the round itself failed.
    pub error: Option<Value>,
}

const RUN: &str = "SELECT stageflow.run_maintenance($1)";

impl<C: GenericClient + Sync> Api<'_, C> {
    /// Runs one maintenance round over at most `max_rows` rows per kind of work (admin; the SQL
    /// default: 1000).
    pub async fn run_maintenance(&self, max_rows: i32) -> Result<MaintenanceReport, Error> {
        self.document(RUN, &[&max_rows]).await
    }
}
