//! Running a geospatial job through the engine on the test cluster with the worker runtime, and a
//! local S3 server (moto), for the container_inventory, validate_stac and S3 raster tests.

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use postgres::Client;
use serde_json::{json, Value};
use stageflow_tests::{connect, fresh_database, job_status, submit};
use stageflow_worker::{builtin_handlers, Worker, WorkerConfig};

/// A fresh database with PostGIS, the `stageflow_geo` schema and tables (install_sql) and the geo
/// job types registered; returns its URL and a client.
pub fn geo_database(name: &str) -> (String, Client) {
    let url = fresh_database(name);
    let mut client = connect(&url);
    client.batch_execute(&stageflow_geo::install_sql()).unwrap_or_else(|e| panic!("install_sql: {e}"));
    for (name, definition) in stageflow_geo::job_types() {
        client.execute("SELECT stageflow.register_job_type($1, $2)", &[&name, &definition]).unwrap();
    }
    (url, client)
}

/// Submits a job, runs 2 workers on the `geo` queue until it ends, and returns its status and how
/// long it took from submission to its end.
pub fn run_job(url: &str, client: &mut Client, job_type: &str, params: Value) -> (String, Value, Duration) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut config = WorkerConfig::new(url.to_owned());
    config.queues = vec!["geo".into()];
    config.concurrency = 2;
    config.poll_interval = Duration::from_millis(50);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = runtime.spawn(Worker::new(config, stageflow_geo::handlers(builtin_handlers(), url)).run(async {
        let _ = stopped.await;
    }));
    let start = Instant::now();
    let job_id = submit(client, job_type, params);
    let status = loop {
        let status = job_status(client, &job_id);
        if status["status"] != json!("processing") && status["status"] != json!("queued") {
            break status;
        }
        if start.elapsed() > Duration::from_secs(180) {
            break status;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let elapsed = start.elapsed();
    let _ = stop.send(());
    runtime.block_on(worker).unwrap();
    (job_id, status, elapsed)
}

/// The errors of a job's failed tasks: (stage name, error).
pub fn task_errors(client: &mut Client, job_id: &str) -> Vec<(String, Value)> {
    client
        .query("SELECT stage_name, error FROM stageflow.job_tasks($1) WHERE error IS NOT NULL ORDER BY stage, task_key", &[&job_id])
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
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
