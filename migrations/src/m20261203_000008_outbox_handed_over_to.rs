//! The sinks that take a claimed batch whole (the Redis stream, the log) are recorded on the event itself when a
//! relay hands it over (`delivered_to`, their names comma-separated), in the same UPDATE that sets
//! `handed_over_at`: a delivery row per event and batch sink cost an insert and a foreign-key check for what
//! one column says. `outbox_deliveries` keeps the per-event sinks (webhooks), whose attempts have a state.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum OutboxEvents {
    Table,
    DeliveredTo,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(OutboxEvents::Table)
                    .add_column(ColumnDef::new(OutboxEvents::DeliveredTo).text().null())
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(Table::alter().table(OutboxEvents::Table).drop_column(OutboxEvents::DeliveredTo).to_owned())
            .await
    }
}
