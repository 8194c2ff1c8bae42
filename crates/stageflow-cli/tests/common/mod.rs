//! What the tests that run `stageflow worker` processes share: starting one, signalling it.
//! (A folder module: cargo does not build it as a test of its own.)

// Each test file uses what it needs of this module.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};

/// Starts `stageflow worker --database-url URL --worker-id NAME --poll-interval-ms 200 ARGS...`,
/// its output appended to `<logs>/<name>.log` (a worker started again under its name keeps one log).
pub fn spawn_worker(url: &str, logs: &Path, name: &str, args: &[&str]) -> Child {
    spawn_worker_with_env(url, logs, name, args, &[])
}

/// [`spawn_worker`] with environment variables of its own (e.g. `STAGEFLOW_LOG`).
pub fn spawn_worker_with_env(url: &str, logs: &Path, name: &str, args: &[&str], env: &[(&str, &str)]) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(logs.join(format!("{name}.log")))
        .expect("the worker's log opens");
    Command::new(env!("CARGO_BIN_EXE_stageflow"))
        .args(["worker", "--database-url", url, "--worker-id", name, "--poll-interval-ms", "200"])
        .args(args)
        .envs(env.iter().copied())
        .stdout(log.try_clone().expect("the log's handle is cloned"))
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .expect("stageflow worker starts")
}

/// Sends `kill -<signal>` (TERM, STOP, CONT, ...) to a child process.
pub fn signal(child: &Child, signal: &str) {
    let status =
        Command::new("kill").args([&format!("-{signal}"), &child.id().to_string()]).status().expect("kill runs");
    assert!(status.success(), "kill -{signal} failed");
}
