//! The domain's [`StockStrategy`] on a [`DistributedLock`]: one Redis lock per ordered option, held from before
//! the order's transaction until after it, with each lock's fencing token carried into the stock write.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use shop_domain::DomainError;
use shop_domain::order::OrderLine;
use shop_domain::ports::stock::union_of;
use shop_domain::ports::{Admission, FencedWrite, StockPermit, StockStrategy, StockTake, StockTx};
use shop_domain::stock::{OptionLocks, OptionTurn};
use tokio::time::Instant;

use crate::lock::{DistributedLock, LockError, LockGuard};

/// The Redis key of an option's stock lock, under `prefix` (`SHOP_REDIS_KEY_PREFIX`): deployments that share one
/// Redis, and tests running side by side, each keep their own locks and fence counters.
#[must_use]
pub fn option_lock_key(prefix: &str, option_id: shop_domain::ids::ProductOptionId) -> String {
    format!("{prefix}:lock:option:{option_id}")
}

/// Takes stock under a distributed lock per option; the row write is fenced, so a holder whose lease ran out
/// while it was paused cannot overwrite a newer holder's write.
#[derive(Debug)]
pub struct RedisLockStock<L: DistributedLock> {
    lock: L,
    wait: Duration,
    name: &'static str,
    prefix: String,
    /// One FIFO queue per option in this process: of all the requests of one instance that want an option, only
    /// the head contends in Redis; the rest wait here without polling, and are handed the turn in order. Mutual
    /// exclusion across instances is still the Redis lock's alone.
    local: OptionLocks,
}

/// What an order holds: its Redis locks, and this instance's queue turns for the same options.
struct HeldLocks {
    redis: Vec<LockGuard>,
    local: Vec<OptionTurn>,
}

impl Drop for HeldLocks {
    fn drop(&mut self) {
        let (mut redis, local) = (std::mem::take(&mut self.redis), std::mem::take(&mut self.local));
        // Release in Redis first and only then pass the local turn on, so the next waiter of this instance does
        // not find the lock still held and fall back to polling.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                release_all(&mut redis).await;
                drop(local);
            });
        }
    }
}

impl<L: DistributedLock> RedisLockStock<L> {
    /// `wait` bounds how long an order waits for all its locks together before answering `LOCK_TIMEOUT`; keys
    /// live under `prefix`.
    pub fn new(lock: L, wait: Duration, prefix: impl Into<String>) -> Self {
        let name = lock.name();
        Self { lock, wait, name, prefix: prefix.into(), local: OptionLocks::default() }
    }
}

/// Releases every guard; a failure is logged, and the lock then expires with its lease.
async fn release_all(guards: &mut [LockGuard]) {
    for guard in guards.iter_mut().rev() {
        if let Err(e) = guard.release().await {
            tracing::warn!(key = guard.key(), error = %e, "releasing a stock lock failed");
        }
    }
}

#[async_trait]
impl<L: DistributedLock> StockStrategy for RedisLockStock<L> {
    fn name(&self) -> &'static str {
        self.name
    }

    /// So a third batch in flight would only queue for the locks (with 4, `redis-pubsub` one by one was 15%
    /// slower than with 2).
    fn locks_whole_transaction(&self) -> bool {
        true
    }

    /// Takes the batch's options' locks, each with its fencing token, which the port's default write carries
    /// into the stock row.
    ///
    /// # Errors
    /// [`DomainError::LockTimeout`] when the locks could not all be had within the wait; [`DomainError::Unexpected`]
    /// when Redis failed.
    async fn admit(&self, orders: &[&[OrderLine]]) -> Result<Admission, DomainError> {
        let lines = union_of(orders);
        // One deadline for all the locks, so that an order with many lines waits no longer than one with one.
        let deadline = Instant::now() + self.wait;
        // This instance's turns first, then the Redis locks, each in ascending option order: every batch takes
        // them in that one order, so no two ever hold each other's next lock.
        let local =
            self.local.lock_all(&lines, deadline).await.ok_or(DomainError::LockTimeout { retry_after_secs: 1 })?;
        let mut held = HeldLocks { redis: Vec::with_capacity(lines.len()), local };
        let mut fences = BTreeMap::new();
        for line in &lines {
            match self.lock.lock(&option_lock_key(&self.prefix, line.option_id), deadline).await {
                Ok(guard) => {
                    fences.insert(line.option_id, guard.fence());
                    held.redis.push(guard);
                }
                // Dropping `held` releases what this batch took, so it keeps nobody out while it gives up.
                Err(LockError::Timeout) => return Err(DomainError::LockTimeout { retry_after_secs: 1 }),
                // Redis down or without a quorum: a dependency, not a bug.
                Err(other) => return Err(DomainError::unavailable(other)),
            }
        }
        Ok(Admission::everyone(StockPermit::fenced(held, fences), orders.len()))
    }

    /// The conditional decrement with each option's fence, as the port's default, except when the row refuses a
    /// fence because Redis lost its counter (a restart without persistence, a FLUSHALL: the counter starts over
    /// below the row's last fence). Then the counter is raised past the row's value and a new fence taken for
    /// the held lock (only while it is still held: see [`LockGuard::refence`]), and the write tried again at
    /// once; without that, every order of the option would be refused until enough grants pushed the counter
    /// past the row on their own. A holder whose lock has really passed on cannot refence, and stays refused.
    async fn take(
        &self,
        tx: &mut dyn StockTx,
        takes: &[StockTake],
        permit: &StockPermit,
        now: DateTime<Utc>,
    ) -> Result<(), DomainError> {
        for take in takes {
            let option = take.row.option_id;
            let mut fence = permit.fence(option)?;
            let mut refenced = false;
            loop {
                match tx.decrement_stock(option, take.units, fence, now).await? {
                    FencedWrite::Written => break,
                    FencedWrite::OutOfStock => return Err(DomainError::WriteConflict),
                    FencedWrite::Fenced { newest } if !refenced => {
                        let key = option_lock_key(&self.prefix, option);
                        let guard = permit
                            .guard::<HeldLocks>()
                            .and_then(|held| held.redis.iter().find(|g| g.key() == key))
                            .ok_or(DomainError::StaleLock { option_id: option })?;
                        match guard.refence(newest).await {
                            Ok(repaired) => {
                                tracing::warn!(
                                    %key, stale = ?fence, row = newest, repaired,
                                    "the fence counter was behind its stock row (Redis lost it); raised it"
                                );
                                fence = Some(repaired);
                                refenced = true;
                            }
                            Err(LockError::Timeout) => return Err(DomainError::StaleLock { option_id: option }),
                            Err(e) => return Err(DomainError::unavailable(e)),
                        }
                    }
                    FencedWrite::Fenced { .. } => return Err(DomainError::StaleLock { option_id: option }),
                }
            }
        }
        Ok(())
    }
}
