//! `redis-spin`: a lock on one node whose waiters poll, on one connection per lock client.
//!
//! Racing (the default): SET NX, retried after a short jittered sleep until the deadline. The simplest lock and
//! the least fair: a waiter only notices a release at its next poll, so under contention the lock goes to whoever
//! asks right after the release, which is usually the releaser itself.
//!
//! Fair ([`LockOptions::FAIR`]): waiters queue in Redis and a release hands the lock to the head of the queue (the
//! fair queue in `scripts`), but nobody is told: each waiter polls, closer together the nearer it is to the head,
//! and accepts the lock once it finds it handed over. Fair without a subscriber connection; a handover costs the
//! head's polling delay (about a millisecond) on top of the round trips.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rand::Rng;
use tokio::time::Instant;

use crate::lock::{self, DistributedLock, Lease, LockError, LockGuard, LockOptions};
use crate::node::{self, SingleNode, Wake};
use crate::probe::RedisProbe;
use crate::scripts::{self, Attempt, FairTiming, QueueKeys};

/// Polling bounds: short enough that a released lock is picked up within a few ms, jittered so that waiters do
/// not poll in lock-step. Deliberately not the holder's TTL: a holder usually releases long before its lease.
const POLL_MIN_MS: u64 = 1;
const POLL_MAX_MS: u64 = 5;

/// A lock on one Redis server that polls while held by someone else.
#[derive(Debug, Clone)]
pub struct SpinLock {
    node: Arc<SingleNode>,
    lease: Duration,
}

impl SpinLock {
    /// Connects to `url` (`redis://host:port/db`). `lease` is how long a holder that died keeps the lock; a live
    /// holder's watchdog renews it.
    ///
    /// # Errors
    /// [`LockError::Redis`] when the server cannot be reached; [`LockError::Config`] for a lease under 30 ms.
    pub async fn connect(url: &str, lease: Duration) -> Result<Self, LockError> {
        Self::connect_with(url, lease, LockOptions::RACING).await
    }

    /// Connects as [`SpinLock::connect`] does, racing or fair as `options` say.
    ///
    /// # Errors
    /// As [`SpinLock::connect`].
    pub async fn connect_with(url: &str, lease: Duration, options: LockOptions) -> Result<Self, LockError> {
        lock::check_lease(lease)?;
        let client = node::connect(url, node::command_timeout(lease)).await?;
        let fair = options.fair.then(|| FairTiming::for_lease(lease));
        Ok(Self { node: Arc::new(SingleNode { client, fair }), lease })
    }

    /// Whether waiters queue ([`LockOptions::FAIR`]).
    #[must_use]
    pub fn is_fair(&self) -> bool {
        self.node.fair.is_some()
    }

    /// A readiness probe sharing this lock's connection.
    #[must_use]
    pub fn probe(&self) -> RedisProbe {
        RedisProbe::new(vec![self.node.client.clone()])
    }

    /// Runs the unlock script with `token` as if its owner released: a no-op unless `token` owns the lock.
    /// Whether it deleted the lock. For tests of foreign unlocks.
    ///
    /// # Errors
    /// [`LockError::Redis`].
    #[doc(hidden)]
    pub async fn force_unlock_as(&self, key: &str, token: &str) -> Result<bool, LockError> {
        self.node.release(key, token).await
    }

    /// How many waiters are queued for `key` in Redis (fair mode; live or not yet found dead), for tests.
    ///
    /// # Errors
    /// [`LockError::Redis`].
    #[doc(hidden)]
    pub async fn queued(&self, key: &str) -> Result<usize, LockError> {
        scripts::queue_len(&self.node.client, &QueueKeys::of(key)).await
    }
}

#[async_trait]
impl DistributedLock for SpinLock {
    async fn lock(&self, key: &str, deadline: Instant) -> Result<LockGuard, LockError> {
        let token = lock::new_token();
        if let Some(timing) = &self.node.fair {
            let keys = QueueKeys::of(key);
            let fence =
                node::wait_in_queue(&self.node.client, &keys, &token, self.lease, timing, Wake::Poll, deadline).await?;
            let lease: Arc<dyn Lease> = self.node.clone();
            return Ok(LockGuard::new(key, token, fence, self.lease, lease));
        }
        loop {
            let attempt = match scripts::acquire(&self.node.client, key, &token, self.lease).await {
                Ok(attempt) => attempt,
                Err(e) => {
                    // The script may have run with its answer lost (a cut connection): undo it once Redis answers,
                    // rather than leave every contender waiting out the lease. The token is never tried again.
                    let lease: Arc<dyn Lease> = self.node.clone();
                    tokio::spawn(lock::retry_release(lease, key.to_owned(), token, Instant::now() + self.lease));
                    return Err(e);
                }
            };
            match attempt {
                Attempt::Granted { fence } => {
                    let lease: Arc<dyn Lease> = self.node.clone();
                    return Ok(LockGuard::new(key, token, fence, self.lease, lease));
                }
                Attempt::Held { .. } => {
                    let left = lock::remaining(deadline);
                    if left.is_zero() {
                        return Err(LockError::Timeout);
                    }
                    let pause = Duration::from_millis(rand::rng().random_range(POLL_MIN_MS..=POLL_MAX_MS));
                    tokio::time::sleep(pause.min(left)).await;
                }
            }
        }
    }

    fn name(&self) -> &'static str {
        "redis-spin"
    }
}
