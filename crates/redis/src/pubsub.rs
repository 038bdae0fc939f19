//! `redis-pubsub`: a lock on one node whose waiters sleep until the holder announces its release (as Redisson's
//! `RLock` does), instead of polling.
//!
//! A failed attempt returns the holder's remaining TTL. The waiter subscribes to the key's release channel and
//! sleeps until a release message or that TTL, whichever comes first, then tries again. A release wakes one
//! waiter per instance (`Notify::notify_one`), not all of them: waking every waiter would have them all race for
//! a lock only one can win. Messages are a hint, never a requirement: a lost one only delays a waiter until the
//! TTL it was told, so a waiter is never stranded.
//!
//! One [`SubscriberClient`] per lock serves every waiter of the instance, with an in-process registry of waiters
//! per channel: a thousand waiters on one key are one subscription, and the channel is unsubscribed when its last
//! waiter leaves.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use fred::clients::SubscriberClient;
use fred::prelude::{ClientLike, EventInterface, PubsubInterface};
use fred::types::Message;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{Notify, OnceCell};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::lock::{self, DistributedLock, Lease, LockError, LockGuard};
use crate::node::{self, SingleNode};
use crate::probe::RedisProbe;
use crate::scripts::{self, Attempt};

/// Messages buffered for the dispatcher before it is considered lagging (fred's default is 32). On lag every
/// channel gets a wake-up, so an overflow costs spurious retries, not stranded waiters.
const MESSAGE_BUFFER: usize = 4096;

/// The floor of a wait, for a holder whose key has just expired (PTTL 0).
const MIN_WAIT: Duration = Duration::from_millis(1);

/// A lock on one Redis server whose waiters are woken by the release.
#[derive(Debug, Clone)]
pub struct PubSubLock {
    node: Arc<SingleNode>,
    waiters: Arc<Registry>,
    lease: Duration,
}

impl PubSubLock {
    /// Connects a command client and a subscriber client to `url`. `lease` is how long a holder that died keeps
    /// the lock; a live holder's watchdog renews it.
    ///
    /// # Errors
    /// [`LockError::Redis`] when the server cannot be reached; [`LockError::Config`] for a lease under 30 ms.
    pub async fn connect(url: &str, lease: Duration) -> Result<Self, LockError> {
        lock::check_lease(lease)?;
        let command_timeout = node::command_timeout(lease);
        let client = node::connect(url, command_timeout).await?;
        let node = Arc::new(SingleNode { client });

        let subscriber = node::builder(url, command_timeout)?
            .with_performance_config(|p| p.broadcast_channel_capacity = MESSAGE_BUFFER)
            .build_subscriber_client()?;
        // Listen before the first SUBSCRIBE so that no message can arrive unheard.
        let messages = subscriber.message_rx();
        node::init(&subscriber).await?;
        let channels: Arc<Mutex<HashMap<String, Arc<Channel>>>> = Arc::default();
        let waiters = Arc::new(Registry {
            // Re-subscribes every channel after a reconnection; messages sent while disconnected are lost, which
            // only delays waiters until their TTL.
            resubscriber: subscriber.manage_subscriptions(),
            dispatcher: tokio::spawn(dispatch(messages, channels.clone())),
            subscriber,
            channels,
            transitions: tokio::sync::Mutex::new(()),
        });
        Ok(Self { node, waiters, lease })
    }

    /// A readiness probe sharing this lock's command connection.
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

    /// The number of channels this instance is subscribed to (or subscribing), for tests of the registry.
    #[doc(hidden)]
    #[must_use]
    pub fn subscribed_channels(&self) -> usize {
        self.waiters.lock_channels().len()
    }

    /// One attempt: the guard, or how long the current holder's lease still runs.
    async fn try_lock(&self, key: &str, token: &str) -> Result<Result<LockGuard, Duration>, LockError> {
        Ok(match scripts::acquire(&self.node.client, key, token, self.lease).await? {
            Attempt::Granted { fence } => {
                let lease: Arc<dyn Lease> = self.node.clone();
                Ok(LockGuard::new(key, token.to_owned(), fence, self.lease, lease))
            }
            Attempt::Held { ttl } => Err(ttl),
        })
    }
}

#[async_trait]
impl DistributedLock for PubSubLock {
    async fn lock(&self, key: &str, deadline: Instant) -> Result<LockGuard, LockError> {
        let token = lock::new_token();
        // The uncontended case costs one round trip and no subscription.
        if let Ok(guard) = self.try_lock(key, &token).await? {
            return Ok(guard);
        }
        // Subscribe before trying again: a release published between the failed attempt and the subscription
        // would otherwise go unheard, and this waiter would sleep a whole TTL for nothing.
        let waiting = Registry::wait_on(&self.waiters, scripts::release_channel(key)).await?;
        let mut woken = false;
        loop {
            let ttl = match self.try_lock(key, &token).await {
                Ok(Ok(guard)) => return Ok(guard),
                Ok(Err(ttl)) => ttl,
                Err(e) => {
                    if woken {
                        // This waiter took the wake-up of a release and will not use it: pass it on.
                        waiting.channel.notify.notify_one();
                    }
                    return Err(e);
                }
            };
            let left = lock::remaining(deadline);
            if left.is_zero() {
                return Err(LockError::Timeout);
            }
            // The holder's TTL bounds the sleep: a holder that died without unlocking (no message, ever) has
            // lost the lock by then, and a lost message costs at most this wait.
            tokio::select! {
                () = waiting.channel.notify.notified() => woken = true,
                () = tokio::time::sleep(ttl.max(MIN_WAIT).min(left)) => woken = false,
            }
        }
    }

    fn name(&self) -> &'static str {
        "redis-pubsub"
    }
}

/// The waiters of this instance, per release channel, and the one subscription that serves them.
struct Registry {
    subscriber: SubscriberClient,
    channels: Arc<Mutex<HashMap<String, Arc<Channel>>>>,
    /// Orders SUBSCRIBE and UNSUBSCRIBE calls, so that the unsubscribe of a channel's last waiter cannot land
    /// after the subscribe of a waiter that came just after it.
    transitions: tokio::sync::Mutex<()>,
    dispatcher: JoinHandle<()>,
    resubscriber: JoinHandle<()>,
}

#[derive(Default)]
struct Channel {
    notify: Notify,
    /// Changed only under the registry's map lock, so that the last waiter's cleanup sees every newcomer.
    waiters: AtomicUsize,
    subscribed: OnceCell<()>,
}

/// A waiter's registration on a channel; leaving (drop) unsubscribes the channel when it was the last.
struct Waiting {
    registry: Arc<Registry>,
    name: String,
    channel: Arc<Channel>,
}

impl Registry {
    fn lock_channels(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Channel>>> {
        // Held only to look up, insert or remove, never across an await.
        self.channels.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a waiter on `name`, subscribing the channel if this is its first: returns once the
    /// subscription is live, so any release published afterwards reaches the waiter.
    async fn wait_on(registry: &Arc<Self>, name: String) -> Result<Waiting, LockError> {
        let channel = {
            let mut channels = registry.lock_channels();
            let channel = channels.entry(name.clone()).or_default().clone();
            channel.waiters.fetch_add(1, Ordering::SeqCst);
            channel
        };
        // Built before the await so that a failed subscribe still deregisters.
        let waiting = Waiting { registry: registry.clone(), name, channel };
        waiting
            .channel
            .subscribed
            .get_or_try_init(|| async {
                let _order = registry.transitions.lock().await;
                registry.subscriber.subscribe(waiting.name.clone()).await
            })
            .await?;
        Ok(waiting)
    }

    /// Unsubscribes `name` if `channel` is still its entry and still has no waiter.
    async fn leave(self: Arc<Self>, name: String, channel: Arc<Channel>) {
        let _order = self.transitions.lock().await;
        let removed = {
            let mut channels = self.lock_channels();
            let idle =
                channels.get(&name).is_some_and(|c| Arc::ptr_eq(c, &channel) && c.waiters.load(Ordering::SeqCst) == 0);
            idle && channels.remove(&name).is_some()
        };
        if removed
            && channel.subscribed.initialized()
            && let Err(e) = self.subscriber.unsubscribe(name.clone()).await
        {
            tracing::warn!(channel = %name, error = %e, "unsubscribing a release channel failed");
        }
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let last = {
            let _channels = self.registry.lock_channels();
            self.channel.waiters.fetch_sub(1, Ordering::SeqCst) == 1
        };
        if last && let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(self.registry.clone().leave(std::mem::take(&mut self.name), self.channel.clone()));
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.dispatcher.abort();
        self.resubscriber.abort();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let subscriber = self.subscriber.clone();
            runtime.spawn(async move {
                let _ = subscriber.quit().await;
            });
        }
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("channels", &self.lock_channels().len()).finish_non_exhaustive()
    }
}

/// Wakes one waiter of the channel each release message names.
async fn dispatch(
    mut messages: tokio::sync::broadcast::Receiver<Message>,
    channels: Arc<Mutex<HashMap<String, Arc<Channel>>>>,
) {
    loop {
        let lock = || channels.lock().unwrap_or_else(PoisonError::into_inner);
        match messages.recv().await {
            Ok(message) => {
                if let Some(channel) = lock().get(&*message.channel) {
                    channel.notify.notify_one();
                }
            }
            // Releases were missed: wake one waiter everywhere rather than leave them to their TTLs.
            Err(RecvError::Lagged(missed)) => {
                tracing::warn!(missed, "release messages were dropped; waking every channel");
                for channel in lock().values() {
                    channel.notify.notify_one();
                }
            }
            Err(RecvError::Closed) => return,
        }
    }
}
