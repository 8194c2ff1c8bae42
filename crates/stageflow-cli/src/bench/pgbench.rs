//! `pgbench` beside the benchmark's own client for the one-at-a-time and batched lines: the same statements
//! in a script file, the same number of connections, prepared (`-M prepared`, as the client
//! prepares its statements), each statement its own transaction, `-t` scripts per connection over
//! a queue or a stage that holds 10 % more than all of them (a claim that finds nothing would end
//! a pgbench client: `\gset` needs a row). So the rates of the two clients differ by what the
//! client costs, on a machine whose cores the client shares with the server.
//!
//! Unlike the client's Stageflow lines, the pgbench run stays within the job's first stage (it
//! cannot wait for a stage advance), and the job's leftover tasks are cancelled afterwards.

use std::path::Path;

use serde_json::json;

use super::jobs::{run_id, submit};
use super::wal::{Meter, PerUnit};
use crate::{connect, CliError};

const PGMQ_SCRIPT: &str = "\
SELECT msg_id FROM pgmq.read('bench_pgbench', 30, 1) \\gset
SELECT pgmq.delete('bench_pgbench', :msg_id::bigint);
";

const STAGEFLOW_SCRIPT: &str = "\
SELECT task_id, lease_token FROM stageflow.claim_tasks('pgbench', 1, 60, 'bench') \\gset
SELECT stageflow.complete_task_and_check_stage(:task_id, '{}', 'bench', :lease_token, false);
";

const PGMQ_BATCH_SCRIPT: &str = "\
SELECT array_agg(msg_id) AS msg_ids FROM pgmq.read('bench_pgbench', 30, 100) \\gset
SELECT count(*) FROM pgmq.delete('bench_pgbench', :msg_ids::bigint[]);
";

const STAGEFLOW_BATCH_SCRIPT: &str = "\
SELECT jsonb_agg(jsonb_build_object('task_id', task_id, 'lease_token', lease_token)) AS batch \
  FROM stageflow.claim_tasks('pgbench', 100, 60, 'bench') \\gset
SELECT jsonb_array_length(stageflow.complete_tasks(:batch::jsonb, 'bench', false));
";

/// How a pgbench line runs besides its statements.
#[derive(Clone, Copy)]
pub(super) struct Variant<'a> {
    pub sync: bool,
    /// `-c name=value ...` for every connection's PGOPTIONS.
    pub settings: &'a str,
    /// The queue's messages or the job's tasks made before a `VACUUM (ANALYZE)` and a
    /// `CHECKPOINT`, as a backlog is when a checkpoint comes between a submission and the claims:
    /// the line's first change of each page then logs the whole page (without it, the pages are
    /// made after the line's checkpoint and none is logged whole).
    pub backlog: bool,
}

impl Variant<'static> {
    pub fn plain(sync: bool) -> Variant<'static> {
        Variant { sync, settings: "", backlog: false }
    }
}

/// A backlog's checkpoint after the line's setup: the same settling as before every line.
async fn before_line(setup: &tokio_postgres::Client, variant: Variant<'_>) -> Result<(), CliError> {
    if variant.backlog {
        super::settle(&[setup]).await?;
    }
    Ok(())
}

/// pgmq's read + delete under pgbench, `batch` (1 or 100) messages a script: messages per second
/// and the WAL per message.
pub(super) async fn pgmq(
    url: &str,
    n: usize,
    variant: Variant<'_>,
    batch: usize,
    messages: usize,
    dir: &Path,
) -> Result<(f64, PerUnit), CliError> {
    let per_client = messages.div_ceil(n * batch);
    let setup = connect(url).await?.into_raw();
    setup.batch_execute("SELECT pgmq.create('bench_pgbench'); SELECT pgmq.purge_queue('bench_pgbench')").await?;
    let count = (per_client * n * batch * 11 / 10) as i32;
    setup
        .execute(
            "SELECT pgmq.send_batch('bench_pgbench', array_agg(jsonb_build_object('task_id', 'message-' || i))) \
               FROM generate_series(1, $1::int) AS i",
            &[&count],
        )
        .await?;
    before_line(&setup, variant).await?;
    let wal = Meter::start(url, &[&setup]).await?;
    let (script, file) = if batch == 1 { (PGMQ_SCRIPT, "pgmq_one.sql") } else { (PGMQ_BATCH_SCRIPT, "pgmq_batch.sql") };
    let rate = batch as f64 * run(url, n, variant, script, per_client, &dir.join(file)).await?;
    let per = wal.per((per_client * n * batch) as f64).await?;
    setup.batch_execute("SELECT pgmq.purge_queue('bench_pgbench')").await?;
    Ok((rate, per))
}

/// Stageflow's claim + complete under pgbench, `batch` tasks a script (1: `claim_tasks(q, 1)` and
/// `complete_task_and_check_stage` without its report; 100: `claim_tasks(q, 100)` and
/// `complete_tasks` without the accepted ones' reports; as the client's lines and the worker
/// runtime call them): tasks per second and the WAL per task.
pub(super) async fn stageflow(
    url: &str,
    n: usize,
    variant: Variant<'_>,
    batch: usize,
    tasks: usize,
    dir: &Path,
) -> Result<(f64, PerUnit), CliError> {
    let per_client = tasks.div_ceil(n * batch);
    let setup = connect(url).await?.into_raw();
    let job_id =
        submit(&setup, "bench_pgbench", json!({"n": per_client * n * batch * 11 / 10, "run": run_id()})).await?;
    before_line(&setup, variant).await?;
    let wal = Meter::start(url, &[&setup]).await?;
    let (script, file) = if batch == 1 {
        (STAGEFLOW_SCRIPT, "stageflow_one.sql")
    } else {
        (STAGEFLOW_BATCH_SCRIPT, "stageflow_batch.sql")
    };
    let rate = batch as f64 * run(url, n, variant, script, per_client, &dir.join(file)).await?;
    let per = wal.per((per_client * n * batch) as f64).await?;
    setup.execute("SELECT stageflow.cancel_job($1)", &[&job_id]).await?;
    Ok((rate, per))
}

/// Runs `script` with pgbench (`STAGEFLOW_PG_BINDIR`'s, or Debian's), `per_client` times on each
/// of `n` connections; returns its rate (scripts per second, connection time excluded), after
/// checking that every script ran.
async fn run(
    url: &str,
    n: usize,
    variant: Variant<'_>,
    script: &str,
    per_client: usize,
    file: &Path,
) -> Result<f64, CliError> {
    let setup_err = |e: std::io::Error| CliError::Setup(format!("{}: {e}", file.display()));
    std::fs::create_dir_all(file.parent().unwrap_or(Path::new("."))).map_err(setup_err)?;
    std::fs::write(file, script).map_err(setup_err)?;
    let pgbench = format!("{}/pgbench", crate::cluster::bin());
    let threads = std::thread::available_parallelism().map(|c| c.get()).unwrap_or(1).min(n);
    let output = tokio::process::Command::new(&pgbench)
        .args(["-n", "-M", "prepared", "-c", &n.to_string(), "-j", &threads.to_string()])
        .args(["-t", &per_client.to_string(), "-f"])
        .arg(file)
        .arg(url)
        .env(
            "PGOPTIONS",
            format!("-c synchronous_commit={} {}", if variant.sync { "on" } else { "off" }, variant.settings),
        )
        .output()
        .await
        .map_err(|e| CliError::Setup(format!("{pgbench}: {e}")))?;
    let text = String::from_utf8_lossy(&output.stdout);
    let failed = || CliError::Setup(format!("{pgbench} failed: {text}{}", String::from_utf8_lossy(&output.stderr)));
    if !output.status.success() {
        return Err(failed());
    }
    let expected = format!("number of transactions actually processed: {0}/{0}", per_client * n);
    if !text.lines().any(|l| l.trim() == expected) {
        return Err(failed());
    }
    text.lines()
        .find_map(|l| l.strip_prefix("tps = ")?.split_whitespace().next()?.parse::<f64>().ok())
        .ok_or_else(failed)
}

/// pgmq and Stageflow under pgbench in alternating rounds (pgmq first in odd rounds, Stageflow
/// first in even ones), `units` messages and tasks a half, every half after the same settling:
/// the ratio of each round's two rates. The single lines above run a minute or more apart, and
/// this machine's commit rate drifts by a third over that time (bench/README.md, sixteenth pass);
/// the two halves of a round run seconds apart, and the median of the rounds' ratios is what the
/// report compares with the targets.
pub(super) struct Rounds {
    pub pgmq: Vec<f64>,
    pub stageflow: Vec<f64>,
}

impl Rounds {
    pub fn ratios(&self) -> Vec<f64> {
        self.stageflow.iter().zip(&self.pgmq).map(|(s, p)| s / p).collect()
    }

    /// The median of the rounds' ratios, and their lowest and highest.
    pub fn median_min_max(&self) -> (f64, f64, f64) {
        let mut r = self.ratios();
        r.sort_by(f64::total_cmp);
        let mid = r.len() / 2;
        let median = if r.len() % 2 == 1 { r[mid] } else { (r[mid - 1] + r[mid]) / 2.0 };
        (median, r[0], r[r.len() - 1])
    }

    pub fn json(&self) -> serde_json::Value {
        let (median, min, max) = self.median_min_max();
        json!({
            "pgmq_per_s": self.pgmq,
            "stageflow_per_s": self.stageflow,
            "ratios": self.ratios(),
            "median_ratio": median,
            "min_ratio": min,
            "max_ratio": max,
        })
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn rounds(
    url: &str,
    n: usize,
    sync: bool,
    batch: usize,
    units: usize,
    count: usize,
    quiet: &[&tokio_postgres::Client],
    dir: &Path,
) -> Result<Rounds, CliError> {
    let mut rounds = Rounds { pgmq: Vec::new(), stageflow: Vec::new() };
    for round in 0..count {
        for pgmq_half in [round % 2 == 0, round % 2 == 1] {
            super::settle(quiet).await?;
            if pgmq_half {
                rounds.pgmq.push(pgmq(url, n, Variant::plain(sync), batch, units, dir).await?.0);
            } else {
                rounds.stageflow.push(stageflow(url, n, Variant::plain(sync), batch, units, dir).await?.0);
            }
        }
    }
    Ok(rounds)
}
