//! `order_items`: one line of an order, with the product/option names and prices at order time.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "order_items")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub order_id: i64,
    pub product_id: i64,
    pub product_option_id: i64,
    #[sea_orm(column_type = "String(StringLen::N(200))")]
    pub product_name: String,
    #[sea_orm(column_type = "String(StringLen::N(100))")]
    pub option_name: String,
    /// Always positive.
    pub quantity: i64,
    pub unit_price: i64,
    pub total_price_at_order: i64,
    pub created_at: DateTimeUtc,
    pub deleted_at: Option<DateTimeUtc>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    #[sea_orm(
        belongs_to = "super::order::Entity",
        from = "Column::OrderId",
        to = "super::order::Column::Id",
        on_delete = "Restrict"
    )]
    Order,
    #[sea_orm(
        belongs_to = "super::product::Entity",
        from = "Column::ProductId",
        to = "super::product::Column::Id",
        on_delete = "Restrict"
    )]
    Product,
    #[sea_orm(
        belongs_to = "super::product_option::Entity",
        from = "Column::ProductOptionId",
        to = "super::product_option::Column::Id",
        on_delete = "Restrict"
    )]
    ProductOption,
}

impl Related<super::order::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Order.def()
    }
}

impl Related<super::product::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Product.def()
    }
}

impl Related<super::product_option::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::ProductOption.def()
    }
}

impl ActiveModelBehavior for ActiveModel {}
