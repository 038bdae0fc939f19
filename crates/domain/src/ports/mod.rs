//! The ports: what the use cases need from the outside world, as traits that adapters implement.
//!
//! Every port is `Send + Sync` (a transaction only `Send`) and object safe, so the server can hold the adapter
//! chosen by configuration as `Arc<dyn Port>`. Each method's `# Errors` section names the variants an adapter
//! MUST return for expected outcomes; a dependency that is down or saturated is
//! [`DomainError::Unavailable`](crate::DomainError::Unavailable), anything else
//! [`DomainError::Unexpected`](crate::DomainError::Unexpected).
//!
//! - [`repositories`]: reads and single-statement writes outside a transaction, and the idempotency store.
//! - [`transaction`]: the unit of work and the roles of one transaction (cart, orders, payments, stock,
//!   idempotency), so that each caller is handed only what it may touch.
//! - [`auth`]: password hashing, tokens, sessions and the sign-in throttle.
//! - [`stock`]: the stock strategy port with the rows and permits it works with, and the stock mirror.
//! - [`outbox`]: the outbox of recorded events, the sinks, and the signal that wakes the relay.
//! - [`catalogue`]: what a cache of the catalogue hears after a commit changed it.
//! - here: the clock, readiness probes, and whether a client is still connected.

pub mod auth;
pub mod catalogue;
pub mod outbox;
pub mod repositories;
pub mod stock;
pub mod transaction;

use std::sync::Mutex;
use std::sync::PoisonError;

use async_trait::async_trait;
use chrono::{DateTime, SubsecRound, Utc};

use crate::error::DomainError;

pub use auth::{PasswordHasher, SessionStore, SignInThrottle, Tokens};
pub use catalogue::{CatalogueChanges, NoCatalogueReaders};
pub use outbox::{DeliveryClaim, EventSink, Outbox, OutboxClaim, OutboxSignal};
pub use repositories::{CartRepository, IdempotencyStore, OrderRepository, ProductRepository, UserRepository};
pub use stock::{
    Admission, FencedWrite, NoStockMirror, RetryPolicy, StockMirror, StockPermit, StockRow, StockStrategy, StockTake,
};
pub use transaction::{CartTx, IdempotencyTx, OrderTx, OutboxTx, PaymentTx, StockTx, Transaction, UnitOfWork};

#[cfg(any(test, feature = "mocks"))]
pub use auth::{MockPasswordHasher, MockSessionStore, MockSignInThrottle, MockTokens};
#[cfg(any(test, feature = "mocks"))]
pub use catalogue::MockCatalogueChanges;
#[cfg(any(test, feature = "mocks"))]
pub use outbox::{MockOutbox, MockOutboxSignal};
#[cfg(any(test, feature = "mocks"))]
pub use repositories::{
    MockCartRepository, MockIdempotencyStore, MockOrderRepository, MockProductRepository, MockUserRepository,
};
#[cfg(any(test, feature = "mocks"))]
pub use stock::MockStockMirror;
#[cfg(any(test, feature = "mocks"))]
pub use transaction::{MockStockTx, MockTransaction, MockUnitOfWork};

/// Time, injected so that expiry, leases and "today" can be tested without sleeping or ageing rows.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
pub trait Clock: Send + Sync {
    /// Sales days are UTC days: `now().date_naive()`. Microseconds at most, the precision PostgreSQL keeps, so an
    /// instant reads back as it was written (in a response, an event, or a later read).
    fn now(&self) -> DateTime<Utc>;
}

/// The wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now().trunc_subsecs(6)
    }
}

/// A clock that runs with the wall clock from an offset that tests move forward: "fifteen minutes later" without
/// waiting fifteen minutes, and without rewriting the rows' timestamps behind the application.
#[derive(Debug, Default)]
pub struct ShiftedClock {
    ahead: Mutex<chrono::Duration>,
}

impl ShiftedClock {
    /// Moves this clock `by` further ahead of the wall clock.
    pub fn advance(&self, by: std::time::Duration) {
        let mut ahead = self.ahead.lock().unwrap_or_else(PoisonError::into_inner);
        *ahead += chrono::Duration::from_std(by).unwrap_or(chrono::Duration::MAX);
    }
}

impl Clock for ShiftedClock {
    fn now(&self) -> DateTime<Utc> {
        (Utc::now() + *self.ahead.lock().unwrap_or_else(PoisonError::into_inner)).trunc_subsecs(6)
    }
}

/// A dependency that `/health/ready` asks.
#[async_trait]
pub trait Probe: Send + Sync {
    fn name(&self) -> &'static str;

    /// # Errors
    /// [`DomainError::Unavailable`] or [`DomainError::Unexpected`] when the dependency does not answer.
    async fn ping(&self) -> Result<(), DomainError>;
}

/// The connection of the client that asked for a use case: a request that waits in a queue checks it before its
/// batch commits, so that an order whose client has hung up is dropped rather than committed behind its back.
pub trait Connection: Send + Sync + std::fmt::Debug {
    /// Whether the client has closed the connection.
    fn is_closed(&self) -> bool;
}
