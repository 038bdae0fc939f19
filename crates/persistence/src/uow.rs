//! [`UnitOfWork`] and [`Transaction`] on a SeaORM database transaction.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, ExprTrait, OnConflict};
use sea_orm::{
    ColumnTrait, DatabaseConnection, DatabaseTransaction, EntityTrait, PaginatorTrait, QueryFilter, QuerySelect, Set,
    SqliteTransactionMode, TransactionOptions, TransactionTrait,
};
use shop_domain::DomainError;
use shop_domain::cart::CartItem;
use shop_domain::ids::{ProductOptionId, UserId};
use shop_domain::money::Quantity;
use shop_domain::ports::{Transaction, UnitOfWork};
use shop_domain::product::ProductOption;

use crate::carts::cart_lines;
use crate::entity::{cart, product, product_option, user};
use crate::error::db;
use crate::products::to_option;

#[derive(Debug, Clone)]
pub struct SeaUnitOfWork {
    db: DatabaseConnection,
}

impl SeaUnitOfWork {
    #[must_use]
    pub const fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }
}

#[async_trait]
impl UnitOfWork for SeaUnitOfWork {
    async fn begin(&self) -> Result<Box<dyn Transaction>, DomainError> {
        // IMMEDIATE takes SQLite's write lock at BEGIN: a read-then-write transaction can then never fail with
        // "database is locked" on its first write; others wait out the busy timeout instead. PostgreSQL ignores it.
        let options = TransactionOptions {
            sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
            ..TransactionOptions::default()
        };
        let tx = self.db.begin_with_options(options).await.map_err(db)?;
        Ok(Box::new(SeaTransaction { tx }))
    }
}

/// One open database transaction; dropped without [`Transaction::commit`], it rolls back.
#[derive(Debug)]
pub struct SeaTransaction {
    tx: DatabaseTransaction,
}

#[async_trait]
impl Transaction for SeaTransaction {
    async fn user_exists(&mut self, id: UserId) -> Result<bool, DomainError> {
        let found = user::Entity::find_by_id(id.get())
            .filter(user::Column::DeletedAt.is_null())
            .select_only()
            .column(user::Column::Id)
            .count(&self.tx)
            .await
            .map_err(db)?;
        Ok(found > 0)
    }

    async fn find_option(&mut self, id: ProductOptionId) -> Result<Option<ProductOption>, DomainError> {
        product_option::Entity::find_by_id(id.get())
            .filter(product_option::Column::DeletedAt.is_null())
            .inner_join(product::Entity)
            .filter(product::Column::DeletedAt.is_null())
            .one(&self.tx)
            .await
            .map_err(db)?
            .map(to_option)
            .transpose()
    }

    async fn add_to_cart(
        &mut self,
        user_id: UserId,
        option_id: ProductOptionId,
        quantity: Quantity,
        now: DateTime<Utc>,
    ) -> Result<CartItem, DomainError> {
        let added = quantity.get();
        let current = Expr::col((cart::Entity, cart::Column::Quantity));
        // One upsert on the live line (`uq_carts_user_option`): concurrent adds of one option merge instead of
        // racing to insert two lines, and the WHERE keeps the merged line within the limit.
        let inserted = cart::Entity::insert(cart::ActiveModel {
            user_id: Set(user_id.get()),
            product_option_id: Set(option_id.get()),
            quantity: Set(added),
            created_at: Set(now),
            updated_at: Set(now),
            deleted_at: Set(None),
            ..Default::default()
        })
        .on_conflict(
            OnConflict::columns([cart::Column::UserId, cart::Column::ProductOptionId])
                .target_and_where(Expr::col(cart::Column::DeletedAt).is_null())
                .value(cart::Column::Quantity, current.clone().add(added))
                .value(cart::Column::UpdatedAt, now)
                .action_and_where(current.add(added).lte(Quantity::MAX))
                .to_owned(),
        )
        .exec_without_returning(&self.tx)
        .await
        .map_err(db)?;
        if inserted == 0 {
            return Err(DomainError::CartQuantityLimitExceeded { max: Quantity::MAX });
        }
        cart_lines(&self.tx, user_id, Some(option_id))
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| DomainError::unexpected("the cart line just written is not there"))
    }

    async fn commit(self: Box<Self>) -> Result<(), DomainError> {
        self.tx.commit().await.map_err(db)
    }
}
