//! One error for every call: the engine's refusals sorted by SQLSTATE (README, "Errors"), a lost
//! connection, or an answer the client could not read.

use std::fmt;

/// What the database said when it refused a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub sqlstate: String,
    pub message: String,
    pub hint: Option<String>,
    pub detail: Option<String>,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (SQLSTATE {})", self.message, self.sqlstate)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// 42704: an unknown job type, job (another login's job reads as unknown), task, queue or role.
    #[error("{0}")]
    UnknownObject(Refusal),
    /// 22023: params outside the schema, a bad definition, a malformed planner result, an
    /// out-of-range argument.
    #[error("{0}")]
    InvalidValue(Refusal),
    /// 22004: NULL params, definition or error.
    #[error("{0}")]
    NullValue(Refusal),
    /// 42602: a job type or queue name outside the rules.
    #[error("{0}")]
    InvalidName(Refusal),
    /// 54000: a size or nesting limit, or a quota.
    #[error("{0}")]
    LimitExceeded(Refusal),
    /// 55000: a report of a task that is not running, or from a lease that is not its current one.
    #[error("{0}")]
    WrongState(Refusal),
    /// 42501: a call the role does not grant, or a claim from a queue not granted to it.
    #[error("{0}")]
    Forbidden(Refusal),
    /// 23505: identical work another login (or tenant) submitted.
    #[error("{0}")]
    Taken(Refusal),
    /// 22P02: JSON PostgreSQL itself refuses (NaN, Infinity).
    #[error("{0}")]
    InvalidText(Refusal),
    /// 40001, 40P01, 55P03: another transaction was in the way; the call changed nothing and is
    /// worth making again ([`Error::is_retryable`]).
    #[error("{0}")]
    Conflict(Refusal),
    /// Any other SQLSTATE.
    #[error("{0}")]
    Other(Refusal),
    /// No answer: the connection broke, could not be made, or the server is going away (SQLSTATE
    /// classes 08 and 57P). Retry on a new connection.
    #[error("database: {}", with_causes(.0))]
    Connection(#[source] tokio_postgres::Error),
    /// A row or document the client could not read (an extension of another version?).
    #[error("unexpected answer from the database: {0}")]
    Decode(String),
    /// A database URL whose settings cannot be used (an unknown `sslmode`, a missing or empty
    /// `sslrootcert`, a malformed connection string): nothing was sent.
    #[error("connection settings: {0}")]
    Config(String),
}

/// An error and its causes, `: `-separated (a TLS handshake's says why: "invalid peer
/// certificate: UnknownIssuer").
fn with_causes(error: &tokio_postgres::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

impl Error {
    /// The error of a refusal with this SQLSTATE.
    pub fn refused(refusal: Refusal) -> Self {
        match refusal.sqlstate.as_str() {
            "42704" => Error::UnknownObject(refusal),
            "22023" => Error::InvalidValue(refusal),
            "22004" => Error::NullValue(refusal),
            "42602" => Error::InvalidName(refusal),
            "54000" => Error::LimitExceeded(refusal),
            "55000" => Error::WrongState(refusal),
            "42501" => Error::Forbidden(refusal),
            "23505" => Error::Taken(refusal),
            "22P02" => Error::InvalidText(refusal),
            "40001" | "40P01" | "55P03" => Error::Conflict(refusal),
            _ => Error::Other(refusal),
        }
    }

    /// What the database said, when it refused the call.
    pub fn refusal(&self) -> Option<&Refusal> {
        match self {
            Error::UnknownObject(r)
            | Error::InvalidValue(r)
            | Error::NullValue(r)
            | Error::InvalidName(r)
            | Error::LimitExceeded(r)
            | Error::WrongState(r)
            | Error::Forbidden(r)
            | Error::Taken(r)
            | Error::InvalidText(r)
            | Error::Conflict(r)
            | Error::Other(r) => Some(r),
            Error::Connection(_) | Error::Decode(_) | Error::Config(_) => None,
        }
    }

    /// The SQLSTATE, when the server sent one (a refusal, or a server going away).
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            Error::Connection(e) => e.code().map(|c| c.code()),
            other => other.refusal().map(|r| r.sqlstate.as_str()),
        }
    }

    pub fn message(&self) -> Option<&str> {
        self.refusal().map(|r| r.message.as_str())
    }

    pub fn hint(&self) -> Option<&str> {
        self.refusal().and_then(|r| r.hint.as_deref())
    }

    /// Whether the same call is worth making again on the same connection: another transaction
    /// was in the way (a serialization failure, a deadlock PostgreSQL broke, a lock not waited for).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Conflict(_))
    }

    /// Whether the connection is gone (make the call again on a new one) rather than the call
    /// refused (which making it again will not change).
    pub fn is_connection(&self) -> bool {
        matches!(self, Error::Connection(_))
    }
}

impl From<tokio_postgres::Error> for Error {
    fn from(error: tokio_postgres::Error) -> Self {
        let Some(db) = error.as_db_error() else {
            return Error::Connection(error);
        };
        let code = db.code().code();
        if code.starts_with("08") || code.starts_with("57P") {
            return Error::Connection(error);
        }
        Error::refused(Refusal {
            sqlstate: code.to_owned(),
            message: db.message().to_owned(),
            hint: db.hint().map(str::to_owned),
            detail: db.detail().map(str::to_owned),
        })
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    fn refusal(sqlstate: &str) -> Refusal {
        Refusal { sqlstate: sqlstate.into(), message: "m".into(), hint: Some("h".into()), detail: None }
    }

    #[test]
    fn sqlstates_sort_into_variants() {
        assert!(matches!(Error::refused(refusal("42704")), Error::UnknownObject(_)));
        assert!(matches!(Error::refused(refusal("55000")), Error::WrongState(_)));
        assert!(matches!(Error::refused(refusal("22P02")), Error::InvalidText(_)));
        assert!(matches!(Error::refused(refusal("22007")), Error::Other(_)));
        for code in ["40001", "40P01", "55P03"] {
            assert!(Error::refused(refusal(code)).is_retryable(), "{code}");
        }
        let error = Error::refused(refusal("54000"));
        assert!(!error.is_retryable() && !error.is_connection());
        assert_eq!((error.sqlstate(), error.message(), error.hint()), (Some("54000"), Some("m"), Some("h")));
        assert_eq!(error.to_string(), "m (SQLSTATE 54000)");
    }
}
