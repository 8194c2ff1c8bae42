//! The client against a real cluster: real refusals sorted into the right variants with their
//! message, hint and SQLSTATE; every call's typed rows and reports; calls inside a caller's
//! transaction that is rolled back.

// Test code: a panic (unwrap, expect) is how a test reports a failure.
#![allow(clippy::unwrap_used)]

use serde_json::{json, Value};
use stageflow_client::{Completion, Error, ListJobs, SubmitOutcome};

const TWO_STAGES: &str = r#"{
    "description": "client test: n tasks, then one per task",
    "parameters": {"type": "object", "properties": {"n": {"type": "integer"}, "run": {"type": "string"}}},
    "retry": {"max_attempts": 2, "backoff_base_seconds": 1},
    "stages": [{"name": "first", "handler": "test.first", "queue": "client_q", "fan_out": "count", "param": "n"},
               {"name": "second", "handler": "test.second", "queue": "client_q", "fan_out": "lineage"}]
}"#;

/// A fresh database with the two-stage job type `two` registered; its URL.
async fn database(name: &str) -> String {
    let name = name.to_owned();
    // The helpers use the blocking client, which must not run on the async runtime.
    tokio::task::spawn_blocking(move || stageflow_tests::fresh_database(&name)).await.unwrap()
}

async fn client(url: &str) -> stageflow_client::Client {
    let client = stageflow_client::connect(url).await.unwrap();
    let definition: Value = serde_json::from_str(TWO_STAGES).unwrap();
    let registered = client.api().register_job_type("two", &definition).await.unwrap();
    assert_eq!(registered.name, "two");
    assert_eq!(registered.definition["stages"][1]["fan_out"], json!("lineage"));
    client
}

fn refusal_of(error: &Error) -> (&str, &str, Option<&str>) {
    (error.sqlstate().unwrap(), error.message().unwrap(), error.hint())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_keep_their_sqlstate_message_and_hint() {
    let url = database("client_errors").await;
    let client = client(&url).await;
    let api = client.api();

    let unknown = api.submit_job("nope", &json!({}), None).await.unwrap_err();
    assert!(matches!(unknown, Error::UnknownObject(_)), "{unknown:?}");
    let (code, message, hint) = refusal_of(&unknown);
    assert_eq!(code, "42704");
    assert!(message.contains("nope"), "{message}");
    assert!(hint.is_some(), "the engine gives a hint: {unknown:?}");
    assert!(!unknown.is_retryable() && !unknown.is_connection());
    assert_eq!(unknown.to_string(), format!("{message} (SQLSTATE 42704)"));

    let invalid = api.submit_job("two", &json!([1]), None).await.unwrap_err();
    assert!(matches!(invalid, Error::InvalidValue(_)), "{invalid:?}");
    let bad_name = api.claim_tasks("Bad Queue", 1, 60, Some("w")).await.unwrap_err();
    assert!(matches!(bad_name, Error::InvalidName(_)), "{bad_name:?}");
    let zero = api.claim_tasks("client_q", 0, 60, Some("w")).await.unwrap_err();
    assert!(matches!(zero, Error::InvalidValue(_)), "{zero:?}");

    // A queued task cannot be completed or failed: 55000.
    let job_id = api.submit_job("two", &json!({"n": 1}), None).await.unwrap();
    let task_id = api.job_tasks(&job_id).await.unwrap().remove(0).task_id;
    let not_running = api.complete_task_and_check_stage(&task_id, Some(&json!({})), None, None).await.unwrap_err();
    assert!(matches!(not_running, Error::WrongState(_)), "{not_running:?}");
    let not_running = api.fail_task(&task_id, &json!({"message": "x"}), true, None, None).await.unwrap_err();
    assert!(matches!(not_running, Error::WrongState(_)), "{not_running:?}");

    // A quota: 54000.
    api.set_quota("postgres", None, Some(2)).await.unwrap();
    let over = api.submit_job("two", &json!({"n": 3}), None).await.unwrap_err();
    assert!(matches!(over, Error::LimitExceeded(_)), "{over:?}");
    assert!(over.hint().is_some());
    api.set_quota("postgres", None, None).await.unwrap();

    // Another tenant's identical work: 23505 from submit_job, owned_by_another from the outcome form.
    api.set_tenant("client_a", false).await.unwrap();
    let mine = api.submit_job_outcome("two", &json!({"n": 1, "run": "t"}), None).await.unwrap();
    assert_eq!(mine.outcome, SubmitOutcome::Created);
    api.set_tenant("client_b", false).await.unwrap();
    let taken = api.submit_job("two", &json!({"n": 1, "run": "t"}), None).await.unwrap_err();
    assert!(matches!(taken, Error::Taken(_)), "{taken:?}");
    let other = api.submit_job_outcome("two", &json!({"n": 1, "run": "t"}), None).await.unwrap();
    assert_eq!((other.job_id.as_str(), other.outcome), (mine.job_id.as_str(), SubmitOutcome::OwnedByAnother));
    let hidden = api.job_status(&mine.job_id).await.unwrap_err();
    assert!(matches!(hidden, Error::UnknownObject(_)), "another tenant's job reads as unknown: {hidden:?}");
    let bad_label = api.set_tenant("a b", false).await;
    let bad_label = match bad_label {
        Err(e) => e,
        // The label may be checked on first use rather than when set.
        Ok(()) => api.list_jobs(ListJobs::default()).await.unwrap_err(),
    };
    assert!(matches!(bad_label, Error::InvalidValue(_)), "{bad_label:?}");
    api.set_tenant("", false).await.unwrap();

    // A login without a stageflow role: 42501.
    client
        .raw()
        .batch_execute("DROP ROLE IF EXISTS sf_client_nobody; CREATE ROLE sf_client_nobody; SET ROLE sf_client_nobody")
        .await
        .unwrap();
    let forbidden = api.job_types().await.unwrap_err();
    assert!(matches!(forbidden, Error::Forbidden(_)), "{forbidden:?}");
    client.raw().batch_execute("RESET ROLE; DROP ROLE sf_client_nobody").await.unwrap();

    // A lost connection is a connection error.
    let gone = stageflow_client::connect(&url).await.unwrap();
    let pid: i32 = gone.raw().query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    client.raw().execute("SELECT pg_terminate_backend($1)", &[&pid]).await.unwrap();
    let lost = gone.api().list_jobs(ListJobs::default()).await.unwrap_err();
    assert!(lost.is_connection(), "{lost:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_answers_in_typed_rows() {
    let url = database("client_rows").await;
    let client = client(&url).await;
    let api = client.api();

    let submission = api.submit_job_outcome("two", &json!({"n": 3, "run": "rows"}), None).await.unwrap();
    assert_eq!(submission.outcome, SubmitOutcome::Created);
    assert_eq!(submission.job_status.as_deref(), Some("queued"));
    let again = api.submit_job_outcome("two", &json!({"n": 3, "run": "rows"}), None).await.unwrap();
    assert_eq!((again.job_id.as_str(), again.outcome), (submission.job_id.as_str(), SubmitOutcome::Exists));
    let job_id = submission.job_id;

    let status = api.job_status(&job_id).await.unwrap();
    assert_eq!((status.job_type.as_str(), status.current_stage, status.total_stages), ("two", 1, 2));
    assert_eq!(status.stages.len(), 2);
    assert_eq!(status.stages[0].task_count, Some(3));
    assert_eq!(status.stages[0].tasks.unwrap().queued, 3);
    assert_eq!(status.stages[1].status, "pending");
    assert_eq!(status.params()["run"], json!("rows"));
    assert_eq!(status.document["job_id"], json!(job_id), "the document is kept as returned");
    assert!(!status.is_finished());

    let claimed = api.claim_tasks("client_q", 10, 60, Some("w1")).await.unwrap();
    assert_eq!(claimed.len(), 3);
    let first = &claimed[0];
    assert_eq!((first.job_id.as_str(), first.stage, first.handler.as_str()), (job_id.as_str(), 1, "test.first"));
    assert_eq!((first.attempt, first.effective_lease_seconds), (1, 60));
    assert!(first.lease_token >= 1);
    assert!(first.lease_expires_at > chrono::Utc::now());
    assert!(first.params.get("index").is_some());

    let ids: Vec<String> = claimed.iter().map(|t| t.task_id.clone()).collect();
    let tokens: Vec<i64> = claimed.iter().map(|t| t.lease_token).collect();
    let extended = api.heartbeat(&ids, 120, Some("w1"), Some(&tokens)).await.unwrap();
    assert_eq!(extended.len(), 3);
    let stale: Vec<i64> = tokens.iter().map(|t| t + 100).collect();
    assert!(api.heartbeat(&ids, 120, Some("w1"), Some(&stale)).await.unwrap().is_empty(), "not their leases");

    // One completion on its own, then a batch in which one report is from a lost lease.
    let report = api
        .complete_task_and_check_stage(&first.task_id, Some(&json!({"i": 0})), Some("w1"), Some(first.lease_token))
        .await
        .unwrap();
    assert_eq!((report.task_status.as_str(), report.stage_completed, report.next_stage), ("completed", false, None));
    let (one, two) = (json!({"i": 1}), json!({"i": 2}));
    let batch = api
        .complete_tasks(
            &[
                Completion { task_id: &claimed[1].task_id, result: &one, lease_token: Some(claimed[1].lease_token) },
                Completion {
                    task_id: &claimed[2].task_id,
                    result: &two,
                    lease_token: Some(claimed[2].lease_token + 7),
                },
            ],
            Some("w1"),
        )
        .await
        .unwrap();
    assert_eq!(batch.len(), 2);
    assert_eq!(batch[0].task_id, claimed[1].task_id);
    assert!(batch[0].outcome.as_ref().unwrap().task_status == "completed");
    let lost = batch[1].outcome.as_ref().unwrap_err();
    assert!(matches!(lost, Error::WrongState(_)), "{lost:?}");
    assert!(lost.message().unwrap().contains("lease"), "{lost:?}");
    // The same batch without reports: the repeat is accepted again, the lost lease refused.
    let quiet = api
        .complete_tasks_unreported(
            &[
                Completion { task_id: &claimed[1].task_id, result: &one, lease_token: Some(claimed[1].lease_token) },
                Completion {
                    task_id: &claimed[2].task_id,
                    result: &two,
                    lease_token: Some(claimed[2].lease_token + 7),
                },
            ],
            Some("w1"),
        )
        .await
        .unwrap();
    assert_eq!(
        quiet.iter().map(|o| o.task_id.as_str()).collect::<Vec<_>>(),
        [&claimed[1].task_id, &claimed[2].task_id]
    );
    assert!(quiet[0].outcome.is_ok(), "{quiet:?}");
    assert!(matches!(quiet[1].outcome, Err(Error::WrongState(_))), "{quiet:?}");
    // One task without its report: the repeat accepted again, the lost lease refused, as above.
    api.complete_task_unreported(&claimed[1].task_id, Some(&one), Some("w1"), Some(claimed[1].lease_token))
        .await
        .unwrap();
    let single = api
        .complete_task_unreported(&claimed[2].task_id, Some(&two), Some("w1"), Some(claimed[2].lease_token + 7))
        .await
        .unwrap_err();
    assert!(matches!(single, Error::WrongState(_)) && single.message().unwrap().contains("lease"), "{single:?}");
    let last = api
        .complete_task_and_check_stage(&claimed[2].task_id, Some(&two), Some("w1"), Some(claimed[2].lease_token))
        .await
        .unwrap();
    assert!(last.stage_completed);
    assert_eq!((last.next_stage, last.current_stage, last.job_status.as_str()), (Some(2), 2, "processing"));

    // Stage 2: one released, one failed for good, one failed to retry.
    let second = api.claim_tasks("client_q", 10, 60, Some("w2")).await.unwrap();
    assert_eq!(second.len(), 3);
    assert!(second.iter().all(|t| t.predecessor.is_some() && t.stage_name == "second"));
    let released =
        api.release_tasks(&[second[0].task_id.clone()], Some("w2"), Some(&[second[0].lease_token])).await.unwrap();
    assert_eq!(released, 1);
    let retried = api
        .fail_task(&second[1].task_id, &json!({"message": "again"}), true, Some("w2"), Some(second[1].lease_token))
        .await
        .unwrap();
    assert_eq!((retried.task_status.as_str(), retried.attempt, retried.max_attempts), ("queued", 1, 2));
    assert!(retried.retry_in_seconds.unwrap() > 0.0);
    let failed = api
        .fail_task(&second[2].task_id, &json!({"message": "never"}), false, Some("w2"), Some(second[2].lease_token))
        .await
        .unwrap();
    assert_eq!((failed.task_status.as_str(), failed.category.as_deref()), ("failed", Some("permanent")));
    assert_eq!(failed.job_status, "failed", "a stage that tolerates no failure fails its job");

    let tasks = api.job_tasks(&job_id).await.unwrap();
    assert_eq!(tasks.len(), 6);
    assert_eq!(tasks.iter().filter(|t| t.status == "completed").count(), 3);
    assert!(tasks.iter().all(|t| t.created_at.is_some()));
    let tasks_json = api.job_tasks_json(&job_id).await.unwrap();
    assert_eq!(tasks_json.as_array().unwrap().len(), 6);

    let dead = api.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!((dead[0].task_id.as_str(), dead[0].status.as_str()), (second[2].task_id.as_str(), "failed"));
    assert_eq!(dead[0].error.as_ref().unwrap()["message"], json!("never"));
    assert_eq!(api.dead_letters_json(10).await.unwrap().as_array().unwrap().len(), 1);

    let retry = api.retry_job(&job_id).await.unwrap();
    assert_eq!(retry.job_status.as_deref(), Some("processing"));
    assert!(retry.retried_tasks >= 1);
    let cancel = api.cancel_job(&job_id).await.unwrap();
    assert!(cancel.cancelled);
    assert_eq!(cancel.job_status.as_deref(), Some("cancelled"));
    let status = api.job_status(&job_id).await.unwrap();
    assert!(status.is_finished());
    let advance = api.advance_stage(&job_id).await.unwrap();
    assert_eq!(advance.job_status, "cancelled");

    let listed = api.list_jobs(ListJobs { job_type: Some("two"), ..ListJobs::default() }).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].job_id.as_str(), listed[0].status.as_str()), (job_id.as_str(), "cancelled"));
    assert_eq!(listed[0].owner, "postgres");
    let listed_json = api.list_jobs_json(ListJobs { job_type: Some("two"), ..ListJobs::default() }).await.unwrap();
    assert_eq!(listed_json[0]["job_id"], json!(job_id));
    let before = api.list_jobs(ListJobs { before: Some("not a time"), ..ListJobs::default() }).await.unwrap_err();
    assert_eq!(before.sqlstate(), Some("22007"));

    let types = api.job_types().await.unwrap();
    let two = types.iter().find(|t| t.name == "two").unwrap();
    assert_eq!(two.stages, Some(json!(["first", "second"])));
    assert!(api.job_types_json().await.unwrap().as_array().unwrap().len() >= 2);

    let granted = api.grant_queue("client_q", "stageflow_worker").await.unwrap();
    assert!(granted.changed);
    let grants = api.list_queue_grants().await.unwrap();
    assert_eq!((grants[0].queue.as_str(), grants[0].role_name.as_str()), ("client_q", "stageflow_worker"));
    assert_eq!(api.list_queue_grants_json().await.unwrap()[0]["queue"], json!("client_q"));
    assert!(api.revoke_queue("client_q", "stageflow_worker").await.unwrap().changed);

    let quota = api.set_quota("postgres", Some(500), None).await.unwrap();
    assert_eq!((quota.role.as_str(), quota.max_open_tasks), ("postgres", 500));
    let quotas = api.list_quotas().await.unwrap();
    assert!(quotas.iter().any(|q| q.role_name == "postgres" && q.custom && q.max_open_tasks == 500));

    let maintenance = api.run_maintenance(100).await.unwrap();
    assert_eq!(maintenance.error, None);

    // Webhooks: a job with a URL gets a delivery when it ends.
    let hooked =
        api.submit_job_outcome("two", &json!({"n": 0, "run": "hook"}), Some("http://127.0.0.1:9/hook")).await.unwrap();
    let deliveries = api.webhook_deliveries(&hooked.job_id).await.unwrap();
    assert_eq!(deliveries.len(), 1, "an empty first stage ends the job at once");
    let claimed = api.claim_webhook_deliveries(10, 30).await.unwrap();
    assert_eq!((claimed.len(), claimed[0].attempts), (1, 1));
    assert_eq!(claimed[0].url, "http://127.0.0.1:9/hook");
    let record = api
        .record_webhook_attempt(claimed[0].delivery_id, false, Some(500), Some("HTTP 500"), Some(1.5))
        .await
        .unwrap();
    assert_eq!((record.status.as_str(), record.attempts), ("pending", 1));
    assert_eq!(api.webhook_deliveries_json(&hooked.job_id).await.unwrap()[0]["status"], json!("pending"));
}

/// Claims every task of `client_q` and completes each with `{"key": <task_key>}`.
async fn work_through(api: &stageflow_client::Api<'_, tokio_postgres::Client>) {
    loop {
        let claimed = api.claim_tasks("client_q", 100, 60, Some("w")).await.unwrap();
        if claimed.is_empty() {
            return;
        }
        let results: Vec<Value> = claimed.iter().map(|t| json!({"key": t.task_key})).collect();
        let completions: Vec<Completion> = claimed
            .iter()
            .zip(&results)
            .map(|(t, result)| Completion { task_id: &t.task_id, result, lease_token: Some(t.lease_token) })
            .collect();
        api.complete_tasks(&completions, Some("w")).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jobs_result_reads_in_typed_pages() {
    let url = database("client_result").await;
    let client = client(&url).await;
    let api = client.api();
    let job_id = api.submit_job("two", &json!({"n": 5}), None).await.unwrap();

    // Not completed: no result yet (55000), and the status counts none.
    let early = api.job_result(&job_id, None, 10).await.unwrap_err();
    assert!(matches!(early, Error::WrongState(_)), "{early:?}");
    let (code, message, hint) = refusal_of(&early);
    assert_eq!(code, "55000");
    assert!(message.contains("has no result: it is queued"), "{message}");
    assert!(hint.is_some_and(|h| h.contains("job_status")), "{early:?}");
    assert_eq!(api.job_status(&job_id).await.unwrap().result_count, None);

    work_through(&api).await;
    let status = api.job_status(&job_id).await.unwrap();
    assert_eq!((status.status.as_str(), status.result_count), ("completed", Some(5)));
    assert!(status.document.get("result").is_none(), "the status carries no result: {}", status.document);

    // Pages of 2 over the 5 entries of the lineage stage, in task order.
    let first = api.job_result(&job_id, None, 2).await.unwrap();
    assert_eq!(
        (first.job_id.as_str(), first.status.as_str(), first.fan_out.as_str()),
        (job_id.as_str(), "completed", "lineage")
    );
    assert!(!first.is_one_task() && first.one_result().is_none());
    let ordinals = |page: &stageflow_client::JobResultPage| page.entries.iter().map(|e| e.ordinal).collect::<Vec<_>>();
    assert_eq!((ordinals(&first), first.next_after), (vec![0, 1], Some(1)));
    assert_eq!(first.entries[1].task_key, "1");
    assert!(first.entries[1].task_id.ends_with("-s2-1"), "{:?}", first.entries[1]);
    assert_eq!(first.entries[1].result, json!({"key": "1"}));
    let second = api.job_result(&job_id, first.next_after, 2).await.unwrap();
    assert_eq!((ordinals(&second), second.next_after), (vec![2, 3], Some(3)));
    let last = api.job_result(&job_id, second.next_after, 2).await.unwrap();
    assert_eq!((ordinals(&last), last.next_after), (vec![4], None));
    let all = api.job_result_all(&job_id).await.unwrap();
    assert_eq!((ordinals(&all), all.next_after), (vec![0, 1, 2, 3, 4], None));
    assert_eq!(all.entries[..2], first.entries[..]);
    let json_page = api.job_result_json(&job_id, Some(3), 2).await.unwrap();
    assert_eq!(json_page["entries"][0]["result"], json!({"key": "4"}));
    assert_eq!(json_page["next_after"], Value::Null);

    // Bad limits: 22023 with a hint; another tenant's job and an unknown one: 42704.
    for limit in [0, -3, stageflow_client::MAX_RESULT_PAGE + 1] {
        let bad = api.job_result(&job_id, None, limit).await.unwrap_err();
        assert!(matches!(bad, Error::InvalidValue(_)), "limit {limit}: {bad:?}");
        let (_, message, hint) = refusal_of(&bad);
        assert!(message.contains(&format!("limit must be between 1 and 10000, got {limit}")), "{message}");
        assert!(hint.is_some_and(|h| h.contains("next_after")), "{bad:?}");
    }
    assert_eq!(api.job_result(&job_id, None, stageflow_client::MAX_RESULT_PAGE).await.unwrap().entries.len(), 5);
    api.set_tenant("client_other", false).await.unwrap();
    let hidden = api.job_result(&job_id, None, 10).await.unwrap_err();
    assert!(matches!(hidden, Error::UnknownObject(_)), "another tenant's job reads as unknown: {hidden:?}");
    api.set_tenant("", false).await.unwrap();
    let unknown = api.job_result(&"0".repeat(64), None, 10).await.unwrap_err();
    assert!(matches!(unknown, Error::UnknownObject(_)), "{unknown:?}");

    // A single last stage: one entry, whose result is the job's.
    let single = json!({"stages": [{"name": "only", "handler": "test.only", "queue": "client_q"}]});
    api.register_job_type("one", &single).await.unwrap();
    let one = api.submit_job("one", &json!({}), None).await.unwrap();
    work_through(&api).await;
    let page = api.job_result(&one, None, 10).await.unwrap();
    assert!(page.is_one_task(), "{page:?}");
    assert_eq!((page.one_result(), page.next_after), (Some(&json!({"key": "0"})), None));
    assert_eq!(api.job_status(&one).await.unwrap().result_count, Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_run_inside_a_callers_transaction() {
    let url = database("client_transaction").await;
    let mut client = client(&url).await;

    // Submitted, seen and claimed inside a transaction that is rolled back: nothing remains.
    let transaction = client.transaction().await.unwrap();
    let job_id = transaction.api().submit_job("two", &json!({"n": 2}), None).await.unwrap();
    assert_eq!(transaction.api().job_status(&job_id).await.unwrap().stages[0].task_count, Some(2));
    assert_eq!(transaction.api().claim_tasks("client_q", 5, 60, Some("w")).await.unwrap().len(), 2);
    transaction.rollback().await.unwrap();
    let gone = client.api().job_status(&job_id).await.unwrap_err();
    assert!(matches!(gone, Error::UnknownObject(_)), "{gone:?}");
    assert!(client.api().claim_tasks("client_q", 5, 60, Some("w")).await.unwrap().is_empty());

    // A refusal inside the transaction leaves the caller to roll back; the connection goes on.
    let transaction = client.transaction().await.unwrap();
    assert!(transaction.api().submit_job("nope", &json!({}), None).await.is_err());
    transaction.rollback().await.unwrap();

    // Committed, it stays; a tenant label set for the transaction ends with it.
    let transaction = client.transaction().await.unwrap();
    transaction.api().set_tenant("client_t", true).await.unwrap();
    let job_id = transaction.api().submit_job("two", &json!({"n": 1}), None).await.unwrap();
    transaction.commit().await.unwrap();
    let status = client.api().job_status(&job_id).await.unwrap();
    assert_eq!(status.tenant.as_deref(), Some("client_t"));

    // On a plain tokio-postgres transaction, without a statement cache.
    let (mut raw, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let transaction = raw.transaction().await.unwrap();
    let api = stageflow_client::Api::new(&transaction);
    let job_id = api.submit_job("two", &json!({"n": 4}), None).await.unwrap();
    assert_eq!(api.job_tasks(&job_id).await.unwrap().len(), 4);
    transaction.rollback().await.unwrap();
    assert!(client.api().job_status(&job_id).await.is_err());

    // The calls' futures are Send: they run on spawned tasks.
    let client = std::sync::Arc::new(client);
    let spawned = tokio::spawn({
        let client = client.clone();
        async move { client.api().list_jobs(ListJobs::default()).await.map(|jobs| jobs.len()) }
    });
    assert_eq!(spawned.await.unwrap().unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_samples_with_labels_by_name() {
    let url = database("client_metrics").await;
    let client = client(&url).await;
    let api = client.api();
    let job_id = api.submit_job("two", &json!({"n": 3, "run": "metrics"}), None).await.unwrap();
    let claimed = api.claim_tasks("client_q", 2, 60, Some("w")).await.unwrap();
    let (done, failed) = (&claimed[0], &claimed[1]);
    api.complete_task_and_check_stage(&done.task_id, None, Some("w"), Some(done.lease_token)).await.unwrap();
    api.fail_task(&failed.task_id, &json!({"message": "no"}), false, Some("w"), Some(failed.lease_token))
        .await
        .unwrap();

    let samples = api.metrics().await.unwrap();
    let value = |name: &str, labels: &[(&str, &str)]| {
        let labels: Vec<(String, String)> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let found = samples.iter().find(|s| s.name == name && s.labels == labels);
        found.unwrap_or_else(|| panic!("no {name} {labels:?} in {samples:?}")).value
    };
    // The job failed (a permanent failure beyond the stage's threshold): its third task was cancelled.
    assert_eq!(value("stageflow_jobs", &[("status", "failed")]), 1.0, "{job_id}");
    assert_eq!(value("stageflow_tasks", &[("status", "completed")]), 1.0);
    assert_eq!(value("stageflow_tasks", &[("status", "failed")]), 1.0);
    assert_eq!(value("stageflow_tasks", &[("status", "cancelled")]), 1.0);
    assert_eq!(value("stageflow_dead_letters", &[]), 1.0);
    assert_eq!(value("stageflow_handler_tasks_total", &[("handler", "test.first"), ("outcome", "completed")]), 1.0);
    assert_eq!(value("stageflow_handler_tasks_total", &[("handler", "test.first"), ("outcome", "failed")]), 1.0);
    assert_eq!(value("stageflow_task_duration_seconds_count", &[("handler", "test.first")]), 1.0);
    assert!(value("stageflow_task_duration_seconds_sum", &[("handler", "test.first")]) >= 0.0);
    assert_eq!(value("stageflow_queue_depth", &[("queue", "client_q")]), 0.0);
}
