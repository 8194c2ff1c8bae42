//! Webhooks: a job's deliveries, and what a dispatcher calls (claim due deliveries, record each
//! attempt).

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::Value;
use tokio_postgres::GenericClient;

use crate::{column, Api, Error};

/// A delivery a dispatcher claimed: POST `payload` to `url`, then record the attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimedDelivery {
    pub delivery_id: i64,
    pub job_id: String,
    pub url: String,
    pub payload: Value,
    /// Attempts so far, this one included.
    pub attempts: i32,
    /// The signing secret of the registered endpoint the job named (`None`: a URL, signed with the
    /// dispatcher's own secret).
    pub secret: Option<String>,
}

/// A row of `stageflow.webhook_deliveries`.
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookDelivery {
    pub delivery_id: i64,
    pub url: String,
    pub status: String,
    pub attempts: i32,
    pub attempt_log: Value,
    pub created_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
}

/// What `record_webhook_attempt` reports.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct AttemptRecord {
    pub delivery_id: i64,
    pub status: String,
    pub attempts: i32,
}

const DELIVERIES: &str = "SELECT * FROM stageflow.webhook_deliveries($1)";
const DELIVERIES_JSON: &str =
    "SELECT coalesce(jsonb_agg(to_jsonb(d)), '[]') FROM stageflow.webhook_deliveries($1) AS d";
const CLAIM: &str =
    "SELECT delivery_id, job_id, url, payload, attempts, secret FROM stageflow.claim_webhook_deliveries($1, $2)";
const REGISTER_ENDPOINT: &str = "SELECT stageflow.register_webhook_endpoint($1, $2)";
const ENDPOINTS_JSON: &str = "SELECT coalesce(jsonb_agg(to_jsonb(e)), '[]') FROM stageflow.webhook_endpoints() AS e";
const DROP_ENDPOINT: &str = "SELECT stageflow.drop_webhook_endpoint($1)";
const RECORD: &str = "SELECT stageflow.record_webhook_attempt($1, $2, $3, $4, $5::text::numeric)";

impl<C: GenericClient + Sync> Api<'_, C> {
    /// A job's webhook deliveries (for its owner and admins).
    pub async fn webhook_deliveries(&self, job_id: &str) -> Result<Vec<WebhookDelivery>, Error> {
        self.rows(DELIVERIES, &[&job_id], |row| {
            Ok(WebhookDelivery {
                delivery_id: column(row, "delivery_id")?,
                url: column(row, "url")?,
                status: column(row, "status")?,
                attempts: column(row, "attempts")?,
                attempt_log: column(row, "attempt_log")?,
                created_at: column(row, "created_at")?,
                delivered_at: column(row, "delivered_at")?,
            })
        })
        .await
    }

    /// [`Api::webhook_deliveries`] as a JSON array of `to_jsonb` rows.
    pub async fn webhook_deliveries_json(&self, job_id: &str) -> Result<Value, Error> {
        self.value(DELIVERIES_JSON, &[&job_id]).await
    }

    /// Claims up to `max_rows` due deliveries for `lease_seconds` (SQL defaults: 10, 30).
    pub async fn claim_webhook_deliveries(
        &self,
        max_rows: i32,
        lease_seconds: i32,
    ) -> Result<Vec<ClaimedDelivery>, Error> {
        self.rows(CLAIM, &[&max_rows, &lease_seconds], |row| {
            Ok(ClaimedDelivery {
                delivery_id: column(row, "delivery_id")?,
                job_id: column(row, "job_id")?,
                url: column(row, "url")?,
                payload: column(row, "payload")?,
                attempts: column(row, "attempts")?,
                secret: column(row, "secret")?,
            })
        })
        .await
    }

    /// Registers (or replaces, with a new secret) the session's webhook endpoint `name` at `url`;
    /// returns its signing secret (`whsec_...`), shown this once. A submission names it with
    /// `webhook_url` `endpoint:<name>`.
    pub async fn register_webhook_endpoint(&self, name: &str, url: &str) -> Result<String, Error> {
        self.value(REGISTER_ENDPOINT, &[&name, &url]).await
    }

    /// The session's webhook endpoints, without their secrets, as a JSON array of
    /// `{"name", "url", "created_at"}`.
    pub async fn webhook_endpoints_json(&self) -> Result<Value, Error> {
        self.value(ENDPOINTS_JSON, &[]).await
    }

    /// Drops the session's webhook endpoint `name`; whether there was one.
    pub async fn drop_webhook_endpoint(&self, name: &str) -> Result<bool, Error> {
        self.value(DROP_ENDPOINT, &[&name]).await
    }

    /// Records an attempt of a delivery: delivered, or failed with the status code and error seen
    /// and tried again after `retry_in_seconds` (to the millisecond), or given up when that is `None`.
    pub async fn record_webhook_attempt(
        &self,
        delivery_id: i64,
        delivered: bool,
        status_code: Option<i32>,
        error: Option<&str>,
        retry_in_seconds: Option<f64>,
    ) -> Result<AttemptRecord, Error> {
        let retry_in = retry_in_seconds.map(|s| format!("{s:.3}"));
        self.document(RECORD, &[&delivery_id, &delivered, &status_code, &error, &retry_in]).await
    }
}
