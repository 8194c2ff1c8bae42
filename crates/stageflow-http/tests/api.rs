//! The HTTP API against a real cluster: the original endpoints and shapes, auth, errors with fitting
//! status codes, listing, cancel and retry, dead letters, OpenAPI, metrics, server-sent events, a
//! body limit, and webhooks delivered with a signature to a receiver that fails the first attempts.

// Test code: a panic (unwrap, expect) is how a test reports a failure.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use stageflow_http::{start, ServeConfig};
use stageflow_tests::{connect, fresh_database, register};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "test-token";
/// The webhook signing secret, as Standard Webhooks libraries make them (`whsec_` + base64).
const WEBHOOK_SECRET: &str = "whsec_c3RhZ2VmbG93IHRlc3Qgd2ViaG9vayBzZWNyZXQ=";

async fn serve(database: &str) -> (String, String) {
    serve_with_tenants(database, Vec::new()).await
}

async fn serve_with_tenants(database: &str, tenant_tokens: Vec<(String, String)>) -> (String, String) {
    serve_configured(database, move |config| config.tenant_tokens = tenant_tokens).await
}

/// A server on a fresh database with the tests' settings, then `adjust`ed.
async fn serve_configured(database: &str, adjust: impl FnOnce(&mut ServeConfig)) -> (String, String) {
    let name = database.to_owned();
    // The test helpers use the blocking client, which must not run on the async runtime.
    let url = tokio::task::spawn_blocking(move || fresh_database(&name)).await.unwrap();
    let mut config = ServeConfig::new(url.clone(), "127.0.0.1:0".parse().unwrap(), Some(TOKEN.into()));
    config.webhooks.secret = Some(WEBHOOK_SECRET.into());
    // The tests' receivers listen on 127.0.0.1 over plain http: allowed by the operator.
    config.webhooks.allowed_hosts = vec!["127.0.0.1".into()];
    config.webhooks.retry_base = Duration::from_millis(50);
    config.webhooks.poll_interval = Duration::from_millis(100);
    config.body_limit = 64 * 1024;
    adjust(&mut config);
    let server = start(config, std::future::pending()).await.expect("server starts");
    (format!("http://{}", server.addr), url)
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn call(method: reqwest::Method, url: &str, body: Option<Value>) -> (u16, Value) {
    call_as(TOKEN, method, url, body).await
}

async fn call_as(token: &str, method: reqwest::Method, url: &str, body: Option<Value>) -> (u16, Value) {
    let mut request = client().request(method, url).bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_serves_jobs_with_auth_and_fitting_errors() {
    let (base, db_url) = serve("http_api").await;

    // Auth: none -> 401, wrong -> 403; health and the OpenAPI document are open (metrics are not).
    let anonymous = client().get(format!("{base}/api/jobs")).send().await.unwrap();
    assert_eq!(anonymous.status().as_u16(), 401);
    assert_eq!(anonymous.headers()["www-authenticate"], "Bearer");
    let wrong = client().get(format!("{base}/api/jobs")).bearer_auth("nope").send().await.unwrap();
    assert_eq!(wrong.status().as_u16(), 403);
    assert_eq!(client().get(format!("{base}/healthz")).send().await.unwrap().status().as_u16(), 200);
    let openapi: Value = client().get(format!("{base}/api/openapi.json")).send().await.unwrap().json().await.unwrap();
    assert_eq!(openapi["openapi"], json!("3.0.3"));
    assert!(openapi["paths"]["/api/jobs/submit/{job_type}"]["post"].is_object());
    assert!(openapi["paths"]["/api/jobs/{job_id}/result"]["get"]["parameters"].is_array());
    assert!(openapi["components"]["schemas"]["JobStatus"]["properties"]["result_count"].is_object());

    // The original endpoints, same shapes.
    let (code, submitted) = call(
        reqwest::Method::POST,
        &format!("{base}/api/jobs/submit/hello_world"),
        Some(json!({"message": "http", "n": 3})),
    )
    .await;
    assert_eq!(code, 200, "{submitted}");
    let job_id = submitted["job_id"].as_str().unwrap().to_owned();
    assert_eq!(submitted["status"], json!("queued"));
    let (code, again) = call(
        reqwest::Method::POST,
        &format!("{base}/api/jobs/submit/hello_world"),
        Some(json!({"n": 3, "message": "http"})),
    )
    .await;
    assert_eq!((code, again["job_id"].as_str()), (200, Some(job_id.as_str())), "a resubmission returns the same job");
    let (code, status) = call(reqwest::Method::GET, &format!("{base}/api/jobs/status/{job_id}"), None).await;
    assert_eq!((code, status["total_stages"].clone()), (200, json!(2)));
    let (code, tasks) = call(reqwest::Method::GET, &format!("{base}/api/db/tasks/{job_id}"), None).await;
    assert_eq!((code, tasks.as_array().map(Vec::len)), (200, Some(3)));
    assert_eq!(tasks[0]["status"], json!("queued"));
    // A page at a time: after the last task of the previous page.
    let (code, first) = call(reqwest::Method::GET, &format!("{base}/api/db/tasks/{job_id}?limit=2"), None).await;
    assert_eq!((code, first.as_array().map(Vec::len)), (200, Some(2)), "{first}");
    let last = first[1]["task_id"].as_str().unwrap();
    let (code, rest) =
        call(reqwest::Method::GET, &format!("{base}/api/db/tasks/{job_id}?after={last}&limit=2"), None).await;
    assert_eq!((code, rest.as_array().map(Vec::len)), (200, Some(1)), "{rest}");
    assert_eq!(rest[0]["task_id"], tasks[2]["task_id"]);
    let (code, error) = call(reqwest::Method::GET, &format!("{base}/api/db/tasks/{job_id}?limit=100000"), None).await;
    assert_eq!((code, error["error"]["sqlstate"].clone()), (400, json!("22023")), "{error}");

    // Errors: JSON with the SQLSTATE and a status that fits.
    let (code, error) =
        call(reqwest::Method::POST, &format!("{base}/api/jobs/submit/hello_world"), Some(json!({"n": 0}))).await;
    assert_eq!(code, 400);
    assert!(error["error"]["message"].as_str().unwrap().contains("params.n: 0 is less than the minimum 1"), "{error}");
    assert_eq!(error["error"]["sqlstate"], json!("22023"));
    let (code, error) = call(reqwest::Method::GET, &format!("{base}/api/jobs/status/{}", "0".repeat(64)), None).await;
    assert_eq!((code, error["error"]["sqlstate"].clone()), (404, json!("42704")));
    assert!(error["error"]["hint"].is_string());
    // The result: an unknown job is 404, a queued job has none yet (409), a bad limit is 400.
    let (code, error) = call(reqwest::Method::GET, &format!("{base}/api/jobs/{}/result", "0".repeat(64)), None).await;
    assert_eq!((code, error["error"]["sqlstate"].clone()), (404, json!("42704")), "{error}");
    let (code, error) = call(reqwest::Method::GET, &format!("{base}/api/jobs/{job_id}/result"), None).await;
    assert_eq!((code, error["error"]["sqlstate"].clone()), (409, json!("55000")), "{error}");
    assert!(error["error"]["message"].as_str().unwrap().contains("has no result: it is queued"), "{error}");
    assert!(error["error"]["hint"].is_string(), "{error}");
    for limit in ["0", "10001", "-1"] {
        let (code, error) =
            call(reqwest::Method::GET, &format!("{base}/api/jobs/{job_id}/result?limit={limit}"), None).await;
        assert_eq!((code, error["error"]["sqlstate"].clone()), (400, json!("22023")), "limit {limit}: {error}");
        assert!(error["error"]["message"].as_str().unwrap().contains("limit must be between 1 and 10000"), "{error}");
        assert!(error["error"]["hint"].as_str().unwrap().contains("next_after"), "{error}");
    }
    let (code, _) = call(reqwest::Method::POST, &format!("{base}/api/jobs/submit/no_such_type"), Some(json!({}))).await;
    assert_eq!(code, 404);
    let (code, _) = call(reqwest::Method::GET, &format!("{base}/api/jobs?status=done"), None).await;
    assert_eq!(code, 400);
    let (code, _) = call(reqwest::Method::GET, &format!("{base}/api/nothing/here"), None).await;
    assert_eq!(code, 404);
    let big = json!({"message": "x".repeat(100_000), "n": 1});
    let (code, _) = call(reqwest::Method::POST, &format!("{base}/api/jobs/submit/hello_world"), Some(big)).await;
    assert_eq!(code, 413, "bodies over the limit are refused");

    // Listing, cancel, retry, dead letters, job types.
    let (_, jobs) = call(reqwest::Method::GET, &format!("{base}/api/jobs?type=hello_world&limit=10"), None).await;
    assert_eq!(jobs[0]["job_id"], json!(job_id));
    let (code, cancelled) = call(reqwest::Method::POST, &format!("{base}/api/jobs/{job_id}/cancel"), None).await;
    assert_eq!((code, cancelled["job_status"].clone()), (200, json!("cancelled")));
    let (_, retried) = call(reqwest::Method::POST, &format!("{base}/api/jobs/{job_id}/retry"), None).await;
    assert_eq!(retried["retried_tasks"], json!(3));
    let (code, letters) = call(reqwest::Method::GET, &format!("{base}/api/dead-letters"), None).await;
    assert_eq!((code, letters.as_array().map(Vec::len)), (200, Some(0)));
    let (_, types) = call(reqwest::Method::GET, &format!("{base}/api/job-types"), None).await;
    assert!(types.as_array().unwrap().iter().any(|t| t["name"] == json!("hello_world")));
    let db = db_url.clone();
    tokio::task::spawn_blocking(move || {
        connect(&db).batch_execute("SELECT stageflow.grant_queue('default', 'stageflow_worker')").unwrap();
    })
    .await
    .unwrap();
    let (code, grants) = call(reqwest::Method::GET, &format!("{base}/api/queues/grants"), None).await;
    assert_eq!(code, 200, "{grants}");
    assert_eq!(
        (grants[0]["queue"].clone(), grants[0]["role_name"].clone()),
        (json!("default"), json!("stageflow_worker")),
        "{grants}"
    );

    // Metrics: queue depth, tasks by status, per handler; behind a token.
    assert_eq!(client().get(format!("{base}/metrics")).send().await.unwrap().status().as_u16(), 401);
    let text = client().get(format!("{base}/metrics")).bearer_auth(TOKEN).send().await.unwrap().text().await.unwrap();
    assert!(text.contains("stageflow_queue_depth{queue=\"default\"} 3"), "{text}");
    assert!(text.contains("stageflow_tasks{status=\"queued\"} 3"), "{text}");
    assert!(text.contains("stageflow_jobs{status=\"processing\"} 1"), "{text}");
    assert!(
        text.contains("stageflow_handler_tasks_total{handler=\"hello_world.greet\",outcome=\"completed\"} 0"),
        "{text}"
    );
    assert!(text.contains("stageflow_task_duration_seconds_count{handler=\"hello_world.greet\"} 0"), "{text}");
    let _ = db_url;
}

/// Tenants' tokens: each tenant submits, reads, lists and cancels only its own jobs; another
/// tenant's job is unknown to it (404) and identical work says whose it is; the operator's routes
/// refuse a tenant's token; the operator sees every job with its tenant label.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_tokens_see_only_their_own_jobs() {
    let tenants = vec![("acme".to_owned(), "token-acme".to_owned()), ("globex".to_owned(), "token-globex".to_owned())];
    let (base, _db_url) = serve_with_tenants("http_tenants", tenants).await;
    let (acme, globex) = ("token-acme", "token-globex");
    let submit_url = format!("{base}/api/jobs/submit/hello_world");
    let work = json!({"message": "tenants", "n": 2});

    let (code, submitted) = call_as(acme, reqwest::Method::POST, &submit_url, Some(work.clone())).await;
    assert_eq!(
        (code, submitted["outcome"].clone(), submitted["job"]["tenant"].clone()),
        (200, json!("created"), json!("acme")),
        "{submitted}"
    );
    let job_id = submitted["job_id"].as_str().unwrap().to_owned();

    // globex: the job is unknown to it, whatever it tries; identical work is not its own.
    for (method, path) in [
        (reqwest::Method::GET, format!("/api/jobs/status/{job_id}")),
        (reqwest::Method::GET, format!("/api/jobs/{job_id}/result")),
        (reqwest::Method::GET, format!("/api/jobs/{job_id}/result?after=0&limit=1")),
        (reqwest::Method::GET, format!("/api/db/tasks/{job_id}")),
        (reqwest::Method::GET, format!("/api/jobs/{job_id}/webhooks")),
        (reqwest::Method::POST, format!("/api/jobs/{job_id}/cancel")),
    ] {
        let (code, error) = call_as(globex, method, &format!("{base}{path}"), None).await;
        assert_eq!((code, error["error"]["sqlstate"].clone()), (404, json!("42704")), "{path}: {error}");
    }
    let (code, listed) = call_as(globex, reqwest::Method::GET, &format!("{base}/api/jobs"), None).await;
    assert_eq!((code, listed), (200, json!([])));
    let (code, same) = call_as(globex, reqwest::Method::POST, &submit_url, Some(work.clone())).await;
    assert_eq!(
        (code, same["job_id"].as_str(), same["outcome"].clone(), same["job"].clone()),
        (200, Some(job_id.as_str()), json!("owned_by_another"), Value::Null),
        "{same}"
    );

    // The operator's routes are not a tenant's.
    for path in ["/api/dead-letters", "/api/queues/grants", "/api/events"] {
        let (code, _) = call_as(acme, reqwest::Method::GET, &format!("{base}{path}"), None).await;
        assert_eq!(code, 403, "{path}");
    }
    let (code, _) = call_as(acme, reqwest::Method::POST, &format!("{base}/api/jobs/{job_id}/retry"), None).await;
    assert_eq!(code, 403);

    // acme: its own job, as it is; cancelled and submitted again, resumed.
    let (_, listed) = call_as(acme, reqwest::Method::GET, &format!("{base}/api/jobs"), None).await;
    assert_eq!((listed.as_array().map(Vec::len), listed[0]["job_id"].as_str()), (Some(1), Some(job_id.as_str())));
    let (code, error) = call_as(acme, reqwest::Method::GET, &format!("{base}/api/jobs/{job_id}/result"), None).await;
    assert_eq!((code, error["error"]["sqlstate"].clone()), (409, json!("55000")), "its own job, not done yet: {error}");
    let (_, again) = call_as(acme, reqwest::Method::POST, &submit_url, Some(work.clone())).await;
    assert_eq!((again["outcome"].clone(), again["status"].clone()), (json!("exists"), json!("queued")), "{again}");
    let (code, cancelled) =
        call_as(acme, reqwest::Method::POST, &format!("{base}/api/jobs/{job_id}/cancel"), None).await;
    assert_eq!((code, cancelled["job_status"].clone()), (200, json!("cancelled")));
    let (_, resumed) = call_as(acme, reqwest::Method::POST, &submit_url, Some(work)).await;
    assert_eq!(
        (resumed["outcome"].clone(), resumed["status"].clone()),
        (json!("resumed"), json!("processing")),
        "{resumed}"
    );

    // The operator sees every job, with whose it is.
    let (_, all) = call(reqwest::Method::GET, &format!("{base}/api/jobs"), None).await;
    assert_eq!((all.as_array().map(Vec::len), all[0]["tenant"].clone()), (Some(1), json!("acme")), "{all}");
}

/// Each request a receiver saw: its headers (lowercase names) and body.
type Seen = Arc<Mutex<Vec<(std::collections::HashMap<String, String>, Vec<u8>)>>>;

/// A receiver that answers 500 to the first `fail_first` requests and 200 after, keeping each
/// request's headers and body.
async fn receiver(fail_first: usize) -> (SocketAddr, Seen) {
    receiver_answering(move |attempt| {
        if attempt <= fail_first {
            "500 Internal Server Error\r\ncontent-length: 0".to_owned()
        } else {
            "200 OK\r\ncontent-length: 0".to_owned()
        }
    })
    .await
}

/// A receiver whose answer to its n-th request (from 1) is `answer(n)`: the status line's rest and
/// any headers, e.g. "302 Found\r\nlocation: http://...".
async fn receiver_answering(answer: impl Fn(usize) -> String + Send + 'static) -> (SocketAddr, Seen) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let mut buffer = [0u8; 8192];
            // Read headers, then the body by content-length.
            loop {
                let n = socket.read(&mut buffer).await.unwrap();
                if n == 0 {
                    break;
                }
                request.extend_from_slice(&buffer[..n]);
                if let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&request[..end]).into_owned();
                    let headers: std::collections::HashMap<String, String> = head
                        .lines()
                        .skip(1)
                        .filter_map(|l| l.split_once(':'))
                        .map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_owned()))
                        .collect();
                    let length: usize = headers.get("content-length").map(|v| v.parse().unwrap()).unwrap_or(0);
                    while request.len() < end + 4 + length {
                        let n = socket.read(&mut buffer).await.unwrap();
                        request.extend_from_slice(&buffer[..n]);
                    }
                    let body = request[end + 4..end + 4 + length].to_vec();
                    let attempt = {
                        let mut seen = log.lock().unwrap();
                        seen.push((headers, body));
                        seen.len()
                    };
                    let _ = socket
                        .write_all(format!("HTTP/1.1 {}\r\nconnection: close\r\n\r\n", answer(attempt)).as_bytes())
                        .await;
                    break;
                }
            }
        }
    });
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_job_is_delivered_to_its_webhook_signed_and_retried() {
    let (base, db_url) = serve("http_webhooks").await;
    let (hook, seen) = receiver(2).await;
    let url = format!("http://{hook}/hooks/stageflow");
    let (code, submitted) = call(
        reqwest::Method::POST,
        &format!("{base}/api/jobs/submit/hello_world?webhook_url={url}"),
        Some(json!({"message": "hooked", "n": 2})),
    )
    .await;
    assert_eq!(code, 200, "{submitted}");
    let job_id = submitted["job_id"].as_str().unwrap().to_owned();
    // Work the job through SQL, as any worker would.
    let db = db_url.clone();
    tokio::task::spawn_blocking(move || {
        let mut client = connect(&db);
        while stageflow_tests::drain(&mut client, "default", 10) > 0 {}
    })
    .await
    .unwrap();

    let mut deliveries = Value::Null;
    for _ in 0..100 {
        let (_, d) = call(reqwest::Method::GET, &format!("{base}/api/jobs/{job_id}/webhooks"), None).await;
        if d[0]["status"] == json!("delivered") {
            deliveries = d;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(deliveries[0]["status"], json!("delivered"), "{deliveries}");
    assert_eq!(deliveries[0]["attempts"], json!(3), "two failed attempts, then delivered");
    let log = deliveries[0]["attempt_log"].as_array().unwrap();
    assert_eq!(
        log.iter().map(|a| a["status_code"].clone()).collect::<Vec<_>>(),
        vec![json!(500), json!(500), json!(200)]
    );

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3);
    let (headers, body) = &seen[2];
    assert_standard_webhook_signature(headers, body);
    // The same id on every attempt (the receiver's deduplication key).
    assert!(seen.iter().all(|(h, _)| h["webhook-id"] == headers["webhook-id"]), "{seen:?}");
    let payload: Value = serde_json::from_slice(body).unwrap();
    assert_eq!(payload["event"], json!("job_completed"));
    assert_eq!(payload["job"]["job_id"], json!(job_id));
    // The payload stays small: the result's size, not the result; the receiver reads it by pages.
    assert_eq!(payload["job"]["result_count"], json!(2), "{payload}");
    assert!(payload["job"].get("result").is_none(), "{payload}");
    let (code, page) = call(reqwest::Method::GET, &format!("{base}/api/jobs/{job_id}/result?limit=1"), None).await;
    assert_eq!(code, 200, "{page}");
    assert_eq!((page["entries"][0]["ordinal"].clone(), page["next_after"].clone()), (json!(0), json!(0)), "{page}");
    assert_eq!(page["entries"][0]["result"], json!({"key": "0"}), "drain's result: {page}");
    let (code, last) = call(reqwest::Method::GET, &format!("{base}/api/jobs/{job_id}/result?after=0"), None).await;
    assert_eq!(code, 200, "{last}");
    assert_eq!((last["entries"][0]["ordinal"].clone(), last["next_after"].clone()), (json!(1), Value::Null), "{last}");
    assert_eq!(last["entries"].as_array().map(Vec::len), Some(1), "{last}");
    let (_, whole) = call(reqwest::Method::GET, &format!("{base}/api/jobs/{job_id}/result"), None).await;
    assert_eq!(
        whole,
        json!({"job_id": job_id, "status": "completed", "fan_out": "lineage",
               "entries": [page["entries"][0], last["entries"][0]], "next_after": null})
    );

    // A job type may name the webhook too; a failing receiver is given up on after max_attempts.
    let db = db_url.clone();
    tokio::task::spawn_blocking(move || {
        register(
            &mut connect(&db),
            "hooked_type",
            r#"{"webhook_url": "http://127.0.0.1:9/unreachable", "stages": [{"name": "s", "handler": "h", "queue": "hq"}]}"#,
        )
    })
    .await
    .unwrap();
    let (_, failing) =
        call(reqwest::Method::POST, &format!("{base}/api/jobs/submit/hooked_type"), Some(json!({}))).await;
    let failing_id = failing["job_id"].as_str().unwrap().to_owned();
    call(reqwest::Method::POST, &format!("{base}/api/jobs/{failing_id}/cancel"), None).await;
    let mut last = Value::Null;
    for _ in 0..300 {
        let (_, d) = call(reqwest::Method::GET, &format!("{base}/api/jobs/{failing_id}/webhooks"), None).await;
        last = d.clone();
        if d[0]["status"] == json!("failed") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(last[0]["status"], json!("failed"), "{last}");
    assert_eq!(last[0]["attempts"], json!(8), "given up after max_attempts");
}

/// The Standard Webhooks signature, computed here from the specification (not with the server's
/// code): `v1,` + base64 of HMAC-SHA256 with the secret's decoded key over `id.timestamp.body`; and
/// the timestamp is now.
fn assert_standard_webhook_signature(headers: &std::collections::HashMap<String, String>, body: &[u8]) {
    use base64::Engine;
    use hmac::{Hmac, Mac};
    let key = base64::engine::general_purpose::STANDARD.decode(WEBHOOK_SECRET.strip_prefix("whsec_").unwrap()).unwrap();
    let (id, timestamp) = (&headers["webhook-id"], &headers["webhook-timestamp"]);
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    let expected = format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()));
    assert_eq!(headers["webhook-signature"], expected, "{headers:?}");
    let age = chrono::Utc::now().timestamp() - timestamp.parse::<i64>().unwrap();
    assert!((0..60).contains(&age), "a fresh timestamp: {timestamp}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_stream_as_they_commit() {
    let (base, _) = serve("http_events").await;
    let response = client().get(format!("{base}/api/events")).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let mut stream = response;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, submitted) = call(
        reqwest::Method::POST,
        &format!("{base}/api/jobs/submit/hello_world"),
        Some(json!({"message": "sse", "n": 1})),
    )
    .await;
    let job_id = submitted["job_id"].as_str().unwrap().to_owned();
    let chunk = tokio::time::timeout(Duration::from_secs(10), stream.chunk())
        .await
        .expect("an event within 10 s")
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&chunk);
    assert!(text.contains("event: stageflow"), "{text}");
    assert!(text.contains(&job_id) && text.contains("job_submitted"), "{text}");
}

/// Submits hello_world (`message` makes it a job of its own) with `webhook_url` and cancels it:
/// its end queues a delivery. Returns the job id.
async fn job_ending_with_webhook(base: &str, message: &str, webhook_url: &str) -> String {
    let url = format!("{base}/api/jobs/submit/hello_world?webhook_url={}", urlencode(webhook_url));
    let (code, submitted) = call(reqwest::Method::POST, &url, Some(json!({"message": message, "n": 1}))).await;
    assert_eq!(code, 200, "{submitted}");
    let job_id = submitted["job_id"].as_str().unwrap().to_owned();
    let (code, cancelled) = call(reqwest::Method::POST, &format!("{base}/api/jobs/{job_id}/cancel"), None).await;
    assert_eq!(code, 200, "{cancelled}");
    job_id
}

fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The job's first delivery once it has had at least one attempt.
async fn first_attempt(base: &str, job_id: &str) -> Value {
    for _ in 0..100 {
        let (_, d) = call(reqwest::Method::GET, &format!("{base}/api/jobs/{job_id}/webhooks"), None).await;
        if d[0]["attempt_log"].as_array().is_some_and(|log| !log.is_empty()) {
            return d[0].clone();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no attempt for job {job_id}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_reach_only_public_https_receivers_and_follow_no_redirect() {
    // A server whose operator allowed no host: a submitter's URL to the server's own machine or
    // network, or to the cloud metadata address, is refused before any connection.
    let (base, _) = serve_configured("http_webhook_targets", |config| config.webhooks.allowed_hosts.clear()).await;
    let (hook, seen) = receiver(0).await;
    let port = hook.port();
    for (n, (url, refusal)) in [
        (format!("http://example.com:{port}/hook"), "https only"),
        (format!("https://127.0.0.1:{port}/hook"), "not public"),
        (format!("https://localhost:{port}/hook"), "not public"),
        (format!("https://[::1]:{port}/hook"), "not public"),
        ("https://169.254.169.254/latest/meta-data/iam".to_owned(), "not public"),
        (format!("https://[::ffff:127.0.0.1]:{port}/hook"), "not public"),
    ]
    .into_iter()
    .enumerate()
    {
        let job_id = job_ending_with_webhook(&base, &format!("ssrf {n}"), &url).await;
        let delivery = first_attempt(&base, &job_id).await;
        let error = delivery["attempt_log"][0]["error"].as_str().unwrap_or_default().to_owned();
        assert!(error.starts_with("refused") && error.contains(refusal), "{url}: {delivery}");
        assert!(!error.contains("127.0.0.1") && !error.contains("::1"), "no address in the error: {error}");
        assert_eq!(delivery["attempt_log"][0]["status_code"], Value::Null, "{delivery}");
    }
    assert_eq!(seen.lock().unwrap().len(), 0, "nothing reached the receiver");

    // An allowed receiver that redirects elsewhere: the redirect is not followed.
    let (base, _) = serve("http_webhook_redirect").await;
    let (elsewhere, stolen) = receiver(0).await;
    let (hook, seen) =
        receiver_answering(move |_| format!("302 Found\r\nlocation: http://{elsewhere}/stolen\r\ncontent-length: 0"))
            .await;
    let job_id = job_ending_with_webhook(&base, "redirected", &format!("http://{hook}/hook")).await;
    let delivery = first_attempt(&base, &job_id).await;
    assert_eq!(delivery["attempt_log"][0]["status_code"], json!(302), "{delivery}");
    assert!(delivery["attempt_log"][0]["error"].as_str().unwrap().contains("redirects are not followed"), "{delivery}");
    // (the receiver may have seen a retry already: each attempt is one request to it)
    assert!(!seen.lock().unwrap().is_empty());
    assert_eq!(stolen.lock().unwrap().len(), 0, "the redirect's target got nothing");
}

/// What the Python reference implementation of Standard Webhooks (PyPI `standardwebhooks`, in the
/// tools venv) says of a delivery, verified with `secret`: `{"verified": <event>, "tampered":
/// "refused"|"accepted"}` (the same delivery with its body changed), or `{"error": ...}`.
fn standard_webhooks_verdict(secret: &str, headers: &std::collections::HashMap<String, String>, body: &[u8]) -> Value {
    let python =
        std::env::var("STAGEFLOW_PYTOOLS_PYTHON").unwrap_or_else(|_| "/var/tmp/stageflow-pytools/bin/python".into());
    let script = r#"
import json, sys
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
secret, headers, body = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
try:
    payload = Webhook(secret).verify(body, headers)
except WebhookVerificationError as e:
    print(json.dumps({"error": str(e)}))
    sys.exit(0)
tampered = body.replace('job_cancelled', 'job_completed')
try:
    Webhook(secret).verify(tampered, headers)
    print(json.dumps({"verified": payload["event"], "tampered": "accepted"}))
except WebhookVerificationError:
    print(json.dumps({"verified": payload["event"], "tampered": "refused"}))
"#;
    let wanted: std::collections::HashMap<&str, &String> =
        ["webhook-id", "webhook-timestamp", "webhook-signature"].iter().map(|k| (*k, &headers[*k])).collect();
    let out = std::process::Command::new(&python)
        .args(["-c", script, secret, &serde_json::to_string(&wanted).unwrap(), std::str::from_utf8(body).unwrap()])
        .output()
        .unwrap_or_else(|e| panic!("{python}: {e} (scripts/setup.sh makes the venv)"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_verify_with_the_standard_webhooks_library() {
    let (base, _) = serve("http_webhook_standard").await;
    // A URL: signed with the server's secret.
    let (hook, seen) = receiver(0).await;
    let job_id = job_ending_with_webhook(&base, "standard", &format!("http://{hook}/hook")).await;
    let delivery = first_attempt(&base, &job_id).await;
    assert_eq!(delivery["status"], json!("delivered"), "{delivery}");
    let (headers, body) = seen.lock().unwrap()[0].clone();
    assert_eq!(
        standard_webhooks_verdict(WEBHOOK_SECRET, &headers, &body),
        json!({"verified": "job_cancelled", "tampered": "refused"})
    );

    // A registered endpoint: its own secret, shown once at registration, signs its deliveries.
    let (hook, seen) = receiver(0).await;
    let (code, endpoint) = call(
        reqwest::Method::POST,
        &format!("{base}/api/webhook-endpoints"),
        Some(json!({"name": "orders", "url": format!("http://{hook}/orders")})),
    )
    .await;
    assert_eq!(code, 200, "{endpoint}");
    let secret = endpoint["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("whsec_") && secret != WEBHOOK_SECRET, "{endpoint}");
    let (_, listed) = call(reqwest::Method::GET, &format!("{base}/api/webhook-endpoints"), None).await;
    assert_eq!(listed[0]["name"], json!("orders"), "{listed}");
    assert!(!listed.to_string().contains("whsec_"), "the list shows no secret: {listed}");
    let job_id = job_ending_with_webhook(&base, "to an endpoint", "endpoint:orders").await;
    let delivery = first_attempt(&base, &job_id).await;
    assert_eq!(delivery["status"], json!("delivered"), "{delivery}");
    assert!(!delivery.to_string().contains("whsec_"), "{delivery}");
    let (headers, body) = seen.lock().unwrap()[0].clone();
    assert_eq!(
        standard_webhooks_verdict(&secret, &headers, &body),
        json!({"verified": "job_cancelled", "tampered": "refused"})
    );
    assert!(
        standard_webhooks_verdict(WEBHOOK_SECRET, &headers, &body).get("error").is_some(),
        "the server's secret does not verify an endpoint's delivery"
    );
    // An unknown endpoint is refused at submission.
    let (code, refused) = call(
        reqwest::Method::POST,
        &format!("{base}/api/jobs/submit/hello_world?webhook_url=endpoint%3Anope"),
        Some(json!({"message": "nope", "n": 1})),
    )
    .await;
    assert_eq!((code, refused["error"]["sqlstate"].clone()), (404, json!("42704")), "{refused}");
    let (code, dropped) = call(reqwest::Method::DELETE, &format!("{base}/api/webhook-endpoints/orders"), None).await;
    assert_eq!((code, dropped["dropped"].clone()), (200, json!(true)), "{dropped}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_stay_out_of_urls_and_a_browser_session_is_an_httponly_cookie() {
    let (base, _) = serve("http_sessions").await;
    // A token in the query string is not accepted (it would sit in logs and histories).
    for path in
        ["/api/jobs?access_token=test-token", "/api/events?access_token=test-token", "/api/jobs?token=test-token"]
    {
        let response = client().get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(response.status().as_u16(), 401, "{path}");
    }
    // Signing in: the token in the header, back as an HttpOnly, SameSite=Strict cookie.
    let refused = client().post(format!("{base}/api/session")).bearer_auth("nope").send().await.unwrap();
    assert_eq!(refused.status().as_u16(), 403);
    assert!(refused.headers().get("set-cookie").is_none());
    let signed_in = client().post(format!("{base}/api/session")).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(signed_in.status().as_u16(), 204);
    let cookie = signed_in.headers()["set-cookie"].to_str().unwrap().to_owned();
    for part in ["stageflow_session=test-token", "HttpOnly", "SameSite=Strict", "Path=/api", "Max-Age=43200"] {
        assert!(cookie.contains(part), "{cookie}");
    }
    assert!(!cookie.contains("Secure"), "plain http by default: {cookie}");
    // Behind an HTTPS proxy the operator marks it Secure (stageflow serve --cookie-secure).
    let (behind_proxy, _) = serve_configured("http_sessions_secure", |config| config.cookie_secure = true).await;
    let secure = client().post(format!("{behind_proxy}/api/session")).bearer_auth(TOKEN).send().await.unwrap();
    let secure_cookie = secure.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(secure_cookie.ends_with("; Secure") && secure_cookie.contains("HttpOnly"), "{secure_cookie}");
    let session = "stageflow_session=test-token";
    // The cookie reads (GET, the event stream), and changes only with x-stageflow-request.
    let listed = client().get(format!("{base}/api/jobs")).header("cookie", session).send().await.unwrap();
    assert_eq!(listed.status().as_u16(), 200);
    let stream = client().get(format!("{base}/api/events")).header("cookie", session).send().await.unwrap();
    assert_eq!(stream.status().as_u16(), 200);
    assert_eq!(stream.headers()["content-type"], "text/event-stream");
    drop(stream);
    let submit = format!("{base}/api/jobs/submit/hello_world");
    let forged = client()
        .post(&submit)
        .header("cookie", session)
        .json(&json!({"message": "csrf", "n": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status().as_u16(), 401, "a cookie alone does not change anything");
    let asked = client()
        .post(&submit)
        .header("cookie", session)
        .header("x-stageflow-request", "dashboard")
        .json(&json!({"message": "csrf", "n": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(asked.status().as_u16(), 200);
    let wrong_cookie =
        client().get(format!("{base}/api/jobs")).header("cookie", "stageflow_session=nope").send().await.unwrap();
    assert_eq!(wrong_cookie.status().as_u16(), 403);
    // Signing out clears it.
    let signed_out = client().delete(format!("{base}/api/session")).send().await.unwrap();
    assert_eq!(signed_out.status().as_u16(), 204);
    assert!(signed_out.headers()["set-cookie"].to_str().unwrap().contains("Max-Age=0"));

    // Every response carries the security headers; the page's script is a file of the server's.
    for path in ["/", "/api/jobs", "/healthz", "/dashboard.js"] {
        let response = client().get(format!("{base}{path}")).bearer_auth(TOKEN).send().await.unwrap();
        let headers = response.headers();
        let csp = headers["content-security-policy"].to_str().unwrap();
        let script_src = csp.split(';').find(|d| d.trim().starts_with("script-src")).unwrap();
        assert_eq!(script_src.trim(), "script-src 'self'", "{path}: {csp}");
        assert!(csp.contains("frame-ancestors 'none'"), "{path}: {csp}");
        assert_eq!(headers["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(headers["x-frame-options"], "DENY", "{path}");
    }
    let page = client().get(format!("{base}/")).send().await.unwrap().text().await.unwrap();
    assert!(page.contains(r#"<script src="/dashboard.js"></script>"#));
    assert_eq!(page.matches("<script").count(), 1, "no inline script in the page");
}

/// A read-only token: every GET route (every job the server's login sees) and /metrics; refused
/// on anything that changes something. A tenant's token does not read /metrics (every tenant's
/// counts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_token_reads_everything_and_changes_nothing() {
    let (base, _) = serve_configured("http_read_tokens", |config| {
        config.tenant_tokens = vec![("acme".into(), "token-acme".into())];
        config.read_tokens = vec!["token-monitor".into()];
    })
    .await;
    let (code, submitted) = call_as(
        "token-acme",
        reqwest::Method::POST,
        &format!("{base}/api/jobs/submit/hello_world"),
        Some(json!({"message": "read", "n": 1})),
    )
    .await;
    assert_eq!(code, 200, "{submitted}");
    let job_id = submitted["job_id"].as_str().unwrap().to_owned();
    let reader = "token-monitor";
    for path in [
        format!("/api/jobs/status/{job_id}"),
        format!("/api/db/tasks/{job_id}"),
        "/api/jobs".to_owned(),
        "/api/job-types".to_owned(),
        "/api/dead-letters".to_owned(),
        "/api/queues/grants".to_owned(),
    ] {
        let (code, body) = call_as(reader, reqwest::Method::GET, &format!("{base}{path}"), None).await;
        assert_eq!(code, 200, "{path}: {body}");
    }
    let metrics = client().get(format!("{base}/metrics")).bearer_auth(reader).send().await.unwrap();
    assert_eq!(metrics.status().as_u16(), 200);
    assert!(metrics.text().await.unwrap().contains("stageflow_jobs{status=\"queued\"} 1"));
    for (method, path) in [
        (reqwest::Method::POST, "/api/jobs/submit/hello_world".to_owned()),
        (reqwest::Method::POST, format!("/api/jobs/{job_id}/cancel")),
        (reqwest::Method::POST, format!("/api/jobs/{job_id}/retry")),
    ] {
        let (code, body) = call_as(reader, method, &format!("{base}{path}"), Some(json!({"message": "x"}))).await;
        assert_eq!(code, 403, "{path}: {body}");
        assert_eq!(body["error"]["message"], json!("a read-only token changes nothing"), "{body}");
    }
    let (_, status) = call_as(reader, reqwest::Method::GET, &format!("{base}/api/jobs/status/{job_id}"), None).await;
    assert_eq!(status["status"], json!("queued"), "the job is as it was: {status}");
    let tenant_metrics = client().get(format!("{base}/metrics")).bearer_auth("token-acme").send().await.unwrap();
    assert_eq!(tenant_metrics.status().as_u16(), 403);
}
