//! The webhook dispatcher: claims due deliveries (`stageflow.claim_webhook_deliveries`), POSTs each
//! payload with an HMAC-SHA256 signature, and records every attempt
//! (`stageflow.record_webhook_attempt`), retrying with exponential backoff up to a limit. Several
//! servers may dispatch at once: claims skip each other's rows.
//!
//! Headers: `X-Stageflow-Signature: sha256=<hex of HMAC-SHA256(secret, body)>` (when a secret is
//! configured), `X-Stageflow-Delivery: <delivery id>`, `X-Stageflow-Event: <kind>`.

use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::api::PoolStatements;
use crate::events::Events;

#[derive(Clone, Debug)]
pub struct WebhookConfig {
    /// The HMAC key; without it deliveries are sent unsigned.
    pub secret: Option<String>,
    /// The first retry's delay; each next one doubles, up to an hour.
    pub retry_base: Duration,
    pub max_attempts: i32,
    pub timeout: Duration,
    /// How often to look for due deliveries when no job ends.
    pub poll_interval: Duration,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            secret: None,
            retry_base: Duration::from_secs(5),
            max_attempts: 8,
            timeout: Duration::from_secs(10),
            poll_interval: Duration::from_secs(1),
        }
    }
}

/// `sha256=<hex>` of HMAC-SHA256(secret, body).
pub fn signature(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes a key of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

pub fn spawn_dispatcher(pool: deadpool_postgres::Pool, config: WebhookConfig, events: Events) {
    tokio::spawn(async move {
        let http = reqwest::Client::builder().timeout(config.timeout).build().expect("an HTTP client");
        let mut wake = events.subscribe();
        loop {
            match dispatch_due(&pool, &http, &config).await {
                Ok(0) => {
                    // Sleep until a job ends (its event may carry a delivery) or the poll interval passes.
                    let _ = tokio::time::timeout(config.poll_interval, wake.recv()).await;
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(%error, "webhooks: database error");
                    tokio::time::sleep(crate::RETRY).await;
                }
            }
        }
    });
}

async fn dispatch_due(
    pool: &deadpool_postgres::Pool,
    http: &reqwest::Client,
    config: &WebhookConfig,
) -> Result<usize, String> {
    let client = pool.get().await.map_err(|e| e.to_string())?;
    let cache = PoolStatements(&client.statement_cache);
    let api = stageflow_client::Api::cached(&**client, &cache);
    let lease = (config.timeout.as_secs() as i32 * 2).max(5);
    let due = api.claim_webhook_deliveries(10, lease).await.map_err(|e| e.to_string())?;
    for delivery in &due {
        let (id, url, payload, attempts) = (delivery.delivery_id, &delivery.url, &delivery.payload, delivery.attempts);
        let body = serde_json::to_vec(payload).expect("JSON serialises");
        let mut request = http
            .post(url)
            .header("content-type", "application/json")
            .header("x-stageflow-delivery", id.to_string())
            .header("x-stageflow-event", payload["event"].as_str().unwrap_or_default());
        if let Some(secret) = &config.secret {
            request = request.header("x-stageflow-signature", signature(secret, &body));
        }
        let (delivered, status, error) = match request.body(body).send().await {
            Ok(response) if response.status().is_success() => (true, Some(response.status().as_u16() as i32), None),
            Ok(response) => {
                (false, Some(response.status().as_u16() as i32), Some(format!("HTTP {}", response.status())))
            }
            Err(e) => (false, None, Some(e.to_string())),
        };
        let retry_in = (!delivered && attempts < config.max_attempts).then(|| {
            let seconds = config.retry_base.as_secs_f64() * 2f64.powi(attempts - 1);
            seconds.min(3600.0)
        });
        api.record_webhook_attempt(id, delivered, status, error.as_deref(), retry_in)
            .await
            .map_err(|e| e.to_string())?;
        if delivered {
            tracing::info!(delivery = id, %url, attempts, "webhook delivered");
        } else {
            tracing::warn!(delivery = id, %url, attempts, error = error.as_deref().unwrap_or(""), "webhook attempt failed");
        }
    }
    Ok(due.len())
}

#[cfg(test)]
mod unit {
    #[test]
    fn the_signature_is_hmac_sha256_in_hex() {
        // RFC 4231 test case 2.
        assert_eq!(
            super::signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
