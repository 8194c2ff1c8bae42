//! Raw pgmq, the yardstick: read + delete one message at a time, or a batch at a time.

use serde_json::{json, Value};

use super::clients::{clients, in_parallel};
use super::wal::{Meter, PerUnit};
use crate::{connect, CliError};

/// Messages per second, and the WAL per message.
pub(super) async fn rate(
    url: &str,
    n: usize,
    sync: bool,
    batch: i32,
    messages: usize,
) -> Result<(f64, PerUnit), CliError> {
    let setup = connect(url).await?;
    setup.raw().batch_execute("SELECT pgmq.create('bench_pgmq'); SELECT pgmq.purge_queue('bench_pgmq')").await?;
    let payload: Vec<Value> = (0..1000).map(|i| json!({"task_id": format!("message-{i}")})).collect();
    for _ in 0..messages.div_ceil(1000) {
        setup.raw().execute("SELECT pgmq.send_batch('bench_pgmq', $1::jsonb[])", &[&payload]).await?;
    }
    let wal = Meter::start(url, &[setup.raw()]).await?;
    let (elapsed, line) = in_parallel(clients(url, n, sync).await?, |client| async move {
        let read = client.prepare("SELECT msg_id FROM pgmq.read('bench_pgmq', 30, $1)").await?;
        let delete_one = client.prepare("SELECT pgmq.delete('bench_pgmq', $1::bigint)").await?;
        let delete_many = client.prepare("SELECT pgmq.delete('bench_pgmq', $1::bigint[])").await?;
        loop {
            let ids: Vec<i64> = client.query(&read, &[&batch]).await?.iter().map(|r| r.get(0)).collect();
            match ids.len() {
                0 => return Ok(client),
                1 => {
                    client.query(&delete_one, &[&ids[0]]).await?;
                }
                _ => {
                    client.query(&delete_many, &[&ids]).await?;
                }
            }
        }
    })
    .await?;
    drop(line);
    let sent = messages.div_ceil(1000) as f64 * 1000.0;
    Ok((sent / elapsed.as_secs_f64(), wal.per(sent).await?))
}
