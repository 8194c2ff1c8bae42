//! `stageflow`: run the demo on an embedded cluster, run workers, submit and watch jobs.

mod bench;
mod cluster;
mod demo;
mod jobs;
mod progress;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use stageflow_worker::{builtin_handlers, shutdown_signal, Worker, WorkerConfig};

use cluster::Cluster;

/// The demo's cluster, relative to the working directory.
const DEMO_DIR: &str = ".stageflow";

#[derive(Parser)]
#[command(name = "stageflow", version, about = "Multi-stage workflows of parallel tasks, inside PostgreSQL")]
struct Cli {
    /// Database URL; defaults to the demo cluster in ./.stageflow when it runs.
    #[arg(long, global = true, env = "STAGEFLOW_DATABASE_URL")]
    database_url: Option<String>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run hello_world on a private cluster in ./.stageflow (created on first run) with live progress.
    Demo {
        /// Greetings to fan out (stage 1 tasks; stage 2 has as many).
        #[arg(long, default_value_t = 1000)]
        n: u32,
        /// Workers in this process.
        #[arg(long, default_value_t = 8)]
        workers: usize,
        /// Stop the demo cluster and exit.
        #[arg(long)]
        stop: bool,
        /// Run process_raster on a real Landsat scene and a generated 8192 x 8192 raster instead
        /// (also `stageflow demo geo`).
        #[cfg(feature = "geo")]
        #[arg(long)]
        geo: bool,
        /// `geo`: the same as --geo.
        #[cfg(feature = "geo")]
        #[arg(value_parser = ["geo"])]
        which: Option<String>,
    },
    /// Install PostGIS and the schema stageflow_geo, and register the geospatial job types
    /// (extract_metadata, process_raster, container_inventory, validate_stac, stage_vector,
    /// export_geoparquet).
    #[cfg(feature = "geo")]
    GeoInstall,
    /// Claim and run tasks until SIGTERM or Ctrl-C.
    Worker {
        /// Queues to claim from (repeat for several).
        #[arg(long = "queue", default_value = "default")]
        queues: Vec<String>,
        /// Handlers running at once.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// Most tasks per claim (default: the concurrency).
        #[arg(long)]
        batch_size: Option<usize>,
        #[arg(long, default_value_t = 60)]
        lease_seconds: i32,
        /// Idle poll interval when no notification arrives.
        #[arg(long, default_value_t = 2000)]
        poll_interval_ms: u64,
        /// Fail a handler running longer than this (retryable `timeout`).
        #[arg(long)]
        task_timeout_seconds: Option<u64>,
        /// After SIGTERM, how long running handlers may finish before their tasks are released.
        #[arg(long, default_value_t = 30)]
        grace_seconds: u64,
        #[arg(long)]
        worker_id: Option<String>,
        #[command(flatten)]
        geo: GeoOptions,
    },
    /// Submit a job.
    Submit {
        job_type: String,
        /// Params as a JSON object.
        #[arg(long)]
        params: Option<String>,
        /// A param as key=value (JSON values are parsed; repeat for several).
        #[arg(short = 'p', long = "param")]
        pairs: Vec<String>,
        /// Follow the job with progress bars until it ends; exit 0 if it completed, 1 if it failed.
        #[arg(long)]
        wait: bool,
    },
    /// A job's status: stages, task counts, progress, ETA, how many entries its result has.
    Status { job_id: String },
    /// A completed job's result, a page at a time: the last stage's completed tasks in task order
    /// (one entry for a single or fan_in last stage), as `ordinal  task_key  result` lines.
    Result {
        job_id: String,
        /// Entries after this task ordinal (the `next_after` of the previous page).
        #[arg(long)]
        after: Option<i32>,
        /// Most entries (1 to 10000).
        #[arg(long, default_value_t = 1000)]
        limit: i32,
        /// Every entry from --after on, in pages of 10000 (a large result is large).
        #[arg(long, conflicts_with = "limit")]
        all: bool,
    },
    /// A job's tasks.
    Tasks {
        job_id: String,
        #[arg(long)]
        status: Option<String>,
    },
    /// Recent jobs.
    Jobs {
        #[arg(long)]
        status: Option<String>,
        #[arg(long = "type")]
        job_type: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: i32,
    },
    /// Cancel a job: queued tasks removed, running ones' completions refused.
    Cancel { job_id: String },
    /// Resume a failed or cancelled job from the stage it stopped at.
    Retry { job_id: String },
    /// Tasks that ended without a result (dead: attempts ran out; failed: a permanent error).
    DeadLetters {
        #[arg(long, default_value_t = 50)]
        limit: i32,
    },
    /// Which roles may claim tasks from which queue (granted with stageflow.grant_queue).
    QueueGrants,
    /// The quotas in force and the open tasks held against them (yours; every login's for an admin).
    Quotas,
    /// Serve the HTTP API (and deliver webhooks) until SIGTERM or Ctrl-C.
    Serve {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        /// The bearer token clients must send.
        #[arg(long, env = "STAGEFLOW_API_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// A tenant's token, as TENANT=TOKEN (repeatable; or comma-separated in the environment): its
        /// requests see, list and cancel only the jobs submitted with it, and reach no operator route.
        #[arg(
            long = "tenant-token",
            env = "STAGEFLOW_API_TENANT_TOKENS",
            value_delimiter = ',',
            hide_env_values = true
        )]
        tenant_tokens: Vec<String>,
        /// A read-only token (repeatable, or comma-separated in the environment): every GET route
        /// (every job the server's login sees) and /metrics; nothing that changes anything.
        #[arg(long = "read-token", env = "STAGEFLOW_API_READ_TOKENS", value_delimiter = ',', hide_env_values = true)]
        read_tokens: Vec<String>,
        /// Serve without authentication (only on a trusted network).
        #[arg(long)]
        no_auth: bool,
        /// Mark the dashboard's session cookie `Secure` (sent over HTTPS only): for a server
        /// reached through an HTTPS proxy.
        #[arg(long, env = "STAGEFLOW_COOKIE_SECURE")]
        cookie_secure: bool,
        /// The secret that signs webhook deliveries (Standard Webhooks: `whsec_<base64>`, or any
        /// text); without one, deliveries wait unsent.
        #[arg(long, env = "STAGEFLOW_WEBHOOK_SECRET", hide_env_values = true)]
        webhook_secret: Option<String>,
        /// A receiver host (name or address, as in the URL) that webhooks may reach over plain
        /// http and at a non-public address (repeatable, or comma-separated in the environment).
        #[arg(long = "webhook-allow-host", env = "STAGEFLOW_WEBHOOK_ALLOW_HOSTS", value_delimiter = ',')]
        webhook_allow_hosts: Vec<String>,
    },
    /// Benchmark Stageflow beside raw pgmq on a private cluster (build with --release).
    Bench {
        /// Client connections for every line.
        #[arg(long, default_value_t = 8)]
        clients: usize,
        /// Small sizes: checks the benchmark runs, measures nothing worth keeping.
        #[arg(long)]
        quick: bool,
        /// Add the million-task line (a job of count 1,000,000 then lineage through 4 worker
        /// processes, several minutes a mode); with --quick it runs anyway, at 10,000.
        #[arg(long)]
        million: bool,
        /// Run only the million-task line (sized by --quick as above).
        #[arg(long)]
        million_only: bool,
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
        #[arg(long, default_value = ".stageflow-bench")]
        dir: PathBuf,
    },
    /// Manage a private cluster directory (what the demo and the tests use).
    Cluster {
        #[arg(value_parser = ["start", "stop", "url"])]
        action: String,
        #[arg(long, default_value = DEMO_DIR)]
        dir: PathBuf,
        /// How `stop` shuts down (pg_ctl's modes; `immediate` is a crash).
        #[arg(long, default_value = "fast", value_parser = ["smart", "fast", "immediate"])]
        mode: String,
    },
}

#[derive(Debug)]
pub enum CliError {
    Database(stageflow_client::Error),
    Setup(String),
    Usage(String),
    JobFailed(String),
}

impl From<stageflow_client::Error> for CliError {
    fn from(error: stageflow_client::Error) -> Self {
        CliError::Database(error)
    }
}

/// SQL of the command's own (not a call of the API): its error sorted the same way.
impl From<tokio_postgres::Error> for CliError {
    fn from(error: tokio_postgres::Error) -> Self {
        CliError::Database(error.into())
    }
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CliError::Database(stageflow_client::Error::Connection(error)) => match error.as_db_error() {
                Some(db) => write!(f, "{} (SQLSTATE {})", db.message(), db.code().code()),
                None => write!(f, "database: {error}"),
            },
            CliError::Database(error) => match error.refusal() {
                Some(refusal) => {
                    write!(f, "{refusal}")?;
                    if let Some(hint) = &refusal.hint {
                        write!(f, "\nhint: {hint}")?;
                    }
                    Ok(())
                }
                None => write!(f, "{error}"),
            },
            CliError::Setup(message) | CliError::Usage(message) => write!(f, "{message}"),
            CliError::JobFailed(job_id) => write!(f, "job {job_id} failed"),
        }
    }
}

pub async fn connect(url: &str) -> Result<stageflow_client::Client, CliError> {
    Ok(stageflow_client::connect(url).await?)
}

/// Where the geospatial job types may read and write (builds with the `geo` feature; see
/// `stageflow_geo::confine`): every path and table a job's params name is checked against it.
#[derive(clap::Args, Clone, Debug)]
pub struct GeoOptions {
    /// A directory whose files the geospatial job types may read and write (repeatable, or
    /// comma-separated in the environment). Without one, every local path is refused.
    #[arg(long = "geo-root", env = "STAGEFLOW_GEO_ROOTS", value_delimiter = ',')]
    pub roots: Vec<PathBuf>,
    /// An S3 location they may read and write under, as s3://bucket[/prefix] (repeatable, or
    /// comma-separated in the environment). Without one, every S3 location is refused.
    #[arg(long = "geo-bucket", env = "STAGEFLOW_GEO_BUCKETS", value_delimiter = ',')]
    pub buckets: Vec<String>,
    /// The schema whose tables they may create, read and write (a bare table name is put there).
    #[arg(long = "geo-schema", env = "STAGEFLOW_GEO_SCHEMA", default_value = "stageflow_geo")]
    pub schema: String,
    /// The most pixels (width x height x bands) of a raster a task may open.
    #[arg(long = "geo-max-pixels", env = "STAGEFLOW_GEO_MAX_PIXELS", default_value_t = 1 << 32)]
    pub max_pixels: u64,
    /// The most bytes of a local file or S3 object a task may read (a raster, a vector source, a
    /// file of an inventory, a STAC document).
    #[arg(long = "geo-max-bytes", env = "STAGEFLOW_GEO_MAX_BYTES", default_value_t = 16 << 30)]
    pub max_bytes: u64,
}

impl GeoOptions {
    /// Confined to `roots` only (the demo's and the benchmark's own directories).
    pub fn roots(roots: &[PathBuf]) -> Self {
        GeoOptions {
            roots: roots.to_vec(),
            buckets: Vec::new(),
            schema: "stageflow_geo".into(),
            max_pixels: 1 << 32,
            max_bytes: 16 << 30,
        }
    }
}

/// The handlers of `stageflow worker`: the built-in ones, and the geospatial ones, confined by
/// `geo`, when built with the `geo` feature.
pub fn worker_handlers(database_url: &str, geo: &GeoOptions) -> Result<stageflow_worker::Handlers, CliError> {
    #[cfg(feature = "geo")]
    {
        let confinement = stageflow_geo::Confinement::new(&geo.roots, &geo.buckets, &geo.schema, geo.max_pixels)
            .map_err(CliError::Usage)?
            .with_max_bytes(geo.max_bytes);
        Ok(stageflow_geo::handlers(builtin_handlers(), database_url, confinement))
    }
    #[cfg(not(feature = "geo"))]
    {
        let _ = (database_url, geo);
        Ok(builtin_handlers())
    }
}

fn database_url(cli: &Cli) -> Result<String, CliError> {
    if let Some(url) = &cli.database_url {
        return Ok(url.clone());
    }
    Cluster::at(DEMO_DIR).ok().and_then(|c| c.url()).ok_or_else(|| {
        CliError::Usage(
            "no database: pass --database-url (or set STAGEFLOW_DATABASE_URL), or run `stageflow demo` first".into(),
        )
    })
}

async fn run(cli: Cli) -> Result<(), CliError> {
    match &cli.command {
        Command::Demo { n, workers, stop, .. } => {
            let cluster = Cluster::at(DEMO_DIR).map_err(CliError::Setup)?;
            if *stop {
                let stopped = cluster.stop("fast").map_err(CliError::Setup)?;
                println!("{}", if stopped { "Stopped the demo cluster." } else { "The demo cluster was not running." });
                return Ok(());
            }
            #[cfg(feature = "geo")]
            if let Command::Demo { geo, which, .. } = &cli.command {
                if *geo || which.is_some() {
                    return demo::run_geo(&cluster, *workers).await;
                }
            }
            demo::run(&cluster, demo::DemoOptions { n: *n, workers: *workers }).await
        }
        #[cfg(feature = "geo")]
        Command::GeoInstall => {
            let client = connect(&database_url(&cli)?).await?;
            for name in demo::install_geo(&client).await? {
                println!("registered {name}");
            }
            Ok(())
        }
        Command::Cluster { action, dir, mode } => {
            let cluster = Cluster::at(dir).map_err(CliError::Setup)?;
            match action.as_str() {
                "start" => println!("{}", cluster.ensure_running().map_err(CliError::Setup)?),
                "stop" => {
                    cluster.stop(mode).map_err(CliError::Setup)?;
                }
                _ => println!(
                    "{}",
                    cluster.url().ok_or_else(|| CliError::Setup(format!("no cluster runs in {}", dir.display())))?
                ),
            }
            Ok(())
        }
        Command::Worker {
            queues,
            concurrency,
            batch_size,
            lease_seconds,
            poll_interval_ms,
            task_timeout_seconds,
            grace_seconds,
            worker_id,
            geo,
        } => {
            let mut config = WorkerConfig::new(database_url(&cli)?);
            config.queues = queues.clone();
            config.concurrency = (*concurrency).max(1);
            config.batch_size = batch_size.unwrap_or(config.concurrency).max(1);
            config.lease_seconds = *lease_seconds;
            config.poll_interval = Duration::from_millis(*poll_interval_ms);
            config.task_timeout = task_timeout_seconds.map(Duration::from_secs);
            config.grace_period = Duration::from_secs(*grace_seconds);
            if let Some(id) = worker_id {
                config.worker_id = id.clone();
            }
            let report =
                Worker::new(config.clone(), worker_handlers(&config.database_url, geo)?).run(shutdown_signal()).await;
            tracing::info!(
                completed = report.completed,
                failed = report.failed,
                released = report.released,
                "worker stopped"
            );
            Ok(())
        }
        Command::Submit { job_type, params, pairs, wait } => {
            let params = jobs::build_params(params.as_deref(), pairs).map_err(CliError::Usage)?;
            let client = connect(&database_url(&cli)?).await?;
            let submission = client.api().submit_job_outcome(job_type, &params, None).await?;
            let (job_id, outcome) = (submission.job_id, submission.outcome.as_str());
            if !cli.json {
                match outcome {
                    "exists" => eprintln!("identical work: your job {job_id}, left as it is"),
                    "resumed" => eprintln!("identical work: your job {job_id} had failed or been cancelled and runs again"),
                    "owned_by_another" => eprintln!("identical work: job {job_id} was submitted by another login or tenant; it is not yours to read"),
                    _ => {}
                }
            }
            if !*wait || outcome == "owned_by_another" {
                if cli.json {
                    println!("{}", serde_json::json!({"job_id": job_id, "outcome": outcome}));
                } else {
                    println!("{job_id}");
                }
                return Ok(());
            }
            let status = progress::follow(&client, &job_id).await?;
            if cli.json {
                println!("{}", status.document);
            } else {
                jobs::print_status(&status.document);
            }
            if status.status != "completed" {
                return Err(CliError::JobFailed(job_id));
            }
            Ok(())
        }
        Command::Status { job_id } => {
            let client = connect(&database_url(&cli)?).await?;
            let status = client.api().job_status(job_id).await?.document;
            if cli.json {
                println!("{status}");
            } else {
                jobs::print_status(&status);
            }
            Ok(())
        }
        Command::Result { job_id, after, limit, all } => {
            let client = connect(&database_url(&cli)?).await?;
            Ok(jobs::result(&client, job_id, *after, (!*all).then_some(*limit), cli.json).await?)
        }
        Command::Tasks { job_id, status } => {
            let client = connect(&database_url(&cli)?).await?;
            Ok(jobs::tasks(&client, job_id, status.as_deref(), cli.json).await?)
        }
        Command::Serve {
            listen,
            token,
            tenant_tokens,
            read_tokens,
            no_auth,
            cookie_secure,
            webhook_secret,
            webhook_allow_hosts,
        } => {
            let tenant_tokens = parse_tenant_tokens(tenant_tokens, token.as_deref())?;
            if read_tokens.iter().any(|t| {
                t.is_empty()
                    || token.as_deref() == Some(t.as_str())
                    || tenant_tokens.iter().any(|(_, other)| other == t)
                    || read_tokens.iter().filter(|o| *o == t).count() > 1
            }) {
                return Err(CliError::Usage("each read-only token must be non-empty and used by no one else".into()));
            }
            let token = match (token, no_auth) {
                (Some(_), true) => return Err(CliError::Usage("give either a token or --no-auth, not both".into())),
                (_, true) if !tenant_tokens.is_empty() || !read_tokens.is_empty() => {
                    return Err(CliError::Usage("tenant and read-only tokens need authentication: drop --no-auth".into()))
                }
                (None, false) => {
                    return Err(CliError::Usage(
                        "no API token: set STAGEFLOW_API_TOKEN (or --token), or pass --no-auth to serve without authentication".into(),
                    ))
                }
                (token, _) => token.clone(),
            };
            let mut config = stageflow_http::ServeConfig::new(database_url(&cli)?, *listen, token);
            config.tenant_tokens = tenant_tokens;
            config.read_tokens = read_tokens.clone();
            config.cookie_secure = *cookie_secure;
            config.webhooks.secret = webhook_secret.clone();
            config.webhooks.allowed_hosts = webhook_allow_hosts.clone();
            let server = stageflow_http::start(config, shutdown_signal()).await.map_err(|e| CliError::Setup(e.0))?;
            println!("serving on http://{}", server.addr);
            server.handle.await.map_err(|e| CliError::Setup(e.to_string()))?;
            Ok(())
        }
        Command::Bench { clients, quick, million, million_only, out, dir } => {
            bench::run(bench::BenchOptions {
                clients: *clients,
                quick: *quick,
                million: *million,
                million_only: *million_only,
                out_dir: out.clone(),
                cluster_dir: dir.clone(),
            })
            .await
        }
        Command::Cancel { job_id } => {
            let client = connect(&database_url(&cli)?).await?;
            let report = client.api().cancel_job_json(job_id).await?;
            println!(
                "{}",
                if cli.json {
                    report.to_string()
                } else {
                    format!("job {job_id}: {}", report["job_status"].as_str().unwrap_or("?"))
                }
            );
            Ok(())
        }
        Command::Retry { job_id } => {
            let client = connect(&database_url(&cli)?).await?;
            let report = client.api().retry_job_json(job_id).await?;
            if cli.json {
                println!("{report}");
            } else {
                println!(
                    "job {job_id}: {} task(s) queued again, job {}",
                    report["retried_tasks"],
                    report["job_status"].as_str().unwrap_or("?")
                );
            }
            Ok(())
        }
        Command::DeadLetters { limit } => {
            let client = connect(&database_url(&cli)?).await?;
            Ok(jobs::dead_letters(&client, *limit, cli.json).await?)
        }
        Command::QueueGrants => {
            let client = connect(&database_url(&cli)?).await?;
            Ok(jobs::queue_grants(&client, cli.json).await?)
        }
        Command::Quotas => {
            let client = connect(&database_url(&cli)?).await?;
            Ok(jobs::quotas(&client, cli.json).await?)
        }
        Command::Jobs { status, job_type, limit } => {
            let client = connect(&database_url(&cli)?).await?;
            Ok(jobs::list(&client, status.as_deref(), job_type.as_deref(), *limit, cli.json).await?)
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("STAGEFLOW_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

/// `TENANT=TOKEN` pairs, tokens non-empty and all different (the server has the database check the
/// labels when it starts).
fn parse_tenant_tokens(pairs: &[String], operator: Option<&str>) -> Result<Vec<(String, String)>, CliError> {
    let mut parsed: Vec<(String, String)> = Vec::new();
    for pair in pairs {
        let Some((label, token)) = pair.split_once('=') else {
            return Err(CliError::Usage(format!("tenant token {pair:?} is not TENANT=TOKEN")));
        };
        if label.is_empty() {
            return Err(CliError::Usage(format!("tenant token {pair:?} names no tenant: give TENANT=TOKEN")));
        }
        if token.is_empty() || operator == Some(token) || parsed.iter().any(|(_, other)| other == token) {
            return Err(CliError::Usage(format!(
                "tenant {label:?} needs a token of its own, non-empty and used by no one else"
            )));
        }
        parsed.push((label.to_owned(), token.to_owned()));
    }
    Ok(parsed)
}
