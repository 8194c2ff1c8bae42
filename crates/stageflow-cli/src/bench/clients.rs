//! The raw connections a timed line runs on, and running them all at once.

use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_postgres::{AsyncMessage, Client};

use crate::{connect, CliError};

/// `n` raw connections for a timed line.
pub(super) async fn clients(url: &str, n: usize, sync: bool) -> Result<Vec<Client>, CliError> {
    let mut all = Vec::with_capacity(n);
    for _ in 0..n {
        let client = connect(url).await?.into_raw();
        client.batch_execute(if sync { "SET synchronous_commit = on" } else { "SET synchronous_commit = off" }).await?;
        all.push(client);
    }
    Ok(all)
}

/// Runs `work` on every client at once until each returns; returns the elapsed time.
pub(super) async fn in_parallel<F, Fut>(clients: Vec<Client>, work: F) -> Result<(Duration, Vec<Client>), CliError>
where
    F: Fn(Client) -> Fut,
    Fut: std::future::Future<Output = Result<Client, tokio_postgres::Error>> + Send + 'static,
{
    let start = Instant::now();
    let handles: Vec<_> = clients.into_iter().map(|c| tokio::spawn(work(c))).collect();
    let mut back = Vec::new();
    for handle in handles {
        back.push(handle.await.map_err(|e| CliError::Setup(format!("bench client crashed: {e}")))??);
    }
    Ok((start.elapsed(), back))
}

/// A connection listening on `stageflow_tasks`, as the worker runtime's does, and a receiver whose
/// value changes on every notification (a watch: a client that marks it seen before its claim
/// and waits for a change after an empty one misses no notification sent in between). Keep the
/// client: dropping it ends the listening connection.
pub(super) async fn notifications(url: &str) -> Result<(Client, watch::Receiver<u64>), CliError> {
    let settings = stageflow_client::tls::ConnectConfig::from_url(url)?;
    let (client, mut connection) = settings.config.connect(settings.tls).await?;
    let (tx, rx) = watch::channel(0u64);
    tokio::spawn(async move {
        while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            match message {
                Ok(AsyncMessage::Notification(_)) => tx.send_modify(|n| *n += 1),
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    client.batch_execute(&format!("LISTEN {}", stageflow_worker::tasks::CHANNEL)).await?;
    Ok((client, rx))
}
