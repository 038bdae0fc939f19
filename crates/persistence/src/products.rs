//! [`ProductRepository`] on SeaORM: the catalogue, admin edits and the popular-products ranking.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Alias, Expr, ExprTrait, Func, IntoCondition, Order, Query};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, DatabaseConnection, EntityTrait, JoinType, PaginatorTrait, QueryFilter, QueryOrder,
    QuerySelect, RelationTrait, Select, Set, TransactionTrait,
};
use shop_domain::ids::{ProductId, ProductOptionId};
use shop_domain::money::{Money, Stock};
use shop_domain::order::OrderStatus;
use shop_domain::page::PageRequest;
use shop_domain::ports::ProductRepository;
use shop_domain::product::{NewProduct, Product, ProductOption};
use shop_domain::sales::{DateRange, PopularProduct, RankingLimit};
use shop_domain::{DomainError, InvalidValue};

use crate::entity::{daily_popular_product as daily, order, order_item, product, product_option};
use crate::error::{Stored, db};

#[derive(Debug, Clone)]
pub struct SeaProductRepository {
    db: DatabaseConnection,
}

impl SeaProductRepository {
    #[must_use]
    pub const fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }

    /// These products with their live options, read by one statement (a left join, so a product whose options
    /// are all deleted comes with none): the products by id, each one's options by id. A cache miss is one round
    /// trip, and the products and options come from one snapshot.
    async fn with_live_options(&self, products: Select<product::Entity>) -> Result<Vec<Product>, DomainError> {
        let live = product::Relation::ProductOption.def().on_condition(|_, option| {
            Expr::col((option, product_option::Column::DeletedAt)).is_null().into_condition()
        });
        let rows = products
            .join(JoinType::LeftJoin, live)
            .select_also(product_option::Entity)
            .order_by_asc(product::Column::Id)
            .order_by_asc(product_option::Column::Id)
            .all(&self.db)
            .await
            .map_err(db)?;
        let mut grouped: Vec<(product::Model, Vec<ProductOption>)> = Vec::new();
        for (product, option) in rows {
            if grouped.last().is_none_or(|(p, _)| p.id != product.id) {
                grouped.push((product, Vec::new()));
            }
            if let (Some(option), Some((_, options))) = (option, grouped.last_mut()) {
                options.push(to_option(option)?);
            }
        }
        grouped.into_iter().map(|(product, options)| to_product(product, options)).collect()
    }
}

pub(crate) fn to_option(m: product_option::Model) -> Result<ProductOption, DomainError> {
    Ok(ProductOption {
        id: ProductOptionId::new(m.id).stored()?,
        product_id: ProductId::new(m.product_id).stored()?,
        name: m.name,
        price: Money::new(m.price).stored()?,
        stock: Stock::new(m.stock).stored()?,
    })
}

fn to_product(m: product::Model, options: Vec<ProductOption>) -> Result<Product, DomainError> {
    Ok(Product { id: ProductId::new(m.id).stored()?, name: m.name, status: m.status.parse().stored()?, options })
}

#[async_trait]
impl ProductRepository for SeaProductRepository {
    async fn list(&self, page: PageRequest) -> Result<Vec<Product>, DomainError> {
        // The page's ids come from the live-products index alone: a deep OFFSET walks index entries, not table rows.
        let page_ids = Query::select()
            .column(product::Column::Id)
            .from(product::Entity)
            .and_where(product::Column::DeletedAt.is_null())
            .order_by(product::Column::Id, Order::Asc)
            .offset(page.offset())
            .limit(page.size())
            .to_owned();
        self.with_live_options(product::Entity::find().filter(product::Column::Id.in_subquery(page_ids))).await
    }

    async fn count_live(&self) -> Result<u64, DomainError> {
        product::Entity::find().filter(product::Column::DeletedAt.is_null()).count(&self.db).await.map_err(db)
    }

    async fn find(&self, id: ProductId) -> Result<Option<Product>, DomainError> {
        let live = product::Entity::find_by_id(id.get()).filter(product::Column::DeletedAt.is_null());
        Ok(self.with_live_options(live).await?.into_iter().next())
    }

    async fn create(&self, new: &NewProduct, now: DateTime<Utc>) -> Result<Product, DomainError> {
        let tx = self.db.begin().await.map_err(db)?;
        let row = product::ActiveModel {
            name: Set(new.name().to_owned()),
            status: Set(new.status().as_str().to_owned()),
            created_at: Set(now),
            updated_at: Set(now),
            deleted_at: Set(None),
            ..Default::default()
        }
        .insert(&tx)
        .await
        .map_err(db)?;
        let mut options = Vec::with_capacity(new.options().len());
        for option in new.options() {
            let inserted = product_option::ActiveModel {
                product_id: Set(row.id),
                name: Set(option.name().to_owned()),
                price: Set(option.price().won()),
                stock: Set(option.stock().get()),
                version: Set(0),
                fence_token: Set(0),
                created_at: Set(now),
                updated_at: Set(now),
                deleted_at: Set(None),
                ..Default::default()
            }
            .insert(&tx)
            .await
            .map_err(db)?;
            options.push(to_option(inserted)?);
        }
        tx.commit().await.map_err(db)?;
        to_product(row, options)
    }

    async fn set_stock(
        &self,
        id: ProductOptionId,
        stock: Stock,
        now: DateTime<Utc>,
    ) -> Result<ProductOption, DomainError> {
        let live_products = Query::select()
            .column(product::Column::Id)
            .from(product::Entity)
            .and_where(product::Column::DeletedAt.is_null())
            .to_owned();
        // Units held by unpaid orders come back to the row if those orders are cancelled: the count plus them
        // must stay within what a read accepts.
        let held: Option<Option<i64>> = order_item::Entity::find()
            .select_only()
            .column_as(
                Expr::expr(Func::cast_as(
                    Func::sum(Expr::col((order_item::Entity, order_item::Column::Quantity))),
                    Alias::new("BIGINT"),
                )),
                "held",
            )
            .join(JoinType::InnerJoin, order_item::Relation::Order.def())
            .filter(order_item::Column::ProductOptionId.eq(id.get()))
            .filter(order::Column::Status.eq(OrderStatus::PendingPayment.as_str()))
            .into_tuple()
            .one(&self.db)
            .await
            .map_err(db)?;
        let held = held.flatten().unwrap_or(0);
        if stock.get().saturating_add(held) > Stock::MAX {
            return Err(
                InvalidValue::new("stock", "plus the units unpaid orders hold must be at most 1000000000").into()
            );
        }
        let updated = product_option::Entity::update_many()
            .col_expr(product_option::Column::Stock, Expr::value(stock.get()))
            // A new version makes any optimistic writer that read the old stock retry.
            .col_expr(product_option::Column::Version, Expr::col(product_option::Column::Version).add(1))
            .col_expr(product_option::Column::UpdatedAt, Expr::value(now))
            .filter(product_option::Column::Id.eq(id.get()))
            .filter(product_option::Column::DeletedAt.is_null())
            .filter(product_option::Column::ProductId.in_subquery(live_products))
            .exec_with_returning(&self.db)
            .await
            .map_err(db)?;
        updated.into_iter().next().map(to_option).transpose()?.ok_or(DomainError::ProductOptionNotFound(id))
    }

    async fn popular(&self, range: DateRange, limit: RankingLimit) -> Result<Vec<PopularProduct>, DomainError> {
        // Reads the range of `idx_daily_sales_day_product` (sold_date, product_id, total_sold) and sums per
        // product; the cast keeps PostgreSQL's SUM(bigint) = numeric out of the Rust side.
        let sum = Expr::expr(Func::cast_as(
            Func::sum(Expr::col((daily::Entity, daily::Column::TotalSold))),
            Alias::new("BIGINT"),
        ));
        let rows: Vec<(i64, String, i64)> = daily::Entity::find()
            .select_only()
            .column(daily::Column::ProductId)
            .column(product::Column::Name)
            .column_as(sum, "total")
            .join(JoinType::InnerJoin, daily::Relation::Product.def())
            .filter(daily::Column::SoldDate.between(range.from(), range.to()))
            .filter(product::Column::DeletedAt.is_null())
            .group_by(daily::Column::ProductId)
            .group_by(product::Column::Name)
            .order_by(Expr::col(Alias::new("total")), Order::Desc)
            .order_by_asc(daily::Column::ProductId)
            .limit(u64::from(limit.get()))
            .into_tuple()
            .all(&self.db)
            .await
            .map_err(db)?;
        rows.into_iter()
            .zip(1..)
            .map(|((product_id, name, total_sold), rank)| {
                Ok(PopularProduct { rank, product_id: ProductId::new(product_id).stored()?, name, total_sold })
            })
            .collect()
    }
}
