//! Orders and payment: placing (taking stock with the configured strategy), reading, paying, and expiring.
//!
//! Placing and paying have one path, whether combining is on or off. A request becomes a [`Job`]. With combining
//! on (`batch_max > 1`) it queues in a lane ([`super::lanes`]): an order in the lane of its lowest option id
//! (every order of one option shares a lane; an order of several options goes with its first), a payment in one
//! of [`PAYMENT_LANES`] lanes picked by its user (a user's payments share a lane, so they never race each other
//! for the balance, while payments of different users still combine). The lane's worker commits up to
//! `batch_max` jobs at a time, and lanes of different keys commit in parallel. With combining off
//! (`batch_max` 1) the lanes are the same and every batch holds one job: one order per lock hold and per commit,
//! while the buyers of one option queue in this process instead of at the pool and the lock. Where lanes
//! overlap (an order of options 3 and 7 in lane 3, beside lane 7's orders), the stock strategy's protection
//! decides, as it does between instances.
//!
//! A job that waited past its deadline (`wait`), or whose client has closed the connection, is dropped before
//! its batch allocates stock: never committed behind its caller's back.
//!
//! - [`place`]: a batch of orders: validate, admit, claim, allocate, write, commit, settle.
//! - [`pay`]: a batch of payments: the order's state machine, the balance rule, the day's sales.
//! - [`expire`]: the sweeper of unpaid orders.

mod expire;
mod pay;
mod place;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::lanes::{Full, Lanes};
use crate::auth::PendingCaps;
use crate::error::DomainError;
use crate::idempotency::Recorder;
use crate::ids::{OrderId, ProductOptionId, UserId};
use crate::order::{Order, OrderRequest};
use crate::page::{Page, PageRequest};
use crate::payment::{Payment, PaymentStatus};
use crate::ports::{
    CatalogueChanges, Clock, Connection, NoCatalogueReaders, NoStockMirror, OrderRepository, OutboxSignal, PaymentTx,
    StockMirror, StockStrategy, StockTx, UnitOfWork, UserRepository,
};

/// Lanes of payments: a user's payments always share one, and different users spread over all of them.
pub const PAYMENT_LANES: u64 = 4;

/// How requests are combined; [`Combining::OFF`] is one order per lock hold and per commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Combining {
    /// Orders (or payments) one batch takes at most; `1` commits each request alone.
    pub batch_max: usize,
    /// Requests one lane queues at most besides the batch it commits; past it, 503 at once.
    pub queue_max: usize,
    /// How long a request may wait for its batch, and its batch for the strategy's locks, before 503.
    pub wait: Duration,
    /// Order batches of one option that may run at once, where the stock strategy allows it: with 2 the next
    /// batch is validated and written while the current one takes its stock and commits. 1 runs them one by one.
    pub pipeline: usize,
}

impl Combining {
    /// Each request alone, waiting at most 5 s.
    pub const OFF: Self = Self { batch_max: 1, queue_max: 10_000, wait: Duration::from_secs(5), pipeline: 1 };
}

/// How busy a kind of lane is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LaneLoad {
    /// Lanes that have work (a batch committing, or requests waiting).
    pub lanes: usize,
    /// Requests waiting, besides the batches being committed.
    pub queued: usize,
}

impl LaneLoad {
    fn of<K, J>(lanes: &Lanes<K, J>) -> Self
    where
        K: Eq + std::hash::Hash + Clone + Send + 'static,
        J: Send + 'static,
    {
        Self { lanes: lanes.active(), queued: lanes.queued() }
    }
}

/// How orders met their stock strategy since start-up. Each count is kept here, per service (what tests and the
/// benchmark read), and recorded through the `metrics` facade with the strategy as a label (what `/metrics`
/// exports), beside the histograms of waits, batch sizes and commit times.
#[derive(Debug, Default)]
pub struct OrderStats {
    /// The stock strategy's name: the `strategy` label of every series.
    strategy: &'static str,
    /// Orders committed.
    pub placed: AtomicU64,
    /// Orders refused by the validation read, before any lock or transaction.
    pub refused_early: AtomicU64,
    /// Batch transactions retried after an optimistic conflict.
    pub retries: AtomicU64,
    /// Lock acquisitions (strategies that lock before the transaction).
    pub lock_acquisitions: AtomicU64,
    /// Time spent waiting for those locks, in microseconds.
    pub lock_wait_micros: AtomicU64,
    /// Order batches committed: `placed / order_batches` is the mean batch size.
    pub order_batches: AtomicU64,
    /// Payment batches committed.
    pub payment_batches: AtomicU64,
    /// Batches whose transaction failed and whose requests were then committed one at a time.
    pub batch_splits: AtomicU64,
    /// Requests refused at once because their lane was full.
    pub shed: AtomicU64,
    /// Requests dropped before their batch committed: the client had gone or the deadline had passed.
    pub abandoned: AtomicU64,
}

/// A count of [`OrderStats`].
#[derive(Debug, Clone, Copy)]
pub(super) enum Tally {
    Placed,
    RefusedEarly,
    Retries,
    OrderBatches,
    PaymentBatches,
    BatchSplits,
    Shed,
    Abandoned,
}

impl OrderStats {
    fn new(strategy: &'static str) -> Self {
        Self { strategy, ..Self::default() }
    }

    /// Adds `n` to a count.
    pub(super) fn add(&self, tally: Tally, n: u64) {
        let (cell, name) = match tally {
            Tally::Placed => (&self.placed, "shop_orders_placed_total"),
            Tally::RefusedEarly => (&self.refused_early, "shop_orders_refused_early_total"),
            Tally::Retries => (&self.retries, "shop_order_retries_total"),
            Tally::OrderBatches => (&self.order_batches, "shop_order_batches_total"),
            Tally::PaymentBatches => (&self.payment_batches, "shop_payment_batches_total"),
            Tally::BatchSplits => (&self.batch_splits, "shop_batch_splits_total"),
            Tally::Shed => (&self.shed, "shop_requests_shed_total"),
            Tally::Abandoned => (&self.abandoned, "shop_requests_abandoned_total"),
        };
        cell.fetch_add(n, Ordering::Relaxed);
        metrics::counter!(name, "strategy" => self.strategy).increment(n);
    }

    /// A batch waited `waited` for the strategy's lock or reservation.
    pub(super) fn stock_wait(&self, waited: Duration) {
        self.lock_acquisitions.fetch_add(1, Ordering::Relaxed);
        self.lock_wait_micros.fetch_add(micros(waited), Ordering::Relaxed);
        metrics::counter!("shop_stock_lock_acquisitions_total", "strategy" => self.strategy).increment(1);
        metrics::counter!("shop_stock_lock_wait_microseconds_total", "strategy" => self.strategy)
            .increment(micros(waited));
        metrics::histogram!("shop_stock_wait_seconds", "strategy" => self.strategy).record(waited);
    }

    /// A batch of `size` orders (or payments: `kind`) whose oldest request queued `queued` and whose
    /// transaction took `commit` (statements and commit).
    pub(super) fn batch(&self, kind: &'static str, size: usize, queued: Duration, commit: Duration) {
        let labels = [("strategy", self.strategy), ("kind", kind)];
        #[allow(clippy::cast_precision_loss)] // batch sizes are far below 2^52
        metrics::histogram!("shop_batch_size", &labels).record(size as f64);
        metrics::histogram!("shop_batch_queue_wait_seconds", &labels).record(queued);
        metrics::histogram!("shop_batch_commit_seconds", &labels).record(commit);
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// A request on its way through a batch: what it asks, until when and for whom it is worth doing, and where
/// its answer goes.
pub(super) struct Job<A, T> {
    pub(super) ask: A,
    pub(super) queued_at: Instant,
    deadline: Instant,
    connection: Option<Arc<dyn Connection>>,
    reply: oneshot::Sender<Result<T, DomainError>>,
}

impl<A, T> Job<A, T> {
    fn new(
        ask: A,
        wait: Duration,
        connection: Option<Arc<dyn Connection>>,
    ) -> (Self, oneshot::Receiver<Result<T, DomainError>>) {
        let (reply, answer) = oneshot::channel();
        let now = Instant::now();
        (Self { ask, queued_at: now, deadline: now + wait, connection, reply }, answer)
    }

    /// Why nobody wants this job done any more: its caller has gone (the reply channel or the client's
    /// connection closed), or it waited past its deadline.
    fn abandoned(&self) -> Option<DomainError> {
        if self.reply.is_closed() || self.connection.as_ref().is_some_and(|c| c.is_closed()) {
            return Some(DomainError::unavailable("the client closed the connection before its batch committed"));
        }
        let late = Instant::now() >= self.deadline;
        late.then_some(DomainError::LockTimeout { retry_after_secs: 1 })
    }

    fn answer(self, outcome: Result<T, DomainError>) {
        // A caller that has gone has nobody to tell.
        let _ = self.reply.send(outcome);
    }
}

/// Everything a batch needs: shared by the service's handle and by its lanes' workers (which hold this, not
/// the service, so that the lanes do not keep themselves alive).
#[derive(Clone)]
pub(super) struct Core {
    pub(super) stats: Arc<OrderStats>,
    pub(super) uow: Arc<dyn UnitOfWork>,
    pub(super) orders: Arc<dyn OrderRepository>,
    pub(super) users: Arc<dyn UserRepository>,
    pub(super) stock: Arc<dyn StockStrategy>,
    pub(super) clock: Arc<dyn Clock>,
    /// Told after a commit that recorded events.
    pub(super) events: Arc<dyn OutboxSignal>,
    /// Whether orders, payments and cancellations record their events in the outbox.
    pub(super) outbox: bool,
    pub(super) mirror: Arc<dyn StockMirror>,
    /// Told after a commit that moved stock: the catalogue's cache.
    pub(super) catalogue: Arc<dyn CatalogueChanges>,
    pub(super) caps: PendingCaps,
}

/// Whether the order service records events.
#[derive(Clone)]
pub enum Events {
    /// Every order, payment and cancellation records its event in the outbox, in its own transaction; the
    /// signal hears of each commit that did.
    Recorded(Arc<dyn OutboxSignal>),
    /// Nothing is recorded (a deployment that needs no events, or a benchmark of what they cost).
    Off,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Recorded(_) => "Recorded",
            Self::Off => "Off",
        })
    }
}

/// The signal of [`Events::Off`].
struct Silent;

impl OutboxSignal for Silent {
    fn recorded(&self) {}
}

impl Core {
    /// Answers and drops the jobs nobody waits for any more; the rest, in order.
    fn still_wanted<A, T>(&self, batch: Vec<Job<A, T>>) -> Vec<Job<A, T>> {
        let mut wanted = Vec::with_capacity(batch.len());
        for job in batch {
            match job.abandoned() {
                Some(why) => {
                    self.stats.add(Tally::Abandoned, 1);
                    job.answer(Err(why));
                }
                None => wanted.push(job),
            }
        }
        wanted
    }
}

pub(super) type PlaceJob = Job<place::OrderAsk, Order>;
pub(super) type PayJob = Job<pay::PaymentAsk, Payment>;

#[derive(Clone)]
pub struct OrderService {
    core: Arc<Core>,
    combining: Combining,
    placing: Lanes<ProductOptionId, PlaceJob>,
    paying: Lanes<u64, PayJob>,
}

impl std::fmt::Debug for OrderService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrderService")
            .field("stock", &self.core.stock.name())
            .field("combining", &self.combining)
            .finish_non_exhaustive()
    }
}

impl OrderService {
    /// A service with combining off ([`Combining::OFF`]) and no stock mirror.
    pub fn new(
        uow: Arc<dyn UnitOfWork>,
        orders: Arc<dyn OrderRepository>,
        users: Arc<dyn UserRepository>,
        stock: Arc<dyn StockStrategy>,
        clock: Arc<dyn Clock>,
        events: Events,
    ) -> Self {
        let (events, outbox): (Arc<dyn OutboxSignal>, bool) = match events {
            Events::Recorded(signal) => (signal, true),
            Events::Off => (Arc::new(Silent), false),
        };
        let core = Core {
            stats: Arc::new(OrderStats::new(stock.name())),
            uow,
            orders,
            users,
            stock,
            clock,
            events,
            outbox,
            mirror: Arc::new(NoStockMirror),
            catalogue: Arc::new(NoCatalogueReaders),
            caps: PendingCaps::NONE,
        };
        Self::with_lanes(Arc::new(core), Combining::OFF)
    }

    /// Tells `mirror` of the stock that expired and unpaid orders give back (after the commit): the strategy's
    /// copy of the stock, when it keeps one.
    #[must_use]
    pub fn with_stock_mirror(self, mirror: Arc<dyn StockMirror>) -> Self {
        let mut core = (*self.core).clone();
        core.mirror = mirror;
        Self::with_lanes(Arc::new(core), self.combining)
    }

    /// Tells `catalogue` of every commit that moved stock (orders placed, paid short, expired), after it.
    #[must_use]
    pub fn with_catalogue_changes(self, catalogue: Arc<dyn CatalogueChanges>) -> Self {
        let mut core = (*self.core).clone();
        core.catalogue = catalogue;
        Self::with_lanes(Arc::new(core), self.combining)
    }

    /// Caps what one user may hold in unpaid orders: an order past it is 409 `PENDING_LIMIT_EXCEEDED`.
    #[must_use]
    pub fn with_pending_caps(self, caps: PendingCaps) -> Self {
        let mut core = (*self.core).clone();
        core.caps = caps;
        Self::with_lanes(Arc::new(core), self.combining)
    }

    /// Combines orders, and payments, that arrive together (see the module documentation).
    #[must_use]
    pub fn combining(self, combining: Combining) -> Self {
        Self::with_lanes(self.core, combining)
    }

    /// The service over `core`, with fresh lanes for `combining`.
    fn with_lanes(core: Arc<Core>, combining: Combining) -> Self {
        let Combining { batch_max, queue_max, .. } = combining;
        let (placer, payer) = (core.clone(), core.clone());
        // Order batches of one option may overlap where the strategy allows it; a user's payments never do.
        let depth = combining.pipeline.min(core.stock.max_pipeline()).max(1);
        let placing = Lanes::new(batch_max, queue_max, depth, move |batch, handoff| {
            let core = placer.clone();
            async move { core.place(batch, Some(handoff)).await }
        });
        let paying = Lanes::new(batch_max, queue_max, 1, move |batch, _| {
            let core = payer.clone();
            async move { core.pay(batch).await }
        });
        Self { core, combining, placing, paying }
    }

    /// Counters of how orders met the stock strategy.
    #[must_use]
    pub fn stats(&self) -> &OrderStats {
        &self.core.stats
    }

    /// The configured stock strategy's name.
    #[must_use]
    pub fn stock_strategy(&self) -> &'static str {
        self.core.stock.name()
    }

    /// The order lanes now: how many run, and how many orders wait in them (not counting the batches being
    /// committed).
    #[must_use]
    pub fn placing_load(&self) -> LaneLoad {
        LaneLoad::of(&self.placing)
    }

    /// The payment lanes now, as [`OrderService::placing_load`].
    #[must_use]
    pub fn paying_load(&self) -> LaneLoad {
        LaneLoad::of(&self.paying)
    }

    /// Places an order: validated and priced, then committed with its batch in one short transaction that
    /// inserts the order, its items and a pending payment, empties those options from the cart, and takes the
    /// stock last. Either every line gets its stock or nothing is kept. `order.created` is published after the
    /// commit. With a `recorder`, the response is recorded in the same transaction as the order. `connection`
    /// is the client's, when there is one: if it closes while the order waits, the order is dropped.
    ///
    /// # Errors
    /// [`DomainError::UserNotFound`], [`DomainError::ProductOptionNotFound`], [`DomainError::ProductNotOnSale`],
    /// [`DomainError::OutOfStock`], [`DomainError::PendingLimitExceeded`], [`DomainError::LockTimeout`] (a lock
    /// wait, the optimistic retries or the order's wait in its lane ran out), [`DomainError::Unavailable`] (its
    /// lane is full).
    pub async fn place(
        &self,
        request: OrderRequest,
        recorder: Option<&Recorder<Order>>,
        connection: Option<Arc<dyn Connection>>,
    ) -> Result<Order, DomainError> {
        // An order's lane is its lowest option's; a request always has a line (`OrderRequest::new` refuses none).
        let Some(lane) = request.lines().first().map(|line| line.option_id) else {
            return Err(DomainError::unexpected("an order request without lines"));
        };
        let ask = place::OrderAsk { request, recorder: recorder.cloned() };
        let (job, answer) = Job::new(ask, self.combining.wait, connection);
        self.queue(&self.placing, lane, job)?;
        answered(answer).await
    }

    /// Pays a pending order from the user's balance, with its batch in one transaction: the order moves to PAID
    /// only if it is still pending (so of concurrent payments exactly one proceeds), the balance is spent as
    /// [`crate::user::User::spend`] decides (a guarded UPDATE behind it), the day's sales grow and the payment
    /// completes. Without enough balance the order is cancelled, the payment fails and the stock goes back, in
    /// that same transaction, and the answer is 402. With a `recorder`, the response is recorded in the same
    /// transaction.
    ///
    /// # Errors
    /// [`DomainError::OrderNotFound`] (also for another user's order), [`DomainError::OrderNotPayable`],
    /// [`DomainError::InsufficientBalance`], [`DomainError::Unavailable`] (its lane is full).
    pub async fn pay(
        &self,
        order_id: OrderId,
        user_id: UserId,
        recorder: Option<&Recorder<Payment>>,
        connection: Option<Arc<dyn Connection>>,
    ) -> Result<Payment, DomainError> {
        let ask = pay::PaymentAsk { order_id, user_id, recorder: recorder.cloned() };
        let (job, answer) = Job::new(ask, self.combining.wait, connection);
        self.queue(&self.paying, user_id.get().unsigned_abs() % PAYMENT_LANES, job)?;
        answered(answer).await
    }

    fn queue<K, A, T>(&self, lanes: &Lanes<K, Job<A, T>>, key: K, job: Job<A, T>) -> Result<(), DomainError>
    where
        K: Eq + std::hash::Hash + Clone + Send + 'static,
        A: Send + 'static,
        T: Send + 'static,
    {
        lanes.submit(key, job).map_err(|Full(_)| {
            self.core.stats.add(Tally::Shed, 1);
            DomainError::unavailable("too many requests are waiting for this option; try again shortly")
        })
    }

    /// # Errors
    /// [`DomainError::OrderNotFound`].
    pub async fn get(&self, id: OrderId) -> Result<Order, DomainError> {
        self.core.orders.find(id).await?.ok_or(DomainError::OrderNotFound(id))
    }

    /// One of `user`'s orders.
    ///
    /// # Errors
    /// [`DomainError::OrderNotFound`], also for another user's order (as if it did not exist).
    pub async fn get_for(&self, id: OrderId, user: UserId) -> Result<Order, DomainError> {
        self.get(id).await.and_then(|o| if o.user_id == user { Ok(o) } else { Err(DomainError::OrderNotFound(id)) })
    }

    /// The user's orders, newest first.
    ///
    /// # Errors
    /// [`DomainError::UserNotFound`].
    pub async fn list(&self, user_id: UserId, page: PageRequest) -> Result<Page<Order>, DomainError> {
        if self.core.users.find(user_id).await?.is_none() {
            return Err(DomainError::UserNotFound(user_id));
        }
        self.core.orders.list_by_user(user_id, page).await
    }

    /// Cancels pending orders older than `timeout`, failing their payments and giving their stock back, in
    /// batches of `batch` per transaction; how many this call cancelled. See [`expire`].
    ///
    /// # Errors
    /// What the store reports (what was committed before stays).
    pub async fn expire_overdue(&self, timeout: Duration, batch: u64) -> Result<usize, DomainError> {
        self.core.expire_overdue(timeout, batch).await
    }
}

async fn answered<T>(answer: oneshot::Receiver<Result<T, DomainError>>) -> Result<T, DomainError> {
    answer.await.unwrap_or_else(|_| Err(DomainError::unexpected("the batch ended without an answer")))
}

/// Cancels these orders' payments and gives their stock back, summed per option (ascending, the order every
/// stock writer locks in): what a failed payment and an expiry both do once the order is CANCELLED. Returns the
/// units given back, for the stock mirror after the commit.
pub(super) async fn give_back<Tx: PaymentTx + StockTx + ?Sized>(
    tx: &mut Tx,
    orders: &[&Order],
    now: DateTime<Utc>,
) -> Result<BTreeMap<ProductOptionId, i64>, DomainError> {
    let mut units: BTreeMap<ProductOptionId, i64> = BTreeMap::new();
    for line in orders.iter().flat_map(|o| o.stock_lines()) {
        *units.entry(line.option_id).or_default() += line.quantity.get();
    }
    if orders.is_empty() {
        return Ok(units);
    }
    let payments: Vec<_> = orders.iter().map(|o| o.payment.id).collect();
    tx.settle_payments(&payments, PaymentStatus::Failed, now).await?;
    tx.restore_stock(&units, now).await?;
    Ok(units)
}

#[cfg(test)]
pub(super) mod testing {
    //! Fixtures of the use-case tests: orders, options and a unit of work handing out mocked transactions.

    use std::sync::Mutex;

    use chrono::Utc;

    use super::*;
    use crate::ids::{PaymentId, ProductId};
    use crate::money::{Money, Quantity, Stock};
    use crate::order::{OrderItem, OrderLine, OrderStatus, OrderableOption};
    use crate::payment::PaymentMethod;
    use crate::ports::{
        MockClock, MockOrderRepository, MockOutboxSignal, MockTransaction, MockUnitOfWork, MockUserRepository,
        Transaction,
    };
    use crate::product::{ProductOption, ProductStatus};

    pub fn uid(n: i64) -> UserId {
        UserId::new(n).unwrap()
    }

    pub fn oid(n: i64) -> ProductOptionId {
        ProductOptionId::new(n).unwrap()
    }

    pub fn order_id(n: i64) -> OrderId {
        OrderId::new(n).unwrap()
    }

    pub fn clock() -> Arc<MockClock> {
        let mut clock = MockClock::new();
        clock.expect_now().returning(Utc::now);
        Arc::new(clock)
    }

    pub fn request(user: i64, lines: &[(i64, i64)]) -> OrderRequest {
        OrderRequest::new(
            uid(user),
            lines.iter().map(|(o, q)| OrderLine { option_id: oid(*o), quantity: Quantity::new(*q).unwrap() }),
        )
        .unwrap()
    }

    pub fn orderable(id: i64, stock: i64, status: ProductStatus) -> OrderableOption {
        OrderableOption {
            option: ProductOption {
                id: oid(id),
                product_id: ProductId::new(10).unwrap(),
                name: "L".into(),
                price: Money::new(1000).unwrap(),
                stock: Stock::new(stock).unwrap(),
            },
            product_name: "shirt".into(),
            product_status: status,
        }
    }

    /// An order of `quantity` units of option 1 at 1,000 won each.
    pub fn order(id: i64, user: i64, status: OrderStatus, quantity: i64) -> Order {
        Order {
            id: order_id(id),
            user_id: uid(user),
            status,
            total_price: Money::new(1000 * quantity).unwrap(),
            ordered_at: Utc::now(),
            items: vec![OrderItem {
                product_id: ProductId::new(10).unwrap(),
                product_option_id: oid(1),
                product_name: "shirt".into(),
                option_name: "L".into(),
                quantity: Quantity::new(quantity).unwrap(),
                unit_price: Money::new(1000).unwrap(),
                total_price: Money::new(1000 * quantity).unwrap(),
            }],
            payment: Payment {
                id: PaymentId::new(100 + id).unwrap(),
                order_id: order_id(id),
                user_id: uid(user),
                status: PaymentStatus::Pending,
                method: PaymentMethod::Balance,
                amount: Money::new(1000 * quantity).unwrap(),
                paid_at: None,
            },
        }
    }

    /// A unit of work handing out these transactions in turn; a transaction past them fails the test.
    pub fn uow(txs: Vec<MockTransaction>) -> Arc<MockUnitOfWork> {
        let queue = Mutex::new(txs.into_iter());
        let mut uow = MockUnitOfWork::new();
        uow.expect_begin().returning(move || {
            let tx = queue.lock().unwrap().next().expect("no more transactions expected");
            let tx: Box<dyn Transaction> = Box::new(tx);
            Ok(tx)
        });
        Arc::new(uow)
    }

    /// A signal that counts the commits that recorded events.
    pub fn signal() -> (Arc<MockOutboxSignal>, Arc<AtomicU64>) {
        let seen = Arc::new(AtomicU64::new(0));
        let count = seen.clone();
        let mut signal = MockOutboxSignal::new();
        signal.expect_recorded().returning(move || {
            count.fetch_add(1, Ordering::SeqCst);
        });
        (Arc::new(signal), seen)
    }

    /// A service recording events (each transaction that commits must expect `record_events`); the count of
    /// commits that signalled them.
    pub fn service(
        txs: Vec<MockTransaction>,
        stock: Arc<dyn StockStrategy>,
        orders: MockOrderRepository,
        users: MockUserRepository,
    ) -> (OrderService, Arc<AtomicU64>) {
        let (signal, seen) = signal();
        let events = Events::Recorded(signal);
        (OrderService::new(uow(txs), Arc::new(orders), Arc::new(users), stock, clock(), events), seen)
    }

    /// The batch runner itself, to hand it a batch of the test's making.
    pub fn core(
        txs: Vec<MockTransaction>,
        stock: Arc<dyn StockStrategy>,
        orders: MockOrderRepository,
        users: MockUserRepository,
    ) -> (Core, Arc<AtomicU64>) {
        let (service, seen) = service(txs, stock, orders, users);
        ((*service.core).clone(), seen)
    }

    /// Users that all exist.
    pub fn everyone() -> MockUserRepository {
        let mut users = MockUserRepository::new();
        users.expect_existing().returning(|ids| Ok(ids.to_vec()));
        users
    }

    /// Options 1..=9, each with `stock` units, all on sale.
    pub fn catalogue(stock: i64) -> MockOrderRepository {
        let mut orders = MockOrderRepository::new();
        orders.expect_orderable_options().returning(move |ids| {
            Ok(ids
                .iter()
                .filter(|id| id.get() < 10)
                .map(|id| orderable(id.get(), stock, ProductStatus::Active))
                .collect())
        });
        orders
    }

    /// A connection the test closes.
    #[derive(Debug, Default)]
    pub struct TestConnection(pub std::sync::atomic::AtomicBool);

    impl Connection for TestConnection {
        fn is_closed(&self) -> bool {
            self.0.load(Ordering::SeqCst)
        }
    }
}
