//! The webhook dispatcher: claims due deliveries (`stageflow.claim_webhook_deliveries`), POSTs each
//! payload signed as the Standard Webhooks specification says, and records every attempt
//! (`stageflow.record_webhook_attempt`), retrying with exponential backoff up to a limit. Several
//! servers may dispatch at once: claims skip each other's rows.
//!
//! Headers (<https://www.standardwebhooks.com/>): `webhook-id` (`msg_<delivery id>`, the same on
//! every attempt, for the receiver's deduplication), `webhook-timestamp` (Unix seconds of the
//! attempt) and `webhook-signature: v1,<base64 of HMAC-SHA256(key, "<id>.<timestamp>.<body>")>`,
//! where the key is the secret's bytes (a `whsec_<base64>` secret, as the specification's
//! libraries make them, is decoded first); and `x-stageflow-event: <kind>`. The secret is the
//! registered endpoint's, when the job named one (`webhook_url` `endpoint:<name>`,
//! `stageflow.register_webhook_endpoint`), else the dispatcher's own.
//!
//! Where a delivery may go (the URL is a submitter's): `https` only, unless the operator allows
//! the host (`--webhook-allow-host`); the delivery is refused when an address of the host is not
//! public (loopback, private, link-local, shared, multicast, unspecified, documentation,
//! reserved; IPv4 and IPv6, IPv4 inside IPv6), checked by the dispatcher's one HTTP client's own
//! resolver, so the connection goes to the addresses checked; redirects are not followed. An
//! attempt's recorded error says what happened, never which address a name resolved to.
//!
//! Deliveries of a claim run at once, at most `per_endpoint` to one host, each within `timeout`;
//! the claim's lease covers the longest that takes. Without a signing secret (neither the
//! endpoint's nor the dispatcher's) nothing is sent: the attempt is recorded as failed, saying why.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::Semaphore;

use crate::api::PoolStatements;
use crate::events::Events;

#[derive(Clone, Debug)]
pub struct WebhookConfig {
    /// The signing secret (`whsec_<base64>`, or any text, whose bytes are the key); without it,
    /// nothing is delivered.
    pub secret: Option<String>,
    /// The first retry's delay; each next one doubles, up to an hour.
    pub retry_base: Duration,
    pub max_attempts: i32,
    /// The most one attempt may take, connection and response included.
    pub timeout: Duration,
    /// How often to look for due deliveries when no job ends.
    pub poll_interval: Duration,
    /// Hosts (names or addresses, as in the URL) that may be reached over plain `http` and at
    /// addresses that are not public: receivers on the operator's own network.
    pub allowed_hosts: Vec<String>,
    /// Deliveries claimed and sent at once.
    pub concurrency: usize,
    /// Of those, the most sent to one host at once.
    pub per_endpoint: usize,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            secret: None,
            retry_base: Duration::from_secs(5),
            max_attempts: 8,
            timeout: Duration::from_secs(10),
            poll_interval: Duration::from_secs(1),
            allowed_hosts: Vec::new(),
            concurrency: 16,
            per_endpoint: 4,
        }
    }
}

/// The HMAC key of a secret: a `whsec_` secret's base64 decoded, any other secret's bytes.
fn key(secret: &str) -> Vec<u8> {
    secret
        .strip_prefix("whsec_")
        .and_then(|encoded| base64::engine::general_purpose::STANDARD.decode(encoded).ok())
        .unwrap_or_else(|| secret.as_bytes().to_vec())
}

/// `v1,<base64 HMAC-SHA256(key, "<id>.<timestamp>.<body>")>`: the Standard Webhooks signature.
pub fn signature(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(&key(secret)).expect("HMAC takes a key of any length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()))
}

/// Whether an address is one a submitter's URL may reach: not loopback, private, link-local,
/// shared (CGNAT), multicast, broadcast, unspecified, documentation, benchmarking or reserved.
pub fn is_public(address: IpAddr) -> bool {
    match address {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            let segments = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (segments[0] & 0xfe00) == 0xfc00 // unique local fc00::/7
                || (segments[0] & 0xffc0) == 0xfe80 // link-local fe80::/10
                || (segments[0] & 0xffc0) == 0xfec0 // site-local fec0::/10 (deprecated)
                || (segments[0] == 0x2001 && segments[1] == 0x0db8) // documentation
                || (segments[0] == 0x0064 && segments[1] == 0xff9b) // NAT64 64:ff9b::/96 (an IPv4 inside)
                || (segments[0..4] == [0, 0, 0, 0] && segments[4] == 0xffff && segments[5] == 0) // ::ffff:0:a.b.c.d (SIIT)
                || (segments[0] == 0x2002) // 6to4 (an IPv4 inside)
                || (segments[0] == 0 && segments[1] == 0 && segments[2] == 0 && segments[3] == 0 && segments[4] == 0
                    && segments[5] == 0)) // IPv4-compatible ::a.b.c.d
        }
    }
}

fn is_public_v4(v4: Ipv4Addr) -> bool {
    let [a, b, c, _] = v4.octets();
    !(v4.is_loopback()
        || v4.is_private()
        || v4.is_link_local()
        || v4.is_multicast()
        || v4.is_broadcast()
        || v4.is_unspecified()
        || v4.is_documentation()
        || a == 0 // "this network"
        || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 192 && b == 88 && c == 99) // 6to4 relay anycast
        || (a == 198 && (18..20).contains(&b)) // benchmarking
        || a >= 240) // reserved
}

/// Where a delivery may go: the URL's host and the addresses to connect to (`None`: resolve as
/// usual, an allowed host), or why not.
/// The refusal of a receiver whose address is not public.
const NOT_PUBLIC: &str = "refused: the receiver's address is not public (loopback, private, link-local or reserved \
                          addresses are not reached; an operator may allow a host with stageflow serve --webhook-allow-host)";

/// A delivery's URL, checked: `https` (or `http` to an allowed host), and a host given as an
/// address must be public. A host given as a name is checked when the client resolves it
/// ([`PublicOnly`]): the addresses checked are the ones connected to.
fn target(url: &str, allowed_hosts: &[String]) -> Result<reqwest::Url, String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("refused: not a URL ({e})"))?;
    let host = parsed.host_str().ok_or("refused: the URL has no host")?.to_owned();
    let bare = host.trim_start_matches('[').trim_end_matches(']').to_owned();
    let allowed = is_allowed(allowed_hosts, &host) || is_allowed(allowed_hosts, &bare);
    match parsed.scheme() {
        "https" => {}
        "http" if allowed => {}
        "http" => {
            return Err("refused: webhooks are delivered over https only (an operator may allow a host with \
                        stageflow serve --webhook-allow-host)"
                .into())
        }
        other => return Err(format!("refused: the scheme {other} is not https")),
    }
    if let Ok(ip) = bare.parse::<IpAddr>() {
        if !allowed && !is_public(ip) {
            return Err(NOT_PUBLIC.into());
        }
    }
    Ok(parsed)
}

fn is_allowed(allowed_hosts: &[String], host: &str) -> bool {
    allowed_hosts.iter().any(|h| h.eq_ignore_ascii_case(host))
}

/// A refusal by the resolver, found again in the error the request returns.
#[derive(Debug)]
struct Refusal(String);

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refusal {}

/// The dispatcher's name resolution: a receiver's name resolves only if every address it has is
/// public, or the operator allowed the host. The client connects to the addresses returned here,
/// so no second lookup can point it elsewhere.
struct PublicOnly {
    allowed_hosts: Vec<String>,
}

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        let allowed = is_allowed(&self.allowed_hosts, &host);
        Box::pin(async move {
            let refuse = |message: String| -> Box<dyn std::error::Error + Send + Sync> { Box::new(Refusal(message)) };
            let addresses: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await
                .map_err(|e| refuse(format!("the receiver's host does not resolve ({e})")))?
                .collect();
            if addresses.is_empty() {
                return Err(refuse("the receiver's host does not resolve".into()));
            }
            if !allowed && addresses.iter().any(|a| !is_public(a.ip())) {
                return Err(refuse(NOT_PUBLIC.into()));
            }
            let addresses: reqwest::dns::Addrs = Box::new(addresses.into_iter());
            Ok(addresses)
        })
    }
}

/// The one HTTP client of the dispatcher: names resolved by [`PublicOnly`], no redirects, no
/// proxy from the environment (a proxy would resolve the name itself, past the check), each
/// request within the timeout; connections to a receiver are kept and reused.
fn http_client(config: &WebhookConfig) -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .timeout(config.timeout)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .dns_resolver(Arc::new(PublicOnly { allowed_hosts: config.allowed_hosts.clone() }))
        .build()
        .map_err(|e| format!("HTTP client: {e}"))
}

/// The resolver's refusal inside a request's error, if that is why it failed.
fn refusal(error: &reqwest::Error) -> Option<String> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = source {
        if let Some(refused) = current.downcast_ref::<Refusal>() {
            return Some(refused.0.clone());
        }
        source = current.source();
    }
    None
}

pub fn spawn_dispatcher(pool: deadpool_postgres::Pool, config: WebhookConfig, events: Events) {
    tokio::spawn(async move {
        let http = match http_client(&config) {
            Ok(http) => http,
            Err(error) => {
                tracing::error!(%error, "webhooks: no dispatcher");
                return;
            }
        };
        if config.secret.is_none() {
            tracing::warn!(
                "webhooks: no signing secret (STAGEFLOW_WEBHOOK_SECRET): only deliveries to registered endpoints \
                 (their own secrets) are sent; the others are not sent unsigned"
            );
        }
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

/// One attempt, signed with `secret`: (delivered, status code, error).
async fn attempt(
    http: &reqwest::Client,
    config: &WebhookConfig,
    id: i64,
    url: &str,
    payload: &serde_json::Value,
    secret: Option<&str>,
) -> (bool, Option<i32>, Option<String>) {
    let Some(secret) = secret else {
        return (
            false,
            None,
            Some(
                "not sent: no signing secret (register the endpoint, or set the server's STAGEFLOW_WEBHOOK_SECRET)"
                    .into(),
            ),
        );
    };
    let parsed = match target(url, &config.allowed_hosts) {
        Ok(parsed) => parsed,
        Err(error) => return (false, None, Some(error)),
    };
    let body = serde_json::to_vec(payload).expect("JSON serialises");
    let message_id = format!("msg_{id}");
    let timestamp = chrono::Utc::now().timestamp();
    let request = http
        .post(parsed)
        .header("content-type", "application/json")
        .header("webhook-id", &message_id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature(secret, &message_id, timestamp, &body))
        .header("x-stageflow-event", payload["event"].as_str().unwrap_or_default())
        .body(body);
    match request.send().await {
        Ok(response) if response.status().is_success() => (true, Some(response.status().as_u16() as i32), None),
        Ok(response) if response.status().is_redirection() => (
            false,
            Some(response.status().as_u16() as i32),
            Some(format!("HTTP {}: redirects are not followed", response.status())),
        ),
        Ok(response) => (false, Some(response.status().as_u16() as i32), Some(format!("HTTP {}", response.status()))),
        Err(e) if refusal(&e).is_some() => (false, None, refusal(&e)),
        Err(e) if e.is_timeout() => (false, None, Some(format!("no answer within {} s", config.timeout.as_secs()))),
        Err(e) if e.is_connect() => (false, None, Some("cannot connect to the receiver".into())),
        Err(e) => (false, None, Some(format!("request failed: {}", e.without_url()))),
    }
}

async fn dispatch_due(
    pool: &deadpool_postgres::Pool,
    http: &reqwest::Client,
    config: &WebhookConfig,
) -> Result<usize, String> {
    let client = pool.get().await.map_err(|e| e.to_string())?;
    let cache = PoolStatements(&client.statement_cache);
    let api = stageflow_client::Api::cached(&**client, &cache);
    let batch = config.concurrency.clamp(1, 1000);
    // Covers the longest a claim's deliveries take: all to one host, per_endpoint at a time.
    let rounds = batch.div_ceil(config.per_endpoint.max(1)) as u64;
    let lease = (config.timeout.as_secs().max(1) * rounds + 5).min(3600) as i32;
    let due = api.claim_webhook_deliveries(batch as i32, lease).await.map_err(|e| e.to_string())?;
    let mut per_host: HashMap<String, Arc<Semaphore>> = HashMap::new();
    let mut running = Vec::new();
    for delivery in due.iter().cloned() {
        let host =
            reqwest::Url::parse(&delivery.url).ok().and_then(|u| u.host_str().map(str::to_owned)).unwrap_or_default();
        let gate = per_host.entry(host).or_insert_with(|| Arc::new(Semaphore::new(config.per_endpoint.max(1)))).clone();
        let (config, http) = (config.clone(), http.clone());
        running.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await;
            let secret = delivery.secret.as_deref().or(config.secret.as_deref());
            let outcome = attempt(&http, &config, delivery.delivery_id, &delivery.url, &delivery.payload, secret).await;
            (delivery, outcome)
        }));
    }
    for handle in running {
        let Ok((delivery, (delivered, status, error))) = handle.await else { continue };
        let (id, url, attempts) = (delivery.delivery_id, &delivery.url, delivery.attempts);
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
    use super::*;

    #[test]
    fn the_signature_is_the_standard_webhooks_one() {
        // The specification's example: its secret, id, timestamp, body and signature.
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            signature(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn only_public_addresses_are_reached() {
        for public in ["93.184.216.34", "8.8.8.8", "2606:2800:220:1:248:1893:25c8:1946", "1.1.1.1"] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "192.0.2.1",
            "198.18.0.1",
            "240.0.0.1",
            "::1",
            "::",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2002:a9fe:a9fe::1",
            "2001:db8::1",
            "::ffff:0:7f00:1",
            "192.88.99.1",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
    }

    #[tokio::test]
    async fn a_target_is_https_and_public_unless_its_host_is_allowed() {
        let refused = |url: &'static str| target(url, &[]).err().unwrap_or_else(|| panic!("{url} allowed"));
        assert!(refused("http://example.com/hook").contains("https only"));
        for private in [
            "https://127.0.0.1/hook",
            "https://169.254.169.254/latest/meta-data/",
            "https://[::1]:8443/hook",
            "https://[::ffff:10.0.0.1]/hook",
        ] {
            assert!(refused(private).contains("not public"), "{private}");
        }
        assert!(refused("ftp://example.com/x").contains("scheme"));
        let allowed = vec!["127.0.0.1".to_owned()];
        assert!(target("http://127.0.0.1:9/hook", &allowed).is_ok());
        // A name is checked where the client resolves it: every address must be public.
        use reqwest::dns::Resolve;
        let name = |host: &str| host.parse::<reqwest::dns::Name>().unwrap();
        let resolver = PublicOnly { allowed_hosts: Vec::new() };
        let error = resolver.resolve(name("localhost")).await.err().expect("localhost resolved");
        assert!(error.to_string().contains("not public"), "{error}");
        let resolver = PublicOnly { allowed_hosts: vec!["localhost".to_owned()] };
        let addresses: Vec<SocketAddr> = resolver.resolve(name("localhost")).await.unwrap().collect();
        assert!(addresses.iter().all(|a| a.ip().is_loopback()) && !addresses.is_empty(), "{addresses:?}");
    }
}
