//! Turning driver errors and stored values into domain errors.

use sea_orm::DbErr;
use shop_domain::{DomainError, InvalidValue};

/// Every driver error the adapters do not expect is [`DomainError::Unexpected`], with its cause kept for the log.
pub(crate) fn db(err: DbErr) -> DomainError {
    DomainError::unexpected(err)
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
