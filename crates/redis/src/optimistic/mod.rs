//! `redis-optimistic`: the flash-sale design. Each option's stock is mirrored in Redis; an order reserves its
//! units there with WATCH / MULTI / EXEC, and the database only records the winners (still with the conditional
//! `UPDATE ... WHERE stock >= n`, which stays the source of truth and the last guard against oversell).
//!
//! # Reserving
//! On one connection of its own (a small [`ExclusivePool`] of dedicated clients: on a multiplexed connection
//! another task's commands would land between the WATCH and the EXEC), an order or a batch of orders WATCHes the
//! mirror keys of all its options, reads them (MGET), decides in Rust who fits (the domain's
//! [`allocate`]: arrival order, each order all its lines or none, the rule the database strategies use too), and runs MULTI / DECRBY per option / HSET of its hold per option / EXEC.
//! An EXEC aborted because a watched key changed is retried after a full-jitter backoff, at most
//! `SHOP_OPTIMISTIC_MAX_RETRIES` times, then 503 `LOCK_TIMEOUT`; an order that does not fit is 409
//! `OUT_OF_STOCK` at once, and nothing is written anywhere. Within one instance, reservations of one option
//! queue on an in-process FIFO and only the head WATCHes: the instances still race each other optimistically,
//! but a thousand requests of one instance do not abort each other's EXEC for nothing.
//!
//! # Giving back
//! The reservation is a [`StockPermit`] guard. [`StockStrategy::settle`] (after the commit or the rollback)
//! gives back whatever the transaction did not take and deletes the hold, in one script that gives back only
//! while the hold is still there; if the request is cancelled before it settles, dropping the guard gives
//! everything back the same way (spawned on the runtime). Both run at most once. The reservation itself runs in a
//! task of its own, so a request cancelled in the middle of it still ends with a guard (dropped, so given back)
//! rather than with units reserved and no owner.
//!
//! # Loading, and losing the mirror
//! A mirror key that is absent (first use, a Redis restart, a flush, an eviction) is loaded from the database
//! by a script that sets it only if it is still absent (SET NX semantics), to the database's stock minus the
//! holds in flight, so concurrent loaders agree. When Redis loses everything mid-sale, the holds go with the
//! mirror: the reload counts the units of the orders then in flight as available, so until reconciliation the
//! mirror may admit more orders than the database has units. The database's conditional UPDATE refuses those
//! (409, and their reservations are given back), so nothing is oversold and no stock goes negative; an order
//! reserved before the flush gives nothing back after it (its hold is gone), so a flush never inflates the
//! mirror by give-backs. Admin counts set the mirror (count minus holds in flight); orders cancelled by expiry or
//! by a failed payment add their units back to a mirror that exists.
//!
//! # Reconciling
//! [`RedisOptimisticStock::reconcile`] (the `shop-server reconcile` command and a periodic task) compares each
//! mirrored option with the database's stock minus its holds in flight, reaps holds past their deadline (their
//! holder died without settling), and repairs the mirror. It acts only on a quiet option: it keeps the option's
//! keys WATCHed while it reads the database twice, [`QUIET`] apart, and writes only if neither store moved, so a
//! commit whose settle is still on its way is not mistaken for drift.
//!
//! # Limits
//! - Between a reload after a flush and the next reconciliation, the mirror may be too high (extra buyers reach
//!   the database and are refused there). It is too low, and refuses buyers the database could serve, only in
//!   narrow windows: a holder that dies after reserving (until its hold's deadline, [`HOLD_TTL`], and the next
//!   reconciliation), a loader that read the database just before an admin count or a cancellation and wrote
//!   the mirror just after, an EXEC whose answer was lost (the compensating give-back runs at once, but an EXEC
//!   still queued behind it leaks until its hold dies). Reconciliation repairs all of them.
//! - Hold deadlines are judged by the instances' wall clocks: skew between instances must stay well below
//!   [`HOLD_TTL`].

mod mirror;
mod reconcile;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use fred::clients::ExclusivePool;
use fred::prelude::{Client, ClientLike, HashesInterface, KeysInterface, TransactionInterface};
use fred::types::Value;
use futures::TryStreamExt;
use shop_domain::DomainError;
use shop_domain::ids::ProductOptionId;
use shop_domain::money::Stock;
use shop_domain::order::OrderLine;
use shop_domain::ports::stock::union_of;
use shop_domain::ports::{Admission, OrderRepository, RetryPolicy, StockMirror, StockPermit, StockStrategy};
use shop_domain::stock::{OptionLocks, allocate};
use tokio::sync::oneshot;
use tokio::time::Instant;

pub use mirror::{stock_holds_key, stock_mirror_key};
pub use reconcile::{ReconcileReport, Repair};

use crate::lock::LockError;
use crate::node;
use crate::probe::RedisProbe;

/// How long a reservation may stay in flight before reconciliation takes its holder for dead: far longer than
/// an order's transaction may run (its pool wait and statements are bounded in seconds).
pub const HOLD_TTL: Duration = Duration::from_secs(120);

/// How long reconciliation watches an option that looks drifted before it repairs it: longer than a commit
/// takes to be followed by its settle.
pub const QUIET: Duration = Duration::from_millis(200);

/// Dedicated connections for WATCH / MULTI / EXEC: each is held only for one attempt (a few round trips).
const POOL_SIZE: usize = 8;

/// Every mirror command fails after this instead of hanging a request.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// Loads of absent mirrors one reservation may run before giving up: more means Redis keeps losing the keys.
const MAX_LOADS: u32 = 5;

/// What the strategy is configured with.
#[derive(Debug, Clone)]
pub struct OptimisticSettings {
    /// Namespace of the mirror keys (`SHOP_REDIS_KEY_PREFIX`).
    pub prefix: String,
    /// Aborted EXECs retried before 503 `LOCK_TIMEOUT` (`SHOP_OPTIMISTIC_MAX_RETRIES`).
    pub max_retries: u32,
    /// How long an order waits for its turn among this instance's reservations (`SHOP_LOCK_WAIT_MS`).
    pub wait: Duration,
}

/// The `redis-optimistic` stock strategy, and the mirror that admin counts and cancellations update.
#[derive(Debug, Clone)]
pub struct RedisOptimisticStock {
    inner: Arc<Inner>,
}

struct Inner {
    /// WATCH / MULTI / EXEC, each on a connection of its own.
    pool: ExclusivePool,
    /// Scripts and reads that need no WATCH (multiplexed).
    client: Client,
    /// The database's stock, to load and reconcile the mirror.
    levels: Arc<dyn OrderRepository>,
    prefix: String,
    retry: RetryPolicy,
    wait: Duration,
    /// This instance's turn per option: only the head of each queue WATCHes.
    local: OptionLocks,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner").field("prefix", &self.prefix).field("retry", &self.retry).finish_non_exhaustive()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The clients' connection tasks would outlive the strategy otherwise.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (client, pool) = (self.client.clone(), self.pool.clone());
            runtime.spawn(async move {
                let _ = client.quit().await;
                let _ = pool.quit().await;
            });
        }
    }
}

impl RedisOptimisticStock {
    /// Connects to `url` (the shared client and the pool of dedicated ones) and loads the scripts; `levels`
    /// reads the database's stock.
    ///
    /// # Errors
    /// [`LockError::Redis`] when the server cannot be reached within about a second.
    pub async fn connect(
        url: &str,
        levels: Arc<dyn OrderRepository>,
        settings: OptimisticSettings,
    ) -> Result<Self, LockError> {
        let client = node::builder(url, COMMAND_TIMEOUT)?.build()?;
        node::init(&client).await?;
        mirror::load_all(&client).await?;
        let mut builder = node::builder(url, COMMAND_TIMEOUT)?;
        // One attempt per command: after a reconnection fred would otherwise send a MULTI/EXEC again, on a
        // connection that never saw the WATCH.
        builder.with_connection_config(|c| c.max_command_attempts = 1);
        let pool = builder.build_exclusive_pool(POOL_SIZE)?;
        match tokio::time::timeout(node::CONNECT_TIMEOUT * 2, pool.init()).await {
            Ok(Ok(_connection_task)) => {}
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => {
                return Err(LockError::Redis(fred::error::Error::new(
                    fred::error::ErrorKind::Timeout,
                    "connecting to redis timed out",
                )));
            }
        }
        let retry = RetryPolicy {
            max_retries: settings.max_retries,
            base: Duration::from_millis(1),
            cap: Duration::from_millis(20),
        };
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                client,
                levels,
                prefix: settings.prefix,
                retry,
                wait: settings.wait,
                local: OptionLocks::default(),
            }),
        })
    }

    /// A readiness probe on the shared connection.
    #[must_use]
    pub fn probe(&self) -> RedisProbe {
        RedisProbe::new(vec![self.inner.client.clone()])
    }

    /// The option's mirrored stock, `None` when it is not loaded: for operators and tests.
    ///
    /// # Errors
    /// [`LockError::Redis`].
    pub async fn mirrored(&self, option_id: ProductOptionId) -> Result<Option<i64>, LockError> {
        Ok(self.inner.client.get(stock_mirror_key(&self.inner.prefix, option_id)).await?)
    }

    /// Makes sure the mirror is not of a newer state of the database than the database holds (the database was
    /// restored from an older backup under a Redis that kept running): then every mirror and holds key is
    /// dropped, and each option reloads from the database on its next order. Whether it dropped them.
    ///
    /// The mark is read before the database, so a mark above the database's newest order was set from a state
    /// that the database no longer has; orders committed meanwhile only make the database's newer.
    ///
    /// # Errors
    /// [`DomainError::Unavailable`] when Redis or the database does not answer.
    pub async fn check_against_database(&self) -> Result<bool, DomainError> {
        let inner = &self.inner;
        let mark: Option<i64> = inner.client.get(mirror::newest_order_key(&inner.prefix)).await.map_err(redis_error)?;
        let newest = inner.levels.newest_order_id().await?.map_or(0, |id| id.get());
        let older = mark.is_some_and(|mark| mark > newest);
        if older {
            let keys: Vec<fred::types::Key> = inner
                .client
                .scan_buffered(mirror::scan_pattern(&inner.prefix), Some(500), None)
                .try_collect()
                .await
                .map_err(redis_error)?;
            for chunk in keys.chunks(500) {
                let _: i64 = inner.client.del(chunk.to_vec()).await.map_err(redis_error)?;
            }
            let _: i64 = inner.client.del(mirror::newest_order_key(&inner.prefix)).await.map_err(redis_error)?;
            tracing::warn!(
                mark,
                newest,
                dropped = keys.len(),
                "the stock mirror is of a newer state than its database (restored from a backup?): dropped, it reloads"
            );
        }
        mirror::raise_mark(&inner.client, &inner.prefix, newest).await.map_err(lock_error)?;
        Ok(older)
    }

    /// Compares every mirrored option with the database and repairs what drifted; see the module documentation.
    ///
    /// # Errors
    /// [`DomainError::Unexpected`] when Redis or the database failed (what was repaired before stays).
    pub async fn reconcile(&self) -> Result<ReconcileReport, DomainError> {
        self.check_against_database().await?;
        reconcile::run(&self.inner).await
    }
}

/// What one WATCH / MULTI / EXEC attempt came to.
enum Attempt {
    /// Some mirror keys are absent: load them and try again.
    Missing(Vec<ProductOptionId>),
    /// A watched key changed before the EXEC.
    Aborted,
    /// Decided: the units reserved (under this hold) and the verdicts.
    Done { hold: String, take: BTreeMap<ProductOptionId, i64>, verdicts: Vec<Result<(), DomainError>> },
}

impl Inner {
    fn mirror_key(&self, option: ProductOptionId) -> String {
        stock_mirror_key(&self.prefix, option)
    }

    fn holds_key(&self, option: ProductOptionId) -> String {
        stock_holds_key(&self.prefix, option)
    }

    /// Reserves what fits of `orders` (arrival order): the reservation and each order's verdict.
    /// `waiter` closes when the request that asked is gone: the reservation then stops before its next attempt
    /// (one already decided is still given back by its guard).
    async fn reserve(
        self: Arc<Self>,
        orders: Vec<Vec<OrderLine>>,
        mut waiter: oneshot::Receiver<()>,
    ) -> Result<(Reservation, Vec<Verdict>), DomainError> {
        let refs: Vec<&[OrderLine]> = orders.iter().map(Vec::as_slice).collect();
        let union = union_of(&refs);
        let deadline = Instant::now() + self.wait;
        let gone = || DomainError::unexpected("the request was cancelled");
        // Released when this task ends, after the EXEC: the turn covers the reservation, not the transaction.
        let _turns = tokio::select! {
            turns = self.local.lock_all(&union, deadline) => turns.ok_or(DomainError::LockTimeout { retry_after_secs: 1 })?,
            _ = &mut waiter => return Err(gone()),
        };
        let mut unknown: BTreeSet<ProductOptionId> = BTreeSet::new();
        let (mut aborts, mut loads) = (0, 0);
        loop {
            if matches!(waiter.try_recv(), Err(oneshot::error::TryRecvError::Closed)) {
                return Err(gone());
            }
            let watched: Vec<ProductOptionId> =
                union.iter().map(|l| l.option_id).filter(|id| !unknown.contains(id)).collect();
            let attempt = if watched.is_empty() {
                // Every option is unknown to the database: nothing to reserve, the transaction reports them.
                Attempt::Done {
                    hold: String::new(),
                    take: BTreeMap::new(),
                    verdicts: refs.iter().map(|_| Ok(())).collect(),
                }
            } else {
                let client = self.pool.acquire().await;
                self.attempt(&client, &watched, &refs).await?
            };
            match attempt {
                Attempt::Done { hold, take, verdicts } => {
                    return Ok((Reservation { hold, units: take, inner: self.clone() }, verdicts));
                }
                Attempt::Missing(missing) => {
                    loads += 1;
                    if loads > MAX_LOADS {
                        return Err(DomainError::unavailable("the stock mirror keeps disappearing from Redis"));
                    }
                    unknown.extend(self.load(&missing).await?);
                }
                Attempt::Aborted if aborts < self.retry.max_retries => {
                    tokio::time::sleep(self.retry.delay(aborts)).await;
                    aborts += 1;
                }
                Attempt::Aborted => {
                    tracing::warn!(attempts = aborts + 1, "stock reservation kept losing its EXEC; giving up");
                    return Err(DomainError::LockTimeout { retry_after_secs: 1 });
                }
            }
        }
    }

    /// One WATCH / MGET / (decide) / MULTI / EXEC on a dedicated client.
    async fn attempt(
        &self,
        client: &Client,
        watched: &[ProductOptionId],
        orders: &[&[OrderLine]],
    ) -> Result<Attempt, DomainError> {
        let keys: Vec<String> = watched.iter().map(|id| self.mirror_key(*id)).collect();
        client.watch(keys.clone()).await.map_err(redis_error)?;
        let values: Vec<Option<i64>> = match client.mget(keys).await {
            Ok(values) => values,
            Err(e) => {
                let _ = client.unwatch().await;
                return Err(redis_error(e));
            }
        };
        let missing: Vec<ProductOptionId> =
            watched.iter().zip(&values).filter(|(_, v)| v.is_none()).map(|(id, _)| *id).collect();
        if !missing.is_empty() {
            client.unwatch().await.map_err(redis_error)?;
            return Ok(Attempt::Missing(missing));
        }
        // A mirror below zero (an admin count under the reservations in flight) has nothing to give.
        let available: BTreeMap<ProductOptionId, Stock> = watched
            .iter()
            .zip(values)
            .filter_map(|(id, v)| Some((*id, Stock::new(v?.clamp(0, Stock::MAX)).ok()?)))
            .collect();
        let allocation = allocate(&available, orders.iter().copied());
        if allocation.taken.is_empty() {
            client.unwatch().await.map_err(redis_error)?;
            return Ok(Attempt::Done { hold: String::new(), take: BTreeMap::new(), verdicts: allocation.verdicts });
        }
        let hold = mirror::hold_field(HOLD_TTL);
        let trx = client.multi();
        for (option, units) in &allocation.taken {
            let () = trx.decr_by(self.mirror_key(*option), *units).await.map_err(redis_error)?;
            let () = trx.hset(self.holds_key(*option), (hold.as_str(), *units)).await.map_err(redis_error)?;
        }
        let replies = match trx.exec::<Value>(true).await {
            Ok(Value::Null) => return Ok(Attempt::Aborted),
            Ok(Value::Array(replies)) => replies,
            Ok(other) => {
                self.compensate(&hold, &allocation.taken).await;
                return Err(DomainError::unexpected(format!("EXEC answered {other:?}")));
            }
            Err(e) => {
                // The EXEC may or may not have run: give back whatever it reserved (nothing, if it did not).
                self.compensate(&hold, &allocation.taken).await;
                return Err(redis_error(e));
            }
        };
        // Each DECRBY answers the units left. Below zero means the WATCH did not hold (the connection was
        // replaced between WATCH and EXEC): undo and decide again, as after an abort.
        let overdrawn = replies.iter().step_by(2).any(|left| left.as_i64().is_none_or(|left| left < 0));
        if overdrawn {
            tracing::warn!("a stock reservation ran without its WATCH; undoing it");
            self.compensate(&hold, &allocation.taken).await;
            return Ok(Attempt::Aborted);
        }
        Ok(Attempt::Done { hold, take: allocation.taken, verdicts: allocation.verdicts })
    }

    /// Gives back a reservation whose EXEC failed or ran unprotected (a no-op if it never ran).
    async fn compensate(&self, hold: &str, take: &BTreeMap<ProductOptionId, i64>) {
        if let Err(e) = mirror::release(&self.client, &self.prefix, hold, take).await {
            tracing::warn!(error = %e, "giving back a failed stock reservation failed; reconciliation repairs it");
        }
    }

    /// Loads these absent mirrors from the database; returns the options it has no row for.
    async fn load(&self, missing: &[ProductOptionId]) -> Result<Vec<ProductOptionId>, DomainError> {
        let rows = self.levels.stock_levels(missing).await?;
        let mut unknown = Vec::new();
        for option in missing {
            match rows.iter().find(|r| r.option_id == *option) {
                Some(row) => {
                    let mirrored =
                        mirror::load(&self.client, &self.prefix, *option, row.stock.get()).await.map_err(lock_error)?;
                    tracing::debug!(option = %option, database = row.stock.get(), mirrored, "loaded a stock mirror");
                }
                None => unknown.push(*option),
            }
        }
        Ok(unknown)
    }
}

type Verdict = Result<(), DomainError>;

/// Units reserved in the mirror under one hold; given back (all of it) when dropped unsettled.
struct Reservation {
    hold: String,
    units: BTreeMap<ProductOptionId, i64>,
    inner: Arc<Inner>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let units = std::mem::take(&mut self.units);
        if units.is_empty() {
            return;
        }
        let (hold, inner) = (std::mem::take(&mut self.hold), self.inner.clone());
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    if let Err(e) = mirror::release(&inner.client, &inner.prefix, &hold, &units).await {
                        tracing::warn!(error = %e, "giving back a dropped reservation failed; reconciliation repairs it");
                    }
                });
            }
            Err(_) => tracing::warn!("a reservation was dropped outside a runtime; reconciliation repairs it"),
        }
    }
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation").field("units", &self.units).finish_non_exhaustive()
    }
}

/// Redis failing (down, timing out) is a dependency that is unavailable, not a bug.
fn redis_error(e: fred::error::Error) -> DomainError {
    DomainError::unavailable(LockError::Redis(e))
}

fn lock_error(e: LockError) -> DomainError {
    DomainError::unavailable(e)
}

#[async_trait]
impl StockStrategy for RedisOptimisticStock {
    fn name(&self) -> &'static str {
        "redis-optimistic"
    }

    /// Reserves what fits of the batch in the mirror; the transaction then takes it with the conditional
    /// decrement (the port's default), which stays the last guard.
    ///
    /// # Errors
    /// [`DomainError::LockTimeout`] when the EXEC kept being aborted or the turn did not come;
    /// [`DomainError::Unexpected`] when Redis or the database failed. An order the mirror cannot serve is
    /// refused in its verdict with [`DomainError::OutOfStock`] (nothing is reserved for it, the database is
    /// not asked).
    async fn admit(&self, orders: &[&[OrderLine]]) -> Result<Admission, DomainError> {
        let owned: Vec<Vec<OrderLine>> = orders.iter().map(|lines| lines.to_vec()).collect();
        // A task of its own: if the request is cancelled in the middle of an attempt, the attempt still
        // completes and its guard, dropped with the task's output, gives the units back. `_waiting` tells the
        // task, by closing, not to start another attempt for nobody.
        let (_waiting, waiter) = oneshot::channel();
        let task = tokio::spawn(self.inner.clone().reserve(owned, waiter));
        let (reservation, verdicts) = task.await.map_err(DomainError::unexpected)??;
        Ok(Admission { permit: StockPermit::holding(reservation), verdicts })
    }

    async fn settle(&self, permit: StockPermit, taken: &[OrderLine]) {
        let Ok(mut reservation) = permit.into_guard::<Reservation>() else { return };
        // Taken out of the guard first, so that its drop gives nothing back a second time.
        let reserved = std::mem::take(&mut reservation.units);
        if reserved.is_empty() {
            return;
        }
        let mut give = reserved;
        for line in taken {
            if let Some(units) = give.get_mut(&line.option_id) {
                *units -= line.quantity.get();
            }
        }
        if give.values().any(|units| *units < 0) {
            tracing::error!(?give, "a transaction took more than was reserved for it");
        }
        let (hold, inner) = (std::mem::take(&mut reservation.hold), self.inner.clone());
        // Spawned, so that a request cancelled now cannot cut the give-back in half.
        let task = tokio::spawn(async move { mirror::release(&inner.client, &inner.prefix, &hold, &give).await });
        match task.await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "settling a stock reservation failed; reconciliation repairs it"),
            Err(e) => tracing::warn!(error = %e, "settling a stock reservation did not finish"),
        }
    }
}

#[async_trait]
impl StockMirror for RedisOptimisticStock {
    async fn stock_set(&self, option_id: ProductOptionId, stock: Stock) {
        match mirror::set_count(&self.inner.client, &self.inner.prefix, option_id, stock.get()).await {
            Ok(mirrored) => tracing::debug!(option = %option_id, stock = stock.get(), mirrored, "stock count mirrored"),
            Err(e) => tracing::warn!(
                option = %option_id, error = %e,
                "could not mirror a stock count; reconciliation repairs it"
            ),
        }
    }

    async fn stock_returned(&self, units: &BTreeMap<ProductOptionId, i64>) {
        if units.is_empty() {
            return;
        }
        if let Err(e) = mirror::returned(&self.inner.client, &self.inner.prefix, units).await {
            tracing::warn!(error = %e, "could not mirror stock given back; reconciliation repairs it");
        }
    }
}
