//! Turning driver errors and stored values into domain errors.

use sea_orm::sqlx;
use sea_orm::{DbErr, RuntimeErr};
use shop_domain::{DomainError, InvalidValue};

/// A driver error as the domain sees it: a database that is down, restarting, saturated or out of time is
/// [`DomainError::Unavailable`] (503, retry); a deadlock or serialization failure, which rolled the transaction
/// back whole, is [`DomainError::WriteConflict`] (the batch is retried); everything else is
/// [`DomainError::Unexpected`] (500, a bug), its cause kept for the log.
pub(crate) fn db(err: DbErr) -> DomainError {
    match kind(&err) {
        Kind::Unavailable => DomainError::unavailable(err),
        Kind::Conflict => DomainError::WriteConflict,
        Kind::Bug => DomainError::unexpected(err),
    }
}

enum Kind {
    Unavailable,
    Conflict,
    Bug,
}

fn kind(err: &DbErr) -> Kind {
    match err {
        // The pool could not hand out a connection in time, or a connection could not be made.
        DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => Kind::Unavailable,
        DbErr::Exec(RuntimeErr::SqlxError(e)) | DbErr::Query(RuntimeErr::SqlxError(e)) => sqlx_kind(e),
        _ => Kind::Bug,
    }
}

fn sqlx_kind(err: &sqlx::Error) -> Kind {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => Kind::Unavailable,
        sqlx::Error::Database(db) => {
            let code = db.code();
            match code.as_deref() {
                // PostgreSQL: deadlock, serialization failure.
                Some("40P01" | "40001") => Kind::Conflict,
                // PostgreSQL: statement timeout or cancel, lock timeout, the server shutting down or starting up,
                // too many connections, a connection exception. SQLite: busy, locked.
                Some("57014" | "55P03" | "57P01" | "57P02" | "57P03" | "53300" | "53400" | "5" | "6" | "517") => {
                    Kind::Unavailable
                }
                Some(c) if c.starts_with("08") => Kind::Unavailable,
                _ => Kind::Bug,
            }
        }
        _ => Kind::Bug,
    }
}

/// A stored value parsed into its domain type. One that does not parse is data the domain never writes (a bug,
/// or a hand edit): the server's failure, so [`DomainError::Unexpected`] (500, cause logged), never the
/// client's 400.
pub(crate) trait Stored<T> {
    fn stored(self) -> Result<T, DomainError>;
}

impl<T> Stored<T> for Result<T, InvalidValue> {
    fn stored(self) -> Result<T, DomainError> {
        self.map_err(|e| DomainError::unexpected(format!("a stored value is invalid: {e}")))
    }
}
