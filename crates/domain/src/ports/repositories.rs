//! Reads, and writes of one statement, outside any transaction; and the store of idempotency keys.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::auth::PasswordHash;
use crate::cart::CartItem;
use crate::error::DomainError;
use crate::idempotency::{ClaimOutcome, IdempotencyClaim, IdempotencyKey};
use crate::ids::{CartItemId, OrderId, ProductId, ProductOptionId, UserId};
use crate::money::{Money, Stock};
use crate::order::{Order, OrderableOption};
use crate::page::{Page, PageRequest};
use crate::ports::stock::StockRow;
use crate::product::{NewProduct, Product, ProductOption};
use crate::sales::{DateRange, PopularProduct, RankingLimit};
use crate::user::{ChargeAmount, User, UserName};

#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait UserRepository: Send + Sync {
    /// # Errors
    /// [`DomainError::UserNameTaken`] when a live user has this name.
    async fn create(&self, name: &UserName, password: &PasswordHash, now: DateTime<Utc>) -> Result<User, DomainError>;

    /// The live user of this name with their password hash (`None` for a user made before accounts existed).
    async fn find_by_name(&self, name: &UserName) -> Result<Option<(User, Option<PasswordHash>)>, DomainError>;

    /// A user that exists and is not soft-deleted.
    async fn find(&self, id: UserId) -> Result<Option<User>, DomainError>;

    /// Which of `ids` are live users, in one read.
    async fn existing(&self, ids: &[UserId]) -> Result<Vec<UserId>, DomainError>;

    /// Adds `amount` to the balance in one relative UPDATE (so concurrent charges never lose one another),
    /// guarded by `limit`; returns the new balance. The caller has already applied [`User::charge`] to the
    /// balance it read: the guard only catches a concurrent charge that landed in between.
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
    /// A page of the products that are not soft-deleted, by id, each with its live options.
    async fn list(&self, page: PageRequest) -> Result<Vec<Product>, DomainError>;

    /// How many products are not soft-deleted.
    async fn count_live(&self) -> Result<u64, DomainError>;

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

/// Reads of orders and of what they are validated against, outside any transaction.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait OrderRepository: Send + Sync {
    /// An order with its items and payment.
    async fn find(&self, id: OrderId) -> Result<Option<Order>, DomainError>;

    /// The user's orders, newest first.
    async fn list_by_user(&self, user_id: UserId, page: PageRequest) -> Result<Page<Order>, DomainError>;

    /// The live options among `ids` with their products, read without a transaction: what an order is validated
    /// and priced against before its batch begins.
    async fn orderable_options(&self, ids: &[ProductOptionId]) -> Result<Vec<OrderableOption>, DomainError>;

    /// The current stock of these options, read in one statement without any lock.
    async fn stock_levels(&self, ids: &[ProductOptionId]) -> Result<Vec<StockRow>, DomainError>;

    /// The id of the newest order committed, `None` before the first: orders are never deleted once committed,
    /// so it only grows, and a copy of the database restored from an older backup has a smaller one.
    async fn newest_order_id(&self) -> Result<Option<OrderId>, DomainError>;
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
