//! WAL accounting of a timed line: `pg_stat_wal` (the whole cluster's) read before and after it,
//! divided by the messages or tasks the line handled.
//!
//! A backend adds its WAL counts to `pg_stat_wal` when it goes idle at least a second after it
//! last did (else up to 10 s later, while it sits idle), or when it exits. So the reading before
//! a line first makes each connection that set the line up (sent its messages, submitted its job,
//! vacuumed) add its counts (`pg_stat_force_next_flush()`, which takes effect as that statement
//! ends, before its answer comes back): without it, the WAL of a setup that had just run was added
//! during the line and counted in it. pgmq's one-at-a-time lines measured 712-743 B a message with
//! 10.4-10.8 records in several runs (runs AV, BC, BF, BI) against 431-456 B and 7.3-7.8 records
//! otherwise: about its 20,000 messages' inserts (a heap row and two index entries each). The
//! reading after a line first waits for the line's connections to be gone (the count of client
//! backends back to what it was before the line), then reads in a fresh transaction with the
//! snapshot cleared. The line's own setup is not counted; the full-page images the line writes
//! after `settle()`'s checkpoint are, as every line pays them alike.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio_postgres::Client;

use crate::{connect, CliError};

const READ: &str = "SELECT wal_bytes::bigint, wal_records, \
                           (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'), \
                           wal_fpi \
                      FROM pg_stat_wal";

pub(super) struct Meter {
    client: Client,
    bytes: i64,
    records: i64,
    backends: i64,
    images: i64,
}

/// WAL per message or task of one line.
#[derive(Clone, Copy)]
pub(super) struct PerUnit {
    pub bytes: f64,
    pub records: f64,
    /// full-page images
    pub images: f64,
}

impl PerUnit {
    pub fn json(self) -> Value {
        json!({"bytes": self.bytes, "records": self.records, "full_page_images": self.images})
    }

    /// `  WAL 1234 B / 12.3 rec` for a printed line.
    pub fn label(self) -> String {
        format!("WAL {:>5.0} B / {:>4.1} rec", self.bytes, self.records)
    }
}

/// Makes each of `clients` add its pending statistics (its WAL counts among them) now.
pub(super) async fn flush(clients: &[&Client]) -> Result<(), CliError> {
    for client in clients {
        client.batch_execute("SELECT pg_stat_force_next_flush()").await?;
    }
    Ok(())
}

async fn read(client: &Client) -> Result<(i64, i64, i64, i64), CliError> {
    client.batch_execute("SELECT pg_stat_clear_snapshot()").await?;
    let row = client.query_one(READ, &[]).await?;
    Ok((row.get(0), row.get(1), row.get(2), row.get(3)))
}

impl Meter {
    /// The reading before a line, on a connection of its own (kept open until [`Meter::per`]),
    /// once every connection in `setup` (those that wrote anything since they last went idle for
    /// a second) has added its WAL counts.
    pub async fn start(url: &str, setup: &[&Client]) -> Result<Meter, CliError> {
        flush(setup).await?;
        let client = connect(url).await?.into_raw();
        let (bytes, records, backends, images) = read(&client).await?;
        Ok(Meter { client, bytes, records, backends, images })
    }

    /// The WAL written since [`Meter::start`], per unit (`units` messages or tasks), once the
    /// line's connections have closed (at most 10 s of waiting).
    pub async fn per(self, units: f64) -> Result<PerUnit, CliError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (_, _, backends, _) = read(&self.client).await?;
            if backends <= self.backends || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // A backend leaves pg_stat_activity just before it flushes its statistics on exit.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (bytes, records, _, images) = read(&self.client).await?;
        Ok(PerUnit {
            bytes: (bytes - self.bytes) as f64 / units,
            records: (records - self.records) as f64 / units,
            images: (images - self.images) as f64 / units,
        })
    }
}
