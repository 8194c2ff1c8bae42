//! The machine's single-row commit rate: the physical limit of one commit per task.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::clients::{clients, in_parallel};
use crate::{connect, CliError};

pub(super) async fn rate(url: &str, n: usize, sync: bool, seconds: f64) -> Result<f64, CliError> {
    let setup = connect(url).await?;
    setup.raw().batch_execute("DROP TABLE IF EXISTS bench_commits; CREATE TABLE bench_commits (id bigserial, at timestamptz DEFAULT now())").await?;
    let done = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let (elapsed, _) = in_parallel(clients(url, n, sync).await?, |client| {
        let done = done.clone();
        async move {
            let insert = client.prepare("INSERT INTO bench_commits DEFAULT VALUES").await?;
            while Instant::now() < deadline {
                client.execute(&insert, &[]).await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok(client)
        }
    })
    .await?;
    Ok(done.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64())
}
