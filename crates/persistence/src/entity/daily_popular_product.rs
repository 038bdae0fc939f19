//! `daily_popular_products`: units sold per option and day, fed by completed payments.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "daily_popular_products")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub product_id: i64,
    /// With `sold_date`: unique (`uq_daily_sales_day_option`), the upsert's conflict target.
    pub product_option_id: i64,
    pub sold_date: Date,
    pub total_sold: i64,
    pub updated_at: DateTimeUtc,
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
    #[sea_orm(
        belongs_to = "super::product_option::Entity",
        from = "Column::ProductOptionId",
        to = "super::product_option::Column::Id",
        on_delete = "Restrict"
    )]
    ProductOption,
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
