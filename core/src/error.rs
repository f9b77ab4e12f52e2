//! The engine's one error type. Every failure surfaces as one of these
//! variants; the FFI layer maps them to `ConfluoError` in one place.

use std::time::Duration;

/// Result alias used across the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The caller passed something the engine refuses (bad change set
    /// content, a hostile name, a value too large...). Nothing was changed.
    #[error("invalid input: {0}")]
    InvalidInput(String),

    /// A change set's bytes could not be decoded (truncated, corrupted or of
    /// an unknown format). Nothing was changed.
    #[error("malformed change set: {0}")]
    MalformedChangeSet(String),

    /// A table cannot be synced as it is, or a schema change was refused.
    /// `problems` lists every reason, not just the first one found.
    #[error("table {table:?} cannot be synced: {}", problems.join("; "))]
    Schema {
        table: String,
        problems: Vec<String>,
    },

    /// A change carries a clock too far ahead of this device's clock.
    #[error("clock drift: a change is {ahead:?} ahead of this device's clock (limit {limit:?})")]
    ClockDrift { ahead: Duration, limit: Duration },

    /// SQLite refused the statement or the storage failed. `message` is
    /// SQLite's own message, so app developers see what SQLite said.
    #[error("sqlite: {message}")]
    Sqlite {
        message: String,
        /// The extended SQLite result code, when SQLite gave one.
        code: Option<i32>,
    },

    /// The sync server could not be reached or answered with a failure.
    /// `retryable` failures (timeouts, 5xx, 429) go away by retrying later,
    /// no sooner than `retry_after` when the server said so.
    #[error("network: {message}")]
    Network {
        message: String,
        retryable: bool,
        retry_after: Option<Duration>,
    },

    /// The server could not be reached at all (connection refused, no
    /// route, timeout): the device is effectively offline. Retryable.
    #[error("server unreachable: {0}")]
    Unreachable(String),

    /// The server refused the token (401) or its rights (403).
    #[error("not authorized: {0}")]
    Auth(String),

    /// The database was closed.
    #[error("the database is closed")]
    Closed,

    /// The caller cancelled the sync (`SyncConfig::cancel`). What was
    /// already sent or applied stays; the next sync goes on from there.
    #[error("the sync was cancelled")]
    Cancelled,
}

/// What kind of failure an [`Error`] is, without its details: what an app
/// branches on (a status display, whether to ask the user to sign in).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// Refused input (a malformed change set and clock drift included).
    InvalidInput,
    Schema,
    Storage,
    /// The server failed or could not be reached.
    Network,
    /// The server refused the token or its rights.
    Auth,
    Closed,
    Cancelled,
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidInput(_) | Error::MalformedChangeSet(_) | Error::ClockDrift { .. } => {
                ErrorKind::InvalidInput
            }
            Error::Schema { .. } => ErrorKind::Schema,
            Error::Sqlite { .. } => ErrorKind::Storage,
            Error::Network { .. } | Error::Unreachable(_) => ErrorKind::Network,
            Error::Auth(_) => ErrorKind::Auth,
            Error::Closed => ErrorKind::Closed,
            Error::Cancelled => ErrorKind::Cancelled,
        }
    }

    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidInput(msg.into())
    }

    pub(crate) fn malformed(msg: impl Into<String>) -> Self {
        Error::MalformedChangeSet(msg.into())
    }

    pub(crate) fn schema(table: &str, problems: Vec<String>) -> Self {
        Error::Schema {
            table: table.to_owned(),
            problems,
        }
    }
}

impl From<rusqlite::Error> for Error {
    fn from(err: rusqlite::Error) -> Self {
        let code = match &err {
            rusqlite::Error::SqliteFailure(e, _) => Some(e.extended_code),
            _ => None,
        };
        let message = match &err {
            // rusqlite's Display for failures already is SQLite's message.
            rusqlite::Error::SqliteFailure(_, Some(msg)) => msg.clone(),
            other => other.to_string(),
        };
        Error::Sqlite { message, code }
    }
}

impl From<rusqlite::types::FromSqlError> for Error {
    fn from(err: rusqlite::types::FromSqlError) -> Self {
        Error::Sqlite {
            message: format!("unexpected value in confluo metadata: {err}"),
            code: None,
        }
    }
}
