//! Job types: register one, list them.

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::Value;
use tokio_postgres::GenericClient;

use crate::{column, Api, Error};

/// What `register_job_type` reports: the definition with its defaults filled in.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RegisteredJobType {
    pub name: String,
    pub definition: Value,
}

/// A row of `stageflow.job_types`.
#[derive(Debug, Clone, PartialEq)]
pub struct JobType {
    pub name: String,
    pub description: Option<String>,
    /// The stages' names, in order.
    pub stages: Option<Value>,
    pub definition: Value,
    pub updated_at: DateTime<Utc>,
}

const REGISTER: &str = "SELECT stageflow.register_job_type($1, $2)";
const JOB_TYPES: &str = "SELECT * FROM stageflow.job_types()";
const JOB_TYPES_JSON: &str = "SELECT coalesce(jsonb_agg(to_jsonb(t)), '[]') FROM stageflow.job_types() AS t";

impl<C: GenericClient + Sync> Api<'_, C> {
    /// Registers (or replaces) job type `name` (admin).
    pub async fn register_job_type(&self, name: &str, definition: &Value) -> Result<RegisteredJobType, Error> {
        self.document(REGISTER, &[&name, definition]).await
    }

    pub async fn job_types(&self) -> Result<Vec<JobType>, Error> {
        self.rows(JOB_TYPES, &[], |row| {
            Ok(JobType {
                name: column(row, "name")?,
                description: column(row, "description")?,
                stages: column(row, "stages")?,
                definition: column(row, "definition")?,
                updated_at: column(row, "updated_at")?,
            })
        })
        .await
    }

    /// [`Api::job_types`] as a JSON array of `to_jsonb` rows.
    pub async fn job_types_json(&self) -> Result<Value, Error> {
        self.value(JOB_TYPES_JSON, &[]).await
    }
}
