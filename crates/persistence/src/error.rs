//! Turning driver errors into domain errors.

use sea_orm::DbErr;
use shop_domain::DomainError;

/// Every driver error the adapters do not expect is [`DomainError::Unexpected`], with its cause kept for the log.
pub(crate) fn db(err: DbErr) -> DomainError {
    DomainError::unexpected(err)
}
