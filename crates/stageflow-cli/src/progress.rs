//! Live progress of a job: one bar per stage, redrawn from `stageflow.job_status` until the job
//! ends. Bars go to the terminal only; without one, a line per stage change is printed instead.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;
use tokio_postgres::Client;

pub async fn job_status(client: &Client, job_id: &str) -> Result<Value, tokio_postgres::Error> {
    Ok(client.query_one("SELECT stageflow.job_status($1)", &[&job_id]).await?.get(0))
}

pub fn is_finished(status: &Value) -> bool {
    matches!(status["status"].as_str(), Some("completed" | "completed_with_errors" | "failed" | "cancelled"))
}

/// Follows the job until it completes or fails; returns its last status.
pub async fn follow(client: &Client, job_id: &str) -> Result<Value, tokio_postgres::Error> {
    let terminal = std::io::stderr().is_terminal();
    let multi = MultiProgress::with_draw_target(if terminal {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    let style = ProgressStyle::with_template("{prefix:>14} [{bar:40.cyan/blue}] {pos:>7}/{len:7} {per_sec:>12} {msg}")
        .expect("valid template")
        .progress_chars("=> ");
    let mut bars: Vec<ProgressBar> = Vec::new();
    let mut last_line = String::new();
    let started = Instant::now();
    loop {
        let status = job_status(client, job_id).await?;
        let stages = status["stages"].as_array().cloned().unwrap_or_default();
        for (i, stage) in stages.iter().enumerate() {
            if bars.len() <= i {
                let bar = multi.add(ProgressBar::new(0).with_style(style.clone()));
                bar.set_prefix(format!("{}. {}", i + 1, stage["name"].as_str().unwrap_or("?")));
                bars.push(bar);
            }
            let bar = &bars[i];
            let total = stage["task_count"].as_u64().unwrap_or(0);
            let done =
                stage["tasks"]["completed"].as_u64().unwrap_or(0) + stage["tasks"]["failed"].as_u64().unwrap_or(0);
            bar.set_length(total);
            bar.set_position(done);
            let state = stage["status"].as_str().unwrap_or("?");
            let failed = stage["tasks"]["failed"].as_u64().unwrap_or(0);
            bar.set_message(if failed > 0 { format!("{state}, {failed} failed") } else { state.to_owned() });
            if state != "pending" && !bar.is_finished() && (state == "completed" || state == "failed") {
                bar.finish();
            }
        }
        if !terminal {
            let line = format!(
                "{} stage {}/{} {}%",
                status["status"].as_str().unwrap_or("?"),
                status["current_stage"],
                status["total_stages"],
                status["progress"]
            );
            if line != last_line {
                eprintln!("[{:>6.1}s] {line}", started.elapsed().as_secs_f64());
                last_line = line;
            }
        }
        if is_finished(&status) {
            for bar in &bars {
                if !bar.is_finished() {
                    bar.abandon();
                }
            }
            return Ok(status);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
