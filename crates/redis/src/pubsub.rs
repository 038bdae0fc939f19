//! `redis-pubsub`: a lock on one node whose waiters sleep until they are woken, instead of polling.
//!
//! # Fair (the default)
//! Waiters queue in Redis (see the fair queue in `scripts`), and a release hands the lock to the longest live
//! waiter and wakes only it, with a message on a channel of its lock client: each lock client subscribes once to a
//! channel of its own (`Wakeups`), and routes a message (a waiter's token) to that waiter through an in-process
//! registry. A wake-up therefore costs one message to one client, however many wait. The woken waiter accepts the
//! handover, which extends the lock to the full lease, and starts its watchdog. Waiters also refresh their place
//! on a timer, which is how a lost message (a reconnection, a lagging dispatcher) only delays.
//!
//! # Racing ([`LockOptions::RACING`])
//! The former behaviour, as Redisson's `RLock`: a failed attempt returns the holder's remaining TTL; the waiter
//! subscribes to the key's release channel and sleeps until a release message or that TTL, then tries again. A
//! release wakes one waiter per instance (`Notify::notify_one`), and all the instances' waiters race for it, so
//! with many instances a release wakes many, and the releaser often takes it back. One [`SubscriberClient`] per lock
//! serves every waiter of the instance, with an in-process registry of waiters per channel: a thousand waiters on
//! one key are one subscription, and the channel is unsubscribed when its last waiter leaves.

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

use crate::lock::{self, DistributedLock, Lease, LockError, LockGuard, LockOptions};
use crate::node::{self, SingleNode, Wake};
use crate::probe::RedisProbe;
use crate::scripts::{self, Attempt, FairTiming, QueueKeys};

/// Messages buffered for the dispatcher before it is considered lagging (fred's default is 32). On lag every
/// waiter gets a wake-up, so an overflow costs spurious retries, not stranded waiters.
const MESSAGE_BUFFER: usize = 4096;

/// The floor of a wait, for a holder whose key has just expired (PTTL 0).
const MIN_WAIT: Duration = Duration::from_millis(1);

/// A lock on one Redis server whose waiters are woken by the release.
#[derive(Debug, Clone)]
pub struct PubSubLock {
    node: Arc<SingleNode>,
    mode: Mode,
    lease: Duration,
}

#[derive(Debug, Clone)]
enum Mode {
    /// Queued in Redis; a release wakes the head only, on this client's channel.
    Fair { wakeups: Arc<Wakeups>, timing: FairTiming },
    /// Racing; a release wakes one waiter of each instance, on the key's release channel.
    Racing { waiters: Arc<Registry> },
}

impl PubSubLock {
    /// Connects a command client and a subscriber client to `url`, fair ([`LockOptions::FAIR`]). `lease` is how
    /// long a holder that died keeps the lock; a live holder's watchdog renews it.
    ///
    /// # Errors
    /// [`LockError::Redis`] when the server cannot be reached; [`LockError::Config`] for a lease under 30 ms.
    pub async fn connect(url: &str, lease: Duration) -> Result<Self, LockError> {
        Self::connect_with(url, lease, LockOptions::FAIR).await
    }

    /// Connects as [`PubSubLock::connect`] does, fair or racing as `options` say.
    ///
    /// # Errors
    /// As [`PubSubLock::connect`].
    pub async fn connect_with(url: &str, lease: Duration, options: LockOptions) -> Result<Self, LockError> {
        lock::check_lease(lease)?;
        let command_timeout = node::command_timeout(lease);
        let client = node::connect(url, command_timeout).await?;
        if options.fair {
            let timing = FairTiming::for_lease(lease);
            let node = Arc::new(SingleNode { client, fair: Some(timing) });
            let wakeups = Wakeups::connect(url, command_timeout).await?;
            return Ok(Self { node, mode: Mode::Fair { wakeups, timing }, lease });
        }
        let node = Arc::new(SingleNode { client, fair: None });
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
        Ok(Self { node, mode: Mode::Racing { waiters }, lease })
    }

    /// A readiness probe sharing this lock's command connection.
    #[must_use]
    pub fn probe(&self) -> RedisProbe {
        RedisProbe::new(vec![self.node.client.clone()])
    }

    /// Whether waiters queue ([`LockOptions::FAIR`]).
    #[must_use]
    pub fn is_fair(&self) -> bool {
        matches!(self.mode, Mode::Fair { .. })
    }

    /// Runs the release script with `token` as if its owner released: a no-op unless `token` owns the lock.
    /// Whether it released the lock. For tests of foreign unlocks.
    ///
    /// # Errors
    /// [`LockError::Redis`].
    #[doc(hidden)]
    pub async fn force_unlock_as(&self, key: &str, token: &str) -> Result<bool, LockError> {
        self.node.release(key, token).await
    }

    /// The number of release channels this instance is subscribed to (or subscribing), for tests of the racing
    /// mode's registry; always 0 when fair.
    #[doc(hidden)]
    #[must_use]
    pub fn subscribed_channels(&self) -> usize {
        match &self.mode {
            Mode::Racing { waiters } => waiters.lock_channels().len(),
            Mode::Fair { .. } => 0,
        }
    }

    /// Unsubscribes this client's wake-up channel, so that every handover message to it is lost, as on a lost
    /// connection: for tests that a lost message only delays. A no-op when racing.
    ///
    /// # Errors
    /// [`LockError::Redis`].
    #[doc(hidden)]
    pub async fn lose_wakeups(&self) -> Result<(), LockError> {
        match &self.mode {
            Mode::Fair { wakeups, .. } => wakeups.unsubscribe().await,
            Mode::Racing { .. } => Ok(()),
        }
    }

    /// How many waiters are queued for `key` in Redis (live or not yet found dead), for tests.
    ///
    /// # Errors
    /// [`LockError::Redis`].
    #[doc(hidden)]
    pub async fn queued(&self, key: &str) -> Result<usize, LockError> {
        scripts::queue_len(&self.node.client, &QueueKeys::of(key)).await
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

    /// The racing mode's wait: sleep until a release message or the holder's TTL, then try again.
    async fn race(&self, waiters: &Arc<Registry>, key: &str, deadline: Instant) -> Result<LockGuard, LockError> {
        let token = lock::new_token();
        // The uncontended case costs one round trip and no subscription.
        if let Ok(guard) = self.try_lock(key, &token).await? {
            return Ok(guard);
        }
        // Subscribe before trying again: a release published between the failed attempt and the subscription
        // would otherwise go unheard, and this waiter would sleep a whole TTL for nothing.
        let waiting = Registry::wait_on(waiters, scripts::release_channel(key)).await?;
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
}

#[async_trait]
impl DistributedLock for PubSubLock {
    async fn lock(&self, key: &str, deadline: Instant) -> Result<LockGuard, LockError> {
        let (wakeups, timing) = match &self.mode {
            Mode::Fair { wakeups, timing } => (wakeups, timing),
            Mode::Racing { waiters } => return self.race(waiters, key, deadline).await,
        };
        let token = lock::new_token();
        // Registered before the first script: the lock may be handed over the moment this waiter is queued.
        let registration = wakeups.register(&token);
        let keys = QueueKeys::of(key);
        let wake = Wake::Message(&registration);
        let fence = node::wait_in_queue(&self.node.client, &keys, &token, self.lease, timing, wake, deadline).await?;
        let lease: Arc<dyn Lease> = self.node.clone();
        Ok(LockGuard::new(key, token, fence, self.lease, lease))
    }

    fn name(&self) -> &'static str {
        "redis-pubsub"
    }
}

/// One lock client's wake-up channel: a subscription to a channel of its own, and the waiters of this client
/// by token. Shared by the fair pub/sub lock and Redlock's fair mode.
pub(crate) struct Wakeups {
    subscriber: SubscriberClient,
    channel: String,
    waiters: Arc<Mutex<HashMap<String, Arc<Notify>>>>,
    dispatcher: JoinHandle<()>,
    resubscriber: JoinHandle<()>,
    /// Redlock's: keeps trying to subscribe while its node is down.
    subscribing: Option<JoinHandle<()>>,
}

/// A waiter's entry in its client's [`Wakeups`]; dropping it deregisters the waiter.
pub(crate) struct Registration {
    wakeups: Arc<Wakeups>,
    token: String,
    notify: Arc<Notify>,
}

impl Registration {
    /// The channel a handover to this waiter is announced on.
    pub(crate) fn channel(&self) -> &str {
        &self.wakeups.channel
    }

    /// Until a handover to this waiter is announced (at once if one was announced since the last call).
    pub(crate) async fn notified(&self) {
        self.notify.notified().await;
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.wakeups.lock_waiters().remove(&self.token);
    }
}

impl Wakeups {
    /// Connects a subscriber to `url` and subscribes to a new random channel; fails when the server cannot be
    /// reached.
    pub(crate) async fn connect(url: &str, command_timeout: Duration) -> Result<Arc<Self>, LockError> {
        let (mut wakeups, subscriber) = Self::build(url, command_timeout)?;
        node::init(&subscriber).await?;
        subscriber.subscribe(wakeups.channel.clone()).await?;
        wakeups.resubscriber = subscriber.manage_subscriptions();
        Ok(Arc::new(wakeups))
    }

    /// As [`Wakeups::connect`], but a server that is down is retried in the background: until then, waiters find
    /// their handovers by their heartbeats. For Redlock, whose queue node may be down while a majority is up.
    pub(crate) async fn connect_or_retry(url: &str, command_timeout: Duration) -> Result<Arc<Self>, LockError> {
        let (mut wakeups, subscriber) = Self::build(url, command_timeout)?;
        let channel = wakeups.channel.clone();
        wakeups.resubscriber = subscriber.manage_subscriptions();
        let first = async {
            node::init(&subscriber).await?;
            subscriber.subscribe(channel.clone()).await.map_err(LockError::from)
        };
        if let Err(e) = first.await {
            tracing::warn!(error = %e, "the redlock queue node is down; waiters poll until it is back");
            wakeups.subscribing = Some(tokio::spawn(async move {
                // Subscribed once, fred's subscription manager keeps the channel across reconnections. Half a
                // second between tries: nothing is lost meanwhile but speed, as waiters find their handovers by
                // their refreshes.
                while subscriber.subscribe(channel.clone()).await.is_err() {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }));
        }
        Ok(Arc::new(wakeups))
    }

    fn build(url: &str, command_timeout: Duration) -> Result<(Self, SubscriberClient), LockError> {
        let subscriber = node::builder(url, command_timeout)?
            .with_config(|c| c.fail_fast = false)
            .with_performance_config(|p| p.broadcast_channel_capacity = MESSAGE_BUFFER)
            .build_subscriber_client()?;
        // Listen before SUBSCRIBE so that no message can arrive unheard.
        let messages = subscriber.message_rx();
        let waiters: Arc<Mutex<HashMap<String, Arc<Notify>>>> = Arc::default();
        let wakeups = Self {
            channel: format!("shop-lock:wake:{}", lock::new_token()),
            dispatcher: tokio::spawn(dispatch_wakeups(messages, waiters.clone())),
            resubscriber: tokio::spawn(async {}),
            subscribing: None,
            subscriber: subscriber.clone(),
            waiters,
        };
        Ok((wakeups, subscriber))
    }

    fn lock_waiters(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Notify>>> {
        // Held only to look up, insert or remove, never across an await.
        self.waiters.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers the waiter `token`, before it queues.
    pub(crate) fn register(self: &Arc<Self>, token: &str) -> Registration {
        let notify = Arc::new(Notify::new());
        self.lock_waiters().insert(token.to_owned(), notify.clone());
        Registration { wakeups: self.clone(), token: token.to_owned(), notify }
    }

    pub(crate) async fn unsubscribe(&self) -> Result<(), LockError> {
        if let Some(subscribing) = &self.subscribing {
            subscribing.abort();
        }
        Ok(self.subscriber.unsubscribe(self.channel.clone()).await?)
    }
}

impl Drop for Wakeups {
    fn drop(&mut self) {
        self.dispatcher.abort();
        self.resubscriber.abort();
        if let Some(subscribing) = &self.subscribing {
            subscribing.abort();
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let subscriber = self.subscriber.clone();
            runtime.spawn(async move {
                let _ = subscriber.quit().await;
            });
        }
    }
}

impl std::fmt::Debug for Wakeups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wakeups")
            .field("channel", &self.channel)
            .field("waiters", &self.lock_waiters().len())
            .finish_non_exhaustive()
    }
}

/// Wakes the waiter each handover message names (the message is its token).
async fn dispatch_wakeups(
    mut messages: tokio::sync::broadcast::Receiver<Message>,
    waiters: Arc<Mutex<HashMap<String, Arc<Notify>>>>,
) {
    loop {
        let lock = || waiters.lock().unwrap_or_else(PoisonError::into_inner);
        match messages.recv().await {
            Ok(message) => {
                if let Some(token) = message.value.as_str()
                    && let Some(notify) = lock().get(&*token)
                {
                    notify.notify_one();
                }
            }
            // Handovers may have been missed: every waiter asks again rather than wait for its heartbeat.
            Err(RecvError::Lagged(missed)) => {
                tracing::warn!(missed, "handover messages were dropped; waking every waiter");
                for notify in lock().values() {
                    notify.notify_one();
                }
            }
            Err(RecvError::Closed) => return,
        }
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
