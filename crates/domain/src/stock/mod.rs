//! How order creation protects stock: a port with one named implementation per strategy.
//!
//! Every strategy takes stock *last* in the order's transaction and in ascending option-id order (the order of
//! [`crate::order::OrderRequest::lines`]), so row locks are held for as little time as possible and two orders
//! never wait on each other in a cycle. A strategy may also take something *before* the transaction begins (an
//! in-process or distributed lock), held by the returned [`StockPermit`] until the transaction has ended.
//!
//! - [`conditional`]: `UPDATE ... WHERE stock >= n`; no lock at all (the default).
//! - [`pessimistic`]: row locks (`SELECT ... FOR NO KEY UPDATE`), then write.
//! - [`optimistic`]: compare-and-set on the version; the whole transaction is retried on conflict.
//! - [`local`]: an in-process mutex per option around the transaction (single instance only).

pub mod conditional;
pub mod local;
pub mod optimistic;
pub mod pessimistic;

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rand::Rng;

use crate::error::DomainError;
use crate::order::OrderLine;
use crate::ports::Transaction;

pub use conditional::ConditionalStock;
pub use local::LocalLockStock;
pub use optimistic::OptimisticStock;
pub use pessimistic::PessimisticStock;

/// Whatever a strategy holds from before the transaction until after it (a lock guard); dropping it releases.
#[derive(Default)]
pub struct StockPermit(Option<Box<dyn Send + Sync>>);

impl StockPermit {
    #[must_use]
    pub fn none() -> Self {
        Self(None)
    }

    pub fn holding(guard: impl Send + Sync + 'static) -> Self {
        Self(Some(Box::new(guard)))
    }
}

impl std::fmt::Debug for StockPermit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "StockPermit(held)" } else { "StockPermit(none)" })
    }
}

/// How often and how patiently a transaction is retried after a [`DomainError::WriteConflict`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub max_retries: u32,
    pub base: Duration,
    pub cap: Duration,
}

impl RetryPolicy {
    /// No retries: a conflict is an error.
    pub const NONE: Self = Self { max_retries: 0, base: Duration::ZERO, cap: Duration::ZERO };

    /// Full-jitter exponential backoff: uniform in `0..=min(cap, base * 2^attempt)`. The jitter spreads the
    /// losers of one race over time so that they do not collide again on the next try.
    #[must_use]
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.base.saturating_mul(2u32.saturating_pow(attempt.min(20))).min(self.cap);
        let micros = u64::try_from(ceiling.as_micros()).unwrap_or(u64::MAX);
        Duration::from_micros(rand::rng().random_range(0..=micros))
    }
}

/// A way of taking stock for an order.
#[async_trait]
pub trait StockStrategy: Send + Sync {
    /// The name configuration selects it by (`SHOP_STOCK_STRATEGY`).
    fn name(&self) -> &'static str;

    /// Runs before the order's transaction begins; the permit is dropped after it ended.
    ///
    /// # Errors
    /// [`DomainError::LockTimeout`] when a lock could not be had in the configured wait.
    async fn acquire(&self, lines: &[OrderLine]) -> Result<StockPermit, DomainError> {
        let _ = lines;
        Ok(StockPermit::none())
    }

    /// Takes the stock of every line inside `tx`, lines ascending by option id.
    ///
    /// # Errors
    /// [`DomainError::OutOfStock`] naming the first short option (the caller rolls back);
    /// [`DomainError::WriteConflict`] when an optimistic write lost a race (the caller retries per
    /// [`StockStrategy::retry_policy`]).
    async fn take(&self, tx: &mut dyn Transaction, lines: &[OrderLine], now: DateTime<Utc>) -> Result<(), DomainError>;

    /// How the whole order transaction is retried on [`DomainError::WriteConflict`].
    fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy::NONE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_jittered_below_an_exponential_ceiling() {
        let p = RetryPolicy { max_retries: 50, base: Duration::from_millis(2), cap: Duration::from_millis(50) };
        for attempt in 0..60 {
            let d = p.delay(attempt);
            let ceiling = Duration::from_millis(2 * 2u64.pow(attempt.min(20))).min(Duration::from_millis(50));
            assert!(d <= ceiling, "attempt {attempt}: {d:?} > {ceiling:?}");
        }
        let spread: std::collections::HashSet<_> = (0..50).map(|_| p.delay(10)).collect();
        assert!(spread.len() > 10, "delays are jittered, not fixed");
    }
}
