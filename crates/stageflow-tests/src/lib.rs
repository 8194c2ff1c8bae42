//! Support for Stageflow's tests against a real PostgreSQL cluster.
//!
//! `scripts/test.sh` starts a private cluster and sets `STAGEFLOW_TEST_DATABASE_URL`. Every test
//! gets a database of its own, copied from a template in which `CREATE EXTENSION stageflow CASCADE`
//! ran once, so tests run in parallel without sharing queues.

// Test code: a panic (unwrap, expect) is how a test reports a failure.
#![allow(clippy::unwrap_used)]

use std::sync::Mutex;

use postgres::{Client, NoTls};
use serde_json::Value;

const TEMPLATE: &str = "stageflow_template";
static CREATE_LOCK: Mutex<bool> = Mutex::new(false);

/// The URL of the test cluster's `postgres` database.
pub fn cluster_url() -> String {
    std::env::var("STAGEFLOW_TEST_DATABASE_URL")
        .expect("STAGEFLOW_TEST_DATABASE_URL is not set: run the tests with scripts/test.sh, which starts a cluster")
}

/// `url` with its database name replaced by `database`.
pub fn url_for(url: &str, database: &str) -> String {
    let base = url.rsplit_once('/').map(|(base, _)| base).unwrap_or(url);
    format!("{base}/{database}")
}

/// The password the tests give the login roles they create (a test cluster asks every login for
/// one: scram-sha-256).
pub const ROLE_PASSWORD: &str = "stageflow-test-role";

/// `url` logging in as `role` (with [`ROLE_PASSWORD`]) instead of its own user.
pub fn url_as(url: &str, role: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("postgres", url));
    let host = rest.split_once('@').map_or(rest, |(_, host)| host);
    format!("{scheme}://{role}:{ROLE_PASSWORD}@{host}")
}

pub fn connect(url: &str) -> Client {
    Client::connect(url, NoTls).unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"))
}

/// A new database with the extension installed, named after the test; returns its URL.
pub fn fresh_database(name: &str) -> String {
    let admin_url = cluster_url();
    let mut template_ready = CREATE_LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut admin = connect(&admin_url);
    if !*template_ready {
        admin.batch_execute(&format!("DROP DATABASE IF EXISTS {TEMPLATE}")).unwrap();
        // A linguistic collation (ICU's en-US) as the database's own, as many installations have,
        // rather than the cluster's C.UTF-8: the engine's ids compare byte by byte whatever it is
        // (COLLATE "C" columns), and its queries must mix the two without a collation conflict.
        admin
            .batch_execute(&format!(
                "CREATE DATABASE {TEMPLATE} TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"
            ))
            .unwrap();
        let mut template = connect(&url_for(&admin_url, TEMPLATE));
        template.batch_execute("CREATE EXTENSION stageflow CASCADE").unwrap();
        drop(template);
        *template_ready = true;
    }
    admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).unwrap();
    admin.batch_execute(&format!("CREATE DATABASE {name} TEMPLATE {TEMPLATE}")).unwrap();
    url_for(&admin_url, name)
}

/// The WAL's current insert position, with every segment from there on kept for the rest of
/// `client`'s session (a temporary replication slot): a test that reads the WAL it made with
/// pg_walinspect must not find a segment removed by a checkpoint another test set off meanwhile
/// (seen once: 58P01, "requested WAL segment ... has already been removed").
pub fn wal_position_kept(client: &mut Client) -> String {
    client
        .batch_execute(
            "SELECT pg_create_physical_replication_slot(s.name, true, true)
               FROM (SELECT 'stageflow_test_' || pg_backend_pid() AS name) AS s
              WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots AS r WHERE r.slot_name = s.name)",
        )
        .expect("a temporary replication slot");
    client.query_one("SELECT pg_current_wal_insert_lsn()::text", &[]).expect("the WAL position").get(0)
}

/// The SQLSTATE, message and hint of a database error.
pub fn db_error(error: &postgres::Error) -> (String, String, Option<String>) {
    let db = error.as_db_error().unwrap_or_else(|| panic!("not a database error: {error}"));
    (db.code().code().to_owned(), db.message().to_owned(), db.hint().map(str::to_owned))
}

/// One JSON value from a query returning one row and one jsonb column.
pub fn json(client: &mut Client, sql: &str, params: &[&(dyn postgres::types::ToSql + Sync)]) -> Value {
    client.query_one(sql, params).unwrap_or_else(|e| panic!("{sql}: {e}")).get(0)
}

/// Registers a job type; `definition` is JSON text.
pub fn register(client: &mut Client, name: &str, definition: &str) {
    let definition: Value = serde_json::from_str(definition).expect("definition is not JSON");
    client
        .execute("SELECT stageflow.register_job_type($1, $2)", &[&name, &definition])
        .unwrap_or_else(|e| panic!("register {name}: {e}"));
}

pub fn submit(client: &mut Client, job_type: &str, params: Value) -> String {
    client
        .query_one("SELECT stageflow.submit_job($1, $2)", &[&job_type, &params])
        .unwrap_or_else(|e| panic!("submit {job_type}: {e:?}"))
        .get(0)
}

/// A claimed task, as claim_tasks returns it.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub task_id: String,
    pub job_id: String,
    pub stage: i32,
    pub task_key: String,
    pub params: Value,
    pub predecessor: Option<Value>,
    pub inputs: Option<Value>,
    pub attempt: i32,
    /// This claim's lease, for a fenced report ([`complete_fenced`]).
    pub lease_token: i64,
}

/// Claims as worker `test`.
pub fn claim(client: &mut Client, queue: &str, max_tasks: i32, lease_seconds: i32) -> Vec<Claimed> {
    client
        .query(
            "SELECT task_id, job_id, stage, task_key, params, predecessor, inputs, attempt, lease_token \
             FROM stageflow.claim_tasks($1, $2, $3, 'test')",
            &[&queue, &max_tasks, &lease_seconds],
        )
        .unwrap_or_else(|e| panic!("claim from {queue}: {e}"))
        .iter()
        .map(|row| Claimed {
            task_id: row.get(0),
            job_id: row.get(1),
            stage: row.get(2),
            task_key: row.get(3),
            params: row.get(4),
            predecessor: row.get(5),
            inputs: row.get(6),
            attempt: row.get(7),
            lease_token: row.get(8),
        })
        .collect()
}

/// Completes in the psql form: no worker id, no lease token (the caller is trusted).
pub fn complete(client: &mut Client, task_id: &str, result: Value) -> Value {
    json(client, "SELECT stageflow.complete_task_and_check_stage($1, $2)", &[&task_id, &result])
}

/// Completes as a worker does: as worker `test` (the one [`claim`] claims as), under the claim's
/// lease; refused with 55000 once that lease is no longer the task's current one.
pub fn complete_fenced(client: &mut Client, task: &Claimed, result: Value) -> Value {
    json(
        client,
        "SELECT stageflow.complete_task_and_check_stage($1, $2, 'test', $3)",
        &[&task.task_id, &result, &task.lease_token],
    )
}

pub fn job_status(client: &mut Client, job_id: &str) -> Value {
    json(client, "SELECT stageflow.job_status($1)", &[&job_id])
}

/// A page of a completed job's result (`stageflow.job_result`).
pub fn job_result_page(client: &mut Client, job_id: &str, after: Option<i32>, limit: i32) -> Value {
    json(client, "SELECT stageflow.job_result($1, $2, $3)", &[&job_id, &after, &limit])
}

/// A completed job's whole result, read page by page, in the one value a caller of
/// `stageflow.job_result` makes of it: the one entry's result for a `single` or `fan_in` last
/// stage, else the array of the entries' results in task order.
pub fn job_result(client: &mut Client, job_id: &str) -> Value {
    let mut results = Vec::new();
    let mut after = None;
    loop {
        let page = job_result_page(client, job_id, after, 10000);
        let entries = page["entries"].as_array().expect("a page has entries");
        if matches!(page["fan_out"].as_str(), Some("single" | "fan_in")) {
            return entries.first().map(|e| e["result"].clone()).unwrap_or(Value::Null);
        }
        results.extend(entries.iter().map(|e| e["result"].clone()));
        match page["next_after"].as_i64() {
            Some(next) => after = Some(i32::try_from(next).expect("an ordinal")),
            None => return Value::Array(results),
        }
    }
}

/// Claims and completes tasks of `queue` until none is left; returns how many it completed.
pub fn drain(client: &mut Client, queue: &str, batch: i32) -> usize {
    let mut done = 0;
    loop {
        let tasks = claim(client, queue, batch, 60);
        if tasks.is_empty() {
            return done;
        }
        for task in tasks {
            complete(client, &task.task_id, serde_json::json!({"key": task.task_key}));
            done += 1;
        }
    }
}

/// A digest of everything Stageflow and pgmq store in this database (rows of every table of both
/// schemas, in a fixed order): equal digests before and after a call mean it changed nothing.
pub fn state_digest(client: &mut Client) -> String {
    let tables: Vec<String> = client
        .query(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname IN ('stageflow', 'pgmq') AND c.relkind IN ('r', 'p') ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    let mut digest = String::new();
    for table in tables {
        let row = client
            .query_one(
                &format!(
                    "SELECT count(*), coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '') FROM {table} t"
                ),
                &[],
            )
            .unwrap();
        let (count, hash): (i64, String) = (row.get(0), row.get(1));
        digest.push_str(&format!("{table}:{count}:{hash}\n"));
    }
    digest
}

/// The randomized tests' seeds and duration: `STAGEFLOW_TORTURE_SEEDS`, a comma-separated list of
/// integers (default 1,2,3), and `STAGEFLOW_TORTURE_SECONDS` (default 20).
pub fn torture_seeds_and_seconds() -> (Vec<u64>, u64) {
    let seeds = match std::env::var("STAGEFLOW_TORTURE_SEEDS") {
        Ok(list) if !list.trim().is_empty() => list
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|s| {
                s.trim().parse().unwrap_or_else(|_| {
                    panic!("STAGEFLOW_TORTURE_SEEDS: {s:?} is not a seed (a comma-separated list of integers)")
                })
            })
            .collect(),
        _ => vec![1, 2, 3],
    };
    let seconds = match std::env::var("STAGEFLOW_TORTURE_SECONDS") {
        Ok(s) if !s.trim().is_empty() => s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("STAGEFLOW_TORTURE_SECONDS: {s:?} is not a whole number of seconds")),
        _ => 20,
    };
    (seeds, seconds)
}

/// A small deterministic generator (splitmix64) for the randomized tests: a seed replays the same
/// choices, one independent stream per (seed, stream), e.g. one per thread.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64, stream: u64) -> Rng {
        let mut rng =
            Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03) ^ 0x5EED);
        rng.next_u64();
        rng
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number below n.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// A number from lo to hi, both included.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability p.
    pub fn chance(&mut self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }
}
