//! The unit of work, and the roles of one transaction.
//!
//! A use case that needs several reads and writes to hold together runs them on one [`Transaction`]. The
//! transaction is the sum of small role traits, and each caller takes only the role it needs: a stock strategy
//! is handed a `&mut dyn StockTx` and can touch nothing but stock; a recorder of idempotent responses a
//! `&mut dyn IdempotencyTx`. Dropping a transaction without committing rolls it back.
//!
//! Every write method that acts on many rows takes them all at once (one statement, or one per table), and
//! writes the rows that several transactions may share in ascending id order, so two transactions never wait
//! on each other in a cycle.

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::auth::Pending;
use crate::cart::CartItem;
use crate::error::DomainError;
use crate::events::NewEvent;
use crate::idempotency::{IdempotencyClaim, StoredResponse};
use crate::ids::{OrderId, PaymentId, ProductOptionId, UserId};
use crate::money::{Money, Quantity, Stock};
use crate::order::{NewOrder, Order, OrderStatus};
use crate::payment::PaymentStatus;
use crate::ports::stock::{FencedWrite, StockRow};
use crate::product::ProductOption;
use crate::sales::DailySales;
use crate::user::{ChargeAmount, User};

/// Starts transactions.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait UnitOfWork: Send + Sync {
    /// Begins a write transaction (on SQLite an IMMEDIATE one, so two writers queue instead of failing).
    async fn begin(&self) -> Result<Box<dyn Transaction>, DomainError>;
}

/// A user's cart.
#[async_trait]
pub trait CartTx: Send {
    /// Whether a live user has this id.
    async fn user_exists(&mut self, id: UserId) -> Result<bool, DomainError>;

    /// A live option of a live product.
    async fn find_option(&mut self, id: ProductOptionId) -> Result<Option<ProductOption>, DomainError>;

    /// The quantity of the user's live line of this option, if there is one.
    async fn cart_quantity(
        &mut self,
        user_id: UserId,
        option_id: ProductOptionId,
    ) -> Result<Option<Quantity>, DomainError>;

    /// Adds `quantity` to the user's live line of this option (creating it when there is none) in one upsert
    /// that refuses to take the line past [`Quantity::MAX`], and returns the line; `None` when that guard refused
    /// (a concurrent add got there first), and then nothing changed.
    async fn add_to_cart(
        &mut self,
        user_id: UserId,
        option_id: ProductOptionId,
        quantity: Quantity,
        now: DateTime<Utc>,
    ) -> Result<Option<CartItem>, DomainError>;

    /// Takes each user's options out of that user's cart (soft delete), in one statement.
    async fn remove_from_carts(
        &mut self,
        carts: &[(UserId, Vec<ProductOptionId>)],
        now: DateTime<Utc>,
    ) -> Result<(), DomainError>;
}

/// Orders and their state machine.
#[async_trait]
pub trait OrderTx: Send {
    /// Locks these users' rows until the transaction ends (ascending, and before any stock row: the order every
    /// writer takes them in) and counts what each holds in unpaid orders; a user missing from the answer holds
    /// nothing. Under the lock no other transaction can place an order for them meanwhile.
    async fn hold_users(&mut self, ids: &[UserId]) -> Result<Vec<(UserId, Pending)>, DomainError>;

    /// Inserts the orders, their items and a PENDING payment each, with one multi-row statement per table;
    /// returns them as stored, in the order given.
    async fn insert_orders(&mut self, orders: &[NewOrder]) -> Result<Vec<Order>, DomainError>;

    /// Deletes orders this transaction inserted and will not keep (the allocation refused them), with their
    /// items and payments.
    async fn delete_orders(&mut self, ids: &[OrderId]) -> Result<(), DomainError>;

    /// These orders with their items and payments, whatever their status, ascending by id (missing ids are left
    /// out).
    async fn find_orders(&mut self, ids: &[OrderId]) -> Result<Vec<Order>, DomainError>;

    /// Moves the orders that are still in `from` to `to`, in one statement: the guard that makes one payment or
    /// one expiry win when several race. Returns the ids that moved.
    async fn transition_orders(
        &mut self,
        ids: &[OrderId],
        from: OrderStatus,
        to: OrderStatus,
        now: DateTime<Utc>,
    ) -> Result<Vec<OrderId>, DomainError>;

    /// Pending orders placed before `placed_before`, oldest first, at most `limit`. On PostgreSQL the rows are
    /// locked with `SKIP LOCKED`, so concurrent sweepers take disjoint sets.
    async fn overdue_orders(&mut self, placed_before: DateTime<Utc>, limit: u64) -> Result<Vec<OrderId>, DomainError>;
}

/// Balances, payments and the sales they add up to.
#[async_trait]
pub trait PaymentTx: Send {
    /// These live users (missing ids are left out), to decide with [`User::spend`] what their balances cover.
    async fn users(&mut self, ids: &[UserId]) -> Result<Vec<User>, DomainError>;

    /// Spends each user's amount (each user at most once) in one relative UPDATE, guarded by
    /// `balance >= amount`: the users whose balance was spent. A user left out had their balance spent by a
    /// concurrent transaction since it was read.
    async fn spend_balances(
        &mut self,
        spends: &[(UserId, Money)],
        now: DateTime<Utc>,
    ) -> Result<Vec<UserId>, DomainError>;

    /// Adds `amount` to the balance with the guarded UPDATE of
    /// [`UserRepository::charge`](crate::ports::UserRepository::charge), inside this transaction.
    ///
    /// # Errors
    /// As [`UserRepository::charge`](crate::ports::UserRepository::charge).
    async fn charge_balance(
        &mut self,
        id: UserId,
        amount: ChargeAmount,
        limit: Money,
        now: DateTime<Utc>,
    ) -> Result<Money, DomainError>;

    /// Sets these payments' outcome in one statement.
    async fn settle_payments(
        &mut self,
        ids: &[PaymentId],
        status: PaymentStatus,
        now: DateTime<Utc>,
    ) -> Result<(), DomainError>;

    /// Adds units to the day's sales with one upsert per (day, option), in the order given (ascending by
    /// option: the rows are shared by every payment of the day).
    async fn add_daily_sales(&mut self, sales: &[DailySales], now: DateTime<Utc>) -> Result<(), DomainError>;
}

/// Stock: the primitives the stock strategies are built from, and what cancelled orders give back.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait StockTx: Send {
    /// Reads stock and version of these options without locking, ascending by id.
    async fn read_stock(&mut self, ids: &[ProductOptionId]) -> Result<Vec<StockRow>, DomainError>;

    /// Locks the options' rows until the transaction ends (`SELECT ... FOR NO KEY UPDATE`, ascending by id) and
    /// reads them.
    async fn lock_stock(&mut self, ids: &[ProductOptionId]) -> Result<Vec<StockRow>, DomainError>;

    /// Writes an absolute stock and bumps the version; with `expected_version`, only if the version is still
    /// that one (compare-and-set). `false` when the compare failed.
    async fn write_stock(
        &mut self,
        id: ProductOptionId,
        stock: Stock,
        expected_version: Option<i64>,
        now: DateTime<Utc>,
    ) -> Result<bool, DomainError>;

    /// `UPDATE ... SET stock = stock - units WHERE id = ? AND stock >= units`; with `fence`, also refused when
    /// the row has already accepted a write under a newer fencing token (the lock passed on while this holder
    /// was paused), and `fence` is recorded as the newest when it writes.
    async fn decrement_stock(
        &mut self,
        id: ProductOptionId,
        units: i64,
        fence: Option<u64>,
        now: DateTime<Utc>,
    ) -> Result<FencedWrite, DomainError>;

    /// Gives units back (`stock = stock + n`, version bumped), per option in ascending order.
    async fn restore_stock(
        &mut self,
        units: &BTreeMap<ProductOptionId, i64>,
        now: DateTime<Utc>,
    ) -> Result<(), DomainError>;
}

/// The responses idempotent requests replay.
#[async_trait]
pub trait IdempotencyTx: Send {
    /// Completes the claim with `response` if it is still this claim (same token, still in progress); `false`
    /// otherwise.
    async fn record_response(
        &mut self,
        claim: &IdempotencyClaim,
        response: &StoredResponse,
        now: DateTime<Utc>,
    ) -> Result<bool, DomainError>;
}

/// One open transaction, with every role.
/// Recording events in the outbox, in the transaction of their effect.
#[async_trait]
pub trait OutboxTx: Send {
    /// Records these events (one statement for all of them), each with a new id, as occurring `now`.
    async fn record_events(&mut self, events: &[NewEvent], now: DateTime<Utc>) -> Result<(), DomainError>;
}

#[async_trait]
pub trait Transaction: CartTx + OrderTx + PaymentTx + StockTx + IdempotencyTx + OutboxTx + Send {
    async fn commit(self: Box<Self>) -> Result<(), DomainError>;
}

#[cfg(any(test, feature = "mocks"))]
mockall::mock! {
    /// A transaction with every role mocked, for use-case tests.
    pub Transaction {}

    #[async_trait]
    impl CartTx for Transaction {
        async fn user_exists(&mut self, id: UserId) -> Result<bool, DomainError>;
        async fn find_option(&mut self, id: ProductOptionId) -> Result<Option<ProductOption>, DomainError>;
        async fn cart_quantity(
            &mut self,
            user_id: UserId,
            option_id: ProductOptionId,
        ) -> Result<Option<Quantity>, DomainError>;
        async fn add_to_cart(
            &mut self,
            user_id: UserId,
            option_id: ProductOptionId,
            quantity: Quantity,
            now: DateTime<Utc>,
        ) -> Result<Option<CartItem>, DomainError>;
        async fn remove_from_carts(
            &mut self,
            carts: &[(UserId, Vec<ProductOptionId>)],
            now: DateTime<Utc>,
        ) -> Result<(), DomainError>;
    }

    #[async_trait]
    impl OrderTx for Transaction {
        async fn hold_users(&mut self, ids: &[UserId]) -> Result<Vec<(UserId, Pending)>, DomainError>;
        async fn insert_orders(&mut self, orders: &[NewOrder]) -> Result<Vec<Order>, DomainError>;
        async fn delete_orders(&mut self, ids: &[OrderId]) -> Result<(), DomainError>;
        async fn find_orders(&mut self, ids: &[OrderId]) -> Result<Vec<Order>, DomainError>;
        async fn transition_orders(
            &mut self,
            ids: &[OrderId],
            from: OrderStatus,
            to: OrderStatus,
            now: DateTime<Utc>,
        ) -> Result<Vec<OrderId>, DomainError>;
        async fn overdue_orders(
            &mut self,
            placed_before: DateTime<Utc>,
            limit: u64,
        ) -> Result<Vec<OrderId>, DomainError>;
    }

    #[async_trait]
    impl PaymentTx for Transaction {
        async fn users(&mut self, ids: &[UserId]) -> Result<Vec<User>, DomainError>;
        async fn spend_balances(
            &mut self,
            spends: &[(UserId, Money)],
            now: DateTime<Utc>,
        ) -> Result<Vec<UserId>, DomainError>;
        async fn charge_balance(
            &mut self,
            id: UserId,
            amount: ChargeAmount,
            limit: Money,
            now: DateTime<Utc>,
        ) -> Result<Money, DomainError>;
        async fn settle_payments(
            &mut self,
            ids: &[PaymentId],
            status: PaymentStatus,
            now: DateTime<Utc>,
        ) -> Result<(), DomainError>;
        async fn add_daily_sales(&mut self, sales: &[DailySales], now: DateTime<Utc>) -> Result<(), DomainError>;
    }

    #[async_trait]
    impl StockTx for Transaction {
        async fn read_stock(&mut self, ids: &[ProductOptionId]) -> Result<Vec<StockRow>, DomainError>;
        async fn lock_stock(&mut self, ids: &[ProductOptionId]) -> Result<Vec<StockRow>, DomainError>;
        async fn write_stock(
            &mut self,
            id: ProductOptionId,
            stock: Stock,
            expected_version: Option<i64>,
            now: DateTime<Utc>,
        ) -> Result<bool, DomainError>;
        async fn decrement_stock(
            &mut self,
            id: ProductOptionId,
            units: i64,
            fence: Option<u64>,
            now: DateTime<Utc>,
        ) -> Result<FencedWrite, DomainError>;
        async fn restore_stock(
            &mut self,
            units: &BTreeMap<ProductOptionId, i64>,
            now: DateTime<Utc>,
        ) -> Result<(), DomainError>;
    }

    #[async_trait]
    impl IdempotencyTx for Transaction {
        async fn record_response(
            &mut self,
            claim: &IdempotencyClaim,
            response: &StoredResponse,
            now: DateTime<Utc>,
        ) -> Result<bool, DomainError>;
    }

    #[async_trait]
    impl OutboxTx for Transaction {
        async fn record_events(&mut self, events: &[NewEvent], now: DateTime<Utc>) -> Result<(), DomainError>;
    }

    #[async_trait]
    impl Transaction for Transaction {
        async fn commit(self: Box<Self>) -> Result<(), DomainError>;
    }
}
