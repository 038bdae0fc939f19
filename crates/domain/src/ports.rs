//! The ports: what the use cases need from the outside world, as traits that adapters implement.
//!
//! Every port is `Send + Sync` and object safe, so the server can hold the adapter chosen by configuration as
//! `Arc<dyn Port>`. Each method's `# Errors` section names the variants an adapter MUST return for expected
//! outcomes; anything else is [`DomainError::Unexpected`].

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::cart::CartItem;
use crate::error::DomainError;
use crate::idempotency::{ClaimOutcome, IdempotencyClaim, IdempotencyKey, StoredResponse};
use crate::ids::{CartItemId, OrderId, PaymentId, ProductId, ProductOptionId, UserId};
use crate::money::{Money, Quantity, Stock};
use crate::order::{NewOrder, Order, OrderLine, OrderStatus, OrderableOption};
use crate::page::{Page, PageRequest};
use crate::payment::PaymentStatus;
use crate::product::{NewProduct, Product, ProductOption};
use crate::sales::DailySales;
use crate::sales::{DateRange, PopularProduct, RankingLimit};
use crate::user::{ChargeAmount, User, UserName};

/// Time, injected so that expiry and "today" can be tested without sleeping.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
pub trait Clock: Send + Sync {
    /// Sales days are UTC days: `now().date_naive()`.
    fn now(&self) -> DateTime<Utc>;
}

/// The wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// What happened, published after the transaction that made it happen has committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainEvent {
    OrderCreated { order_id: OrderId, user_id: UserId, total_price: Money },
    PaymentCompleted { payment_id: PaymentId, order_id: OrderId, user_id: UserId, amount: Money },
}

impl DomainEvent {
    /// The event's name on the wire (`order.created`, `payment.completed`).
    #[must_use]
    pub const fn name(&self) -> &'static str {
        match self {
            Self::OrderCreated { .. } => "order.created",
            Self::PaymentCompleted { .. } => "payment.completed",
        }
    }
}

/// Hands events to whoever listens. Never blocks and never fails the use case: an event is a notice of a
/// committed fact, so a publisher that cannot deliver logs it.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
pub trait EventPublisher: Send + Sync {
    fn publish(&self, event: DomainEvent);
}

#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait UserRepository: Send + Sync {
    async fn create(&self, name: &UserName, now: DateTime<Utc>) -> Result<User, DomainError>;

    /// A user that exists and is not soft-deleted.
    async fn find(&self, id: UserId) -> Result<Option<User>, DomainError>;

    /// Which of `ids` are live users, in one read.
    async fn existing(&self, ids: &[UserId]) -> Result<Vec<UserId>, DomainError>;

    /// Adds `amount` to the balance in one atomic conditional UPDATE, so concurrent charges never lose one
    /// another; returns the new balance.
    ///
    /// # Errors
    /// [`DomainError::UserNotFound`]; [`DomainError::BalanceLimitExceeded`] when the new balance would pass
    /// `limit` (the balance is then unchanged).
    async fn charge(
        &self,
        id: UserId,
        amount: ChargeAmount,
        limit: Money,
        now: DateTime<Utc>,
    ) -> Result<Money, DomainError>;
}

#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait ProductRepository: Send + Sync {
    /// Products that are not soft-deleted, by id, each with its live options.
    async fn list(&self, page: PageRequest) -> Result<Page<Product>, DomainError>;

    /// A product that is not soft-deleted, with its live options.
    async fn find(&self, id: ProductId) -> Result<Option<Product>, DomainError>;

    /// Inserts the product and its options in one transaction.
    async fn create(&self, product: &NewProduct, now: DateTime<Utc>) -> Result<Product, DomainError>;

    /// Sets an option's stock (an admin's count), bumping its version so optimistic writers see the change.
    ///
    /// # Errors
    /// [`DomainError::ProductOptionNotFound`] for an unknown option or one of a soft-deleted product.
    async fn set_stock(
        &self,
        id: ProductOptionId,
        stock: Stock,
        now: DateTime<Utc>,
    ) -> Result<ProductOption, DomainError>;

    /// Products ranked by units sold in paid orders over `range`, best first, ties by product id; soft-deleted
    /// products are left out.
    async fn popular(&self, range: DateRange, limit: RankingLimit) -> Result<Vec<PopularProduct>, DomainError>;
}

#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait CartRepository: Send + Sync {
    /// The user's live cart lines, oldest first, with their options' names and prices.
    async fn list(&self, user_id: UserId) -> Result<Vec<CartItem>, DomainError>;

    /// Soft-deletes a line of the user's cart; `false` when the user has no such line.
    async fn remove(&self, user_id: UserId, item_id: CartItemId, now: DateTime<Utc>) -> Result<bool, DomainError>;
}

/// Starts transactions. Use cases that need several reads and writes to hold together run them on one
/// [`Transaction`]; dropping a transaction without committing rolls it back.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait UnitOfWork: Send + Sync {
    /// Begins a write transaction (on SQLite an IMMEDIATE one, so two writers queue instead of failing).
    async fn begin(&self) -> Result<Box<dyn Transaction>, DomainError>;
}

/// The reads and writes a use case may make inside one transaction.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait Transaction: Send {
    /// Whether a live user has this id.
    async fn user_exists(&mut self, id: UserId) -> Result<bool, DomainError>;

    /// A live option of a live product, with the product's id.
    async fn find_option(&mut self, id: ProductOptionId) -> Result<Option<ProductOption>, DomainError>;

    /// Adds `quantity` to the user's line of this option, creating the line when there is none, and returns
    /// the line.
    ///
    /// # Errors
    /// [`DomainError::CartQuantityLimitExceeded`] when the merged line would hold more than
    /// [`Quantity::MAX`] (the line is then unchanged).
    async fn add_to_cart(
        &mut self,
        user_id: UserId,
        option_id: ProductOptionId,
        quantity: Quantity,
        now: DateTime<Utc>,
    ) -> Result<CartItem, DomainError>;

    // --- orders ---

    /// The live options among `ids` (live option of a live product), with their products' names and statuses.
    async fn orderable_options(&mut self, ids: &[ProductOptionId]) -> Result<Vec<OrderableOption>, DomainError>;

    /// Inserts the order, its items and a PENDING payment of its total; returns the order as stored.
    async fn insert_order(&mut self, order: &NewOrder) -> Result<Order, DomainError>;

    /// Inserts the orders of a batch, their items and a PENDING payment each, with one multi-row statement per
    /// table; returns them as stored, in the order given.
    async fn insert_orders(&mut self, orders: &[NewOrder]) -> Result<Vec<Order>, DomainError>;

    /// Takes each user's options out of that user's cart (soft delete), in one statement.
    async fn remove_from_carts(
        &mut self,
        carts: &[(UserId, Vec<ProductOptionId>)],
        now: DateTime<Utc>,
    ) -> Result<(), DomainError>;

    /// Takes these options out of the user's cart (soft delete).
    async fn remove_from_cart(
        &mut self,
        user_id: UserId,
        options: &[ProductOptionId],
        now: DateTime<Utc>,
    ) -> Result<(), DomainError>;

    /// An order with its items and payment, whatever its status.
    async fn find_order(&mut self, id: OrderId) -> Result<Option<Order>, DomainError>;

    /// These orders with their items and payments, whatever their status (missing ids are left out).
    async fn find_orders(&mut self, ids: &[OrderId]) -> Result<Vec<Order>, DomainError>;

    /// [`Transaction::transition_order`] for many orders in one statement: the ids that were in `from` and moved.
    async fn transition_orders(
        &mut self,
        ids: &[OrderId],
        from: OrderStatus,
        to: OrderStatus,
        now: DateTime<Utc>,
    ) -> Result<Vec<OrderId>, DomainError>;

    /// Sets these payments' outcome in one statement.
    async fn settle_payments(
        &mut self,
        ids: &[PaymentId],
        status: PaymentStatus,
        now: DateTime<Utc>,
    ) -> Result<(), DomainError>;

    /// Moves the order from `from` to `to` only if it is still in `from`: the guard that makes one payment or
    /// one expiry win when several race. `false` when it was not in `from`.
    async fn transition_order(
        &mut self,
        id: OrderId,
        from: OrderStatus,
        to: OrderStatus,
        now: DateTime<Utc>,
    ) -> Result<bool, DomainError>;

    /// Sets the payment's outcome.
    async fn settle_payment(
        &mut self,
        id: PaymentId,
        status: PaymentStatus,
        now: DateTime<Utc>,
    ) -> Result<(), DomainError>;

    /// Pending orders placed before `placed_before`, oldest first, at most `limit`. On PostgreSQL the rows are
    /// locked with `SKIP LOCKED`, so concurrent sweepers take disjoint sets.
    async fn overdue_orders(&mut self, placed_before: DateTime<Utc>, limit: u64) -> Result<Vec<OrderId>, DomainError>;

    // --- balance and sales ---

    /// Spends `amount` with one conditional UPDATE (`balance >= amount`); the new balance, or `None` when the
    /// balance is short (then nothing changes).
    async fn spend_balance(
        &mut self,
        user_id: UserId,
        amount: Money,
        now: DateTime<Utc>,
    ) -> Result<Option<Money>, DomainError>;

    /// [`Transaction::spend_balance`] for several users in one statement, each user at most once: the users
    /// whose balance covered their amount and was spent (the others are unchanged).
    async fn spend_balances(
        &mut self,
        spends: &[(UserId, Money)],
        now: DateTime<Utc>,
    ) -> Result<Vec<UserId>, DomainError>;

    /// The user's balance.
    ///
    /// # Errors
    /// [`DomainError::UserNotFound`].
    async fn balance(&mut self, user_id: UserId) -> Result<Money, DomainError>;

    /// Adds units to the day's sales with one upsert per option, in the order given.
    async fn add_daily_sales(&mut self, sales: &[DailySales], now: DateTime<Utc>) -> Result<(), DomainError>;

    // --- stock: the primitives the stock strategies are built from ---

    /// `UPDATE ... SET stock = stock - n WHERE id = ? AND stock >= n`; `false` when the stock is short.
    async fn decrement_stock(
        &mut self,
        id: ProductOptionId,
        quantity: Quantity,
        now: DateTime<Utc>,
    ) -> Result<bool, DomainError>;

    /// The conditional decrement of a lock holder: also refuses when the row has already accepted a write under
    /// a newer fencing token than `fence` (the lock passed on while this holder was paused), and records
    /// `fence` as the newest when it writes.
    async fn decrement_stock_fenced(
        &mut self,
        id: ProductOptionId,
        quantity: Quantity,
        fence: u64,
        now: DateTime<Utc>,
    ) -> Result<FencedWrite, DomainError>;

    /// `UPDATE ... SET stock = stock - units WHERE id = ? AND stock >= units`, for a batch's total of an option
    /// (which may pass one line's limit); with `fence`, also the fencing check of
    /// [`Transaction::decrement_stock_fenced`].
    async fn decrement_stock_by(
        &mut self,
        id: ProductOptionId,
        units: i64,
        fence: Option<u64>,
        now: DateTime<Utc>,
    ) -> Result<FencedWrite, DomainError>;

    /// Locks the options' rows until the transaction ends (`SELECT ... FOR NO KEY UPDATE`, ascending by id)
    /// and reads them.
    async fn lock_stock(&mut self, ids: &[ProductOptionId]) -> Result<Vec<StockRow>, DomainError>;

    /// Reads stock and version without locking.
    async fn read_stock(&mut self, ids: &[ProductOptionId]) -> Result<Vec<StockRow>, DomainError>;

    /// Writes an absolute stock and bumps the version; with `expected_version`, only if the version is still
    /// that one (compare-and-set). `false` when the compare failed.
    async fn write_stock(
        &mut self,
        id: ProductOptionId,
        stock: Stock,
        expected_version: Option<i64>,
        now: DateTime<Utc>,
    ) -> Result<bool, DomainError>;

    /// Gives units back (`stock = stock + n`, version bumped), in the order given.
    async fn restore_stock(&mut self, lines: &[OrderLine], now: DateTime<Utc>) -> Result<(), DomainError>;

    // --- idempotency ---

    /// Completes the claim with `response` if it is still this claim (same token, still in progress);
    /// `false` otherwise.
    async fn record_response(
        &mut self,
        claim: &IdempotencyClaim,
        response: &StoredResponse,
        now: DateTime<Utc>,
    ) -> Result<bool, DomainError>;

    /// Adds `amount` to the balance with the one conditional UPDATE of [`UserRepository::charge`], inside this
    /// transaction.
    ///
    /// # Errors
    /// As [`UserRepository::charge`].
    async fn charge_balance(
        &mut self,
        id: UserId,
        amount: ChargeAmount,
        limit: Money,
        now: DateTime<Utc>,
    ) -> Result<Money, DomainError>;

    async fn commit(self: Box<Self>) -> Result<(), DomainError>;
}

/// Where idempotency keys live. Claims and releases run in short transactions of their own.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait IdempotencyStore: Send + Sync {
    /// Claims `key` for `user_id`'s request hashing to `request_hash`: inserts it in progress until `lease_until`,
    /// or takes over an expired key or a claim whose lease ran out (its holder died), or reports what the key
    /// already holds.
    async fn claim(
        &self,
        user_id: UserId,
        key: &IdempotencyKey,
        request_hash: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    ) -> Result<ClaimOutcome, DomainError>;

    /// Deletes a claim that will not be completed (the request failed with a 5xx), if it is still this claim.
    async fn release(&self, claim: &IdempotencyClaim) -> Result<(), DomainError>;

    /// Deletes keys that expired before `now`; how many.
    async fn purge_expired(&self, now: DateTime<Utc>) -> Result<u64, DomainError>;
}

/// What a fenced stock write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FencedWrite {
    Written,
    OutOfStock,
    /// The row has accepted a newer fencing token: this holder's lock is stale.
    Fenced,
}

/// An option's stock and the version that optimistic writers compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StockRow {
    pub option_id: ProductOptionId,
    pub stock: Stock,
    pub version: i64,
}

/// Reads of orders outside any transaction.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait OrderRepository: Send + Sync {
    /// An order with its items and payment.
    async fn find(&self, id: OrderId) -> Result<Option<Order>, DomainError>;

    /// The user's orders, newest first.
    async fn list_by_user(&self, user_id: UserId, page: PageRequest) -> Result<Page<Order>, DomainError>;

    /// The live options among `ids` with their products, read without a transaction: what an order is validated
    /// and priced against before it joins a batch.
    async fn orderable_options(&self, ids: &[ProductOptionId]) -> Result<Vec<OrderableOption>, DomainError>;

    /// The current stock of these options, read in one statement without any lock.
    async fn stock_levels(&self, ids: &[ProductOptionId]) -> Result<Vec<StockRow>, DomainError>;
}

/// A dependency that `/health/ready` asks.
#[async_trait]
pub trait Probe: Send + Sync {
    fn name(&self) -> &'static str;

    /// # Errors
    /// [`DomainError::Unexpected`] when the dependency does not answer.
    async fn ping(&self) -> Result<(), DomainError>;
}

/// Told, after the commit, when stock moved other than by an order taking it: an admin's count, or units that
/// an expired or unpaid order gave back. A strategy that keeps a copy of the stock outside the database (the
/// Redis mirror of `redis-optimistic`) updates its copy; every other strategy has none and uses
/// [`NoStockMirror`].
///
/// Never fails the use case: the database has committed and stays the source of truth, and a copy that missed
/// a notice is repaired by its own reconciliation. Implementations log what they could not do.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait StockMirror: Send + Sync {
    /// The option's stock was set to `stock` (an admin's count).
    async fn stock_set(&self, option_id: ProductOptionId, stock: Stock);

    /// These units came back to stock (an order cancelled by expiry or by a failed payment).
    async fn stock_returned(&self, lines: &[OrderLine]);
}

/// The mirror of every strategy that keeps no copy of the stock: ignores every notice.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoStockMirror;

#[async_trait]
impl StockMirror for NoStockMirror {
    async fn stock_set(&self, _option_id: ProductOptionId, _stock: Stock) {}

    async fn stock_returned(&self, _lines: &[OrderLine]) {}
}
