//! A typed client of Stageflow's SQL API, on tokio-postgres.
//!
//! Every crate that talks to the engine goes through [`Api`]: one method per `stageflow.*`
//! function, typed rows and reports (deserialised from the jsonb the functions return), and one
//! [`Error`] whose variants follow the SQLSTATEs the engine raises. It issues no SQL but calls of
//! those functions (and `set_config('stageflow.tenant', ...)`).
//!
//! [`Api`] works on anything that is a [`GenericClient`]: a connection of its own ([`Client`],
//! whose statements are prepared once), or a caller's [`tokio_postgres::Transaction`], so that a
//! submission can commit or roll back with the caller's own writes:
//!
//! ```ignore
//! let mut client = stageflow_client::connect(&url).await?;
//! let task = client.api().claim_tasks("default", 8, 60, Some("worker-1")).await?;
//! let transaction = client.transaction().await?;
//! let submission = transaction.api().submit_job_outcome("hello_world", &params, None).await?;
//! transaction.commit().await?;
//! ```

mod error;
mod grants;
mod job_types;
mod jobs;
mod maintenance;
mod metrics;
mod tasks;
pub mod tls;
mod webhooks;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;

use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::types::{FromSql, ToSql};
use tokio_postgres::{GenericClient, Row, Socket, Statement};

pub use error::{Error, Refusal};
pub use grants::{QueueGrant, QueueGrantChange, Quota, QuotaSetting};
pub use job_types::{JobType, RegisteredJobType};
pub use jobs::{
    AdvanceReport, CancelReport, DeadLetter, JobResultPage, JobStatus, JobSummary, ListJobs, ResultEntry, RetryReport,
    StageStatus, StageTasks, Submission, SubmitOutcome, TaskRow, MAX_RESULT_PAGE,
};
pub use maintenance::MaintenanceReport;
pub use metrics::Metric;
pub use tasks::{
    BatchCompletion, BatchOutcome, ClaimedTask, Completion, CompletionReport, ExtendedLease, FailReport, TASK_CALLS,
};
pub use webhooks::{AttemptRecord, ClaimedDelivery, WebhookDelivery};

/// The parameters of a statement, as tokio-postgres takes them.
pub type Params<'a> = [&'a (dyn ToSql + Sync)];

/// Where [`Api`] gets a statement prepared once per connection: [`Statements`] (what a [`Client`]
/// keeps), or a pool's own cache (deadpool's `StatementCache`, behind a newtype).
pub trait PrepareCached: Send + Sync {
    /// The statement for `sql` on `client`'s connection, prepared on first use.
    fn prepare<'a>(
        &'a self,
        client: &'a tokio_postgres::Client,
        sql: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Statement, tokio_postgres::Error>> + Send + 'a>>;
}

/// Statements prepared on one connection, by their SQL. Use it only with the connection it
/// prepared them on.
#[derive(Default)]
pub struct Statements {
    prepared: Mutex<HashMap<String, Statement>>,
}

impl Statements {
    fn cached(&self, sql: &str) -> Option<Statement> {
        self.prepared.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(sql).cloned()
    }
}

impl PrepareCached for Statements {
    fn prepare<'a>(
        &'a self,
        client: &'a tokio_postgres::Client,
        sql: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Statement, tokio_postgres::Error>> + Send + 'a>> {
        Box::pin(async move {
            if let Some(statement) = self.cached(sql) {
                return Ok(statement);
            }
            let statement = client.prepare(sql).await?;
            // A poisoned lock only means another caller panicked while inserting: the map is whole.
            self.prepared
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(sql.to_owned(), statement.clone());
            Ok(statement)
        })
    }
}

/// Connects as the URL's `sslmode` and `sslrootcert` say ([`tls::ConnectConfig`]); the
/// connection runs on a task of its own until the client is dropped.
pub async fn connect(url: &str) -> Result<Client, Error> {
    let settings = tls::ConnectConfig::from_url(url)?;
    let (client, connection) = settings.config.connect(settings.tls).await?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "database connection ended");
        }
    });
    Ok(Client { client, statements: Statements::default() })
}

/// Connects with `tls` (any tokio-postgres TLS connector: `NoTls`, postgres-native-tls,
/// tokio-postgres-rustls, ...); the connection runs on a task of its own until the client is dropped.
pub async fn connect_with<T>(url: &str, tls: T) -> Result<Client, Error>
where
    T: MakeTlsConnect<Socket>,
    T::Stream: Send + 'static,
    T::TlsConnect: Send,
    <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
{
    let (client, connection) = tokio_postgres::connect(url, tls).await?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "database connection ended");
        }
    });
    Ok(Client { client, statements: Statements::default() })
}

/// A connection of its own, whose statements are prepared once.
pub struct Client {
    client: tokio_postgres::Client,
    statements: Statements,
}

impl Client {
    /// A client over a connection made elsewhere (its connection future already spawned).
    pub fn new(client: tokio_postgres::Client) -> Self {
        Client { client, statements: Statements::default() }
    }

    /// The SQL API on this connection, each statement prepared on first use and kept.
    pub fn api(&self) -> Api<'_, tokio_postgres::Client> {
        Api::cached(&self.client, &self.statements)
    }

    /// The connection itself, for SQL that is not a call of the API (a `CREATE EXTENSION`, a
    /// benchmark's own statements).
    pub fn raw(&self) -> &tokio_postgres::Client {
        &self.client
    }

    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// The connection without the API (its prepared statements dropped with it).
    pub fn into_raw(self) -> tokio_postgres::Client {
        self.client
    }

    /// Starts a transaction; its [`Transaction::api`] shares this connection's prepared statements.
    /// Begins a transaction, READ COMMITTED whatever the session's default: the engine decides
    /// under row locks on the rows as they are now, which a stricter level turns into
    /// serialization failures (a heartbeat's update of the task row would fail a later completion).
    pub async fn transaction(&mut self) -> Result<Transaction<'_>, Error> {
        let transaction = self
            .client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::ReadCommitted)
            .start()
            .await?;
        Ok(Transaction { transaction, statements: &self.statements })
    }

    /// Prepares the statements of `sql` now rather than on first use (a worker prepares its task
    /// calls when it connects, so that a database without the extension is found at once).
    pub async fn prepare(&self, sql: &[&str]) -> Result<(), Error> {
        for sql in sql {
            self.statements.prepare(&self.client, sql).await?;
        }
        Ok(())
    }
}

/// A transaction of a [`Client`]: rolled back when dropped without [`Transaction::commit`].
pub struct Transaction<'a> {
    transaction: tokio_postgres::Transaction<'a>,
    statements: &'a Statements,
}

impl<'a> Transaction<'a> {
    pub fn api(&self) -> Api<'_, tokio_postgres::Transaction<'a>> {
        Api::cached(&self.transaction, self.statements)
    }

    pub fn raw(&self) -> &tokio_postgres::Transaction<'a> {
        &self.transaction
    }

    pub async fn commit(self) -> Result<(), Error> {
        Ok(self.transaction.commit().await?)
    }

    pub async fn rollback(self) -> Result<(), Error> {
        Ok(self.transaction.rollback().await?)
    }
}

/// The SQL API on `db`: a connection or a transaction (anything [`GenericClient`]). Without a
/// cache each call prepares its statement as it runs (one round trip more, as a plain
/// `query(&str)` does); with one, once per connection.
pub struct Api<'a, C> {
    db: &'a C,
    cache: Option<&'a dyn PrepareCached>,
}

impl<C> Clone for Api<'_, C> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<C> Copy for Api<'_, C> {}

impl<'a, C: GenericClient + Sync> Api<'a, C> {
    /// The API on `db`, preparing each statement as it runs.
    pub fn new(db: &'a C) -> Self {
        Api { db, cache: None }
    }

    /// The API on `db`, taking statements from `cache` (which must belong to `db`'s connection).
    pub fn cached(db: &'a C, cache: &'a dyn PrepareCached) -> Self {
        Api { db, cache: Some(cache) }
    }

    async fn query(&self, sql: &str, params: &Params<'_>) -> Result<Vec<Row>, Error> {
        Ok(match self.cache {
            Some(cache) => {
                let statement = cache.prepare(self.db.client(), sql).await?;
                self.db.query(&statement, params).await?
            }
            None => self.db.query(sql, params).await?,
        })
    }

    async fn query_one(&self, sql: &str, params: &Params<'_>) -> Result<Row, Error> {
        let rows = self.query(sql, params).await?;
        let count = rows.len();
        rows.into_iter().next().filter(|_| count == 1).ok_or_else(|| Error::Decode(format!("{count} rows from {sql}")))
    }

    /// The one value of a statement returning one row of one column.
    async fn value<T: for<'r> FromSql<'r>>(&self, sql: &str, params: &Params<'_>) -> Result<T, Error> {
        column(&self.query_one(sql, params).await?, 0)
    }

    /// The jsonb document of a statement returning one row of one jsonb column, deserialised.
    async fn document<T: DeserializeOwned>(&self, sql: &str, params: &Params<'_>) -> Result<T, Error> {
        from_document(self.value::<Value>(sql, params).await?)
    }

    /// Every row, each read by `read`.
    async fn rows<T>(
        &self,
        sql: &str,
        params: &Params<'_>,
        read: impl Fn(&Row) -> Result<T, Error>,
    ) -> Result<Vec<T>, Error> {
        self.query(sql, params).await?.iter().map(read).collect()
    }

    /// Sets the session's tenant label (`stageflow.tenant`): for the rest of the transaction when
    /// `local`, else for the session. An empty label means no tenant.
    pub async fn set_tenant(&self, label: &str, local: bool) -> Result<(), Error> {
        self.query("SELECT set_config('stageflow.tenant', $1, $2)", &[&label, &local]).await?;
        Ok(())
    }
}

/// Column `index` (a position or a name) of `row`; a value of another type is [`Error::Decode`].
fn column<'r, T: FromSql<'r>>(
    row: &'r Row,
    index: impl tokio_postgres::row::RowIndex + std::fmt::Display,
) -> Result<T, Error> {
    row.try_get(&index).map_err(|e| Error::Decode(format!("column {index}: {e}")))
}

fn from_document<T: DeserializeOwned>(document: Value) -> Result<T, Error> {
    serde_json::from_value(document).map_err(|e| Error::Decode(format!("document: {e}")))
}
