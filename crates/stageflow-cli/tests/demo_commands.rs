//! The newcomer's path: `stageflow demo` ends by suggesting what to type next ("Connect with:  psql
//! URL" and "Try:  stageflow jobs   |   stageflow status JOB   |   stageflow result JOB --limit 5   |
//! stageflow demo --stop"). This runs
//! the demo on a cluster of its own in a fresh directory, reads those suggestions from its output,
//! and runs every one of them as a newcomer would: from the directory the demo ran in, with no
//! database URL in the environment. Each must succeed and say something about the demo's job.

// Test code: a panic (unwrap, expect) is how a test reports a failure.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// `stageflow ARGS` run in `dir` as a newcomer's shell would: no STAGEFLOW_DATABASE_URL, so the
/// command finds the database through the demo cluster in `dir/.stageflow`.
fn stageflow_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stageflow"))
        .args(args)
        .current_dir(dir)
        .env_remove("STAGEFLOW_DATABASE_URL")
        .stdin(Stdio::null())
        .output()
        .expect("stageflow runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The demo's directory; its cluster is stopped and the directory removed however the test ends.
struct DemoDir(PathBuf);

impl Drop for DemoDir {
    fn drop(&mut self) {
        let _ = stageflow_in(&self.0, &["demo", "--stop"]);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The text after `marker` on the first line of `output` that contains it.
fn after<'a>(output: &'a str, marker: &str) -> &'a str {
    let line = output.lines().find(|l| l.contains(marker)).unwrap_or_else(|| panic!("no {marker:?} in:\n{output}"));
    line.split_once(marker).unwrap().1.trim()
}

#[test]
fn every_command_the_demo_suggests_works_where_the_demo_ran() {
    let dir = DemoDir(std::env::temp_dir().join(format!("stageflow-demo-commands-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0).unwrap();

    let demo = stageflow_in(&dir.0, &["demo", "--n", "40", "--workers", "4"]);
    let demo_out = text(&demo.stdout);
    assert!(demo.status.success(), "the demo failed:\n{demo_out}\n{}", text(&demo.stderr));
    // "Submitted hello_world with n = 40 as job <id> in 3.1 ms"
    let job_id = after(&demo_out, " as job ").split_whitespace().next().unwrap().to_owned();
    assert_eq!(job_id.len(), 64, "a job id: {job_id}");

    // "The cluster keeps running. Connect with:  psql <url>"
    let connect = after(&demo_out, "Connect with:");
    let url = connect.strip_prefix("psql ").unwrap_or_else(|| panic!("not a psql command: {connect}")).trim();
    let psql = Command::new("psql")
        .args([url, "-X", "-A", "-t", "-c"])
        .arg(format!("SELECT stageflow.job_status('{job_id}')->>'status'"))
        .stdin(Stdio::null())
        .output()
        .expect("psql runs");
    assert!(psql.status.success(), "psql {url}: {}", text(&psql.stderr));
    assert_eq!(text(&psql.stdout).trim(), "completed", "the demo's job, read in psql");

    // "Try:  stageflow jobs   |   stageflow status <id>   |   stageflow demo --stop", run in the
    // order given (the demo names --stop last, and so it runs last here).
    let suggested: Vec<Vec<&str>> =
        after(&demo_out, "Try:").split('|').map(|command| command.split_whitespace().collect()).collect();
    assert!(suggested.len() >= 3, "the demo suggests commands: {suggested:?}");
    let mut ran = Vec::new();
    for command in &suggested {
        assert_eq!(command.first(), Some(&"stageflow"), "a stageflow command: {command:?}");
        let output = stageflow_in(&dir.0, &command[1..]);
        let stdout = text(&output.stdout);
        assert!(
            output.status.success(),
            "`{}` failed where the demo ran:\n{stdout}\n{}",
            command.join(" "),
            text(&output.stderr)
        );
        match &command[1..] {
            ["jobs"] => {
                let line = stdout.lines().find(|l| l.starts_with(&job_id)).unwrap_or_else(|| panic!("{stdout}"));
                assert!(
                    line.contains("hello_world") && line.contains("completed") && line.contains("100.0%"),
                    "{line}"
                );
            }
            ["status", id] => {
                assert_eq!(*id, job_id, "the demo suggests the status of its own job");
                assert!(stdout.contains(&format!("job      {job_id}")), "{stdout}");
                assert!(stdout.contains("status   completed") && stdout.contains("progress 100%"), "{stdout}");
                for stage in ["greet", "reply"] {
                    let row = stdout.lines().find(|l| l.split_whitespace().nth(1) == Some(stage));
                    let row = row.unwrap_or_else(|| panic!("no stage {stage}:\n{stdout}"));
                    // "#  stage  status  tasks  queued  running  completed  failed  cancelled"
                    let columns: Vec<&str> = row.split_whitespace().collect();
                    assert_eq!(columns[2..], ["completed", "40", "0", "0", "40", "0", "0"], "{row}");
                }
            }
            ["result", id, "--limit", "5"] => {
                assert_eq!(*id, job_id, "the demo suggests the result of its own job");
                // "<ordinal> <task_key> <result>": the first 5 of the 40 replies, in task order.
                let ordinals: Vec<&str> = stdout.lines().filter_map(|l| l.split_whitespace().next()).collect();
                assert_eq!(ordinals, ["0", "1", "2", "3", "4"], "{stdout}");
                assert!(stdout.lines().all(|l| l.contains("\"reply\"")), "{stdout}");
                assert!(text(&output.stderr).contains("--after 4"), "{}", text(&output.stderr));
            }
            ["demo", "--stop"] => assert_eq!(stdout.trim(), "Stopped the demo cluster."),
            // A suggestion this test does not know yet must at least succeed and print something.
            _ => assert!(!stdout.trim().is_empty(), "`{}` printed nothing", command.join(" ")),
        }
        ran.push(command.join(" "));
    }
    println!("ran: psql {url}; {}", ran.join("; "));
    assert!(ran.iter().any(|c| c == "stageflow jobs"), "{ran:?}");
    assert!(ran.iter().any(|c| c == &format!("stageflow status {job_id}")), "{ran:?}");
    assert!(ran.iter().any(|c| c == &format!("stageflow result {job_id} --limit 5")), "{ran:?}");
    assert_eq!(ran.last().map(String::as_str), Some("stageflow demo --stop"), "stopping comes last: {ran:?}");

    // With the cluster stopped, the same command says how to reach a database.
    let stopped = stageflow_in(&dir.0, &["jobs"]);
    assert_eq!(stopped.status.code(), Some(1));
    let stderr = text(&stopped.stderr);
    assert!(stderr.contains("pass --database-url") && stderr.contains("run `stageflow demo` first"), "{stderr}");
}
