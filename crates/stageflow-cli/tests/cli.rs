//! The `stageflow` command against a real cluster: submit, wait, status, result, tasks, jobs, dead
//! letters, retry and cancel, with --json output and database errors shown with their hint.

// Test code: a panic (unwrap, expect) is how a test reports a failure.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Output, Stdio};

use serde_json::{json, Value};
use stageflow_tests::*;

fn stageflow(url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stageflow"))
        .args(args)
        .env("STAGEFLOW_DATABASE_URL", url)
        .stdin(Stdio::null())
        .output()
        .expect("stageflow runs")
}

fn json_of(output: &Output) -> Value {
    assert!(output.status.success(), "stderr: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stdout)))
}

#[test]
fn the_command_drives_jobs_from_submit_to_dead_letters() {
    let url = fresh_database("cli_commands");
    let mut client = connect(&url);
    register(
        &mut client,
        "doomed",
        r#"{"retry": {"max_attempts": 1},
            "parameters": {"type": "object", "properties": {"permanent": {"type": "boolean"}, "message": {"type": "string"}}},
            "stages": [{"name": "try", "handler": "debug.fail", "queue": "doomed"}]}"#,
    );
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
            "100",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    let done = stageflow(&url, &["submit", "hello_world", "-p", "n=3", "-p", "message=cli", "--wait", "--json"]);
    let status = json_of(&done);
    assert_eq!(status["status"], json!("completed"));
    let job_id = status["job_id"].as_str().unwrap().to_owned();
    assert_eq!(json_of(&stageflow(&url, &["status", &job_id, "--json"]))["progress"], json!(100));
    assert_eq!(json_of(&stageflow(&url, &["tasks", &job_id, "--json"])).as_array().unwrap().len(), 6);
    let jobs = json_of(&stageflow(&url, &["jobs", "--json", "--status", "completed"]));
    assert!(jobs.as_array().unwrap().iter().any(|j| j["job_id"] == json!(job_id)));
    let text = stageflow(&url, &["status", &job_id]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("reply"), "the text status names the stages");
    assert!(
        String::from_utf8_lossy(&text.stdout).contains(&format!("result   3 entries: stageflow result {job_id}")),
        "the text status says how to read the result: {}",
        String::from_utf8_lossy(&text.stdout)
    );

    // The result: not in the status (its size is), read by pages with `stageflow result`.
    assert_eq!((status["result_count"].clone(), status.get("result")), (json!(3), None), "{status}");
    let whole = json_of(&stageflow(&url, &["result", &job_id, "--json"]));
    let ordinals = |page: &Value| -> Vec<i64> {
        page["entries"].as_array().unwrap().iter().map(|e| e["ordinal"].as_i64().unwrap()).collect()
    };
    assert_eq!((ordinals(&whole), whole["next_after"].clone()), (vec![0, 1, 2], Value::Null), "{whole}");
    assert_eq!(whole["fan_out"], json!("lineage"));
    assert!(whole["entries"][2]["result"]["reply"].as_str().is_some_and(|r| r.contains("cli")), "{whole}");
    let first = json_of(&stageflow(&url, &["result", &job_id, "--limit", "2", "--json"]));
    assert_eq!((ordinals(&first), first["next_after"].clone()), (vec![0, 1], json!(1)), "{first}");
    let rest = json_of(&stageflow(&url, &["result", &job_id, "--after", "1", "--limit", "2", "--json"]));
    assert_eq!((ordinals(&rest), rest["next_after"].clone()), (vec![2], Value::Null), "{rest}");
    assert_eq!(json_of(&stageflow(&url, &["result", &job_id, "--all", "--json"])), whole);
    let from_one = json_of(&stageflow(&url, &["result", &job_id, "--all", "--after", "0", "--json"]));
    assert_eq!((ordinals(&from_one), from_one["next_after"].clone()), (vec![1, 2], Value::Null), "{from_one}");
    let lines = stageflow(&url, &["result", &job_id, "--limit", "2"]);
    let stdout = String::from_utf8_lossy(&lines.stdout);
    let keys: Vec<(&str, &str)> = stdout
        .lines()
        .map(|l| {
            let mut words = l.split_whitespace();
            (words.next().unwrap(), words.next().unwrap())
        })
        .collect();
    assert_eq!(keys, [("0", "0"), ("1", "1")], "`ordinal task_key result` lines: {stdout}");
    assert!(stdout.lines().all(|l| l.contains("\"reply\"")), "{stdout}");
    let stderr = String::from_utf8_lossy(&lines.stderr);
    assert!(stderr.contains(&format!("stageflow result {job_id} --after 1")), "the next page's command: {stderr}");
    let bad_limit = stageflow(&url, &["result", &job_id, "--limit", "0"]);
    assert_eq!(bad_limit.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&bad_limit.stderr);
    assert!(
        stderr.contains("limit must be between 1 and 10000, got 0 (SQLSTATE 22023)")
            && stderr.contains("hint: page through"),
        "{stderr}"
    );

    // A job that fails: --wait exits 1, its task is a dead letter, retry queues it again.
    let failed = stageflow(
        &url,
        &["submit", "doomed", "--params", r#"{"permanent": true, "message": "no luck"}"#, "--wait", "--json"],
    );
    assert_eq!(failed.status.code(), Some(1));
    let failed_status: Value = serde_json::from_slice(&failed.stdout).unwrap();
    assert_eq!(failed_status["status"], json!("failed"));
    let failed_id = failed_status["job_id"].as_str().unwrap().to_owned();
    let no_result = stageflow(&url, &["result", &failed_id]);
    assert_eq!(no_result.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&no_result.stderr);
    assert!(stderr.contains("has no result: it is failed (SQLSTATE 55000)") && stderr.contains("hint: "), "{stderr}");
    client.batch_execute("SELECT stageflow.grant_queue('default', 'stageflow_worker')").unwrap();
    let grants = json_of(&stageflow(&url, &["queue-grants", "--json"]));
    assert_eq!(
        (grants[0]["queue"].clone(), grants[0]["role_name"].clone()),
        (json!("default"), json!("stageflow_worker")),
        "{grants}"
    );
    client.batch_execute("SELECT stageflow.set_quota(session_user, 500, 200)").unwrap();
    let quotas = json_of(&stageflow(&url, &["quotas", "--json"]));
    assert_eq!(
        (
            quotas[0]["role_name"].clone(),
            quotas[0]["max_open_tasks"].clone(),
            quotas[0]["max_tasks_per_job"].clone(),
            quotas[0]["custom"].clone()
        ),
        (json!("postgres"), json!(500), json!(200), json!(true)),
        "{quotas}"
    );
    let letters = json_of(&stageflow(&url, &["dead-letters", "--json"]));
    assert_eq!(letters[0]["job_id"], json!(failed_id));
    assert_eq!(letters[0]["error"]["message"], json!("no luck"));
    signal_term(&worker);
    assert!(worker.wait().unwrap().success());

    let retried = json_of(&stageflow(&url, &["retry", &failed_id, "--json"]));
    assert_eq!(retried["retried_tasks"], json!(1));
    let cancelled = json_of(&stageflow(&url, &["cancel", &failed_id, "--json"]));
    assert_eq!(cancelled["job_status"], json!("cancelled"));
    // Submitting the cancelled job's work again resumes it, and says so.
    let again = json_of(&stageflow(
        &url,
        &["submit", "doomed", "--params", r#"{"permanent": true, "message": "no luck"}"#, "--json"],
    ));
    assert_eq!(
        (again["job_id"].as_str(), again["outcome"].clone()),
        (Some(failed_id.as_str()), json!("resumed")),
        "{again}"
    );

    // Errors from the database: message, SQLSTATE and hint, exit code 1.
    let unknown = stageflow(&url, &["status", "nope"]);
    assert_eq!(unknown.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&unknown.stderr);
    assert!(stderr.contains("unknown job 'nope' (SQLSTATE 42704)") && stderr.contains("hint: job ids are"), "{stderr}");
    let bad = stageflow(&url, &["submit", "hello_world", "-p", "n=0"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("params.n: 0 is less than the minimum 1"));
}

fn signal_term(child: &std::process::Child) {
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
}

/// The benchmark must keep running (its numbers are judged by people, not by this test).
#[test]
fn the_benchmark_runs_every_line_and_writes_its_report() {
    let out = std::env::temp_dir().join("stageflow-bench-smoke/results");
    let dir = std::env::temp_dir().join("stageflow-bench-smoke/cluster");
    let _ = std::fs::remove_dir_all(&out);
    let output = Command::new(env!("CARGO_BIN_EXE_stageflow"))
        .args(["bench", "--quick", "--clients", "2", "--out", out.to_str().unwrap(), "--dir", dir.to_str().unwrap()])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let file = std::fs::read_dir(&out).unwrap().next().expect("a report is written").unwrap().path();
    let report: Value = serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    for mode in ["on", "off"] {
        let line = &report["synchronous_commit"][mode];
        for key in [
            "commit_rate_per_s",
            "pgmq_one_at_a_time_msg_per_s",
            "pgmq_batch_100_msg_per_s",
            "stageflow_one_at_a_time_tasks_per_s",
            "stageflow_batch_100_tasks_per_s",
            "fan_out_seconds",
            "flatness_ratio",
        ] {
            assert!(line[key].as_f64().is_some_and(|v| v > 0.0), "{mode}.{key} = {}", line[key]);
        }
        assert!(line["stage_advance_ms"]["p99"].as_f64().is_some_and(|v| v > 0.0));
        for key in ["pgmq_one_at_a_time", "pgmq_batch_100", "stageflow_one_at_a_time", "stageflow_batch_100"] {
            let wal = &line["wal_per_unit"][key];
            assert!(
                wal["bytes"].as_f64().is_some_and(|v| v > 0.0) && wal["records"].as_f64().is_some_and(|v| v > 0.0),
                "{mode}.{key}: {wal}"
            );
        }
        for key in ["pgmq_one_at_a_time_msg_per_s", "stageflow_one_at_a_time_first_stage_tasks_per_s"] {
            assert!(
                line["pgbench"][key].as_f64().is_some_and(|v| v > 0.0),
                "{mode}.pgbench.{key} = {}",
                line["pgbench"]
            );
        }
        // The alternating rounds: three of each at the quick size, every rate measured.
        for key in ["one_at_a_time", "batch_100"] {
            let rounds = &line["pgbench"]["rounds"][key];
            for side in ["pgmq_per_s", "stageflow_per_s", "ratios"] {
                let values = rounds[side].as_array().map(|a| a.iter().filter_map(Value::as_f64).collect::<Vec<_>>());
                assert!(
                    values.as_ref().is_some_and(|v| v.len() == 3 && v.iter().all(|r| *r > 0.0)),
                    "{mode}.pgbench.rounds.{key}.{side}: {rounds}"
                );
            }
            let (min, median, max) =
                (rounds["min_ratio"].as_f64(), rounds["median_ratio"].as_f64(), rounds["max_ratio"].as_f64());
            assert!(
                matches!((min, median, max), (Some(a), Some(b), Some(c)) if 0.0 < a && a <= b && b <= c),
                "{rounds}"
            );
        }
        // pgflow's lines run when scripts/setup.sh has fetched its SQL (it does when npm is there).
        let pgflow = std::env::var("STAGEFLOW_PGFLOW_DIR").unwrap_or_else(|_| "/var/tmp/stageflow-pgflow".into());
        if std::path::Path::new(&pgflow).join("core-0.8.1/package/dist/supabase/migrations").is_dir() {
            for key in ["one_at_a_time_tasks_per_s", "batch_10_tasks_per_s"] {
                assert!(
                    line["pgflow"][key].as_f64().is_some_and(|v| v > 0.0),
                    "{mode}.pgflow.{key} = {}",
                    line["pgflow"]
                );
            }
            assert!(line["pgflow"]["wal_per_task"]["one_at_a_time"]["bytes"].as_f64().is_some_and(|v| v > 0.0));
        }
        // The million-task line, at its quick size: the job ran to its end through the worker
        // processes, and retention deleted it with all its tasks.
        let million = &line["million"];
        assert_eq!(million["tasks"], json!(20_000), "{mode}.million = {million}");
        assert_eq!(million["job_status"], json!("completed"), "{mode}.million = {million}");
        assert_eq!(million["tasks_left_after_retention"], json!(0), "{mode}.million = {million}");
        assert_eq!(million["workers"].as_array().map(Vec::len), Some(4), "{mode}.million = {million}");
        for key in ["submit_to_send_batch_ratio", "tasks_per_second", "flatness_last_to_first"] {
            assert!(million[key].as_f64().is_some_and(|v| v > 0.0), "{mode}.million.{key} = {}", million[key]);
        }
    }
    assert_eq!(
        report["worker"]["completed_by_worker"],
        json!(2000),
        "the worker completed every task of the memory line"
    );
    for key in ["job_status_p50_ms", "job_result_first_page_p50_ms"] {
        assert!(report["worker"][key].as_f64().is_some_and(|v| v > 0.0), "worker.{key} = {}", report["worker"][key]);
    }
    assert_eq!(report["worker"]["job_result_first_page_entries"], json!(1000), "a full first page of the result");
    assert!(
        report["fresh_statistics"]["stageflow_one_at_a_time_tasks_per_s"].as_f64().is_some_and(|v| v > 0.0)
            && report["fresh_statistics"]["ratio_to_analysed"].as_f64().is_some_and(|v| v > 0.0),
        "the line before any ANALYZE ran: {}",
        report["fresh_statistics"]
    );
    #[cfg(feature = "geo")]
    assert!(report["geo"]["ratio"].as_f64().is_some_and(|r| r > 0.0), "the geo line ran: {}", report["geo"]);
}

/// With the `geo` feature: `stageflow geo-install` registers the geospatial job types and a
/// `stageflow worker` runs them.
#[cfg(feature = "geo")]
#[test]
fn geo_job_types_install_and_run_from_the_command_line() {
    let url = fresh_database("cli_geo");
    let installed = stageflow(&url, &["geo-install"]);
    assert!(installed.status.success(), "{}", String::from_utf8_lossy(&installed.stderr));
    assert!(String::from_utf8_lossy(&installed.stdout).contains("registered process_raster"));
    let mut worker = Command::new(env!("CARGO_BIN_EXE_stageflow"))
        .args(["worker", "--database-url", &url, "--queue", "geo", "--poll-interval-ms", "100"])
        // The scene's directory is the one the worker may read (see confine).
        .args(["--geo-root", "/var/tmp/stageflow-geodata/stars"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let landsat = "/var/tmp/stageflow-geodata/stars/usr/lib/R/site-library/stars/tif/L7_ETMs.tif";
    let done = stageflow(&url, &["submit", "extract_metadata", "-p", &format!("path={landsat}"), "--wait", "--json"]);
    signal_term(&worker);
    assert!(worker.wait().unwrap().success());
    let status = json_of(&done);
    assert_eq!(status["status"], json!("completed"), "{status}");
    let page = json_of(&stageflow(&url, &["result", status["job_id"].as_str().unwrap(), "--json"]));
    assert_eq!(page["fan_out"], json!("single"), "{page}");
    assert_eq!(page["entries"][0]["result"]["crs"]["epsg"], json!(31985));
}
