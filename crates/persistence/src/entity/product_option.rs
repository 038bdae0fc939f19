//! `product_options`: a sellable variant of a product, with its price and stock.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "product_options")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub product_id: i64,
    #[sea_orm(column_type = "String(StringLen::N(100))")]
    pub name: String,
    pub price: i64,
    /// Never negative (`ck_product_options_stock_non_negative`).
    pub stock: i64,
    /// Optimistic-lock version.
    pub version: i64,
    /// The newest fencing token a stock write was accepted under (Redis lock strategies).
    pub fence_token: i64,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
    pub deleted_at: Option<DateTimeUtc>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    #[sea_orm(
        belongs_to = "super::product::Entity",
        from = "Column::ProductId",
        to = "super::product::Column::Id",
        on_delete = "Restrict"
    )]
    Product,
    #[sea_orm(has_many = "super::order_item::Entity")]
    OrderItem,
    #[sea_orm(has_many = "super::cart::Entity")]
    Cart,
    #[sea_orm(has_many = "super::daily_popular_product::Entity")]
    DailyPopularProduct,
}

impl Related<super::product::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Product.def()
    }
}

impl Related<super::order_item::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::OrderItem.def()
    }
}

impl Related<super::cart::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Cart.def()
    }
}

impl Related<super::daily_popular_product::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::DailyPopularProduct.def()
    }
}

impl ActiveModelBehavior for ActiveModel {}
