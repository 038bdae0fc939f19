//! `local`: an in-process async mutex per option, taken in ascending option order before the transaction and
//! held until it ends; inside, the conditional UPDATE still guards the row. Correct only while one instance
//! serves the database: the embedded mode.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::OwnedMutexGuard;
use tokio::time::Instant;

use crate::error::DomainError;
use crate::ids::ProductOptionId;
use crate::order::OrderLine;
use crate::ports::stock::union_of;
use crate::ports::{Admission, StockPermit, StockStrategy};

type LockMap = Mutex<HashMap<ProductOptionId, Arc<tokio::sync::Mutex<()>>>>;

/// One async FIFO mutex per option in this process, made on first use and dropped when its last holder and
/// waiter are gone (a catalogue of a million options must not leave a million mutexes behind): the `local`
/// strategy's locks, and the queue in front of each distributed lock.
#[derive(Debug, Default)]
pub struct OptionLocks {
    locks: Arc<LockMap>,
}

/// One option's turn: the lock is released, and its entry dropped when nobody else wants it, when this goes.
#[derive(Debug)]
pub struct OptionTurn {
    option: ProductOptionId,
    guard: Option<OwnedMutexGuard<()>>,
    locks: Arc<LockMap>,
}

impl Drop for OptionTurn {
    fn drop(&mut self) {
        drop(self.guard.take());
        forget_if_idle(&self.locks, self.option);
    }
}

/// Drops the option's entry if only the map still refers to it: nobody holds it and nobody waits (a waiter
/// holds a clone while it waits, and clones are only made under the map's lock).
fn forget_if_idle(locks: &LockMap, option: ProductOptionId) {
    let mut map = locks.lock().unwrap_or_else(PoisonError::into_inner);
    if map.get(&option).is_some_and(|lock| Arc::strong_count(lock) == 1) {
        map.remove(&option);
    }
}

impl OptionLocks {
    fn lock_of(&self, id: ProductOptionId) -> Arc<tokio::sync::Mutex<()>> {
        // The map lock is held only to look up or insert, never across an await.
        let mut locks = self.locks.lock().unwrap_or_else(PoisonError::into_inner);
        locks.entry(id).or_default().clone()
    }

    /// Takes the lock of every line's option, in the lines' (ascending) order so that two orders never hold each
    /// other's next lock; `None` when they could not all be had by `deadline` (those taken are released).
    pub async fn lock_all(&self, lines: &[OrderLine], deadline: Instant) -> Option<Vec<OptionTurn>> {
        let mut turns = Vec::with_capacity(lines.len());
        for line in lines {
            let option = line.option_id;
            let waited = tokio::time::timeout_at(deadline, self.lock_of(option).lock_owned()).await;
            match waited {
                Ok(guard) => turns.push(OptionTurn { option, guard: Some(guard), locks: self.locks.clone() }),
                Err(_) => {
                    // The timed-out wait dropped its clone: its entry may be idle now.
                    forget_if_idle(&self.locks, option);
                    return None;
                }
            }
        }
        Some(turns)
    }

    /// How many options have a lock entry now: for tests of the clean-up.
    #[must_use]
    pub fn entries(&self) -> usize {
        self.locks.lock().unwrap_or_else(PoisonError::into_inner).len()
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

    /// Takes the batch's options' locks, ascending; inside, the conditional write still guards each row.
    async fn admit(&self, orders: &[&[OrderLine]]) -> Result<Admission, DomainError> {
        let retry_after_secs = u32::try_from(self.wait.as_secs().max(1)).unwrap_or(u32::MAX);
        let guards = self
            .locks
            .lock_all(&union_of(orders), Instant::now() + self.wait)
            .await
            .ok_or(DomainError::LockTimeout { retry_after_secs })?;
        Ok(Admission::everyone(StockPermit::holding(guards), orders.len()))
    }

    fn locks_whole_transaction(&self) -> bool {
        true
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
        let held = stock.admit(&[&[line(1)], &[line(2)]]).await.unwrap();
        let err = stock.admit(&[&[line(2)]]).await.unwrap_err();
        assert!(matches!(err, DomainError::LockTimeout { retry_after_secs: 1 }));
        assert!(stock.admit(&[&[line(3)]]).await.is_ok(), "other options are not blocked");
        drop(held);
        assert!(stock.admit(&[&[line(2)]]).await.is_ok(), "released with the permit");
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
                    let _permit = stock.admit(&[&[line(1)]]).await.unwrap();
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

    #[tokio::test(start_paused = true)]
    async fn idle_options_leave_no_lock_entry_behind() {
        let locks = OptionLocks::default();
        let held = locks.lock_all(&[line(1), line(2)], Instant::now() + Duration::from_secs(1)).await.unwrap();
        assert_eq!(locks.entries(), 2);
        assert!(locks.lock_all(&[line(2)], Instant::now() + Duration::from_millis(10)).await.is_none());
        assert_eq!(locks.entries(), 2, "option 2 is still held");
        drop(held);
        assert_eq!(locks.entries(), 0, "released and nobody waiting: forgotten");
        for n in 0..1_000 {
            drop(locks.lock_all(&[line(n + 1)], Instant::now() + Duration::from_secs(1)).await.unwrap());
        }
        assert_eq!(locks.entries(), 0);
    }
}
