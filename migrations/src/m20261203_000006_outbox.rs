//! The transactional outbox: every order, payment and cancellation writes its event here in the same
//! transaction as its effect, and the relay hands each event to every sink, recording per sink where it stands.
//!
//! - `outbox_events`: one row per event, in recording order (`id`); `handed_over_at` is set once a relay has
//!   given it to every sink (the partial index keeps the relay's claim of the rest cheap however long the
//!   table grows).
//! - `outbox_deliveries`: one row per event and sink: `pending` (with its next attempt), `delivered`, or
//!   `failed` (dead-lettered). Deleted with their event when the outbox is pruned.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{
    big_integer, big_pk_auto, integer, string_len, text, text_null, timestamp_with_time_zone,
    timestamp_with_time_zone_null,
};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(OutboxEvents::Table)
                    .col(big_pk_auto(OutboxEvents::Id))
                    // The event's id (a UUID): what consumers deduplicate by.
                    .col(string_len(OutboxEvents::EventId, 36).unique_key())
                    .col(string_len(OutboxEvents::Kind, 32))
                    .col(big_integer(OutboxEvents::OrderId))
                    // The envelope as every sink delivers it: {"id", "type", "occurredAt", "data"}.
                    .col(text(OutboxEvents::Envelope))
                    .col(timestamp_with_time_zone(OutboxEvents::OccurredAt))
                    .col(timestamp_with_time_zone_null(OutboxEvents::HandedOverAt))
                    .check((
                        "ck_outbox_events_kind",
                        Expr::col(OutboxEvents::Kind).is_in(["order.created", "payment.completed", "order.cancelled"]),
                    ))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_outbox_events_new")
                    .table(OutboxEvents::Table)
                    .col(OutboxEvents::Id)
                    .and_where(Expr::col(OutboxEvents::HandedOverAt).is_null())
                    .to_owned(),
            )
            .await?;
        // The prune: events handed over before a time.
        manager
            .create_index(
                Index::create()
                    .name("idx_outbox_events_occurred_at")
                    .table(OutboxEvents::Table)
                    .col(OutboxEvents::OccurredAt)
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(OutboxDeliveries::Table)
                    .col(big_integer(OutboxDeliveries::EventSeq))
                    .col(string_len(OutboxDeliveries::Sink, 512))
                    .col(big_integer(OutboxDeliveries::OrderId))
                    .col(string_len(OutboxDeliveries::Status, 16))
                    .col(integer(OutboxDeliveries::Attempts).default(0))
                    .col(timestamp_with_time_zone_null(OutboxDeliveries::NextAttemptAt))
                    .col(text_null(OutboxDeliveries::LastError))
                    .col(timestamp_with_time_zone_null(OutboxDeliveries::DeliveredAt))
                    .primary_key(Index::create().col(OutboxDeliveries::EventSeq).col(OutboxDeliveries::Sink))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_outbox_deliveries_event")
                            .from(OutboxDeliveries::Table, OutboxDeliveries::EventSeq)
                            .to(OutboxEvents::Table, OutboxEvents::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .check((
                        "ck_outbox_deliveries_status",
                        Expr::col(OutboxDeliveries::Status).is_in(["pending", "delivered", "failed"]),
                    ))
                    .to_owned(),
            )
            .await?;
        // A sink's claim of what is due, and its check that no earlier event of the same order is still pending.
        manager
            .create_index(
                Index::create()
                    .name("idx_outbox_deliveries_due")
                    .table(OutboxDeliveries::Table)
                    .col(OutboxDeliveries::Sink)
                    .col(OutboxDeliveries::NextAttemptAt)
                    .and_where(Expr::col(OutboxDeliveries::Status).eq("pending"))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_outbox_deliveries_pending_order")
                    .table(OutboxDeliveries::Table)
                    .col(OutboxDeliveries::Sink)
                    .col(OutboxDeliveries::OrderId)
                    .col(OutboxDeliveries::EventSeq)
                    .and_where(Expr::col(OutboxDeliveries::Status).eq("pending"))
                    .to_owned(),
            )
            .await?;
        // The admin list of dead-lettered events.
        manager
            .create_index(
                Index::create()
                    .name("idx_outbox_deliveries_failed")
                    .table(OutboxDeliveries::Table)
                    .col(OutboxDeliveries::EventSeq)
                    .and_where(Expr::col(OutboxDeliveries::Status).eq("failed"))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_table(Table::drop().table(OutboxDeliveries::Table).to_owned()).await?;
        manager.drop_table(Table::drop().table(OutboxEvents::Table).to_owned()).await
    }
}

#[derive(DeriveIden)]
enum OutboxEvents {
    Table,
    Id,
    EventId,
    Kind,
    OrderId,
    Envelope,
    OccurredAt,
    HandedOverAt,
}

#[derive(DeriveIden)]
enum OutboxDeliveries {
    Table,
    EventSeq,
    Sink,
    OrderId,
    Status,
    Attempts,
    NextAttemptAt,
    LastError,
    DeliveredAt,
}
