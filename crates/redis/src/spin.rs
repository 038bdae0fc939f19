//! `redis-spin`: SET NX on one node, retried after a short jittered sleep until the deadline.
//!
//! The simplest lock and the least fair: a waiter only notices a release at its next poll, so under contention
//! the lock tends to go to whoever polls right after the release rather than to the longest waiter.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rand::Rng;
use tokio::time::Instant;

use crate::lock::{self, DistributedLock, Lease, LockError, LockGuard};
use crate::node::{self, SingleNode};
use crate::probe::RedisProbe;
use crate::scripts::{self, Attempt};

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
        lock::check_lease(lease)?;
        let client = node::connect(url, node::command_timeout(lease)).await?;
        Ok(Self { node: Arc::new(SingleNode { client }), lease })
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
        scripts::unlock(&self.node.client, key, token).await
    }
}

#[async_trait]
impl DistributedLock for SpinLock {
    async fn lock(&self, key: &str, deadline: Instant) -> Result<LockGuard, LockError> {
        let token = lock::new_token();
        loop {
            match scripts::acquire(&self.node.client, key, &token, self.lease).await? {
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
