//! [`OrderRepository`] on SeaORM, and the loading of whole orders shared with the transaction.

use std::collections::HashMap;

use async_trait::async_trait;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder, QuerySelect,
};
use shop_domain::DomainError;
use shop_domain::ids::{OrderId, PaymentId, ProductId, ProductOptionId, UserId};
use shop_domain::money::{Money, Quantity, Stock};
use shop_domain::order::{Order, OrderItem, OrderableOption};
use shop_domain::page::{Page, PageRequest};
use shop_domain::payment::Payment;
use shop_domain::ports::{OrderRepository, StockRow};

use crate::entity::{order, order_item, payment, product, product_option};
use crate::error::{Stored, db};
use crate::products::to_option;

#[derive(Debug, Clone)]
pub struct SeaOrderRepository {
    db: DatabaseConnection,
}

impl SeaOrderRepository {
    #[must_use]
    pub const fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }
}

pub(crate) fn to_item(m: order_item::Model) -> Result<OrderItem, DomainError> {
    Ok(OrderItem {
        product_id: ProductId::new(m.product_id).stored()?,
        product_option_id: ProductOptionId::new(m.product_option_id).stored()?,
        product_name: m.product_name,
        option_name: m.option_name,
        quantity: Quantity::new(m.quantity).stored()?,
        unit_price: Money::new(m.unit_price).stored()?,
        total_price: Money::new(m.total_price_at_order).stored()?,
    })
}

pub(crate) fn to_payment(m: payment::Model) -> Result<Payment, DomainError> {
    Ok(Payment {
        id: PaymentId::new(m.id).stored()?,
        order_id: OrderId::new(m.order_id).stored()?,
        user_id: UserId::new(m.user_id).stored()?,
        status: m.status.parse().stored()?,
        method: m.method.parse().stored()?,
        amount: Money::new(m.amount).stored()?,
        paid_at: m.paid_at,
    })
}

/// Whole orders for these rows, in the rows' order: items and payments come in one query each.
pub(crate) async fn load_orders<C: ConnectionTrait>(
    conn: &C,
    rows: Vec<order::Model>,
) -> Result<Vec<Order>, DomainError> {
    let ids: Vec<i64> = rows.iter().map(|o| o.id).collect();
    let mut items: HashMap<i64, Vec<OrderItem>> = HashMap::new();
    for item in order_item::Entity::find()
        .filter(order_item::Column::OrderId.is_in(ids.iter().copied()))
        .order_by_asc(order_item::Column::ProductOptionId)
        .all(conn)
        .await
        .map_err(db)?
    {
        items.entry(item.order_id).or_default().push(to_item(item)?);
    }
    let mut payments: HashMap<i64, Payment> = HashMap::new();
    for p in payment::Entity::find()
        .filter(payment::Column::OrderId.is_in(ids.iter().copied()))
        .all(conn)
        .await
        .map_err(db)?
    {
        payments.insert(p.order_id, to_payment(p)?);
    }
    rows.into_iter()
        .map(|o| {
            let payment = payments
                .remove(&o.id)
                .ok_or_else(|| DomainError::unexpected(format!("order {} has no payment", o.id)))?;
            Ok(Order {
                id: OrderId::new(o.id).stored()?,
                user_id: UserId::new(o.user_id).stored()?,
                status: o.status.parse().stored()?,
                total_price: Money::new(o.total_price).stored()?,
                ordered_at: o.ordered_at,
                items: items.remove(&o.id).unwrap_or_default(),
                payment,
            })
        })
        .collect()
}

/// The live options among `ids` with their live products: what an order is validated and priced against.
pub(crate) async fn orderable_options<C: ConnectionTrait>(
    conn: &C,
    ids: &[ProductOptionId],
) -> Result<Vec<OrderableOption>, DomainError> {
    let rows = product_option::Entity::find()
        .filter(product_option::Column::Id.is_in(ids.iter().map(|id| id.get())))
        .filter(product_option::Column::DeletedAt.is_null())
        .find_also_related(product::Entity)
        .filter(product::Column::DeletedAt.is_null())
        .all(conn)
        .await
        .map_err(db)?;
    rows.into_iter()
        .filter_map(|(option, product)| product.map(|p| (option, p)))
        .map(|(option, product)| {
            Ok(OrderableOption {
                option: to_option(option)?,
                product_name: product.name,
                product_status: product.status.parse().stored()?,
            })
        })
        .collect()
}

pub(crate) async fn find_order<C: ConnectionTrait>(conn: &C, id: OrderId) -> Result<Option<Order>, DomainError> {
    let Some(row) =
        order::Entity::find_by_id(id.get()).filter(order::Column::DeletedAt.is_null()).one(conn).await.map_err(db)?
    else {
        return Ok(None);
    };
    Ok(load_orders(conn, vec![row]).await?.pop())
}

#[async_trait]
impl OrderRepository for SeaOrderRepository {
    async fn find(&self, id: OrderId) -> Result<Option<Order>, DomainError> {
        find_order(&self.db, id).await
    }

    async fn list_by_user(&self, user_id: UserId, page: PageRequest) -> Result<Page<Order>, DomainError> {
        // `idx_orders_user` (user_id, id) serves both the count and the newest-first page.
        let mine = order::Entity::find()
            .filter(order::Column::UserId.eq(user_id.get()))
            .filter(order::Column::DeletedAt.is_null());
        let total = mine.clone().count(&self.db).await.map_err(db)?;
        let rows = mine
            .order_by_desc(order::Column::Id)
            .offset(page.offset())
            .limit(page.size())
            .all(&self.db)
            .await
            .map_err(db)?;
        Ok(Page { items: load_orders(&self.db, rows).await?, page: page.page(), size: page.size(), total })
    }

    async fn orderable_options(&self, ids: &[ProductOptionId]) -> Result<Vec<OrderableOption>, DomainError> {
        orderable_options(&self.db, ids).await
    }

    async fn stock_levels(&self, ids: &[ProductOptionId]) -> Result<Vec<StockRow>, DomainError> {
        let rows: Vec<(i64, i64, i64)> = product_option::Entity::find()
            .select_only()
            .column(product_option::Column::Id)
            .column(product_option::Column::Stock)
            .column(product_option::Column::Version)
            .filter(product_option::Column::Id.is_in(ids.iter().map(|id| id.get())))
            .into_tuple()
            .all(&self.db)
            .await
            .map_err(db)?;
        rows.into_iter()
            .map(|(id, stock, version)| {
                Ok(StockRow {
                    option_id: ProductOptionId::new(id).stored()?,
                    stock: Stock::new(stock).stored()?,
                    version,
                })
            })
            .collect()
    }

    async fn newest_order_id(&self) -> Result<Option<OrderId>, DomainError> {
        let newest: Option<Option<i64>> = order::Entity::find()
            .select_only()
            .column_as(order::Column::Id.max(), "newest")
            .into_tuple()
            .one(&self.db)
            .await
            .map_err(db)?;
        newest.flatten().map(|id| OrderId::new(id).stored()).transpose()
    }
}
