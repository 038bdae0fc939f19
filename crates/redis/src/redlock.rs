//! `redis-redlock`: the Redlock algorithm over N independent Redis servers (3 or 5), so that the lock survives
//! the loss of any minority of them.
//!
//! An attempt runs the acquire script on every node at once and wins when a majority granted it while the lease
//! still has time left after the round trips and a clock-drift allowance (`validity = lease - elapsed - drift`).
//! A majority is what makes the lock exclusive: two clients cannot both hold more than half of the nodes. A lost
//! attempt is undone on every node (a node may have granted after the answer was given up on) and retried after
//! a random delay that grows with each loss, so that contenders who split the votes do not split them again. A
//! round stops waiting as soon as its outcome is known, and a node known to be disconnected counts as a "no" at
//! once: a dead node costs nothing while a majority is up.
//!
//! # Fencing
//! Each node keeps its own fence counter, bumped by the acquire script. After winning, the holder takes the
//! largest counter among the nodes that granted as its fence and raises the counter of every node it still owns
//! to that value (never lowering one), and only counts the lock as won if a majority confirmed the raise while
//! still owned. Any two majorities of the same N nodes share at least one node, so the next holder's majority
//! includes a node that recorded this fence; that node's lock was ours until the raise was written (the script
//! checks the token), so the next holder bumps a counter that is already at least this fence and takes a larger
//! one. Tokens therefore strictly increase across holders. Like the lock itself this assumes a node does not come
//! back empty (without its data) while a lock it granted is still live: restart crashed nodes after the lease or
//! with persistence.
//!
//! # Fair mode ([`LockOptions::FAIR`])
//! Contenders that split the votes cannot be made to queue on every node in the same order without agreeing on
//! one, so the order is kept on one node: the first URL is the queue node, where each key has a turn (a fair
//! single-node lock, `{key}:turn`, with the queue of the `scripts` module). A waiter first waits for its turn,
//! woken by a message when the previous holder passes it on, and only the holder of the turn then runs the
//! Redlock rounds above, which it wins at once because no other fair waiter is asking. Mutual exclusion and fences
//! are still the majority's alone: the turn only decides who asks. When the queue node is down, waiters race as
//! in the default mode (with the lock unaffected), so fairness needs it but availability does not. Every instance
//! must list the same node first.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use fred::prelude::{Client, ClientLike};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use shop_domain::ports::RetryPolicy;
use tokio::time::Instant;

use crate::lock::{self, DistributedLock, Lease, LockError, LockGuard, LockOptions};
use crate::node::{self, Wake};
use crate::probe::RedisProbe;
use crate::pubsub::Wakeups;
use crate::scripts::{self, Attempt, FairTiming, QueueKeys};

/// The random pause between lost attempts: full jitter under a ceiling that doubles per loss (1 ms up to 50 ms),
/// so that the more contenders split the votes, the more they spread out, and a round again has one winner.
const BACKOFF: RetryPolicy =
    RetryPolicy { max_retries: u32::MAX, base: Duration::from_millis(1), cap: Duration::from_millis(50) };

/// A lock held on a majority of independent Redis servers.
#[derive(Debug, Clone)]
pub struct Redlock {
    nodes: Arc<Nodes>,
    lease: Duration,
    /// The fair mode's turns, on the first node.
    turns: Option<Arc<Turns>>,
}

impl Redlock {
    /// Connects one client per URL, concurrently, each with a bounded connect wait and a per-command timeout of
    /// `lease / 50` (20 ms to 200 ms): small against the lease (as the Redlock description asks), because a round
    /// whose live nodes split their votes must wait for the slowest node before it can give its grants back.
    /// Nodes that are down at start (or later) are reconnected in the background and count as a "no" meanwhile.
    ///
    /// # Errors
    /// [`LockError::NoQuorum`] when fewer than a majority can be reached; [`LockError::Config`] for no URL or a
    /// lease under 30 ms; [`LockError::Redis`] for a malformed URL.
    pub async fn connect<S: AsRef<str>>(urls: &[S], lease: Duration) -> Result<Self, LockError> {
        Self::connect_with(urls, lease, LockOptions::RACING).await
    }

    /// Connects as [`Redlock::connect`] does, racing or fair as `options` say. Fair, the first URL is the queue
    /// node (see the module documentation); it may be down, at start or later.
    ///
    /// # Errors
    /// As [`Redlock::connect`].
    pub async fn connect_with<S: AsRef<str>>(
        urls: &[S],
        lease: Duration,
        options: LockOptions,
    ) -> Result<Self, LockError> {
        lock::check_lease(lease)?;
        if urls.is_empty() {
            return Err(LockError::Config("redlock needs at least one node (3 or 5 make sense)".into()));
        }
        let node_timeout = (lease / 50).clamp(Duration::from_millis(20), Duration::from_millis(200));
        let mut clients = Vec::with_capacity(urls.len());
        for url in urls {
            let client = node::builder(url.as_ref(), node_timeout)?
                // Keep connecting in the background instead of failing: the lock works without a minority.
                .with_config(|c| c.fail_fast = false)
                .build()?;
            clients.push(client);
        }
        let up = futures::future::join_all(clients.iter().map(|client| async move {
            node::init(client).await?;
            scripts::load_all(client).await.map_err(LockError::from)
        }))
        .await;
        let nodes = Nodes { clients };
        let answered = up.iter().filter(|r| r.is_ok()).count();
        if answered < nodes.quorum() {
            return Err(LockError::NoQuorum { answered, needed: nodes.quorum(), nodes: nodes.clients.len() });
        }
        for (url, result) in urls.iter().zip(up) {
            if let Err(e) = result {
                tracing::warn!(node = url.as_ref(), error = %e, "redlock node is down; continuing with a majority");
            }
        }
        let turns = match (options.fair, urls.first(), nodes.clients.first()) {
            (true, Some(url), Some(client)) => Some(Arc::new(Turns {
                client: client.clone(),
                wakeups: Wakeups::connect_or_retry(url.as_ref(), node_timeout).await?,
                timing: FairTiming::for_lease(lease),
            })),
            _ => None,
        };
        Ok(Self { nodes: Arc::new(nodes), lease, turns })
    }

    /// Whether waiters queue ([`LockOptions::FAIR`]).
    #[must_use]
    pub fn is_fair(&self) -> bool {
        self.turns.is_some()
    }

    /// A readiness probe of every node: ready while a majority answers.
    #[must_use]
    pub fn probe(&self) -> RedisProbe {
        RedisProbe::new(self.nodes.clients.clone())
    }

    /// Runs the unlock script with `token` on every node as if its owner released: a no-op unless `token` owns
    /// the lock. Whether it deleted the lock anywhere. For tests of foreign unlocks.
    ///
    /// # Errors
    /// [`LockError::NoQuorum`] when a majority did not answer.
    #[doc(hidden)]
    pub async fn force_unlock_as(&self, key: &str, token: &str) -> Result<bool, LockError> {
        self.nodes.release(key, token).await
    }

    /// How many waiters queue for a turn at `key` on the queue node (fair mode), for tests.
    ///
    /// # Errors
    /// [`LockError::Redis`]; [`LockError::Config`] when racing.
    #[doc(hidden)]
    pub async fn queued(&self, key: &str) -> Result<usize, LockError> {
        let turns = self.turns.as_ref().ok_or_else(|| LockError::Config("a racing redlock has no queue".into()))?;
        scripts::queue_len(&turns.client, &turn_keys(key)).await
    }

    /// Unsubscribes this client's wake-up channel (fair mode), so that every handover message to it is lost: for
    /// tests that a lost message only delays.
    ///
    /// # Errors
    /// [`LockError::Redis`].
    #[doc(hidden)]
    pub async fn lose_wakeups(&self) -> Result<(), LockError> {
        match &self.turns {
            Some(turns) => turns.wakeups.unsubscribe().await,
            None => Ok(()),
        }
    }

    /// One attempt: the fence when won, else how many nodes did not answer.
    async fn attempt(&self, key: &str, token: &str) -> Result<u64, usize> {
        let started = Instant::now();
        let lease = self.lease;
        let grants = self
            .nodes
            .round(|client| async move {
                Ok(match scripts::acquire(&client, key, token, lease).await? {
                    Attempt::Granted { fence } => Some(fence),
                    Attempt::Held { .. } => None,
                })
            })
            .await;
        let quorum = self.nodes.quorum();
        if grants.succeeded.len() < quorum {
            return Err(grants.errors);
        }
        // Each node answered its counter after the bump, so the largest is one more than the largest before.
        let fence = grants.succeeded.iter().copied().max().unwrap_or(0);
        let raised = self
            .nodes
            .round(|client| async move { Ok(scripts::raise_fence(&client, key, token, fence).await?.then_some(())) })
            .await;
        // The clocks of the nodes may run a little faster than ours: 1% of the lease, plus 2 ms for the
        // granularity of Redis' expiry.
        let drift = self.lease / 100 + Duration::from_millis(2);
        let valid = self.lease.checked_sub(started.elapsed() + drift).is_some_and(|v| !v.is_zero());
        if raised.succeeded.len() >= quorum && valid { Ok(fence) } else { Err(raised.errors) }
    }
}

#[async_trait]
impl DistributedLock for Redlock {
    async fn lock(&self, key: &str, deadline: Instant) -> Result<LockGuard, LockError> {
        let token = lock::new_token();
        let mut turn = match &self.turns {
            Some(turns) if turns.wait(key, &token, deadline).await? => {
                Some(HeldTurn { turns: turns.clone(), key: key.to_owned(), token: token.clone(), armed: true })
            }
            _ => None,
        };
        // Until the lock is won, a dropped lock future undoes what its attempts got, instead of leaving the next
        // contender a minority it cannot win for a whole lease.
        let mut pending = Undo {
            nodes: self.nodes.clone(),
            lease: self.lease,
            key: key.to_owned(),
            token: token.clone(),
            armed: true,
        };
        let mut lost = 0u32;
        loop {
            let unanswered = match self.attempt(key, &token).await {
                Ok(fence) => {
                    pending.armed = false;
                    let lease: Arc<dyn Lease> = match turn.take() {
                        Some(turn) => Arc::new(FairNodes { nodes: self.nodes.clone(), turns: turn.keep(self.lease) }),
                        None => self.nodes.clone(),
                    };
                    return Ok(LockGuard::new(key, token, fence, self.lease, lease));
                }
                Err(unanswered) => unanswered,
            };
            // Undo everywhere, not only where granted: a node may have granted after the round stopped waiting.
            let undone = self.nodes.release(key, &token).await;
            if let Err(e) = &undone {
                tracing::debug!(%key, error = %e, "undoing a lost redlock attempt failed");
            }
            let left = lock::remaining(deadline);
            if left.is_zero() {
                // Grants that a cut connection kept from being undone would block every contender for a whole
                // lease: `pending` undoes them again once the nodes answer. The token is no longer tried, so a
                // late undo cannot free a lock won with it.
                pending.armed = undone.is_err();
                if let Some(turn) = turn.take() {
                    turn.pass_on().await;
                }
                return Err(self.nodes.failure(unanswered));
            }
            // The turn was taken for the acceptance lease only: renewed while this waiter is still trying, it
            // lapses soon after the waiter dies. Lost meanwhile (a renewal came too late), someone else may be
            // asking with the next turn, so this waiter races from here on.
            if let Some(held) = &mut turn
                && !held.renew().await
            {
                held.armed = false;
                turn = None;
            }
            tokio::time::sleep(BACKOFF.delay(lost).min(left)).await;
            lost = lost.saturating_add(1);
        }
    }

    fn name(&self) -> &'static str {
        "redis-redlock"
    }
}

/// The fair mode's order: a turn per key on the queue node (the first), and this client's wake-up channel there.
#[derive(Debug)]
struct Turns {
    client: Client,
    wakeups: Arc<Wakeups>,
    timing: FairTiming,
}

/// The keys of `key`'s turn and its queue on the queue node.
fn turn_keys(key: &str) -> QueueKeys {
    QueueKeys::of(&scripts::derived_key(key, "turn"))
}

impl Turns {
    /// Waits until it is `token`'s turn at `key`: `Ok(true)`; `Ok(false)` when the queue node cannot be asked, so
    /// that the caller races instead of failing with a node the lock itself does not need.
    ///
    /// The turn is taken for the acceptance lease only, not the lock's: a waiter that dies between its turn and the
    /// lock (no guard, no watchdog yet) must stall the queue no longer than one that dies before its turn.
    async fn wait(&self, key: &str, token: &str, deadline: Instant) -> Result<bool, LockError> {
        if !self.client.is_connected() {
            return Ok(false);
        }
        let registration = self.wakeups.register(token);
        let (keys, accept, timing) = (turn_keys(key), self.timing.accept, &self.timing);
        let wake = Wake::Message(&registration);
        match node::wait_in_queue(&self.client, &keys, token, accept, timing, wake, deadline).await {
            Ok(_turn_fence) => Ok(true),
            Err(LockError::Timeout) => Err(LockError::Timeout),
            Err(e) => {
                tracing::warn!(%key, error = %e, "the redlock queue node failed; racing for the lock instead");
                Ok(false)
            }
        }
    }

    /// Passes `token`'s turn at `key` to the next waiter (a no-op once it is no longer `token`'s).
    async fn pass_on(&self, key: &str, token: &str) -> Result<bool, LockError> {
        scripts::fair_release(&self.client, &turn_keys(key), token, &self.timing).await
    }
}

/// A turn held while its holder runs the Redlock rounds; passed on if the lock future is dropped meanwhile.
struct HeldTurn {
    turns: Arc<Turns>,
    key: String,
    token: String,
    armed: bool,
}

impl HeldTurn {
    /// The lock is won: the turn now belongs to the lock's guard, whose watchdog renews it and whose release passes
    /// it on. Extended to the lock's `lease` at once, in the background (the next renewal is a third of a lease
    /// away, the turn's acceptance lease much sooner); should that fail, the next waiter only asks early, and loses
    /// to the majority.
    fn keep(mut self, lease: Duration) -> Arc<Turns> {
        self.armed = false;
        let (turns, key, token) = (self.turns.clone(), std::mem::take(&mut self.key), std::mem::take(&mut self.token));
        tokio::spawn(async move {
            let _ = scripts::extend(&turns.client, &turn_keys(&key).lock, &token, lease).await;
        });
        self.turns.clone()
    }

    /// Renews the turn for another acceptance lease: whether it is still this waiter's.
    async fn renew(&self) -> bool {
        let turn = turn_keys(&self.key);
        scripts::extend(&self.turns.client, &turn.lock, &self.token, self.turns.timing.accept).await.unwrap_or(false)
    }

    /// Gives the turn up (the lock could not be had in time), so the next waiter does not wait out its lease.
    async fn pass_on(mut self) {
        self.armed = false;
        if let Err(e) = self.turns.pass_on(&self.key, &self.token).await {
            tracing::warn!(key = %self.key, error = %e, "passing a redlock turn on failed; it lapses with its lease");
        }
    }
}

impl Drop for HeldTurn {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (turns, key, token) = (self.turns.clone(), std::mem::take(&mut self.key), std::mem::take(&mut self.token));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = turns.pass_on(&key, &token).await;
            });
        }
    }
}

/// Grants of a lock not yet won; undone on every node if the lock future is dropped before it is.
struct Undo {
    nodes: Arc<Nodes>,
    lease: Duration,
    key: String,
    token: String,
    armed: bool,
}

impl Drop for Undo {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (nodes, key, token) = (self.nodes.clone(), std::mem::take(&mut self.key), std::mem::take(&mut self.token));
        let give_up = Instant::now() + self.lease;
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if nodes.release(&key, &token).await.is_err() {
                    let nodes: Arc<dyn Lease> = nodes;
                    lock::retry_release(nodes, key, token, give_up).await;
                }
            });
        }
    }
}

/// The lease of a lock won with a turn: renewed and released on the majority as any other, and its release also
/// passes the turn to the next waiter.
struct FairNodes {
    nodes: Arc<Nodes>,
    turns: Arc<Turns>,
}

#[async_trait]
impl Lease for FairNodes {
    /// The majority decides; the turn is renewed alongside so that it does not lapse under a long hold (if it
    /// does, the next waiter only asks early, and loses to the majority).
    async fn extend(&self, key: &str, token: &str, lease: Duration) -> Result<bool, LockError> {
        let turn = turn_keys(key);
        let (held, _turn) = tokio::join!(
            self.nodes.extend(key, token, lease),
            scripts::extend(&self.turns.client, &turn.lock, token, lease)
        );
        held
    }

    /// Unlocks the majority and passes the turn on at once: the unlock on the queue node is sent first on the same
    /// connection, so the next holder, woken by the turn, finds that node free.
    async fn release(&self, key: &str, token: &str) -> Result<bool, LockError> {
        let (released, passed) = tokio::join!(self.nodes.release(key, token), self.turns.pass_on(key, token));
        if let Err(e) = passed {
            tracing::warn!(%key, error = %e, "passing a redlock turn on failed; it lapses with its lease");
        }
        released
    }

    async fn refence(&self, key: &str, token: &str, floor: u64) -> Result<Option<u64>, LockError> {
        self.nodes.refence(key, token, floor).await
    }
}

/// The clients of the independent nodes.
#[derive(Debug)]
struct Nodes {
    clients: Vec<Client>,
}

/// What a round on every node gave: the successes, and how many nodes failed to answer.
struct Round<T> {
    succeeded: Vec<T>,
    errors: usize,
}

impl Nodes {
    /// A strict majority: two of them always share a node.
    fn quorum(&self) -> usize {
        self.clients.len() / 2 + 1
    }

    /// The error of a lock that ran out of time: no quorum when a majority did not even answer the last round.
    fn failure(&self, errors: usize) -> LockError {
        let nodes = self.clients.len();
        if errors > nodes - self.quorum() {
            LockError::NoQuorum { answered: nodes - errors, needed: self.quorum(), nodes }
        } else {
            LockError::Timeout
        }
    }

    /// Runs `op` on every node at once and returns as soon as the outcome is known: a majority succeeded
    /// (`Some`), or too many failed for a majority to be possible. Waiting for the rest would only wait for the
    /// slowest (a dead node's command timeout); what they do after is covered by the token checks and the lease.
    async fn round<T, F, Fut>(&self, op: F) -> Round<T>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<Option<T>, LockError>>,
    {
        let (nodes, quorum) = (self.clients.len(), self.quorum());
        let mut pending: FuturesUnordered<_> = self
            .clients
            .iter()
            .map(|c| {
                // A node known to be down answers "no" at once: waiting for its command timeout would leave a
                // split round (one live node granted, one refused) holding its grant until then, and under
                // contention those splits never end.
                let connected = c.is_connected();
                let attempt = op(c.clone());
                async move { if connected { attempt.await } else { Err(LockError::Disconnected) } }
            })
            .collect();
        let (mut succeeded, mut failed, mut errors) = (Vec::with_capacity(nodes), 0, 0);
        while let Some(answer) = pending.next().await {
            match answer {
                Ok(Some(value)) => succeeded.push(value),
                Ok(None) => failed += 1,
                Err(e) => {
                    tracing::debug!(error = %e, "redlock node did not answer");
                    failed += 1;
                    errors += 1;
                }
            }
            if succeeded.len() >= quorum || failed > nodes - quorum {
                break;
            }
        }
        Round { succeeded, errors }
    }
}

#[async_trait]
impl Lease for Nodes {
    /// Renewed when a majority renewed: the same majority that makes the lock exclusive.
    async fn extend(&self, key: &str, token: &str, lease: Duration) -> Result<bool, LockError> {
        let round = self
            .round(|client| async move { Ok(scripts::extend(&client, key, token, lease).await?.then_some(())) })
            .await;
        if round.succeeded.len() >= self.quorum() {
            return Ok(true);
        }
        match self.failure(round.errors) {
            LockError::Timeout => Ok(false),
            unreachable => Err(unreachable),
        }
    }

    /// A new fence from a majority that still holds the lock: each raises its counter past `floor` and bumps it;
    /// the largest answer is then raised on every node, as at a grant, so that the next majority reads it.
    async fn refence(&self, key: &str, token: &str, floor: u64) -> Result<Option<u64>, LockError> {
        let bumped = self.round(|client| async move { scripts::refence(&client, key, token, floor).await }).await;
        if bumped.succeeded.len() < self.quorum() {
            return match self.failure(bumped.errors) {
                LockError::Timeout => Ok(None),
                unreachable => Err(unreachable),
            };
        }
        let fence = bumped.succeeded.iter().copied().max().unwrap_or(floor + 1);
        let raised = self
            .round(|client| async move { Ok(scripts::raise_fence(&client, key, token, fence).await?.then_some(())) })
            .await;
        if raised.succeeded.len() >= self.quorum() { Ok(Some(fence)) } else { Err(self.failure(raised.errors)) }
    }

    /// Released once a majority answered (nobody else can win before that); whether any node still held it.
    async fn release(&self, key: &str, token: &str) -> Result<bool, LockError> {
        let round = self.round(|client| async move { scripts::unlock(&client, key, token).await.map(Some) }).await;
        if round.succeeded.len() >= self.quorum() {
            Ok(round.succeeded.contains(&true))
        } else {
            Err(self.failure(round.errors))
        }
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            for client in self.clients.clone() {
                runtime.spawn(async move {
                    let _ = client.quit().await;
                });
            }
        }
    }
}
