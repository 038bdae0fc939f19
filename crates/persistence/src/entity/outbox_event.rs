//! `outbox_events`: every event recorded in the transaction of its effect, in recording order.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "outbox_events")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    #[sea_orm(unique)]
    pub event_id: String,
    pub kind: String,
    pub order_id: i64,
    pub envelope: String,
    pub occurred_at: DateTimeUtc,
    /// Set once a relay has handed the event to every sink.
    pub handed_over_at: Option<DateTimeUtc>,
    /// The batch sinks it was handed to then, comma-separated (per-event sinks have delivery rows).
    pub delivered_to: Option<String>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    #[sea_orm(has_many = "super::outbox_delivery::Entity")]
    Delivery,
}

impl Related<super::outbox_delivery::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Delivery.def()
    }
}

impl ActiveModelBehavior for ActiveModel {}
