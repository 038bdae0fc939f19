//! What every lock shares: the [`DistributedLock`] port, its error, the [`LockOptions`] a lock is connected with,
//! and the [`LockGuard`] that renews and releases a held lock.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rand::Rng;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Why a lock was not had.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Someone else held the lock until the deadline.
    #[error("the lock was held by someone else until the deadline")]
    Timeout,
    /// Fewer than a majority of the Redlock nodes answered, so no lock can be granted (nodes are down).
    #[error("only {answered} of {nodes} Redis nodes answered; a lock needs {needed}")]
    NoQuorum { answered: usize, needed: usize, nodes: usize },
    /// Redis failed (unreachable, timed out, refused the command).
    #[error("redis: {0}")]
    Redis(#[from] fred::error::Error),
    /// A Redlock node was not connected (it is being reconnected in the background).
    #[error("the redis node is not connected")]
    Disconnected,
    /// Redis answered something the scripts never return (a bug, or a foreign value under the key).
    #[error("unexpected reply from redis: {0}")]
    Protocol(String),
    /// The lock was configured with values it cannot work with.
    #[error("invalid lock configuration: {0}")]
    Config(String),
}

/// How a lock is connected: for now, whether its waiters queue (`fair`) or race.
///
/// Racing waiters try again on their own schedule (a poll, a release message to every instance, a backoff), so
/// under contention the releaser, which asks again at once, usually wins its own lock back and the others starve.
/// Fair waiters queue in Redis, and a release hands the lock to the longest live waiter and wakes only it: nearly
/// every grant changes holder, at the cost of one more round trip per handover (the new holder's acceptance).
/// Mutual exclusion, owner tokens, the watchdog and fences are the same either way.
///
/// `SpinLock::connect` and `Redlock::connect` race and `PubSubLock::connect` is fair; `connect_with` takes these
/// options instead, so one setting can choose for all three.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LockOptions {
    /// Queue the waiters in Redis and hand each release to the longest live waiter.
    pub fair: bool,
}

impl LockOptions {
    /// Waiters queue, and a release hands the lock to the head of the queue.
    pub const FAIR: Self = Self { fair: true };
    /// Waiters race for a released lock.
    pub const RACING: Self = Self { fair: false };
}

/// A mutual-exclusion lock shared by every instance of the service.
#[async_trait]
pub trait DistributedLock: Send + Sync {
    /// Takes the lock on `key`, waiting until `deadline` at the latest. The lock is held until the guard is
    /// released or dropped; meanwhile a watchdog renews its lease, so the lease only bounds how long a holder
    /// that died keeps others out.
    ///
    /// # Errors
    /// [`LockError::Timeout`] when someone else held it until the deadline; [`LockError::NoQuorum`] or
    /// [`LockError::Redis`] when Redis could not be asked.
    async fn lock(&self, key: &str, deadline: Instant) -> Result<LockGuard, LockError>;

    /// The name configuration selects this lock by (`redis-spin`, `redis-redlock`, `redis-pubsub`).
    fn name(&self) -> &'static str;
}

#[async_trait]
impl<L: DistributedLock + ?Sized> DistributedLock for Arc<L> {
    async fn lock(&self, key: &str, deadline: Instant) -> Result<LockGuard, LockError> {
        (**self).lock(key, deadline).await
    }

    fn name(&self) -> &'static str {
        (**self).name()
    }
}

/// How a guard renews and releases its lock: one implementation per topology (one node, or Redlock's nodes).
#[async_trait]
pub(crate) trait Lease: Send + Sync + 'static {
    /// Renews the lease: `Ok(false)` when the token no longer owns the lock.
    async fn extend(&self, key: &str, token: &str, lease: Duration) -> Result<bool, LockError>;

    /// Deletes the lock if the token still owns it and announces the release: whether it did.
    async fn release(&self, key: &str, token: &str) -> Result<bool, LockError>;

    /// A new fence above `floor` for the token's lock (the counter fell behind a stock row: Redis lost it);
    /// `None` when the token no longer owns the lock.
    async fn refence(&self, key: &str, token: &str, floor: u64) -> Result<Option<u64>, LockError>;
}

/// A random 128-bit owner token: only the holder knows it, so only the holder's unlock or extend matches.
pub(crate) fn new_token() -> String {
    format!("{:032x}", rand::rng().random::<u128>())
}

/// A held lock. Released by [`LockGuard::release`] or, failing that, when dropped (the release is then spawned
/// on the current tokio runtime; without one, the lease runs out instead).
pub struct LockGuard {
    key: String,
    token: String,
    fence: u64,
    /// `None` once released or abandoned: makes release idempotent.
    lease: Option<Arc<dyn Lease>>,
    /// How long the lock lives without renewal: an unlock that failed is retried for that long.
    ttl: Duration,
    watchdog: Option<JoinHandle<()>>,
}

impl LockGuard {
    /// A guard for a lock just granted, with a watchdog renewing it every `lease / 3`: a third leaves two
    /// renewals' worth of slack, so one slow or failed renewal does not let the lock expire under its holder.
    pub(crate) fn new(key: &str, token: String, fence: u64, lease: Duration, backend: Arc<dyn Lease>) -> Self {
        let watchdog = tokio::spawn(watchdog(backend.clone(), key.to_owned(), token.clone(), lease));
        Self { key: key.to_owned(), token, fence, lease: Some(backend), ttl: lease, watchdog: Some(watchdog) }
    }

    #[must_use]
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The random owner token the lock is stored with.
    #[must_use]
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The fencing token: strictly greater than that of every earlier holder of this key, so a store can refuse a
    /// write from a holder whose lock expired meanwhile.
    #[must_use]
    pub fn fence(&self) -> u64 {
        self.fence
    }

    /// A fence above `floor` for this held lock, when a stock row refused this guard's fence because the
    /// counter in Redis fell behind the row's last fence (Redis lost it: a restart without persistence, a
    /// FLUSHALL). The counter is raised past the row's value and the next fence taken in one script, only while
    /// this guard still owns the lock. That keeps a paused former holder unable to write: whatever fence it was
    /// granted, the row refuses any fence below the last it accepted, and the new fence is above that.
    ///
    /// # Errors
    /// [`LockError::Timeout`] when the lock is no longer this guard's (its lease ran out); [`LockError::Redis`].
    pub async fn refence(&self, floor: u64) -> Result<u64, LockError> {
        let lease = self.lease.as_ref().ok_or(LockError::Timeout)?;
        lease.refence(&self.key, &self.token, floor).await?.ok_or(LockError::Timeout)
    }

    /// Stops renewing and deletes the lock if this guard still owns it. Idempotent: later calls (and the drop)
    /// do nothing.
    ///
    /// # Errors
    /// [`LockError::Redis`] when the unlock could not be sent; it is then retried in the background until it
    /// succeeds or the lease would have run out (see [`retry_release`]).
    pub async fn release(&mut self) -> Result<(), LockError> {
        self.stop_watchdog();
        let Some(backend) = self.lease.take() else { return Ok(()) };
        match backend.release(&self.key, &self.token).await {
            Ok(true) => Ok(()),
            Ok(false) => {
                tracing::warn!(key = %self.key, "lock was no longer ours at release: its lease had expired");
                Ok(())
            }
            Err(e) => {
                let (key, token) = (self.key.clone(), self.token.clone());
                tokio::spawn(retry_release(backend, key, token, Instant::now() + self.ttl));
                Err(e)
            }
        }
    }

    /// Stops renewing and forgets the lock without releasing it, as a holder that crashed would: it stays locked
    /// until its lease runs out. For tests of that failure.
    #[doc(hidden)]
    pub fn abandon(mut self) {
        self.stop_watchdog();
        self.lease = None;
    }

    fn stop_watchdog(&mut self) {
        if let Some(watchdog) = self.watchdog.take() {
            // An extend cut short is harmless: the scripts compare the token, so a late one cannot touch a lock
            // that was released or passed on.
            watchdog.abort();
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        self.stop_watchdog();
        let Some(backend) = self.lease.take() else { return };
        let (key, token) = (std::mem::take(&mut self.key), std::mem::take(&mut self.token));
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let give_up = Instant::now() + self.ttl;
                runtime.spawn(async move {
                    if backend.release(&key, &token).await.is_err() {
                        retry_release(backend, key, token, give_up).await;
                    }
                });
            }
            Err(_) => tracing::warn!(%key, "lock dropped outside a tokio runtime; it expires with its lease"),
        }
    }
}

impl fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The token is left out: whoever knows it can unlock.
        f.debug_struct("LockGuard")
            .field("key", &self.key)
            .field("fence", &self.fence)
            .field("held", &self.lease.is_some())
            .finish_non_exhaustive()
    }
}

/// Retries an unlock that failed (Redis unreachable for a moment: a restart, a cut connection) until it goes
/// through or `give_up` (when the lease, no longer renewed, runs out anyway). Without it, every order of the
/// option would wait out the whole lease after Redis came back; with it, the lock is free as soon as the client
/// has reconnected. Only the token's owner can unlock, so a late retry cannot free someone else's lock.
pub(crate) async fn retry_release(backend: Arc<dyn Lease>, key: String, token: String, give_up: Instant) {
    const EVERY: Duration = Duration::from_millis(100);
    while Instant::now() + EVERY < give_up {
        tokio::time::sleep(EVERY).await;
        if backend.release(&key, &token).await.is_ok() {
            tracing::info!(%key, "released a lock once Redis answered again");
            return;
        }
    }
    tracing::warn!(%key, "releasing a lock kept failing; it expires with its lease");
}

async fn watchdog(backend: Arc<dyn Lease>, key: String, token: String, lease: Duration) {
    let period = lease / 3;
    loop {
        tokio::time::sleep(period).await;
        match backend.extend(&key, &token, lease).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(%key, "lock lost while held (lease expired or taken over); no longer renewing it");
                return;
            }
            // A failed renewal is retried at the next period; if Redis stays away the lease runs out and the
            // next renewal answers `false`.
            Err(e) => tracing::warn!(%key, error = %e, "renewing a held lock failed"),
        }
    }
}

/// Time left until `deadline`, zero when it has passed.
pub(crate) fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// Refuses a lease the watchdog could not renew in time.
pub(crate) fn check_lease(lease: Duration) -> Result<(), LockError> {
    if lease < Duration::from_millis(30) {
        return Err(LockError::Config(format!("lease {lease:?} is shorter than 30ms")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use super::*;

    /// A lease that counts what the guard asks of it.
    struct Recorder {
        owned: AtomicBool,
        extends: AtomicUsize,
        releases: AtomicUsize,
    }

    impl Recorder {
        fn new(owned: bool) -> Arc<Self> {
            Arc::new(Self {
                owned: AtomicBool::new(owned),
                extends: AtomicUsize::new(0),
                releases: AtomicUsize::new(0),
            })
        }

        fn counts(&self) -> (usize, usize) {
            (self.extends.load(Ordering::SeqCst), self.releases.load(Ordering::SeqCst))
        }
    }

    #[async_trait]
    impl Lease for Recorder {
        async fn extend(&self, _: &str, _: &str, _: Duration) -> Result<bool, LockError> {
            self.extends.fetch_add(1, Ordering::SeqCst);
            Ok(self.owned.load(Ordering::SeqCst))
        }

        async fn release(&self, _: &str, _: &str) -> Result<bool, LockError> {
            self.releases.fetch_add(1, Ordering::SeqCst);
            Ok(true)
        }

        async fn refence(&self, _: &str, _: &str, floor: u64) -> Result<Option<u64>, LockError> {
            Ok(self.owned.load(Ordering::SeqCst).then_some(floor + 1))
        }
    }

    fn guard(lease: &Arc<Recorder>) -> LockGuard {
        LockGuard::new("k", new_token(), 7, Duration::from_secs(3), lease.clone())
    }

    #[tokio::test(start_paused = true)]
    async fn the_watchdog_renews_every_third_of_the_lease_until_released_once() {
        let lease = Recorder::new(true);
        let mut held = guard(&lease);
        tokio::time::sleep(Duration::from_millis(3_500)).await;
        assert_eq!(lease.counts(), (3, 0), "renewed at 1 s, 2 s and 3 s");
        held.release().await.unwrap();
        held.release().await.unwrap();
        tokio::time::sleep(Duration::from_secs(10)).await;
        drop(held);
        tokio::task::yield_now().await;
        assert_eq!(lease.counts(), (3, 1), "no renewal after the release, and one release in all");
    }

    #[tokio::test(start_paused = true)]
    async fn the_watchdog_stops_once_the_lock_is_no_longer_ours() {
        let lease = Recorder::new(false);
        let _held = guard(&lease);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(lease.counts(), (1, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_guard_releases_and_an_abandoned_one_neither_renews_nor_releases() {
        let lease = Recorder::new(true);
        drop(guard(&lease));
        tokio::task::yield_now().await;
        assert_eq!(lease.counts(), (0, 1));

        let lease = Recorder::new(true);
        guard(&lease).abandon();
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(lease.counts(), (0, 0));
    }

    #[test]
    fn tokens_are_128_bit_hex_and_unique() {
        let (a, b) = (new_token(), new_token());
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
