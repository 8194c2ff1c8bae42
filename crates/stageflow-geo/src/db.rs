//! The database side shared by the job types that read or write PostGIS tables: validated table
//! names, a connection, and database errors as categorised task errors.

use std::error::Error;

use postgres::Client;
use stageflow_worker::TaskError;

/// What `table` must match: `name` or `schema.name`, plain lowercase SQL identifiers.
pub const TABLE_PATTERN: &str = "^[a-z_][a-z0-9_]{0,62}([.][a-z_][a-z0-9_]{0,62})?$";

/// The schema of a table named without one.
pub const DEFAULT_SCHEMA: &str = "stageflow_geo";

/// A validated `schema.name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

impl TableName {
    /// `name` (in [`DEFAULT_SCHEMA`]) or `schema.name`, each a plain lowercase identifier.
    pub fn parse(text: &str) -> Result<TableName, TaskError> {
        Self::parse_in(text, DEFAULT_SCHEMA)
    }

    /// `name` (in `default_schema`) or `schema.name`, each a plain lowercase identifier.
    pub fn parse_in(text: &str, default_schema: &str) -> Result<TableName, TaskError> {
        let parts: Vec<&str> = text.split('.').collect();
        let (schema, name) = match parts.as_slice() {
            [name] => (default_schema, *name),
            [schema, name] => (*schema, *name),
            _ => return Err(bad_table(text)),
        };
        if !plain_identifier(schema) || !plain_identifier(name) {
            return Err(bad_table(text));
        }
        Ok(TableName { schema: schema.to_owned(), name: name.to_owned() })
    }

    /// `"schema"."name"`, for SQL.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }

    /// `schema.name`, for people.
    pub fn display(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }
}

fn bad_table(text: &str) -> TaskError {
    TaskError::permanent(
        "bad_params",
        format!(
            "table {text:?} must be `name` or `schema.name`, each 1-63 of a-z, 0-9 and _ not starting with a digit"
        ),
    )
}

pub(crate) fn plain_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some('a'..='z' | '_'))
        && s.len() <= 63
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
}

pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// `'text'`, a SQL string literal (standard_conforming_strings, on since PostgreSQL 9.1).
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The mark a table a job created carries, in its comment: `stageflow job <job id>`. A job writes
/// only into a table it created (or a new one), as it writes only into directories it marked.
pub fn table_mark(job_id: &str) -> String {
    format!("stageflow job {job_id}")
}

/// The job whose mark the table's comment holds (`None`: no table, or not a job's).
pub fn table_owner(client: &mut Client, table: &TableName) -> Result<Option<String>, TaskError> {
    let comment: Option<String> = client
        .query_opt("SELECT obj_description(to_regclass($1)::oid, 'pg_class')", &[&table.quoted()])
        .map_err(|e| db_error("reading the table's comment", e))?
        .and_then(|row| row.get(0));
    Ok(comment.and_then(|c| c.strip_prefix("stageflow job ").map(str::to_owned)))
}

/// Refuses (`forbidden_path`) a table that exists without this job's mark.
pub fn check_table_owner(client: &mut Client, table: &TableName, job_id: &str) -> Result<(), TaskError> {
    match table_owner(client, table)? {
        Some(owner) if owner == job_id => Ok(()),
        owner => Err(TaskError::permanent(
            "forbidden_path",
            format!(
                "table {} was not created by this job ({}): a job writes only into a table it created; \
                 drop it or name a new one",
                table.display(),
                owner.map_or_else(|| "it is no job's".to_owned(), |o| format!("job {o} created it")),
            ),
        )),
    }
}

/// A database error as a task error: connection trouble, lock conflicts, a full disk or a lack of
/// resources are worth a retry; anything else is permanent.
pub(crate) fn db_error(context: &str, e: postgres::Error) -> TaskError {
    let message = match e.as_db_error() {
        Some(db) => format!("{context}: {} ({})", db.message(), db.code().code()),
        None => format!("{context}: {e}"),
    };
    match e.code().map(|c| c.code()) {
        Some("53100") => TaskError::retryable("disk_full", message),
        Some("42P01" | "3F000" | "3D000") => TaskError::permanent("not_found", message),
        Some(code)
            if code.starts_with("08")
                || code.starts_with("57P")
                || code.starts_with("53")
                || matches!(code, "40001" | "40P01" | "55P03" | "23505") =>
        {
            TaskError::retryable("database", message)
        }
        Some(_) => TaskError::permanent("database", message),
        // Not a server error: the connection broke or could not be made.
        None if e.is_closed() || e.source().is_some_and(|s| s.is::<std::io::Error>()) => {
            TaskError::retryable("database", message)
        }
        None => TaskError::permanent("database", message),
    }
}

pub(crate) fn connect(url: &str) -> Result<Client, TaskError> {
    let settings = stageflow_client::tls::ConnectConfig::from_url(url)
        .map_err(|e| TaskError::permanent("database", format!("database URL: {e}")))?;
    postgres::Config::from(settings.config).connect(settings.tls).map_err(|e| {
        if e.as_db_error().is_some() {
            db_error("connecting to the database", e)
        } else {
            TaskError::retryable("database", format!("cannot connect to the database: {e}"))
        }
    })
}
