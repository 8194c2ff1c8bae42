//! Shared by the geospatial tests: a database with PostGIS and the geo job types, jobs run through
//! the engine by the worker runtime, the real vector files fetched by scripts/setup.sh and what
//! GDAL's own `ogrinfo` says about them, and a local S3 server (moto).

#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use postgres::Client;
use serde_json::{json, Value};
use stageflow_tests::{connect, fresh_database, job_status, submit};
use stageflow_worker::{builtin_handlers, Task, Worker, WorkerConfig};

pub const NC: &str = "sf/usr/lib/R/site-library/sf/gpkg/nc.gpkg";
pub const CYCLE_HIRE: &str = "spdata/usr/lib/R/site-library/spData/shapes/cycle_hire.geojson";
pub const NATURAL_EARTH: &str =
    "geopandas/usr/lib/python3/dist-packages/geopandas/datasets/naturalearth_lowres/naturalearth_lowres.shp";

/// A file under the geodata directory (`STAGEFLOW_GEODATA_ROOT`, default where setup.sh puts it).
pub fn geodata(relative: &str) -> String {
    let root = std::env::var("STAGEFLOW_GEODATA_ROOT").unwrap_or_else(|_| "/var/tmp/stageflow-geodata".into());
    let path = PathBuf::from(root).join(relative);
    assert!(path.exists(), "{} is missing: scripts/setup.sh fetches it", path.display());
    path.to_string_lossy().into_owned()
}

/// The feature count `ogrinfo -so -al` reports for a file's (single) layer.
pub fn ogrinfo_feature_count(path: &str) -> i64 {
    let out = Command::new("ogrinfo").args(["-so", "-al", path]).output().expect("ogrinfo (gdal-bin) is installed");
    assert!(out.status.success(), "ogrinfo {path}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let counts: Vec<i64> =
        text.lines().filter_map(|l| l.strip_prefix("Feature Count: ")).map(|n| n.trim().parse().unwrap()).collect();
    assert_eq!(counts.len(), 1, "one layer in {path}: {text}");
    counts[0]
}

/// A fresh database with install_sql() run and the geo job types registered.
pub fn geo_database(name: &str) -> (String, Client) {
    let url = fresh_database(name);
    let mut client = connect(&url);
    client.batch_execute(&stageflow_geo::install_sql()).unwrap_or_else(|e| panic!("install_sql: {e}"));
    for (name, definition) in stageflow_geo::job_types() {
        client
            .execute("SELECT stageflow.register_job_type($1, $2)", &[&name, &definition])
            .unwrap_or_else(|e| panic!("register {name}: {e}"));
    }
    (url, client)
}

/// What the tests' workers may touch: the geodata, the temporary directory, the local S3
/// server's test buckets, the schema stageflow_geo.
pub fn test_confinement() -> stageflow_geo::Confinement {
    let geodata = std::env::var("STAGEFLOW_GEODATA_ROOT").unwrap_or_else(|_| "/var/tmp/stageflow-geodata".into());
    stageflow_geo::Confinement::new(
        &[PathBuf::from(geodata), std::env::temp_dir()],
        // (no-such-bucket: allowed, and missing on the S3 server, for the not_found tests)
        &["s3://rasters".into(), "s3://geo-survey".into(), "s3://no-such-bucket".into()],
        "stageflow_geo",
        stageflow_geo::confine::DEFAULT_MAX_PIXELS,
    )
    .expect("the test confinement is valid")
}

/// Submits a job and runs a worker with `slots` handler slots on the `geo` queue until the job
/// ends; returns the job id, its status document and the time from submission to its end.
pub fn run_job(
    url: &str,
    client: &mut Client,
    job_type: &str,
    params: Value,
    slots: usize,
) -> (String, Value, Duration) {
    run_job_confined(url, client, job_type, params, slots, test_confinement())
}

/// [`run_job`] with a worker confined by `confinement`.
pub fn run_job_confined(
    url: &str,
    client: &mut Client,
    job_type: &str,
    params: Value,
    slots: usize,
    confinement: stageflow_geo::Confinement,
) -> (String, Value, Duration) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut config = WorkerConfig::new(url.to_owned());
    config.queues = vec!["geo".into()];
    config.concurrency = slots;
    config.poll_interval = Duration::from_millis(50);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker =
        runtime.spawn(Worker::new(config, stageflow_geo::handlers(builtin_handlers(), url, confinement)).run(async {
            let _ = stopped.await;
        }));
    let start = Instant::now();
    let job_id = submit(client, job_type, params);
    let status = loop {
        let status = job_status(client, &job_id);
        if status["status"] != json!("processing") && status["status"] != json!("queued") {
            break status;
        }
        assert!(start.elapsed() < Duration::from_secs(180), "{job_type} did not end: {status}");
        std::thread::sleep(Duration::from_millis(25));
    };
    let elapsed = start.elapsed();
    let _ = stop.send(());
    runtime.block_on(worker).unwrap();
    (job_id, status, elapsed)
}

/// The result of the job whose status document `status` is (`stageflow.job_result`, every page):
/// the one task's result of a single or fan_in last stage, else the array of results.
pub fn result_of(client: &mut Client, status: &Value) -> Value {
    stageflow_tests::job_result(client, status["job_id"].as_str().expect("a status has a job_id"))
}

/// A task to call a handler with directly.
pub fn task(handler: &str, params: Value) -> Task {
    Task::standalone(handler, params)
}

/// The errors of a job's failed tasks, as stored by the engine: (stage name, error).
pub fn task_errors(client: &mut Client, job_id: &str) -> Vec<(String, Value)> {
    client
        .query(
            "SELECT stage_name, error FROM stageflow.job_tasks($1) WHERE error IS NOT NULL ORDER BY stage, task_key",
            &[&job_id],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// `schema.table`'s columns and their types, as format_type prints them.
pub fn column_types(client: &mut Client, table: &str) -> Vec<(String, String)> {
    client
        .query(
            "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute \
             WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            &[&table],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// The stage_vector parameters to load `file` into `table`.
pub fn stage_params(file: &str, table: &str) -> Value {
    json!({"source": file, "table": table})
}

/// The Python tools scripts/setup.sh installs (moto, rio-cogeo, boto3 with moto).
pub const PYTOOLS: &str = "/var/tmp/stageflow-pytools/bin";

/// A moto S3 server on a free port, killed when dropped (also when the test fails).
pub struct Moto {
    child: Child,
    pub endpoint: String,
}

impl Moto {
    pub fn start() -> Moto {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(format!("{PYTOOLS}/moto_server"))
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{PYTOOLS}/moto_server: {e} (scripts/setup.sh installs it)"));
        let moto = Moto { child, endpoint: format!("http://127.0.0.1:{port}") };
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(start.elapsed() < Duration::from_secs(30), "moto_server did not listen on {port}");
            std::thread::sleep(Duration::from_millis(100));
        }
        moto
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
