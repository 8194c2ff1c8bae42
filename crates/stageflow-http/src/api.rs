//! The routes. Each handler makes one call of the SQL API (`stageflow_client`) and returns its JSON;
//! database errors become JSON errors with a status that fits their SQLSTATE.
//!
//! Two kinds of bearer token: the operator's (every route, every job the server's login sees) and
//! tenants' (`--tenant-token TENANT=TOKEN`): a tenant's requests run with `stageflow.tenant` set to
//! its label for their transaction, so the database shows and lets it cancel only the jobs it
//! submitted; the operator's routes (retry, dead letters, queue grants, events) refuse it (403).
//!
//! A token travels in the `Authorization` header, never in a URL (where logs and histories keep
//! it). A browser signs in once (`POST /api/session` with the header) and gets the token back as
//! an HttpOnly, SameSite=Strict cookie, which its page's scripts cannot read and its
//! `EventSource` sends; a request authenticated by that cookie must also carry the header
//! `x-stageflow-request` unless it is a GET (another site's page cannot add it). Every response
//! carries a content security policy without inline script, `nosniff`, and no framing.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;

use axum::extract::{DefaultBodyLimit, Extension, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use futures_util::Stream;
use serde::Deserialize;
use serde_json::{json, Value};
use stageflow_client::{Api, ListJobs, PrepareCached, SubmitOutcome};
use tokio_postgres::Statement;

use crate::events::Events;

#[derive(Clone)]
pub struct AppState {
    pub pool: deadpool_postgres::Pool,
    pub token: Option<String>,
    /// (tenant label, token) pairs.
    pub tenant_tokens: Vec<(String, String)>,
    /// Read-only tokens: every GET route (every job the server's login sees) and /metrics.
    pub read_tokens: Vec<String>,
    /// The session cookie carries `Secure`.
    pub cookie_secure: bool,
    pub events: Events,
}

/// Who a request comes from, by its token's scope: the operator (admin: everything), a tenant
/// (submit: reads, submits and cancels the jobs of its label), or a reader (read: every GET
/// route and /metrics, nothing that changes anything).
#[derive(Clone, Debug, PartialEq)]
pub enum Caller {
    Operator,
    Tenant(String),
    Reader,
}

pub struct ApiError {
    status: StatusCode,
    body: Value,
}

impl ApiError {
    fn new(status: StatusCode, sqlstate: Option<&str>, message: impl Into<String>, hint: Option<&str>) -> Self {
        ApiError { status, body: json!({"error": {"message": message.into(), "sqlstate": sqlstate, "hint": hint}}) }
    }
}

impl From<stageflow_client::Error> for ApiError {
    fn from(error: stageflow_client::Error) -> Self {
        use stageflow_client::Error;
        if let Error::Connection(e) = &error {
            return match e.as_db_error() {
                // The server is going away (57P01, ...) and said so.
                Some(db) => {
                    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, Some(db.code().code()), db.message(), db.hint())
                }
                None => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, None, format!("database: {e}"), None),
            };
        }
        let Some(refusal) = error.refusal() else {
            return ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, None, error.to_string(), None);
        };
        let status = match &error {
            Error::UnknownObject(_) => StatusCode::NOT_FOUND,
            Error::WrongState(_) => StatusCode::CONFLICT,
            Error::Forbidden(_) => StatusCode::FORBIDDEN,
            Error::LimitExceeded(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Error::InvalidName(_) => StatusCode::BAD_REQUEST,
            _ if refusal.sqlstate.starts_with("22") => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, Some(&refusal.sqlstate), refusal.message.clone(), refusal.hint.as_deref())
    }
}

impl From<tokio_postgres::Error> for ApiError {
    fn from(error: tokio_postgres::Error) -> Self {
        stageflow_client::Error::from(error).into()
    }
}

impl From<deadpool_postgres::PoolError> for ApiError {
    fn from(error: deadpool_postgres::PoolError) -> Self {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, None, format!("database unavailable: {error}"), None)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

type ApiResult = Result<Json<Value>, ApiError>;

/// A pooled connection's statement cache (deadpool's), for the SQL API: each statement prepared
/// once per connection.
pub(crate) struct PoolStatements<'a>(pub(crate) &'a deadpool_postgres::StatementCache);

impl PrepareCached for PoolStatements<'_> {
    fn prepare<'a>(
        &'a self,
        client: &'a tokio_postgres::Client,
        sql: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Statement, tokio_postgres::Error>> + Send + 'a>> {
        Box::pin(self.0.prepare(client, sql))
    }
}

/// Starts the transaction of a request: a tenant's sets `stageflow.tenant` to its label for it.
async fn begin<'a>(
    client: &'a mut deadpool_postgres::Object,
    caller: &Caller,
) -> Result<deadpool_postgres::Transaction<'a>, ApiError> {
    let transaction = client.transaction().await?;
    if let Caller::Tenant(label) = caller {
        // Never empty (no tenant at all): start(), the only maker of this state, refuses one.
        let cache = PoolStatements(&transaction.statement_cache);
        Api::cached(&*transaction, &cache).set_tenant(label, true).await?;
    }
    Ok(transaction)
}

/// Makes the call `$call` on `$api` (the SQL API) as `$caller`, in a transaction of its own
/// ([`begin`]) committed after it; evaluates to the call's answer.
macro_rules! as_caller {
    ($state:expr, $caller:expr, |$api:ident| $call:expr) => {{
        let mut client = $state.pool.get().await?;
        let transaction = begin(&mut client, $caller).await?;
        let cache = PoolStatements(&transaction.statement_cache);
        let $api = Api::cached(&*transaction, &cache);
        let answer = $call.await?;
        transaction.commit().await?;
        answer
    }};
}

/// The name of the session cookie a browser signs in with.
const SESSION_COOKIE: &str = "stageflow_session";
/// How long a browser's session lasts.
const SESSION_SECONDS: u32 = 12 * 3600;

/// The token of the session cookie, if the request carries one.
fn session_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| pair.trim().strip_prefix(SESSION_COOKIE)?.strip_prefix('=').map(str::to_owned))
        .filter(|t| !t.is_empty())
}

/// Who the bearer token names: the operator token, or a tenant's. Every token is compared (in
/// constant time), so the time taken does not tell which one matched.
fn caller_of(state: &AppState, given: &str) -> Option<Caller> {
    let given = digest(given);
    let mut caller = None;
    if state.token.as_deref().is_some_and(|token| digests_equal(&given, &digest(token))) {
        caller = Some(Caller::Operator);
    }
    for (label, token) in &state.tenant_tokens {
        if digests_equal(&given, &digest(token)) && caller.is_none() {
            caller = Some(Caller::Tenant(label.clone()));
        }
    }
    for token in &state.read_tokens {
        if digests_equal(&given, &digest(token)) && caller.is_none() {
            caller = Some(Caller::Reader);
        }
    }
    caller
}

async fn require_token(
    State(state): State<AppState>,
    headers: HeaderMap,
    mut request: Request,
    next: Next,
) -> Response {
    if state.token.is_none() && state.tenant_tokens.is_empty() && state.read_tokens.is_empty() {
        request.extensions_mut().insert(Caller::Operator);
        return next.run(request).await;
    }
    // The header first; the session cookie only with x-stageflow-request, unless the request reads.
    let from_cookie = session_token(&headers)
        .filter(|_| request.method() == axum::http::Method::GET || headers.contains_key("x-stageflow-request"));
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or(from_cookie.map(|token| format!("Bearer {token}")));
    match given.as_deref() {
        None => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            Json(json!({"error": {"message": "missing bearer token", "hint": "send Authorization: Bearer <STAGEFLOW_API_TOKEN>"}})),
        )
            .into_response(),
        Some(value) => match value.strip_prefix("Bearer ").and_then(|given| caller_of(&state, given)) {
            Some(Caller::Reader) if request.method() != axum::http::Method::GET => ApiError::new(
                StatusCode::FORBIDDEN,
                None,
                "a read-only token changes nothing",
                Some("submitting, cancelling and retrying need a tenant's token or STAGEFLOW_API_TOKEN"),
            )
            .into_response(),
            Some(caller) => {
                request.extensions_mut().insert(caller);
                next.run(request).await
            }
            None => (StatusCode::FORBIDDEN, Json(json!({"error": {"message": "wrong bearer token"}}))).into_response(),
        },
    }
}

/// The operator's routes: a tenant's token is refused (a reader's reads them: the token check
/// refused its other methods).
async fn require_operator(Extension(caller): Extension<Caller>, request: Request, next: Next) -> Response {
    match caller {
        Caller::Operator | Caller::Reader => next.run(request).await,
        Caller::Tenant(_) => ApiError::new(
            StatusCode::FORBIDDEN,
            None,
            "this route is the operator's",
            Some(
                "a tenant's token reads, lists, submits and cancels its own jobs; this route needs STAGEFLOW_API_TOKEN",
            ),
        )
        .into_response(),
    }
}

/// Tokens are compared by their SHA-256 digests, in constant time: neither the contents nor the
/// lengths of the tokens show in the time taken.
fn digest(token: &str) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::digest(token.as_bytes()).into()
}

fn digests_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Deserialize)]
struct SubmitQuery {
    webhook_url: Option<String>,
}

async fn submit(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(job_type): Path<String>,
    Query(q): Query<SubmitQuery>,
    body: Option<Json<Value>>,
) -> ApiResult {
    let params = body.map(|Json(v)| v).unwrap_or_else(|| json!({}));
    let submitted =
        as_caller!(state, &caller, |api| api.submit_job_outcome(&job_type, &params, q.webhook_url.as_deref()));
    let job_id = submitted.job_id.as_str();
    // Identical work of another login or tenant: its id and outcome, nothing of the job.
    if submitted.outcome == SubmitOutcome::OwnedByAnother {
        return Ok(Json(
            json!({"job_id": job_id, "outcome": "owned_by_another", "status": null, "job_type": job_type, "job": null}),
        ));
    }
    // A statement of its own: one that also submitted would not see its own job.
    let status = as_caller!(state, &caller, |api| api.job_status(job_id)).document;
    Ok(Json(json!({
        "job_id": status["job_id"],
        "outcome": submitted.outcome.as_str(),
        "status": status["status"],
        "job_type": status["job_type"],
        "created_at": status["created_at"],
        "job": status,
    })))
}

async fn status(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(job_id): Path<String>,
) -> ApiResult {
    Ok(Json(as_caller!(state, &caller, |api| api.job_status(&job_id)).document))
}

#[derive(Deserialize)]
struct ResultQuery {
    after: Option<i32>,
    limit: Option<i32>,
}

/// A page of a completed job's result (`stageflow.job_result`), for those who see the job, as the
/// status route: another's job is 404, a job without a result 409, a bad limit 400.
async fn result(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(job_id): Path<String>,
    Query(q): Query<ResultQuery>,
) -> ApiResult {
    Ok(Json(as_caller!(state, &caller, |api| api.job_result_json(&job_id, q.after, q.limit.unwrap_or(1000)))))
}

#[derive(Deserialize)]
struct TasksQuery {
    after: Option<String>,
    limit: Option<i32>,
}

/// A page of a job's tasks (`?after=<last task_id of the previous page>&limit=`, default 1,000, at
/// most 10,000): a job of a million tasks is never read whole by one request.
async fn tasks(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(job_id): Path<String>,
    Query(q): Query<TasksQuery>,
) -> ApiResult {
    let limit = q.limit.unwrap_or(1000);
    Ok(Json(as_caller!(state, &caller, |api| api.job_tasks_page_json(&job_id, q.after.as_deref(), Some(limit)))))
}

#[derive(Deserialize)]
struct ListQuery {
    status: Option<String>,
    #[serde(rename = "type")]
    job_type: Option<String>,
    limit: Option<i32>,
    before: Option<String>,
}

async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<ListQuery>,
) -> ApiResult {
    let filter = ListJobs {
        status: q.status.as_deref(),
        job_type: q.job_type.as_deref(),
        max_rows: q.limit.unwrap_or(50),
        before: q.before.as_deref(),
    };
    Ok(Json(as_caller!(state, &caller, |api| api.list_jobs_json(filter))))
}

async fn cancel(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(job_id): Path<String>,
) -> ApiResult {
    Ok(Json(as_caller!(state, &caller, |api| api.cancel_job_json(&job_id))))
}

async fn retry(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(job_id): Path<String>,
) -> ApiResult {
    Ok(Json(as_caller!(state, &caller, |api| api.retry_job_json(&job_id))))
}

async fn webhook_deliveries(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(job_id): Path<String>,
) -> ApiResult {
    Ok(Json(as_caller!(state, &caller, |api| api.webhook_deliveries_json(&job_id))))
}

#[derive(Deserialize)]
struct EndpointBody {
    name: String,
    url: String,
}

/// `POST /api/webhook-endpoints` `{"name", "url"}`: registers the caller's endpoint (a tenant's
/// under its label) and answers its signing secret, shown this once.
async fn register_endpoint(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Json(body): Json<EndpointBody>,
) -> ApiResult {
    let secret = as_caller!(state, &caller, |api| api.register_webhook_endpoint(&body.name, &body.url));
    Ok(Json(json!({"name": body.name, "url": body.url, "secret": secret})))
}

async fn list_endpoints(State(state): State<AppState>, Extension(caller): Extension<Caller>) -> ApiResult {
    Ok(Json(as_caller!(state, &caller, |api| api.webhook_endpoints_json())))
}

async fn drop_endpoint(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult {
    let dropped = as_caller!(state, &caller, |api| api.drop_webhook_endpoint(&name));
    Ok(Json(json!({"name": name, "dropped": dropped})))
}

#[derive(Deserialize)]
struct LimitQuery {
    limit: Option<i32>,
}

async fn dead_letters(State(state): State<AppState>, Query(q): Query<LimitQuery>) -> ApiResult {
    Ok(Json(as_caller!(state, &Caller::Operator, |api| api.dead_letters_json(q.limit.unwrap_or(100)))))
}

async fn job_types(State(state): State<AppState>) -> ApiResult {
    Ok(Json(as_caller!(state, &Caller::Operator, |api| api.job_types_json())))
}

/// Which roles may claim from which queue (stageflow.list_queue_grants).
async fn queue_grants(State(state): State<AppState>) -> ApiResult {
    Ok(Json(as_caller!(state, &Caller::Operator, |api| api.list_queue_grants_json())))
}

/// Only that the database answers: no call of the API.
async fn healthz(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let client = state.pool.get().await?;
    client.query_one("SELECT 1", &[]).await?;
    Ok(Json(json!({"status": "ok"})))
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], include_str!("openapi.json"))
}

/// Prometheus metrics (stageflow.metrics), as the server's login: no tenant.
/// `/metrics`: every job's counters, for the operator's and readers' tokens (not a tenant's).
async fn metrics(State(state): State<AppState>, Extension(caller): Extension<Caller>) -> Result<Response, ApiError> {
    if let Caller::Tenant(_) = caller {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            None,
            "metrics count every tenant's jobs",
            Some("scrape /metrics with a read-only token (stageflow serve --read-token) or STAGEFLOW_API_TOKEN"),
        ));
    }
    let samples = as_caller!(state, &Caller::Operator, |api| api.metrics());
    let text = crate::metrics::render(&samples);
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

/// Server-sent events: every stageflow event (`{"event_id", "job_id", "kind"}`) as it commits.
async fn events(State(state): State<AppState>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let receiver = state.events.subscribe();
    let stream = futures_util::stream::unfold(receiver, |mut receiver| async move {
        loop {
            match receiver.recv().await {
                Ok(payload) => return Some((Ok(Event::default().event("stageflow").data(payload)), receiver)),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

async fn dashboard() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], include_str!("dashboard.html"))
}

async fn dashboard_script() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], include_str!("dashboard.js"))
}

/// `POST /api/session`: a browser signs in with its token in the Authorization header and gets it
/// back as an HttpOnly cookie (204), or 403 for a token this server does not know.
async fn open_session(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let given =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    match given.filter(|token| caller_of(&state, token).is_some()) {
        Some(token) if token.bytes().all(|b| b.is_ascii_graphic() && b != b';' && b != b',') => (
            StatusCode::NO_CONTENT,
            [(
                header::SET_COOKIE,
                format!(
                    "{SESSION_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/api; Max-Age={SESSION_SECONDS}{}",
                    if state.cookie_secure { "; Secure" } else { "" }
                ),
            )],
        )
            .into_response(),
        Some(_) => ApiError::new(
            StatusCode::BAD_REQUEST,
            None,
            "this token cannot be kept in a cookie",
            Some("send it in the Authorization header instead"),
        )
        .into_response(),
        None => (StatusCode::FORBIDDEN, Json(json!({"error": {"message": "wrong or missing bearer token"}})))
            .into_response(),
    }
}

/// `DELETE /api/session`: the cookie is cleared.
async fn close_session(State(state): State<AppState>) -> Response {
    let secure = if state.cookie_secure { "; Secure" } else { "" };
    (
        StatusCode::NO_CONTENT,
        [(header::SET_COOKIE, format!("{SESSION_COOKIE}=; HttpOnly; SameSite=Strict; Path=/api; Max-Age=0{secure}"))],
    )
        .into_response()
}

/// Headers on every response: a content security policy with scripts from this server only (no
/// inline script), no sniffing of content types, no framing, no referrer.
async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        header::HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; connect-src 'self'; \
             img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
    );
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, header::HeaderValue::from_static("nosniff"));
    headers.insert(header::X_FRAME_OPTIONS, header::HeaderValue::from_static("DENY"));
    headers.insert(header::REFERRER_POLICY, header::HeaderValue::from_static("no-referrer"));
    response
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, None, "no such route", Some("see /api/openapi.json"))
}

pub fn router(state: AppState, body_limit: usize) -> Router {
    let operator = Router::new()
        .route("/api/jobs/{job_id}/retry", post(retry))
        .route("/api/dead-letters", get(dead_letters))
        .route("/api/queues/grants", get(queue_grants))
        .route("/api/events", get(events))
        .route_layer(middleware::from_fn(require_operator));
    let api = Router::new()
        .route("/api/jobs/submit/{job_type}", post(submit))
        .route("/api/jobs/status/{job_id}", get(status))
        .route("/api/jobs/{job_id}/result", get(result))
        .route("/api/db/tasks/{job_id}", get(tasks))
        .route("/api/jobs", get(list))
        .route("/api/jobs/{job_id}/cancel", post(cancel))
        .route("/api/jobs/{job_id}/webhooks", get(webhook_deliveries))
        .route("/api/webhook-endpoints", get(list_endpoints).post(register_endpoint))
        .route("/api/webhook-endpoints/{name}", delete(drop_endpoint))
        .route("/api/job-types", get(job_types))
        .route("/metrics", get(metrics))
        .merge(operator)
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .merge(api)
        .route("/", get(dashboard))
        .route("/dashboard.js", get(dashboard_script))
        .route("/api/session", post(open_session).delete(close_session))
        .route("/api/openapi.json", get(openapi))
        .route("/healthz", get(healthz))
        .fallback(not_found)
        .layer(middleware::from_fn(security_headers))
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}
