//! `local`: an in-process async mutex per option, taken in ascending option order before the transaction and
//! held until it ends; inside, the conditional UPDATE still guards the row. Correct only while one instance
//! serves the database: the embedded mode.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::OwnedMutexGuard;

use super::{ConditionalStock, StockPermit, StockStrategy};
use crate::error::DomainError;
use crate::ids::ProductOptionId;
use crate::order::OrderLine;
use crate::ports::Transaction;

#[derive(Debug)]
pub struct LocalLockStock {
    locks: Mutex<HashMap<ProductOptionId, Arc<tokio::sync::Mutex<()>>>>,
    wait: Duration,
}

impl LocalLockStock {
    /// `wait` bounds how long an order waits for its locks before answering `LOCK_TIMEOUT`.
    #[must_use]
    pub fn new(wait: Duration) -> Self {
        Self { locks: Mutex::new(HashMap::new()), wait }
    }

    fn lock_of(&self, id: ProductOptionId) -> Arc<tokio::sync::Mutex<()>> {
        // The map lock is held only to look up or insert, never across an await.
        let mut locks = self.locks.lock().unwrap_or_else(PoisonError::into_inner);
        locks.entry(id).or_default().clone()
    }
}

#[async_trait]
impl StockStrategy for LocalLockStock {
    fn name(&self) -> &'static str {
        "local"
    }

    async fn acquire(&self, lines: &[OrderLine]) -> Result<StockPermit, DomainError> {
        let mut guards: Vec<OwnedMutexGuard<()>> = Vec::with_capacity(lines.len());
        let acquire_all = async {
            // Ascending order (the lines are sorted) so that two orders never hold each other's next lock.
            for line in lines {
                guards.push(self.lock_of(line.option_id).lock_owned().await);
            }
        };
        let retry_after_secs = u32::try_from(self.wait.as_secs().max(1)).unwrap_or(u32::MAX);
        tokio::time::timeout(self.wait, acquire_all)
            .await
            .map_err(|_| DomainError::LockTimeout { retry_after_secs })?;
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
