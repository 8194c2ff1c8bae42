//! Stageflow's HTTP API, served by `stageflow serve`: the original system's endpoints (same
//! shapes), job listing, cancel and retry, dead letters, job types, a health check, an OpenAPI
//! document, Prometheus metrics, server-sent events from `LISTEN stageflow_events`, and the
//! webhook dispatcher. Every handler calls one stageflow SQL function; the server keeps no state.

mod api;
mod events;
mod metrics;
mod webhooks;

use std::net::SocketAddr;
use std::time::Duration;

pub use webhooks::WebhookConfig;

#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub database_url: String,
    pub listen: SocketAddr,
    /// The operator's bearer token: every /api route, every job. With no tenant tokens either, auth is off.
    pub token: Option<String>,
    /// Tenants' (label, bearer token) pairs: each sees and cancels only the jobs submitted with its token.
    pub tenant_tokens: Vec<(String, String)>,
    /// Read-only tokens: every GET route (every job the server's login sees) and /metrics.
    pub read_tokens: Vec<String>,
    pub webhooks: WebhookConfig,
    /// The most bytes a request body may have.
    pub body_limit: usize,
    /// The session cookie carries `Secure` (browsers send it over HTTPS only): for a server
    /// reached through an HTTPS proxy.
    pub cookie_secure: bool,
}

impl ServeConfig {
    pub fn new(database_url: impl Into<String>, listen: SocketAddr, token: Option<String>) -> Self {
        ServeConfig {
            database_url: database_url.into(),
            listen,
            token,
            tenant_tokens: Vec::new(),
            read_tokens: Vec::new(),
            webhooks: WebhookConfig::default(),
            body_limit: 2 * 1024 * 1024,
            cookie_secure: false,
        }
    }
}

#[derive(Debug)]
pub struct ServeError(pub String);

impl std::fmt::Display for ServeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A running server.
pub struct Server {
    pub addr: SocketAddr,
    pub handle: tokio::task::JoinHandle<()>,
}

/// Binds, starts the event listener and the webhook dispatcher, and serves until `shutdown`.
pub async fn start(
    config: ServeConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<Server, ServeError> {
    let mut settings = stageflow_client::tls::ConnectConfig::from_url(&config.database_url)
        .map_err(|e| ServeError(format!("database URL: {e}")))?;
    // No request holds a connection or a statement for long: a few slow ones must not hang the API.
    let options = format!(
        "{} -c statement_timeout={} -c idle_in_transaction_session_timeout={}",
        settings.config.get_options().unwrap_or_default(),
        STATEMENT_TIMEOUT.as_millis(),
        STATEMENT_TIMEOUT.as_millis()
    );
    settings.config.options(options.trim());
    let manager = deadpool_postgres::Manager::from_config(
        settings.config,
        settings.tls,
        deadpool_postgres::ManagerConfig { recycling_method: deadpool_postgres::RecyclingMethod::Fast },
    );
    let pool = deadpool_postgres::Pool::builder(manager)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .wait_timeout(Some(POOL_TIMEOUT))
        .create_timeout(Some(POOL_TIMEOUT))
        .recycle_timeout(Some(POOL_TIMEOUT))
        .build()
        .map_err(|e| ServeError(format!("database pool: {e}")))?;
    // Fail early and clearly if the database or the extension is missing (a catalog lookup: no call
    // of the API, which would fail with less to say).
    let client = pool.get().await.map_err(|e| {
        // (the causes say why: a TLS handshake's names the certificate problem)
        let mut text = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(cause) = source {
            text.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        ServeError(format!("cannot connect to the database: {text}"))
    })?;
    client
        .query_one("SELECT to_regprocedure('stageflow.job_status(text)') IS NOT NULL", &[])
        .await
        .map_err(|e| ServeError(e.to_string()))
        .and_then(|row| {
            if row.get::<_, bool>(0) {
                Ok(())
            } else {
                Err(ServeError("the stageflow extension is not installed in this database".into()))
            }
        })?;
    // Every tenant label is one the database takes (it refuses the others with a hint). An empty
    // label would mean no tenant: the operator's view.
    for (label, _) in &config.tenant_tokens {
        if label.is_empty() {
            return Err(ServeError("a tenant token needs a tenant label".into()));
        }
        let api = stageflow_client::Api::new(&**client);
        let checked = match api.set_tenant(label, false).await {
            Ok(()) => api.list_jobs(stageflow_client::ListJobs { max_rows: 1, ..Default::default() }).await.map(drop),
            Err(e) => Err(e),
        };
        checked.map_err(|e| {
            ServeError(format!(
                "tenant {label:?}: {}",
                e.refusal().map_or(e.to_string(), |r| format!("{} ({})", r.message, r.hint.as_deref().unwrap_or("")))
            ))
        })?;
    }
    client.batch_execute("RESET stageflow.tenant").await.map_err(|e| ServeError(e.to_string()))?;
    drop(client);

    let events = events::Events::start(config.database_url.clone());
    webhooks::spawn_dispatcher(pool.clone(), config.webhooks.clone(), events.clone());
    let app = api::router(
        api::AppState {
            pool,
            token: config.token.clone(),
            tenant_tokens: config.tenant_tokens.clone(),
            read_tokens: config.read_tokens.clone(),
            cookie_secure: config.cookie_secure,
            events,
        },
        config.body_limit,
    );
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| ServeError(format!("cannot listen on {}: {e}", config.listen)))?;
    let addr = listener.local_addr().map_err(|e| ServeError(e.to_string()))?;
    tracing::info!(%addr, auth = config.token.is_some(), tenants = config.tenant_tokens.len(), "stageflow serve listening");
    let handle = tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
            tracing::error!(%error, "server stopped");
        }
    });
    Ok(Server { addr, handle })
}

/// The longest a request's statement (or its transaction, idle) may take in the database.
pub(crate) const STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest a request waits for a pooled connection (or for one to be made or checked).
pub(crate) const POOL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the dispatcher and listener wait before trying the database again.
pub(crate) const RETRY: Duration = Duration::from_secs(1);
