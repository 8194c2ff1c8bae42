//! Who may do what: queue grants (which roles claim from which queue) and quotas (how much work a
//! login may have open).

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::Value;
use tokio_postgres::GenericClient;

use crate::{column, Api, Error};

/// What `grant_queue` and `revoke_queue` report: `changed` is `granted` (a new grant) or `revoked`
/// (a grant removed).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct QueueGrantChange {
    pub queue: String,
    pub role: String,
    #[serde(alias = "granted", alias = "revoked")]
    pub changed: bool,
}

/// A row of `stageflow.list_queue_grants`.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueGrant {
    pub queue: String,
    pub role_name: String,
    pub granted_at: DateTime<Utc>,
}

/// What `set_quota` reports: the quota now in force.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct QuotaSetting {
    pub role: String,
    pub max_open_tasks: i64,
    pub max_tasks_per_job: i64,
}

/// A row of `stageflow.list_quotas`.
#[derive(Debug, Clone, PartialEq)]
pub struct Quota {
    pub role_name: String,
    pub tenant: Option<String>,
    pub max_open_tasks: i64,
    pub max_tasks_per_job: i64,
    pub open_tasks: i64,
    /// Set with `set_quota` (false: the defaults).
    pub custom: bool,
}

const GRANT: &str = "SELECT stageflow.grant_queue($1, $2::text::name)";
const REVOKE: &str = "SELECT stageflow.revoke_queue($1, $2::text::name)";
const GRANTS: &str = "SELECT queue, role_name::text AS role_name, granted_at FROM stageflow.list_queue_grants()";
const GRANTS_JSON: &str = "SELECT coalesce(jsonb_agg(to_jsonb(g)), '[]') FROM stageflow.list_queue_grants() AS g";
const SET_QUOTA: &str = "SELECT stageflow.set_quota($1::text::name, $2, $3)";
const QUOTAS: &str =
    "SELECT role_name::text AS role_name, tenant, max_open_tasks, max_tasks_per_job, open_tasks, custom \
                        FROM stageflow.list_quotas()";

impl<C: GenericClient + Sync> Api<'_, C> {
    /// Lets `role` (and its members) claim from `queue` (admin).
    pub async fn grant_queue(&self, queue: &str, role: &str) -> Result<QueueGrantChange, Error> {
        self.document(GRANT, &[&queue, &role]).await
    }

    pub async fn revoke_queue(&self, queue: &str, role: &str) -> Result<QueueGrantChange, Error> {
        self.document(REVOKE, &[&queue, &role]).await
    }

    pub async fn list_queue_grants(&self) -> Result<Vec<QueueGrant>, Error> {
        self.rows(GRANTS, &[], |row| {
            Ok(QueueGrant {
                queue: column(row, "queue")?,
                role_name: column(row, "role_name")?,
                granted_at: column(row, "granted_at")?,
            })
        })
        .await
    }

    /// [`Api::list_queue_grants`] as a JSON array of `to_jsonb` rows.
    pub async fn list_queue_grants_json(&self) -> Result<Value, Error> {
        self.value(GRANTS_JSON, &[]).await
    }

    /// Sets `role`'s quota (admin): `None` is the default; both `None`, back to the defaults.
    pub async fn set_quota(
        &self,
        role: &str,
        max_open_tasks: Option<i64>,
        max_tasks_per_job: Option<i64>,
    ) -> Result<QuotaSetting, Error> {
        self.document(SET_QUOTA, &[&role, &max_open_tasks, &max_tasks_per_job]).await
    }

    /// The quotas in force and the open tasks held against them: the caller's own; an admin's,
    /// every login with a quota or an open job.
    pub async fn list_quotas(&self) -> Result<Vec<Quota>, Error> {
        self.rows(QUOTAS, &[], |row| {
            Ok(Quota {
                role_name: column(row, "role_name")?,
                tenant: column(row, "tenant")?,
                max_open_tasks: column(row, "max_open_tasks")?,
                max_tasks_per_job: column(row, "max_tasks_per_job")?,
                open_tasks: column(row, "open_tasks")?,
                custom: column(row, "custom")?,
            })
        })
        .await
    }
}
