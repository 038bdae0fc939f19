//! The one error type of the domain, and the small error of value constructors.

use std::fmt;

use crate::ids::{CartItemId, OrderId, ProductId, ProductOptionId, UserId};
use crate::money::Money;
use crate::order::OrderStatus;

/// A value that failed to parse at the edge: names the field (as the client spelled it) and the rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidValue {
    pub field: &'static str,
    pub reason: &'static str,
}

impl InvalidValue {
    #[must_use]
    pub const fn new(field: &'static str, reason: &'static str) -> Self {
        Self { field, reason }
    }
}

impl fmt::Display for InvalidValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.field, self.reason)
    }
}

impl std::error::Error for InvalidValue {}

/// Every outcome of a use case other than success. Expected outcomes are variants a client can branch on;
/// [`DomainError::Unavailable`] is a dependency that is down or saturated, or load this instance sheds (the client
/// may retry); [`DomainError::Unexpected`] carries the cause of everything else: a bug.
#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    #[error(transparent)]
    Invalid(#[from] InvalidValue),
    #[error("user {0} not found")]
    UserNotFound(UserId),
    #[error("product {0} not found")]
    ProductNotFound(ProductId),
    #[error("product option {0} not found")]
    ProductOptionNotFound(ProductOptionId),
    #[error("cart item {0} not found")]
    CartItemNotFound(CartItemId),
    #[error("order {0} not found")]
    OrderNotFound(OrderId),
    #[error("the balance may not exceed {limit}")]
    BalanceLimitExceeded { limit: Money },
    #[error("a cart line may hold at most {max} units")]
    CartQuantityLimitExceeded { max: i64 },
    #[error("balance {balance} is less than the {required} due")]
    InsufficientBalance { balance: Money, required: Money },
    #[error("product option {option_id} does not have the stock asked for")]
    OutOfStock { option_id: ProductOptionId },
    #[error("product {product_id} is not on sale")]
    ProductNotOnSale { product_id: ProductId },
    #[error("order {order_id} is {status} and cannot be paid")]
    OrderNotPayable { order_id: OrderId, status: OrderStatus },
    /// A lock or a retry budget ran out; the client may retry after `retry_after_secs`.
    #[error("could not get the stock lock in time")]
    LockTimeout { retry_after_secs: u32 },
    /// A lock held outside the database expired before the stock write: a newer holder has written, and the
    /// fence refused this one. The transaction rolls back; the client may retry.
    #[error("the stock lock of option {option_id} expired before the write")]
    StaleLock { option_id: ProductOptionId },
    /// An optimistic write lost a race; use cases retry it and never let it reach a client.
    #[error("a concurrent write changed the data first")]
    WriteConflict,
    #[error("the name {0} is taken")]
    UserNameTaken(String),
    /// A wrong name or a wrong password: the same answer, so that names cannot be probed.
    #[error("the name or the password is wrong")]
    InvalidCredentials,
    /// A token that is malformed, badly signed, expired, retired or revoked.
    #[error("the token is not valid")]
    InvalidToken,
    #[error("too many failed sign-ins; try again after {retry_after_secs} seconds")]
    TooManyAttempts { retry_after_secs: u32 },
    #[error("user {user_id} already holds as many unpaid orders or units as one user may")]
    PendingLimitExceeded { user_id: UserId },
    #[error("this Idempotency-Key was used with a different request")]
    IdempotencyKeyReused,
    #[error("the first request with this Idempotency-Key is still running")]
    IdempotencyKeyInUse,
    #[error("event {0} not found")]
    EventNotFound(String),
    #[error("event {0} has no dead-lettered delivery to retry")]
    EventNotFailed(String),
    /// A dependency is down or saturated (a database or Redis that does not answer, a pool or queue that is
    /// full): nothing was done, and the client may retry after `retry_after_secs`.
    #[error("service unavailable: {cause}")]
    Unavailable { cause: Box<dyn std::error::Error + Send + Sync>, retry_after_secs: u32 },
    #[error("unexpected failure: {0}")]
    Unexpected(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl DomainError {
    /// Wraps any infrastructure error as [`DomainError::Unexpected`].
    pub fn unexpected(cause: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Unexpected(cause.into())
    }

    /// A dependency that is down or saturated, or load shed: 503 with `Retry-After: 1`.
    pub fn unavailable(cause: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Unavailable { cause: cause.into(), retry_after_secs: 1 }
    }

    /// The same outcome again, for a failure that several requests share (a batch's lock timeout): every
    /// variant is copied, a cause as its message.
    #[must_use]
    pub fn replicate(&self) -> Self {
        match self {
            Self::Invalid(e) => Self::Invalid(e.clone()),
            Self::UserNotFound(id) => Self::UserNotFound(*id),
            Self::ProductNotFound(id) => Self::ProductNotFound(*id),
            Self::ProductOptionNotFound(id) => Self::ProductOptionNotFound(*id),
            Self::CartItemNotFound(id) => Self::CartItemNotFound(*id),
            Self::OrderNotFound(id) => Self::OrderNotFound(*id),
            Self::BalanceLimitExceeded { limit } => Self::BalanceLimitExceeded { limit: *limit },
            Self::CartQuantityLimitExceeded { max } => Self::CartQuantityLimitExceeded { max: *max },
            Self::InsufficientBalance { balance, required } => {
                Self::InsufficientBalance { balance: *balance, required: *required }
            }
            Self::OutOfStock { option_id } => Self::OutOfStock { option_id: *option_id },
            Self::ProductNotOnSale { product_id } => Self::ProductNotOnSale { product_id: *product_id },
            Self::OrderNotPayable { order_id, status } => {
                Self::OrderNotPayable { order_id: *order_id, status: *status }
            }
            Self::LockTimeout { retry_after_secs } => Self::LockTimeout { retry_after_secs: *retry_after_secs },
            Self::StaleLock { option_id } => Self::StaleLock { option_id: *option_id },
            Self::WriteConflict => Self::WriteConflict,
            Self::UserNameTaken(name) => Self::UserNameTaken(name.clone()),
            Self::InvalidCredentials => Self::InvalidCredentials,
            Self::InvalidToken => Self::InvalidToken,
            Self::TooManyAttempts { retry_after_secs } => Self::TooManyAttempts { retry_after_secs: *retry_after_secs },
            Self::PendingLimitExceeded { user_id } => Self::PendingLimitExceeded { user_id: *user_id },
            Self::IdempotencyKeyReused => Self::IdempotencyKeyReused,
            Self::IdempotencyKeyInUse => Self::IdempotencyKeyInUse,
            Self::EventNotFound(id) => Self::EventNotFound(id.clone()),
            Self::EventNotFailed(id) => Self::EventNotFailed(id.clone()),
            Self::Unavailable { cause, retry_after_secs } => {
                Self::Unavailable { cause: cause.to_string().into(), retry_after_secs: *retry_after_secs }
            }
            Self::Unexpected(cause) => Self::Unexpected(cause.to_string().into()),
        }
    }
}
