//! `carts`: a line of a user's cart; soft-deleted lines keep `deleted_at`.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "carts")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    /// With `product_option_id`: unique among live lines (`uq_carts_user_option`).
    pub user_id: i64,
    pub product_option_id: i64,
    /// Always positive.
    pub quantity: i64,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
    pub deleted_at: Option<DateTimeUtc>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    #[sea_orm(
        belongs_to = "super::user::Entity",
        from = "Column::UserId",
        to = "super::user::Column::Id",
        on_delete = "Restrict"
    )]
    User,
    #[sea_orm(
        belongs_to = "super::product_option::Entity",
        from = "Column::ProductOptionId",
        to = "super::product_option::Column::Id",
        on_delete = "Restrict"
    )]
    ProductOption,
}

impl Related<super::user::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::User.def()
    }
}

impl Related<super::product_option::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::ProductOption.def()
    }
}

impl ActiveModelBehavior for ActiveModel {}
