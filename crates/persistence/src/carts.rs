//! [`CartRepository`] on SeaORM.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, EntityTrait, JoinType, QueryFilter, QueryOrder, QuerySelect,
    RelationTrait,
};
use shop_domain::DomainError;
use shop_domain::cart::CartItem;
use shop_domain::ids::{CartItemId, ProductId, ProductOptionId, UserId};
use shop_domain::money::Money;
use shop_domain::ports::CartRepository;

use crate::entity::{cart, product, product_option};
use crate::error::{Stored, db};

#[derive(Debug, Clone)]
pub struct SeaCartRepository {
    db: DatabaseConnection,
}

impl SeaCartRepository {
    #[must_use]
    pub const fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }
}

type Row = (i64, i64, i64, i64, String, String, i64, i64);

/// The user's live lines (of live options of live products) with what a client shows of each; `option` narrows
/// to the line of one option. Shared by the listing and by the transaction that adds to a line.
pub(crate) async fn cart_lines<C: ConnectionTrait>(
    conn: &C,
    user_id: UserId,
    option: Option<ProductOptionId>,
) -> Result<Vec<CartItem>, DomainError> {
    let mut query = cart::Entity::find()
        .select_only()
        .column(cart::Column::Id)
        .column(cart::Column::UserId)
        .column(cart::Column::ProductOptionId)
        .column(product::Column::Id)
        .column(product::Column::Name)
        .column(product_option::Column::Name)
        .column(product_option::Column::Price)
        .column(cart::Column::Quantity)
        .join(JoinType::InnerJoin, cart::Relation::ProductOption.def())
        .join(JoinType::InnerJoin, product_option::Relation::Product.def())
        .filter(cart::Column::UserId.eq(user_id.get()))
        .filter(cart::Column::DeletedAt.is_null())
        .filter(product_option::Column::DeletedAt.is_null())
        .filter(product::Column::DeletedAt.is_null())
        .order_by_asc(cart::Column::Id);
    if let Some(option) = option {
        query = query.filter(cart::Column::ProductOptionId.eq(option.get()));
    }
    let rows: Vec<Row> = query.into_tuple().all(conn).await.map_err(db)?;
    rows.into_iter()
        .map(|(id, user, option, product, product_name, option_name, price, quantity)| {
            Ok(CartItem {
                id: CartItemId::new(id).stored()?,
                user_id: UserId::new(user).stored()?,
                product_option_id: ProductOptionId::new(option).stored()?,
                product_id: ProductId::new(product).stored()?,
                product_name,
                option_name,
                price: Money::new(price).stored()?,
                quantity,
            })
        })
        .collect()
}

#[async_trait]
impl CartRepository for SeaCartRepository {
    async fn list(&self, user_id: UserId) -> Result<Vec<CartItem>, DomainError> {
        cart_lines(&self.db, user_id, None).await
    }

    async fn remove(&self, user_id: UserId, item_id: CartItemId, now: DateTime<Utc>) -> Result<bool, DomainError> {
        let result = cart::Entity::update_many()
            .col_expr(cart::Column::DeletedAt, Expr::value(Some(now)))
            .col_expr(cart::Column::UpdatedAt, Expr::value(now))
            .filter(cart::Column::Id.eq(item_id.get()))
            .filter(cart::Column::UserId.eq(user_id.get()))
            .filter(cart::Column::DeletedAt.is_null())
            .exec(&self.db)
            .await
            .map_err(db)?;
        Ok(result.rows_affected == 1)
    }
}
