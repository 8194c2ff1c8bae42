//! Live progress of a job: one bar per stage, redrawn from `stageflow.job_status` until the job
//! ends. Bars go to the terminal only; without one, a line per stage change is printed instead.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use stageflow_client::{Client, Error, JobStatus};

/// Follows the job until it completes or fails; returns its last status.
pub async fn follow(client: &Client, job_id: &str) -> Result<JobStatus, Error> {
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
        let status = client.api().job_status(job_id).await?;
        for (i, stage) in status.stages.iter().enumerate() {
            if bars.len() <= i {
                let bar = multi.add(ProgressBar::new(0).with_style(style.clone()));
                bar.set_prefix(format!("{}. {}", i + 1, stage.name));
                bars.push(bar);
            }
            let bar = &bars[i];
            let count = |n: i64| u64::try_from(n).unwrap_or(0);
            let total = count(stage.task_count.unwrap_or(0));
            let (completed, failed) = stage.tasks.map_or((0, 0), |t| (count(t.completed), count(t.failed)));
            bar.set_length(total);
            bar.set_position(completed + failed);
            let state = stage.status.as_str();
            bar.set_message(if failed > 0 { format!("{state}, {failed} failed") } else { state.to_owned() });
            if state != "pending" && !bar.is_finished() && (state == "completed" || state == "failed") {
                bar.finish();
            }
        }
        if !terminal {
            let document = &status.document;
            let line = format!(
                "{} stage {}/{} {}%",
                status.status, document["current_stage"], document["total_stages"], document["progress"]
            );
            if line != last_line {
                eprintln!("[{:>6.1}s] {line}", started.elapsed().as_secs_f64());
                last_line = line;
            }
        }
        if status.is_finished() {
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
