//! `local`: an in-process async mutex per option, taken in ascending option order before the transaction and
//! held until it ends; inside, the conditional UPDATE still guards the row. Correct only while one instance
//! serves the database: the embedded mode.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::OwnedMutexGuard;
use tokio::time::Instant;

use super::{ConditionalStock, StockPermit, StockStrategy};
use crate::error::DomainError;
use crate::ids::ProductOptionId;
use crate::order::OrderLine;
use crate::ports::Transaction;

/// One async FIFO mutex per option in this process, made on first use: the `local` strategy's locks, and the
/// queue in front of each distributed lock.
#[derive(Debug, Default)]
pub struct OptionLocks {
    locks: Mutex<HashMap<ProductOptionId, Arc<tokio::sync::Mutex<()>>>>,
}

impl OptionLocks {
    fn lock_of(&self, id: ProductOptionId) -> Arc<tokio::sync::Mutex<()>> {
        // The map lock is held only to look up or insert, never across an await.
        let mut locks = self.locks.lock().unwrap_or_else(PoisonError::into_inner);
        locks.entry(id).or_default().clone()
    }

    /// Takes the lock of every line's option, in the lines' (ascending) order so that two orders never hold each
    /// other's next lock; `None` when they could not all be had by `deadline` (those taken are released).
    pub async fn lock_all(&self, lines: &[OrderLine], deadline: Instant) -> Option<Vec<OwnedMutexGuard<()>>> {
        let mut guards = Vec::with_capacity(lines.len());
        for line in lines {
            guards.push(tokio::time::timeout_at(deadline, self.lock_of(line.option_id).lock_owned()).await.ok()?);
        }
        Some(guards)
    }
}

#[derive(Debug)]
pub struct LocalLockStock {
    locks: OptionLocks,
    wait: Duration,
}

impl LocalLockStock {
    /// `wait` bounds how long an order waits for its locks before answering `LOCK_TIMEOUT`.
    #[must_use]
    pub fn new(wait: Duration) -> Self {
        Self { locks: OptionLocks::default(), wait }
    }
}

#[async_trait]
impl StockStrategy for LocalLockStock {
    fn name(&self) -> &'static str {
        "local"
    }

    async fn acquire(&self, lines: &[OrderLine]) -> Result<StockPermit, DomainError> {
        let retry_after_secs = u32::try_from(self.wait.as_secs().max(1)).unwrap_or(u32::MAX);
        let guards = self
            .locks
            .lock_all(lines, Instant::now() + self.wait)
            .await
            .ok_or(DomainError::LockTimeout { retry_after_secs })?;
        Ok(StockPermit::holding(guards))
    }

    async fn take(
        &self,
        tx: &mut dyn Transaction,
        lines: &[OrderLine],
        _permit: &StockPermit,
        now: DateTime<Utc>,
    ) -> Result<(), DomainError> {
        ConditionalStock.take(tx, lines, _permit, now).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money::Quantity;

    fn line(id: i64) -> OrderLine {
        OrderLine { option_id: ProductOptionId::new(id).unwrap(), quantity: Quantity::new(1).unwrap() }
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_option_makes_the_next_order_wait_then_time_out() {
        let stock = LocalLockStock::new(Duration::from_millis(500));
        let held = stock.acquire(&[line(1), line(2)]).await.unwrap();
        let err = stock.acquire(&[line(2)]).await.unwrap_err();
        assert!(matches!(err, DomainError::LockTimeout { retry_after_secs: 1 }));
        assert!(stock.acquire(&[line(3)]).await.is_ok(), "other options are not blocked");
        drop(held);
        assert!(stock.acquire(&[line(2)]).await.is_ok(), "released with the permit");
    }

    #[tokio::test]
    async fn hundreds_of_tasks_hold_the_lock_one_at_a_time() {
        let stock = Arc::new(LocalLockStock::new(Duration::from_secs(30)));
        let inside = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let barrier = Arc::new(tokio::sync::Barrier::new(300));
        let tasks: Vec<_> = (0..300)
            .map(|_| {
                let (stock, inside, barrier) = (stock.clone(), inside.clone(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    let _permit = stock.acquire(&[line(1)]).await.unwrap();
                    let before = inside.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    tokio::task::yield_now().await;
                    inside.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                    before
                })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap(), 0, "nobody else was inside");
        }
    }
}
