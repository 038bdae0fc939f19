//! Orders and payment: create (taking stock with the configured strategy), read, pay, and expire.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::error::DomainError;
use crate::idempotency::Recorder;
use crate::ids::{OrderId, ProductOptionId, UserId};
use crate::money::Quantity;
use crate::order::{NewOrder, Order, OrderLine, OrderRequest, OrderStatus};
use crate::page::{Page, PageRequest};
use crate::payment::{Payment, PaymentStatus};
use crate::ports::{
    Clock, DomainEvent, EventPublisher, NoStockMirror, OrderRepository, StockMirror, Transaction, UnitOfWork,
    UserRepository,
};
use crate::sales::DailySales;
use crate::stock::{StockPermit, StockStrategy};

use super::batch::{self, Combiners, PendingOrder, PendingPayment};

/// How orders met their stock strategy since start-up: what `/metrics` shows and the benchmark reads.
#[derive(Debug, Default)]
pub struct OrderStats {
    /// Orders committed.
    pub placed: AtomicU64,
    /// Orders refused by the stock read before (or just after winning) the lock, without a transaction.
    pub refused_early: AtomicU64,
    /// Order transactions retried after an optimistic conflict.
    pub retries: AtomicU64,
    /// Lock acquisitions (strategies that lock before the transaction).
    pub lock_acquisitions: AtomicU64,
    /// Time spent waiting for those locks, in microseconds.
    pub lock_wait_micros: AtomicU64,
    /// Order batches committed (with combining on): `placed / order_batches` is the mean batch size.
    pub order_batches: AtomicU64,
    /// Payment batches committed (with combining on).
    pub payment_batches: AtomicU64,
    /// Batches whose transaction failed and whose requests were then committed one at a time.
    pub batch_splits: AtomicU64,
}

pub(super) fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

#[derive(Clone)]
pub struct OrderService {
    pub(super) stats: Arc<OrderStats>,
    pub(super) uow: Arc<dyn UnitOfWork>,
    pub(super) orders: Arc<dyn OrderRepository>,
    pub(super) users: Arc<dyn UserRepository>,
    pub(super) stock: Arc<dyn StockStrategy>,
    pub(super) clock: Arc<dyn Clock>,
    pub(super) events: Arc<dyn EventPublisher>,
    pub(super) mirror: Arc<dyn StockMirror>,
    combiners: Combiners,
}

impl std::fmt::Debug for OrderService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrderService").field("stock", &self.stock.name()).finish_non_exhaustive()
    }
}

impl OrderService {
    pub fn new(
        uow: Arc<dyn UnitOfWork>,
        orders: Arc<dyn OrderRepository>,
        users: Arc<dyn UserRepository>,
        stock: Arc<dyn StockStrategy>,
        clock: Arc<dyn Clock>,
        events: Arc<dyn EventPublisher>,
    ) -> Self {
        Self {
            stats: Arc::new(OrderStats::default()),
            uow,
            orders,
            users,
            stock,
            clock,
            events,
            mirror: Arc::new(NoStockMirror),
            combiners: Combiners::default(),
        }
    }

    /// Tells `mirror` of the stock that expired and unpaid orders give back (after the commit): the strategy's
    /// copy of the stock, when it keeps one.
    #[must_use]
    pub fn with_stock_mirror(mut self, mirror: Arc<dyn StockMirror>) -> Self {
        self.mirror = mirror;
        self
    }

    /// Combines orders, and payments, that arrive together: each batch of up to `max` takes the stock
    /// strategy's protection once and commits in one transaction (see [`super::batch`]). `max <= 1` leaves
    /// combining off: one order per lock hold and per commit. Call it last: the batch workers run on a copy of
    /// the service as it is now.
    ///
    /// # Panics
    /// With `max > 1`, outside a tokio runtime (the batch workers are spawned on it).
    #[must_use]
    pub fn combining(mut self, max: usize) -> Self {
        self.combiners = if max > 1 { Combiners::spawn(&self, max) } else { Combiners::default() };
        self
    }

    /// Counters of how orders met the stock strategy.
    #[must_use]
    pub fn stats(&self) -> &OrderStats {
        &self.stats
    }

    /// The configured stock strategy's name.
    #[must_use]
    pub fn stock_strategy(&self) -> &'static str {
        self.stock.name()
    }

    /// Places an order in one short transaction: validate, price, insert the order, its items and a pending
    /// payment, empty those options from the cart, and take the stock last. Either every line gets its stock or
    /// nothing is kept. `order.created` is published after the commit.
    ///
    /// # Errors
    /// [`DomainError::UserNotFound`], [`DomainError::ProductOptionNotFound`], [`DomainError::ProductNotOnSale`],
    /// [`DomainError::OutOfStock`], [`DomainError::LockTimeout`] (a lock wait or the optimistic retries ran out).
    ///
    /// With a `recorder`, the response is recorded in the same transaction as the order.
    pub async fn create(
        &self,
        request: OrderRequest,
        recorder: Option<&Recorder<Order>>,
    ) -> Result<Order, DomainError> {
        let Some(placing) = &self.combiners.placing else {
            return self.create_alone(request, recorder).await;
        };
        let recorder = recorder.cloned();
        batch::submit(placing, |reply| PendingOrder { queued_at: std::time::Instant::now(), request, recorder, reply })
            .await
    }

    /// One order, one lock hold, one transaction: the path when combining is off.
    async fn create_alone(
        &self,
        request: OrderRequest,
        recorder: Option<&Recorder<Order>>,
    ) -> Result<Order, DomainError> {
        self.refuse_if_short(&request).await?;
        let waited = std::time::Instant::now();
        let permit = self.stock.acquire(request.lines()).await?;
        if permit.is_held() {
            bump(&self.stats.lock_acquisitions, 1);
            bump(&self.stats.lock_wait_micros, u64::try_from(waited.elapsed().as_micros()).unwrap_or(u64::MAX));
            // Buyers who queued on the lock while the last units went learn it from one read under the lock
            // (exact now: stock only falls by a lock holder), not from a whole transaction.
            if let Err(short) = self.refuse_if_short(&request).await {
                self.stock.settle(permit, &[]).await;
                return Err(short);
            }
        }
        let outcome = self.create_retrying(&request, &permit, recorder).await;
        // The permit (a lock, a reservation) is settled only now, after the commit or the rollback.
        let taken = if outcome.is_ok() { request.lines() } else { &[] };
        self.stock.settle(permit, taken).await;
        let order = outcome?;
        bump(&self.stats.placed, 1);
        self.events.publish(DomainEvent::OrderCreated {
            order_id: order.id,
            user_id: order.user_id,
            total_price: order.total_price,
        });
        Ok(order)
    }

    /// A sold-out option is refused before any lock or transaction: under a flash sale most buyers arrive after
    /// the last unit went, and each would otherwise queue for the lock only to learn it. The answer is exact at
    /// the moment of the read (stock only comes back by a cancellation or an admin count, which may land just
    /// after it); the buyers it lets through still meet the strategy's guarded write.
    async fn refuse_if_short(&self, request: &OrderRequest) -> Result<(), DomainError> {
        let ids: Vec<ProductOptionId> = request.lines().iter().map(|l| l.option_id).collect();
        let levels = self.orders.stock_levels(&ids).await?;
        for line in request.lines() {
            let short = levels
                .iter()
                .find(|row| row.option_id == line.option_id)
                .is_some_and(|row| row.stock.checked_take(line.quantity).is_none());
            if short {
                bump(&self.stats.refused_early, 1);
                return Err(DomainError::OutOfStock { option_id: line.option_id });
            }
        }
        // An option missing here is reported by the transaction, with the rest of its validation.
        Ok(())
    }

    /// The order's transaction, retried per the strategy's policy while an optimistic write loses its race.
    async fn create_retrying(
        &self,
        request: &OrderRequest,
        permit: &StockPermit,
        recorder: Option<&Recorder<Order>>,
    ) -> Result<Order, DomainError> {
        let retry = self.stock.retry_policy();
        let mut attempt = 0;
        loop {
            match self.try_create(request, permit, recorder).await {
                Err(DomainError::WriteConflict) if attempt < retry.max_retries => {
                    bump(&self.stats.retries, 1);
                    tokio::time::sleep(retry.delay(attempt)).await;
                    attempt += 1;
                }
                Err(DomainError::WriteConflict) => {
                    tracing::warn!(attempts = attempt + 1, "optimistic stock write kept losing; giving up");
                    return Err(DomainError::LockTimeout { retry_after_secs: 1 });
                }
                other => return other,
            }
        }
    }

    async fn try_create(
        &self,
        request: &OrderRequest,
        permit: &StockPermit,
        recorder: Option<&Recorder<Order>>,
    ) -> Result<Order, DomainError> {
        let now = self.clock.now();
        let ids: Vec<ProductOptionId> = request.lines().iter().map(|l| l.option_id).collect();
        let mut tx = self.uow.begin().await?;
        if !tx.user_exists(request.user_id()).await? {
            return Err(DomainError::UserNotFound(request.user_id()));
        }
        let options = tx.orderable_options(&ids).await?;
        let new = NewOrder::price(request, &options, now)?;
        let order = tx.insert_order(&new).await?;
        tx.remove_from_cart(request.user_id(), &ids, now).await?;
        // Last, so that whatever it locks is held only until the commit just below.
        self.stock.take(tx.as_mut(), request.lines(), permit, now).await?;
        let order = Ok(order);
        if let Some(recorder) = recorder {
            recorder.record_in(tx.as_mut(), &order, now).await?;
        }
        tx.commit().await?;
        order
    }

    /// # Errors
    /// [`DomainError::OrderNotFound`].
    pub async fn get(&self, id: OrderId) -> Result<Order, DomainError> {
        self.orders.find(id).await?.ok_or(DomainError::OrderNotFound(id))
    }

    /// The user's orders, newest first.
    ///
    /// # Errors
    /// [`DomainError::UserNotFound`].
    pub async fn list(&self, user_id: UserId, page: PageRequest) -> Result<Page<Order>, DomainError> {
        if self.users.find(user_id).await?.is_none() {
            return Err(DomainError::UserNotFound(user_id));
        }
        self.orders.list_by_user(user_id, page).await
    }

    /// Pays a pending order from the user's balance, in one transaction: the order moves to PAID only if it
    /// is still pending (so of concurrent payments exactly one proceeds), the balance is spent with a
    /// conditional UPDATE, the day's sales grow and the payment completes. Without enough balance the order is
    /// cancelled, the payment fails and the stock goes back, in that same transaction, and the answer is 402.
    ///
    /// # Errors
    /// [`DomainError::OrderNotFound`] (also for another user's order), [`DomainError::OrderNotPayable`],
    /// [`DomainError::InsufficientBalance`].
    ///
    /// With a `recorder`, the response (the payment, or the 402) is recorded in the same transaction.
    pub async fn pay(
        &self,
        order_id: OrderId,
        user_id: UserId,
        recorder: Option<&Recorder<Payment>>,
    ) -> Result<Payment, DomainError> {
        let Some(paying) = &self.combiners.paying else {
            return self.pay_alone(order_id, user_id, recorder).await;
        };
        let recorder = recorder.cloned();
        batch::submit(paying, |reply| PendingPayment { order_id, user_id, recorder, reply }).await
    }

    /// One payment in one transaction: the path when combining is off, and for each payment of a failed batch.
    pub(super) async fn pay_alone(
        &self,
        order_id: OrderId,
        user_id: UserId,
        recorder: Option<&Recorder<Payment>>,
    ) -> Result<Payment, DomainError> {
        let now = self.clock.now();
        let mut tx = self.uow.begin().await?;
        let order = tx
            .find_order(order_id)
            .await?
            .filter(|o| o.user_id == user_id)
            .ok_or(DomainError::OrderNotFound(order_id))?;
        order.ensure_payable()?;
        if !tx.transition_order(order_id, OrderStatus::PendingPayment, OrderStatus::Paid, now).await? {
            // Another payment or the sweeper got there between our read and our write.
            let status = tx.find_order(order_id).await?.map_or(OrderStatus::Cancelled, |o| o.status);
            return Err(DomainError::OrderNotPayable { order_id, status });
        }
        let outcome = match tx.spend_balance(user_id, order.total_price, now).await? {
            Some(_) => {
                tx.add_daily_sales(&DailySales::of_items(now.date_naive(), &order.items), now).await?;
                tx.settle_payment(order.payment.id, PaymentStatus::Completed, now).await?;
                let mut payment = order.payment.clone();
                payment.status = PaymentStatus::Completed;
                payment.paid_at = Some(now);
                Ok(payment)
            }
            None => {
                let balance = tx.balance(user_id).await?;
                tx.transition_order(order_id, OrderStatus::Paid, OrderStatus::Cancelled, now).await?;
                tx.settle_payment(order.payment.id, PaymentStatus::Failed, now).await?;
                tx.restore_stock(&order.stock_lines(), now).await?;
                // Committed below, then answered as 402: the cancellation is the outcome.
                Err(DomainError::InsufficientBalance { balance, required: order.total_price })
            }
        };
        if let Some(recorder) = recorder {
            recorder.record_in(tx.as_mut(), &outcome, now).await?;
        }
        tx.commit().await?;
        match &outcome {
            Ok(payment) => self.events.publish(DomainEvent::PaymentCompleted {
                payment_id: payment.id,
                order_id,
                user_id,
                amount: payment.amount,
            }),
            Err(DomainError::InsufficientBalance { .. }) => self.mirror.stock_returned(&order.stock_lines()).await,
            Err(_) => {}
        }
        outcome
    }

    /// Cancels pending orders older than `timeout`, failing their payments and giving their stock back, in
    /// batches of `batch` per transaction. Each order is cancelled once even when several instances sweep at
    /// the same time: the status moves only from PENDING_PAYMENT, and only one transaction can move it.
    /// Returns how many orders this call cancelled.
    ///
    /// # Errors
    /// [`DomainError::Unexpected`] when the store fails (what was committed before stays).
    pub async fn expire_overdue(&self, timeout: Duration, batch: u64) -> Result<usize, DomainError> {
        let now = self.clock.now();
        let cutoff = now - chrono::Duration::from_std(timeout).unwrap_or(chrono::Duration::MAX);
        let mut cancelled = 0;
        loop {
            let mut tx = self.uow.begin().await?;
            let due = tx.overdue_orders(cutoff, batch).await?;
            let (claimed, given_back) = expire_batch(tx.as_mut(), &due, now).await?;
            tx.commit().await?;
            if !given_back.is_empty() {
                self.mirror.stock_returned(&given_back).await;
            }
            cancelled += claimed;
            if (due.len() as u64) < batch {
                return Ok(cancelled);
            }
        }
    }
}

/// Cancels the orders of one batch that are still pending and gives back their stock, summed per option and in
/// ascending option order (the order every stock writer locks in). Returns how many it cancelled and the lines
/// it gave back.
async fn expire_batch(
    tx: &mut dyn Transaction,
    due: &[OrderId],
    now: DateTime<Utc>,
) -> Result<(usize, Vec<OrderLine>), DomainError> {
    let mut give_back: BTreeMap<ProductOptionId, i64> = BTreeMap::new();
    let mut claimed = 0;
    for id in due {
        if !tx.transition_order(*id, OrderStatus::PendingPayment, OrderStatus::Cancelled, now).await? {
            continue;
        }
        let Some(order) = tx.find_order(*id).await? else { continue };
        tx.settle_payment(order.payment.id, PaymentStatus::Failed, now).await?;
        for line in order.stock_lines() {
            *give_back.entry(line.option_id).or_default() += line.quantity.get();
        }
        claimed += 1;
    }
    let mut lines = Vec::with_capacity(give_back.len());
    for (option_id, units) in give_back {
        // A sum of many orders can pass one line's limit: give it back in chunks the type allows.
        let mut left = units;
        while left > 0 {
            let chunk = left.min(Quantity::MAX);
            lines.push(OrderLine { option_id, quantity: Quantity::new(chunk)? });
            left -= chunk;
        }
    }
    tx.restore_stock(&lines, now).await?;
    Ok((claimed, lines))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::ids::{PaymentId, ProductId};
    use crate::money::{Money, Stock};
    use crate::order::{OrderItem, OrderableOption};
    use crate::payment::PaymentMethod;
    use crate::ports::{
        MockClock, MockEventPublisher, MockOrderRepository, MockStockMirror, MockTransaction, MockUnitOfWork,
        MockUserRepository, StockRow,
    };
    use crate::product::{ProductOption, ProductStatus};
    use crate::stock::{ConditionalStock, OptimisticStock, RetryPolicy};
    use crate::user::User;

    fn uid() -> UserId {
        UserId::new(1).unwrap()
    }

    fn oid(n: i64) -> ProductOptionId {
        ProductOptionId::new(n).unwrap()
    }

    fn order_id() -> OrderId {
        OrderId::new(77).unwrap()
    }

    fn clock() -> Arc<MockClock> {
        let mut clock = MockClock::new();
        clock.expect_now().returning(Utc::now);
        Arc::new(clock)
    }

    fn request(lines: &[(i64, i64)]) -> OrderRequest {
        OrderRequest::new(
            uid(),
            lines.iter().map(|(o, q)| OrderLine { option_id: oid(*o), quantity: Quantity::new(*q).unwrap() }),
        )
        .unwrap()
    }

    fn orderable(id: i64, status: ProductStatus) -> OrderableOption {
        OrderableOption {
            option: ProductOption {
                id: oid(id),
                product_id: ProductId::new(10).unwrap(),
                name: "L".into(),
                price: Money::new(1000).unwrap(),
                stock: Stock::new(10).unwrap(),
            },
            product_name: "shirt".into(),
            product_status: status,
        }
    }

    fn order(status: OrderStatus, quantity: i64) -> Order {
        Order {
            id: order_id(),
            user_id: uid(),
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
                id: PaymentId::new(5).unwrap(),
                order_id: order_id(),
                user_id: uid(),
                status: PaymentStatus::Pending,
                method: PaymentMethod::Balance,
                amount: Money::new(1000 * quantity).unwrap(),
                paid_at: None,
            },
        }
    }

    /// A unit of work handing out these transactions in turn.
    fn uow(txs: Vec<MockTransaction>) -> Arc<MockUnitOfWork> {
        let queue = Mutex::new(txs.into_iter());
        let mut uow = MockUnitOfWork::new();
        uow.expect_begin().returning(move || {
            let tx = queue.lock().unwrap().next().expect("no more transactions expected");
            let tx: Box<dyn Transaction> = Box::new(tx);
            Ok(tx)
        });
        Arc::new(uow)
    }

    fn events(expected: usize) -> (Arc<MockEventPublisher>, Arc<Mutex<Vec<DomainEvent>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let mut events = MockEventPublisher::new();
        events.expect_publish().times(expected).returning(move |e| sink.lock().unwrap().push(e));
        (Arc::new(events), seen)
    }

    fn service(
        txs: Vec<MockTransaction>,
        stock: Arc<dyn StockStrategy>,
        events: Arc<MockEventPublisher>,
    ) -> OrderService {
        service_with(txs, stock, events, plenty_of_stock(), MockUserRepository::new())
    }

    /// An order repository whose pre-check finds 10 units of everything.
    fn plenty_of_stock() -> MockOrderRepository {
        let mut orders = MockOrderRepository::new();
        orders.expect_stock_levels().returning(|ids| {
            Ok(ids.iter().map(|id| StockRow { option_id: *id, stock: Stock::new(10).unwrap(), version: 0 }).collect())
        });
        orders
    }

    #[tokio::test]
    async fn a_sold_out_option_is_refused_before_any_lock_or_transaction() {
        let mut orders = MockOrderRepository::new();
        orders.expect_stock_levels().returning(|ids| {
            Ok(ids
                .iter()
                .map(|id| StockRow { option_id: *id, stock: Stock::new(i64::from(id.get() == 1)).unwrap(), version: 0 })
                .collect())
        });
        let (events, _) = events(0);
        // No transaction is expected: `uow` panics if one begins.
        let svc = service_with(vec![], Arc::new(ConditionalStock), events, orders, MockUserRepository::new());
        let err = svc.create(request(&[(1, 1), (2, 1)]), None).await.unwrap_err();
        assert!(matches!(err, DomainError::OutOfStock { option_id } if option_id == oid(2)));
    }

    fn service_with(
        txs: Vec<MockTransaction>,
        stock: Arc<dyn StockStrategy>,
        events: Arc<MockEventPublisher>,
        orders: MockOrderRepository,
        users: MockUserRepository,
    ) -> OrderService {
        OrderService::new(uow(txs), Arc::new(orders), Arc::new(users), stock, clock(), events)
    }

    /// A transaction that gets as far as taking stock for an order of option 1.
    fn placing_tx(status: ProductStatus) -> MockTransaction {
        let mut tx = MockTransaction::new();
        tx.expect_user_exists().returning(|_| Ok(true));
        tx.expect_orderable_options().returning(move |_| Ok(vec![orderable(1, status)]));
        tx.expect_insert_order().returning(|new| {
            let mut o = order(OrderStatus::PendingPayment, new.items[0].quantity.get());
            o.total_price = new.total_price;
            Ok(o)
        });
        tx.expect_remove_from_cart().returning(|_, _, _| Ok(()));
        tx
    }

    #[tokio::test]
    async fn create_takes_stock_last_commits_then_publishes() {
        let mut tx = placing_tx(ProductStatus::Active);
        let mut seq = mockall::Sequence::new();
        tx.expect_decrement_stock().times(1).in_sequence(&mut seq).returning(|_, _, _| Ok(true));
        tx.expect_commit().times(1).in_sequence(&mut seq).returning(|| Ok(()));
        let (events, seen) = events(1);
        let order =
            service(vec![tx], Arc::new(ConditionalStock), events).create(request(&[(1, 2)]), None).await.unwrap();
        assert_eq!(order.total_price.won(), 2000);
        assert!(matches!(seen.lock().unwrap()[0], DomainEvent::OrderCreated { order_id, .. } if order_id == order.id));
    }

    #[tokio::test]
    async fn create_for_an_unknown_user_writes_nothing() {
        let mut tx = MockTransaction::new();
        tx.expect_user_exists().returning(|_| Ok(false));
        tx.expect_insert_order().never();
        tx.expect_commit().never();
        let (events, _) = events(0);
        let err =
            service(vec![tx], Arc::new(ConditionalStock), events).create(request(&[(1, 1)]), None).await.unwrap_err();
        assert!(matches!(err, DomainError::UserNotFound(_)));
    }

    #[tokio::test]
    async fn create_of_an_unknown_option_writes_nothing() {
        let mut tx = MockTransaction::new();
        tx.expect_user_exists().returning(|_| Ok(true));
        tx.expect_orderable_options().returning(|_| Ok(vec![orderable(1, ProductStatus::Active)]));
        tx.expect_insert_order().never();
        tx.expect_commit().never();
        let (events, _) = events(0);
        let err = service(vec![tx], Arc::new(ConditionalStock), events)
            .create(request(&[(1, 1), (2, 1)]), None)
            .await
            .unwrap_err();
        assert!(matches!(err, DomainError::ProductOptionNotFound(id) if id == oid(2)));
    }

    #[tokio::test]
    async fn create_of_a_product_off_sale_writes_nothing() {
        let mut tx = MockTransaction::new();
        tx.expect_user_exists().returning(|_| Ok(true));
        tx.expect_orderable_options().returning(|_| Ok(vec![orderable(1, ProductStatus::Inactive)]));
        tx.expect_insert_order().never();
        tx.expect_commit().never();
        let (events, _) = events(0);
        let err =
            service(vec![tx], Arc::new(ConditionalStock), events).create(request(&[(1, 1)]), None).await.unwrap_err();
        assert!(matches!(err, DomainError::ProductNotOnSale { .. }));
    }

    #[tokio::test]
    async fn create_out_of_stock_rolls_back_and_publishes_nothing() {
        let mut tx = placing_tx(ProductStatus::Active);
        tx.expect_decrement_stock().returning(|_, _, _| Ok(false));
        tx.expect_commit().never();
        let (events, _) = events(0);
        let err =
            service(vec![tx], Arc::new(ConditionalStock), events).create(request(&[(1, 1)]), None).await.unwrap_err();
        assert!(matches!(err, DomainError::OutOfStock { option_id } if option_id == oid(1)));
    }

    fn optimistic(max_retries: u32) -> Arc<OptimisticStock> {
        Arc::new(OptimisticStock::new(RetryPolicy {
            max_retries,
            base: Duration::from_millis(1),
            cap: Duration::from_millis(4),
        }))
    }

    fn optimistic_tx(wins: bool) -> MockTransaction {
        let mut tx = placing_tx(ProductStatus::Active);
        tx.expect_read_stock()
            .returning(|ids| Ok(vec![StockRow { option_id: ids[0], stock: Stock::new(10).unwrap(), version: 3 }]));
        tx.expect_write_stock().returning(move |_, _, _, _| Ok(wins));
        if wins {
            tx.expect_commit().times(1).returning(|| Ok(()));
        } else {
            tx.expect_commit().never();
        }
        tx
    }

    #[tokio::test]
    async fn optimistic_conflicts_retry_the_whole_transaction() {
        let txs = vec![optimistic_tx(false), optimistic_tx(false), optimistic_tx(true)];
        let (events, _) = events(1);
        let order = service(txs, optimistic(5), events).create(request(&[(1, 1)]), None).await.unwrap();
        assert_eq!(order.id, order_id());
    }

    #[tokio::test]
    async fn retries_and_placements_are_counted() {
        let txs = vec![optimistic_tx(false), optimistic_tx(true)];
        let (events, _) = events(1);
        let svc = service(txs, optimistic(5), events);
        svc.create(request(&[(1, 1)]), None).await.unwrap();
        assert_eq!(svc.stats().retries.load(Ordering::Relaxed), 1);
        assert_eq!(svc.stats().placed.load(Ordering::Relaxed), 1);
        assert_eq!(svc.stats().lock_acquisitions.load(Ordering::Relaxed), 0, "optimistic takes no lock");
    }

    #[tokio::test]
    async fn optimistic_retries_run_out_as_lock_timeout() {
        let txs = vec![optimistic_tx(false), optimistic_tx(false), optimistic_tx(false)];
        let (events, _) = events(0);
        let err = service(txs, optimistic(2), events).create(request(&[(1, 1)]), None).await.unwrap_err();
        assert!(matches!(err, DomainError::LockTimeout { .. }));
    }

    fn paying_tx(found: Order) -> MockTransaction {
        let mut tx = MockTransaction::new();
        tx.expect_find_order().returning(move |_| Ok(Some(found.clone())));
        tx
    }

    #[tokio::test]
    async fn pay_spends_records_sales_completes_and_publishes_after_commit() {
        let mut tx = paying_tx(order(OrderStatus::PendingPayment, 3));
        let mut seq = mockall::Sequence::new();
        tx.expect_transition_order()
            .withf(|_, from, to, _| (*from, *to) == (OrderStatus::PendingPayment, OrderStatus::Paid))
            .times(1)
            .in_sequence(&mut seq)
            .returning(|_, _, _, _| Ok(true));
        tx.expect_spend_balance()
            .withf(|_, amount, _| amount.won() == 3000)
            .times(1)
            .in_sequence(&mut seq)
            .returning(|_, _, _| Ok(Some(Money::new(7000).unwrap())));
        tx.expect_add_daily_sales()
            .withf(|sales, _| sales.len() == 1 && sales[0].units == 3)
            .times(1)
            .in_sequence(&mut seq)
            .returning(|_, _| Ok(()));
        tx.expect_settle_payment()
            .withf(|_, status, _| *status == PaymentStatus::Completed)
            .times(1)
            .in_sequence(&mut seq)
            .returning(|_, _, _| Ok(()));
        tx.expect_commit().times(1).in_sequence(&mut seq).returning(|| Ok(()));
        let (events, seen) = events(1);
        let mut mirror = MockStockMirror::new();
        mirror.expect_stock_returned().never();
        let payment = service(vec![tx], Arc::new(ConditionalStock), events)
            .with_stock_mirror(Arc::new(mirror))
            .pay(order_id(), uid(), None)
            .await
            .unwrap();
        assert_eq!((payment.status, payment.amount.won()), (PaymentStatus::Completed, 3000));
        assert!(payment.paid_at.is_some());
        assert!(matches!(seen.lock().unwrap()[0], DomainEvent::PaymentCompleted { .. }));
    }

    #[tokio::test]
    async fn pay_without_enough_balance_cancels_fails_and_gives_stock_back_in_one_commit() {
        let mut tx = paying_tx(order(OrderStatus::PendingPayment, 2));
        tx.expect_transition_order()
            .withf(|_, from, to, _| (*from, *to) == (OrderStatus::PendingPayment, OrderStatus::Paid))
            .returning(|_, _, _, _| Ok(true));
        tx.expect_spend_balance().returning(|_, _, _| Ok(None));
        tx.expect_balance().returning(|_| Ok(Money::new(500).unwrap()));
        tx.expect_transition_order()
            .withf(|_, from, to, _| (*from, *to) == (OrderStatus::Paid, OrderStatus::Cancelled))
            .times(1)
            .returning(|_, _, _, _| Ok(true));
        tx.expect_settle_payment().withf(|_, s, _| *s == PaymentStatus::Failed).times(1).returning(|_, _, _| Ok(()));
        tx.expect_restore_stock()
            .withf(|lines, _| lines.len() == 1 && lines[0].quantity.get() == 2)
            .times(1)
            .returning(|_, _| Ok(()));
        tx.expect_add_daily_sales().never();
        // The mirror hears of the units only once they are back in the database.
        let mut seq = mockall::Sequence::new();
        tx.expect_commit().times(1).in_sequence(&mut seq).returning(|| Ok(()));
        let mut mirror = MockStockMirror::new();
        mirror
            .expect_stock_returned()
            .withf(|lines| lines.len() == 1 && lines[0].option_id == oid(1) && lines[0].quantity.get() == 2)
            .times(1)
            .in_sequence(&mut seq)
            .returning(|_| ());
        let (events, _) = events(0);
        let err = service(vec![tx], Arc::new(ConditionalStock), events)
            .with_stock_mirror(Arc::new(mirror))
            .pay(order_id(), uid(), None)
            .await
            .unwrap_err();
        assert!(matches!(err, DomainError::InsufficientBalance { balance, required }
            if balance.won() == 500 && required.won() == 2000));
    }

    #[tokio::test]
    async fn paying_a_paid_order_is_not_payable() {
        let mut tx = paying_tx(order(OrderStatus::Paid, 1));
        tx.expect_transition_order().never();
        tx.expect_commit().never();
        let (events, _) = events(0);
        let err = service(vec![tx], Arc::new(ConditionalStock), events).pay(order_id(), uid(), None).await.unwrap_err();
        assert!(matches!(err, DomainError::OrderNotPayable { status: OrderStatus::Paid, .. }));
    }

    #[tokio::test]
    async fn losing_the_payment_race_is_not_payable_and_spends_nothing() {
        let mut tx = MockTransaction::new();
        let mut reads = vec![order(OrderStatus::Paid, 1), order(OrderStatus::PendingPayment, 1)];
        tx.expect_find_order().times(2).returning(move |_| Ok(reads.pop()));
        tx.expect_transition_order().returning(|_, _, _, _| Ok(false));
        tx.expect_spend_balance().never();
        tx.expect_commit().never();
        let (events, _) = events(0);
        let err = service(vec![tx], Arc::new(ConditionalStock), events).pay(order_id(), uid(), None).await.unwrap_err();
        assert!(matches!(err, DomainError::OrderNotPayable { status: OrderStatus::Paid, .. }));
    }

    #[tokio::test]
    async fn another_users_order_is_not_found() {
        let tx = paying_tx(order(OrderStatus::PendingPayment, 1));
        let (events, _) = events(0);
        let other = UserId::new(2).unwrap();
        let err = service(vec![tx], Arc::new(ConditionalStock), events).pay(order_id(), other, None).await.unwrap_err();
        assert!(matches!(err, DomainError::OrderNotFound(_)));
    }

    #[tokio::test]
    async fn expiry_cancels_only_what_it_claims_and_gives_stock_back_summed_per_option() {
        let mut tx = MockTransaction::new();
        let (a, b) = (OrderId::new(1).unwrap(), OrderId::new(2).unwrap());
        tx.expect_overdue_orders().returning(move |_, _| Ok(vec![a, b]));
        // `b` was cancelled by another sweeper in between: its transition fails and nothing of it is touched.
        tx.expect_transition_order().returning(move |id, _, _, _| Ok(id == a));
        tx.expect_find_order()
            .withf(move |id| *id == a)
            .times(1)
            .returning(|_| Ok(Some(order(OrderStatus::Cancelled, 4))));
        tx.expect_settle_payment().withf(|_, s, _| *s == PaymentStatus::Failed).times(1).returning(|_, _, _| Ok(()));
        tx.expect_restore_stock()
            .withf(|lines, _| lines.len() == 1 && lines[0].quantity.get() == 4)
            .times(1)
            .returning(|_, _| Ok(()));
        let mut seq = mockall::Sequence::new();
        tx.expect_commit().times(1).in_sequence(&mut seq).returning(|| Ok(()));
        let mut mirror = MockStockMirror::new();
        mirror
            .expect_stock_returned()
            .withf(|lines| lines.len() == 1 && lines[0].quantity.get() == 4)
            .times(1)
            .in_sequence(&mut seq)
            .returning(|_| ());
        let (events, _) = events(0);
        let cancelled = service(vec![tx], Arc::new(ConditionalStock), events)
            .with_stock_mirror(Arc::new(mirror))
            .expire_overdue(Duration::from_secs(900), 10)
            .await
            .unwrap();
        assert_eq!(cancelled, 1);
    }

    #[tokio::test]
    async fn listing_orders_of_an_unknown_user_is_not_found() {
        let mut users = MockUserRepository::new();
        users.expect_find().returning(|_| Ok(None));
        let (events, _) = events(0);
        let svc = service_with(vec![], Arc::new(ConditionalStock), events, MockOrderRepository::new(), users);
        assert!(matches!(svc.list(uid(), PageRequest::default()).await, Err(DomainError::UserNotFound(_))));
    }

    #[tokio::test]
    async fn listing_and_reading_orders() {
        let mut users = MockUserRepository::new();
        users.expect_find().returning(|id| Ok(Some(User { id, name: "kim".into(), balance: Money::ZERO })));
        let mut orders = MockOrderRepository::new();
        orders.expect_list_by_user().returning(|_, page| {
            Ok(Page { items: vec![order(OrderStatus::Paid, 1)], page: page.page(), size: page.size(), total: 1 })
        });
        orders.expect_find().returning(|id| Ok((id == order_id()).then(|| order(OrderStatus::Paid, 1))));
        let (events, _) = events(0);
        let svc = service_with(vec![], Arc::new(ConditionalStock), events, orders, users);
        assert_eq!(svc.list(uid(), PageRequest::default()).await.unwrap().total, 1);
        assert_eq!(svc.get(order_id()).await.unwrap().id, order_id());
        assert!(matches!(svc.get(OrderId::new(1).unwrap()).await, Err(DomainError::OrderNotFound(_))));
    }
}
