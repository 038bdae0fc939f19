//! `products`: a catalogue entry; what is sold is one of its options.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "products")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    #[sea_orm(column_type = "String(StringLen::N(200))")]
    pub name: String,
    /// `ACTIVE` or `INACTIVE`.
    #[sea_orm(column_type = "String(StringLen::N(16))")]
    pub status: String,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
    pub deleted_at: Option<DateTimeUtc>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    #[sea_orm(has_many = "super::product_option::Entity")]
    ProductOption,
    #[sea_orm(has_many = "super::order_item::Entity")]
    OrderItem,
    #[sea_orm(has_many = "super::daily_popular_product::Entity")]
    DailyPopularProduct,
}

impl Related<super::product_option::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::ProductOption.def()
    }
}

impl Related<super::order_item::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::OrderItem.def()
    }
}

impl Related<super::daily_popular_product::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::DailyPopularProduct.def()
    }
}

impl ActiveModelBehavior for ActiveModel {}
