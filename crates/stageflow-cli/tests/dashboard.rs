//! The dashboard in a real browser: `stageflow serve` and a worker process on a fresh database,
//! driven by `crates/stageflow-http/tests/browser/dashboard.mjs` in Debian's headless Chromium
//! (playwright-core from npm, installed by scripts/setup.sh).

// Test code: a panic (unwrap, expect) is how a test reports a failure.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use stageflow_tests::{connect, fresh_database, register};

#[test]
fn the_dashboard_shows_jobs_live_and_retries_dead_letters_in_chromium() {
    let url = fresh_database("dashboard");
    register(
        &mut connect(&url),
        "doomed",
        r#"{"retry": {"max_attempts": 1},
            "parameters": {"type": "object", "properties": {"permanent": {"type": "boolean"}, "message": {"type": "string"}}},
            "stages": [{"name": "try", "handler": "debug.fail", "queue": "doomed"}]}"#,
    );
    let mut server = Command::new(env!("CARGO_BIN_EXE_stageflow"))
        .args(["serve", "--listen", "127.0.0.1:0", "--database-url", &url])
        .env("STAGEFLOW_API_TOKEN", "browser-token")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut first_line = String::new();
    BufReader::new(server.stdout.take().unwrap()).read_line(&mut first_line).unwrap();
    let base = first_line.trim().strip_prefix("serving on ").expect("serve prints its address").to_owned();
    let mut worker = Command::new(env!("CARGO_BIN_EXE_stageflow"))
        .args([
            "worker",
            "--database-url",
            &url,
            "--queue",
            "default",
            "--queue",
            "doomed",
            "--poll-interval-ms",
            "200",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    let browser_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("run by cargo test"))
        .join("../stageflow-http/tests/browser");
    let screenshot = std::env::temp_dir().join("stageflow-dashboard.png");
    let _ = std::fs::remove_file(&screenshot);
    let output = Command::new("node")
        .arg(browser_dir.join("dashboard.mjs"))
        .args([&base, "browser-token", screenshot.to_str().unwrap()])
        .current_dir(&browser_dir)
        .output()
        .expect("node runs");
    let _ = server.kill();
    let _ = worker.kill();
    let _ = (server.wait(), worker.wait());
    print!("{}", String::from_utf8_lossy(&output.stdout));
    assert!(
        output.status.success(),
        "browser test failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let png = std::fs::read(&screenshot).expect("a screenshot");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "a real screenshot, {} bytes", png.len());
}
