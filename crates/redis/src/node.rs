//! Connecting to one Redis server, the single-node lease shared by the spin and pub/sub locks, and waiting in a
//! node's fair queue (the fair single-node locks, and Redlock's turns).
//!
//! A queued waiter learns that the lock was handed to it from a message ([`Wake::Message`], the pub/sub lock and
//! Redlock) or from its own polls ([`Wake::Poll`], the spin lock, which keeps one connection). Either way it
//! refreshes its place at least every heartbeat, which is also how it finds a handover whose message was lost, or
//! a lapsed one to pass on: a lost message delays, never strands. A waiter that stops waiting (deadline, error, or
//! its future dropped) leaves the queue and passes on a lock handed to it meanwhile, so giving up costs the others
//! nothing.

use std::time::Duration;

use async_trait::async_trait;
use fred::prelude::{Builder, Client, ClientLike, Config, ReconnectPolicy};
use rand::Rng;
use tokio::time::Instant;

use crate::lock::{self, Lease, LockError};
use crate::pubsub::Registration;
use crate::scripts::{self, FairAttempt, FairTiming, QueueKeys};

/// How long a TCP connect (and the handshake commands after it) may take: a dead node must fail in well under
/// a lock wait, not after fred's 10 s default.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// The per-command timeout of a single-node lock: under a third of the lease, so that a renewal stuck on a
/// hung server fails before the next one is due, and bounded so a request never hangs on Redis for long.
pub(crate) fn command_timeout(lease: Duration) -> Duration {
    (lease / 3).clamp(Duration::from_millis(100), Duration::from_secs(2))
}

/// A client builder for `url` whose every command fails after `command_timeout` instead of waiting for a
/// reconnection forever, and which reconnects in the background (with backoff) after losing its server.
pub(crate) fn builder(url: &str, command_timeout: Duration) -> Result<Builder, LockError> {
    let mut builder = Builder::from_config(Config::from_url(url)?);
    builder
        .with_connection_config(|c| {
            c.connection_timeout = CONNECT_TIMEOUT;
            c.internal_command_timeout = CONNECT_TIMEOUT;
        })
        .with_performance_config(|p| p.default_command_timeout = command_timeout)
        // Zero attempts: retry forever. 100 ms to 2 s between tries.
        .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2));
    Ok(builder)
}

/// Connects a client and loads the lock scripts, failing within about [`CONNECT_TIMEOUT`] when the server is
/// not there.
pub(crate) async fn connect(url: &str, command_timeout: Duration) -> Result<Client, LockError> {
    let client = builder(url, command_timeout)?.build()?;
    init(&client).await?;
    scripts::load_all(&client).await?;
    Ok(client)
}

/// Starts `client`'s connection and waits a bounded time for it.
pub(crate) async fn init(client: &impl ClientLike) -> Result<(), LockError> {
    match tokio::time::timeout(CONNECT_TIMEOUT * 2, client.init()).await {
        Ok(Ok(_connection_task)) => Ok(()),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(LockError::Redis(fred::error::Error::new(
            fred::error::ErrorKind::Timeout,
            "connecting to redis timed out",
        ))),
    }
}

/// One Redis server holding the lock: the spin and pub/sub locks.
#[derive(Debug)]
pub(crate) struct SingleNode {
    pub(crate) client: Client,
    /// `Some` for a fair lock: a release passes the lock to the head of the key's queue instead of deleting it.
    pub(crate) fair: Option<FairTiming>,
}

#[async_trait]
impl Lease for SingleNode {
    async fn extend(&self, key: &str, token: &str, lease: Duration) -> Result<bool, LockError> {
        scripts::extend(&self.client, key, token, lease).await
    }

    async fn release(&self, key: &str, token: &str) -> Result<bool, LockError> {
        match &self.fair {
            Some(timing) => scripts::fair_release(&self.client, &QueueKeys::of(key), token, timing).await,
            None => scripts::unlock(&self.client, key, token).await,
        }
    }

    async fn refence(&self, key: &str, token: &str, floor: u64) -> Result<Option<u64>, LockError> {
        scripts::refence(&self.client, key, token, floor).await
    }
}

/// How a queued waiter learns that the lock was handed to it.
pub(crate) enum Wake<'a> {
    /// A message on its own channel; it still refreshes every heartbeat, in case the message is lost.
    Message(&'a Registration),
    /// Its own polls, closer together the nearer it is to the head of the queue.
    Poll,
}

/// Waits in the fair queue of `keys` on `client` until the lock is `token`'s (taken, or handed over and accepted
/// for the full `lease`), and returns its fence.
///
/// # Errors
/// [`LockError::Timeout`] at the deadline, after leaving the queue; [`LockError::Redis`] when a script failed
/// (the queue is then left in the background).
pub(crate) async fn wait_in_queue(
    client: &Client,
    keys: &QueueKeys,
    token: &str,
    lease: Duration,
    timing: &FairTiming,
    wake: Wake<'_>,
    deadline: Instant,
) -> Result<u64, LockError> {
    let channel = match &wake {
        Wake::Message(registration) => registration.channel(),
        Wake::Poll => "",
    };
    let mut queued = InQueue { client, keys, token, timing, waiting: true };
    let mut pace = Pace::new(timing.heartbeat);
    loop {
        let position = match scripts::fair_acquire(client, keys, token, lease, channel, timing).await? {
            FairAttempt::Granted { fence } => {
                queued.waiting = false;
                return Ok(fence);
            }
            FairAttempt::Queued { position, .. } => position,
        };
        let left = lock::remaining(deadline);
        if left.is_zero() {
            queued.waiting = false;
            if let Err(e) = scripts::fair_leave(client, keys, token, timing).await {
                tracing::warn!(key = %keys.lock, error = %e, "leaving a lock queue failed; the entry lapses");
            }
            return Err(LockError::Timeout);
        }
        match &wake {
            Wake::Message(registration) => {
                tokio::select! {
                    () = registration.notified() => {}
                    () = tokio::time::sleep(pace.heartbeat().min(left)) => {}
                }
            }
            Wake::Poll => tokio::time::sleep(pace.poll(position).min(left)).await,
        }
    }
}

/// A waiter's place in a queue; dropped while still waiting (an error, or the lock future dropped), it leaves in
/// the background.
struct InQueue<'a> {
    client: &'a Client,
    keys: &'a QueueKeys,
    token: &'a str,
    timing: &'a FairTiming,
    waiting: bool,
}

impl Drop for InQueue<'_> {
    fn drop(&mut self) {
        if !self.waiting {
            return;
        }
        let (client, keys, token, timing) =
            (self.client.clone(), self.keys.clone(), self.token.to_owned(), *self.timing);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) = scripts::fair_leave(&client, &keys, &token, &timing).await {
                    tracing::debug!(key = %keys.lock, error = %e, "leaving a lock queue failed; the entry lapses");
                }
            });
        }
    }
}

/// The shortest pause between two polls of a waiter near the head of the queue: tokio's timer granularity.
const POLL_MIN: Duration = Duration::from_millis(1);

/// Polls a waiter at the head or next to it makes back to back before it falls back to [`POLL_MIN`]: a short hold
/// is handed over within a round trip or two instead of a timer tick (the next in line is often the head by the
/// time the lock comes free), and a long hold costs Redis one poll a millisecond from each of the two.
const HEAD_SPINS: u32 = 8;

/// When a queued waiter asks again.
struct Pace {
    heartbeat: Duration,
    /// The place and time of the previous poll, to measure how fast the queue moves.
    last: Option<(usize, Instant)>,
    /// The measured time per grant (how long one place in the queue takes), once the queue has moved.
    per_grant: Option<Duration>,
    /// Back-to-back polls made at or next to the head so far.
    head_spins: u32,
}

impl Pace {
    fn new(heartbeat: Duration) -> Self {
        Self { heartbeat, last: None, per_grant: None, head_spins: 0 }
    }

    /// A refresh between 3/4 and all of the heartbeat: waiters that queued together drift apart.
    fn heartbeat(&self) -> Duration {
        self.heartbeat.mul_f64(rand::rng().random_range(0.75..=1.0))
    }

    /// The pause of a polling waiter at `position`. The head and the one behind it poll back to back for a few
    /// polls, then as often as the timer allows: the lock is handed to the head at a release, and whoever is next
    /// may already be the head by its next poll. Further back, a waiter sleeps half the time it expects to
    /// take to be next, because oversleeping stalls the whole queue (the lock waits, handed over, for it to look)
    /// while an early poll costs one round trip; polls thin out far from the head, a few per turn, never more than
    /// a heartbeat apart.
    fn poll(&mut self, position: Option<usize>) -> Duration {
        let Some(position) = position else { return self.heartbeat() };
        let now = Instant::now();
        // Only movement is evidence: a queue that did not move between two polls may be waiting for a waiter that
        // oversleeps its turn, and counting that as a slow queue would make everyone oversleep theirs.
        if let Some((was, at)) = self.last
            && let Some(moved) = was.checked_sub(position).filter(|&m| m > 0)
        {
            let observed = now.saturating_duration_since(at) / u32::try_from(moved).unwrap_or(u32::MAX);
            // Optimistic: a faster queue is believed at once, a slower one by a quarter per poll, since a waiter
            // that expects its turn late oversleeps it and stalls the queue, and the stall then looks like a slow
            // queue to everyone behind.
            self.per_grant =
                Some(self.per_grant.map_or(observed, |p| if observed < p { observed } else { (p * 3 + observed) / 4 }));
        }
        self.last = Some((position, now));
        if position <= 1 && self.head_spins < HEAD_SPINS {
            self.head_spins += 1;
            return Duration::ZERO;
        }
        if position <= 1 {
            return POLL_MIN;
        }
        let until_next = u32::try_from(position - 1).unwrap_or(u32::MAX);
        let expected = self.per_grant.unwrap_or(POLL_MIN).saturating_mul(until_next);
        expected.mul_f64(rand::rng().random_range(0.4..=0.6)).clamp(POLL_MIN, self.heartbeat)
    }
}

impl Drop for SingleNode {
    fn drop(&mut self) {
        // The client's connection task would outlive the lock otherwise. Guards hold the node too, so this runs
        // only once the lock and every guard are gone.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let client = self.client.clone();
            runtime.spawn(async move {
                let _ = client.quit().await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn polls_thin_out_far_from_the_head_and_stay_within_a_heartbeat() {
        let heartbeat = Duration::from_millis(250);
        let mut pace = Pace::new(heartbeat);
        let refresh = pace.poll(None);
        assert!(refresh >= heartbeat * 3 / 4 && refresh <= heartbeat, "{refresh:?}");
        // The queue moves one place per 2 ms.
        let first = pace.poll(Some(50));
        tokio::time::advance(Duration::from_millis(20)).await;
        let far = pace.poll(Some(40));
        // 39 places to go before being next, 2 ms each, slept 40-60% of.
        assert!(far >= Duration::from_millis(31) && far <= Duration::from_millis(47), "{first:?} then {far:?}");
        tokio::time::advance(Duration::from_millis(76)).await;
        let third = pace.poll(Some(2));
        assert!(third >= POLL_MIN && third <= Duration::from_millis(2), "one place to go: {third:?}");
        assert_eq!(pace.poll(Some(1)), Duration::ZERO, "the one behind the head asks again at once");
        for _ in 1..HEAD_SPINS {
            assert_eq!(pace.poll(Some(0)), Duration::ZERO, "the head asks again at once, a few times");
        }
        assert_eq!(pace.poll(Some(0)), POLL_MIN, "then as often as the timer allows");
        assert_eq!(pace.poll(Some(1)), POLL_MIN);
        assert!(pace.poll(Some(100_000)) <= heartbeat, "never longer than a heartbeat");
    }
}
