//! The outbox on SeaORM: events recorded in the transaction of their effect, the relay's claims, and each sink's
//! deliveries.
//!
//! On PostgreSQL a claim is a transaction that holds its rows `FOR UPDATE SKIP LOCKED` while the sinks get them,
//! so several instances share the work and never hand one event over twice at the same time. SQLite serves one
//! instance: a claim reads without holding SQLite's one write lock (orders keep committing while the sinks get
//! the events), and what it came to is written in a short transaction after.

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, ExprTrait, LockBehavior, LockType, Query};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, EntityTrait, PaginatorTrait,
    QueryFilter, QueryOrder, QuerySelect, Set, SqliteTransactionMode, Statement, TransactionOptions, TransactionTrait,
};
use serde::Serialize;
use shop_domain::DomainError;
use shop_domain::events::{Attempt, CancelReason, Delivery, DeliveryStatus, EventRecord, NewEvent, OutboxEvent};
use shop_domain::ids::OrderId;
use shop_domain::page::{Page, PageRequest};
use shop_domain::ports::{DeliveryClaim, Outbox, OutboxClaim};

use crate::entity::{outbox_delivery as delivery, outbox_event as event};
use crate::error::{Stored, db};
use crate::uow::insert_chunked;

/// Inserts `events`, each with a new UUID (version 7: time-ordered, so the unique index on it grows at its right
/// edge) and its envelope. On PostgreSQL one statement binds four arrays (`unnest`) whatever the batch's size; on
/// SQLite, multi-row INSERTs ([`insert_chunked`]).
pub(crate) async fn record(
    tx: &DatabaseTransaction,
    events: &[NewEvent],
    now: DateTime<Utc>,
) -> Result<(), DomainError> {
    if tx.get_database_backend() == DbBackend::Postgres {
        if let Some(insert) = postgres_insert(events, now)? {
            tx.execute_raw(insert).await.map_err(db)?;
        }
        return Ok(());
    }
    let (ids, envelopes) = enveloped(events, now)?;
    let rows: Vec<_> = events
        .iter()
        .zip(ids.into_iter().zip(envelopes))
        .map(|(e, (id, envelope))| event::ActiveModel {
            event_id: Set(id),
            kind: Set(e.kind.as_str().to_owned()),
            order_id: Set(e.order.id.get()),
            envelope: Set(envelope),
            occurred_at: Set(now),
            handed_over_at: Set(None),
            delivered_to: Set(None),
            ..Default::default()
        })
        .collect();
    insert_chunked(tx, rows).await
}

/// The PostgreSQL statement that inserts `events` (none for no events): four arrays bound, whatever their number.
pub(crate) fn postgres_insert(events: &[NewEvent], now: DateTime<Utc>) -> Result<Option<Statement>, DomainError> {
    if events.is_empty() {
        return Ok(None);
    }
    let (ids, envelopes) = enveloped(events, now)?;
    let sql = "INSERT INTO outbox_events (event_id, kind, order_id, envelope, occurred_at) \
               SELECT e.event_id, e.kind, e.order_id, e.envelope, $5 \
               FROM unnest($1::text[], $2::text[], $3::int8[], $4::text[]) AS e(event_id, kind, order_id, envelope)";
    let kinds: Vec<String> = events.iter().map(|e| e.kind.as_str().to_owned()).collect();
    let orders: Vec<i64> = events.iter().map(|e| e.order.id.get()).collect();
    let values = vec![ids.into(), kinds.into(), orders.into(), envelopes.into(), now.into()];
    Ok(Some(Statement::from_sql_and_values(DbBackend::Postgres, sql, values)))
}

/// Each event's new UUID (version 7: time-ordered) and its serialized envelope.
fn enveloped(events: &[NewEvent], now: DateTime<Utc>) -> Result<(Vec<String>, Vec<String>), DomainError> {
    let mut ids = Vec::with_capacity(events.len());
    let mut envelopes = Vec::with_capacity(events.len());
    for e in events {
        let id = uuid::Uuid::now_v7().to_string();
        let envelope = Envelope { id: &id, kind: e.kind.as_str(), occurred_at: now, data: OrderData::of(e) };
        envelopes.push(serde_json::to_string(&envelope).map_err(DomainError::unexpected)?);
        ids.push(id);
    }
    Ok((ids, envelopes))
}

/// What every sink delivers: `{"id", "type", "occurredAt", "data"}` (API.md, "Events").
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Envelope<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    occurred_at: DateTime<Utc>,
    data: OrderData<'a>,
}

/// The order as the API shows it (`GET /api/v1/orders/{id}`), and a cancellation's reason.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OrderData<'a> {
    id: i64,
    user_id: i64,
    status: &'static str,
    total_price: i64,
    ordered_at: DateTime<Utc>,
    items: Vec<ItemData<'a>>,
    payment: PaymentData,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ItemData<'a> {
    product_option_id: i64,
    product_name: &'a str,
    option_name: &'a str,
    quantity: i64,
    unit_price: i64,
    total_price_at_order: i64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PaymentData {
    id: i64,
    order_id: i64,
    status: &'static str,
    method: &'static str,
    amount: i64,
    paid_at: Option<DateTime<Utc>>,
}

impl<'a> OrderData<'a> {
    fn of(event: &'a NewEvent) -> Self {
        let o = &event.order;
        Self {
            id: o.id.get(),
            user_id: o.user_id.get(),
            status: o.status.as_str(),
            total_price: o.total_price.won(),
            ordered_at: o.ordered_at,
            items: o
                .items
                .iter()
                .map(|i| ItemData {
                    product_option_id: i.product_option_id.get(),
                    product_name: &i.product_name,
                    option_name: &i.option_name,
                    quantity: i.quantity.get(),
                    unit_price: i.unit_price.won(),
                    total_price_at_order: i.total_price.won(),
                })
                .collect(),
            payment: PaymentData {
                id: o.payment.id.get(),
                order_id: o.payment.order_id.get(),
                status: o.payment.status.as_str(),
                method: o.payment.method.as_str(),
                amount: o.payment.amount.won(),
                paid_at: o.payment.paid_at,
            },
            reason: event.reason.map(CancelReason::as_str),
        }
    }
}

#[derive(Debug, Clone)]
pub struct SeaOutbox {
    db: DatabaseConnection,
}

impl SeaOutbox {
    #[must_use]
    pub const fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }

    fn postgres(&self) -> bool {
        self.db.get_database_backend() == DbBackend::Postgres
    }

    /// A relay's claim on PostgreSQL: a transaction whose commit does not wait for its WAL to reach the disk. A
    /// crash may forget a hand-over it reported, which gives those events to the sinks again (delivery is at
    /// least once, and consumers deduplicate by id); in exchange the relay's commits never queue for a WAL flush
    /// beside the orders' own.
    async fn claiming(&self) -> Result<DatabaseTransaction, DomainError> {
        let tx = self.db.begin().await.map_err(db)?;
        tx.execute_unprepared("SET LOCAL synchronous_commit = off").await.map_err(db)?;
        Ok(tx)
    }

    /// A short write transaction (SQLite's write lock taken at BEGIN, as the unit of work does).
    async fn write(&self) -> Result<DatabaseTransaction, DomainError> {
        let options = TransactionOptions {
            sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
            ..TransactionOptions::default()
        };
        self.db.begin_with_options(options).await.map_err(db)
    }
}

fn to_event(row: event::Model) -> Result<OutboxEvent, DomainError> {
    Ok(OutboxEvent {
        seq: row.id,
        kind: row.kind.parse().stored()?,
        order_id: OrderId::new(row.order_id).stored()?,
        occurred_at: row.occurred_at,
        envelope: row.envelope,
        id: row.event_id,
    })
}

fn to_delivery(row: delivery::Model) -> Result<Delivery, DomainError> {
    Ok(Delivery {
        status: row.status.parse().stored()?,
        attempts: u32::try_from(row.attempts).map_err(DomainError::unexpected)?,
        last_error: row.last_error,
        next_attempt_at: row.next_attempt_at,
        delivered_at: row.delivered_at,
        sink: row.sink,
    })
}

/// New events claimed: on PostgreSQL inside `tx`, their rows locked.
struct NewClaim {
    outbox: SeaOutbox,
    tx: Option<DatabaseTransaction>,
    events: Vec<OutboxEvent>,
}

#[async_trait]
impl OutboxClaim for NewClaim {
    fn events(&self) -> &[OutboxEvent] {
        &self.events
    }

    async fn hand_over(
        self: Box<Self>,
        delivered: &[&str],
        queued: &[&str],
        now: DateTime<Utc>,
    ) -> Result<(), DomainError> {
        let tx = match self.tx {
            Some(tx) => tx,
            None => self.outbox.write().await?,
        };
        // The batch sinks had the events whole: the event row says so. Only the per-event sinks get delivery rows.
        let mut rows = Vec::with_capacity(self.events.len() * queued.len());
        for e in &self.events {
            for sink in queued {
                rows.push(delivery::ActiveModel {
                    event_seq: Set(e.seq),
                    sink: Set((*sink).to_owned()),
                    order_id: Set(e.order_id.get()),
                    status: Set(DeliveryStatus::Pending.as_str().to_owned()),
                    attempts: Set(0),
                    next_attempt_at: Set(Some(now)),
                    last_error: Set(None),
                    delivered_at: Set(None),
                });
            }
        }
        insert_chunked(&tx, rows).await?;
        let delivered_to = (!delivered.is_empty()).then(|| delivered.join(","));
        let seqs: Vec<i64> = self.events.iter().map(|e| e.seq).collect();
        let backend = tx.get_database_backend();
        // One array parameter on PostgreSQL rather than a parameter per event.
        let claimed = if backend == DbBackend::Postgres {
            Expr::cust_with_values("id = ANY($1)", [sea_orm::Value::from(seqs)])
        } else {
            Expr::col(event::Column::Id).is_in(seqs)
        };
        event::Entity::update_many()
            .col_expr(event::Column::HandedOverAt, Expr::value(now))
            .col_expr(event::Column::DeliveredTo, Expr::value(delivered_to))
            .filter(claimed)
            .exec(&tx)
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)
    }
}

/// A sink's due deliveries claimed: on PostgreSQL inside `tx`, their rows locked.
struct DueClaim {
    outbox: SeaOutbox,
    tx: Option<DatabaseTransaction>,
    sink: String,
    deliveries: Vec<(OutboxEvent, u32)>,
}

#[async_trait]
impl DeliveryClaim for DueClaim {
    fn deliveries(&self) -> &[(OutboxEvent, u32)] {
        &self.deliveries
    }

    async fn settle(self: Box<Self>, attempts: &[(i64, Attempt)], now: DateTime<Utc>) -> Result<(), DomainError> {
        let tx = match self.tx {
            Some(tx) => tx,
            None => self.outbox.write().await?,
        };
        for (seq, attempt) in attempts {
            let (status, next, error, delivered_at) = match attempt {
                Attempt::Delivered => (DeliveryStatus::Delivered, None, None, Some(now)),
                Attempt::Retry { error, retry_at } => (DeliveryStatus::Pending, Some(*retry_at), Some(error), None),
                Attempt::GaveUp { error } => (DeliveryStatus::Failed, None, Some(error), None),
            };
            delivery::Entity::update_many()
                .col_expr(delivery::Column::Status, Expr::value(status.as_str()))
                .col_expr(delivery::Column::Attempts, Expr::col(delivery::Column::Attempts).add(1))
                .col_expr(delivery::Column::NextAttemptAt, Expr::value(next))
                .col_expr(delivery::Column::LastError, Expr::value(error.map(|e| truncate(e, 1_000))))
                .col_expr(delivery::Column::DeliveredAt, Expr::value(delivered_at))
                .filter(delivery::Column::EventSeq.eq(*seq))
                .filter(delivery::Column::Sink.eq(self.sink.as_str()))
                .exec(&tx)
                .await
                .map_err(db)?;
        }
        tx.commit().await.map_err(db)
    }
}

fn truncate(text: &str, max: usize) -> String {
    text.chars().take(max).collect()
}

/// A statement with `$n` placeholders, as `?` on SQLite.
fn statement(backend: DbBackend, sql: &str, values: Vec<sea_orm::Value>) -> Statement {
    let sql = if backend == DbBackend::Sqlite {
        let mut out = String::with_capacity(sql.len());
        let mut chars = sql.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '$' && chars.peek().is_some_and(char::is_ascii_digit) {
                while chars.peek().is_some_and(char::is_ascii_digit) {
                    chars.next();
                }
                out.push('?');
            } else {
                out.push(c);
            }
        }
        out
    } else {
        sql.to_owned()
    };
    Statement::from_sql_and_values(backend, sql, values)
}

/// Events matching an admin filter (`e` is `outbox_events`).
fn status_filter(status: Option<DeliveryStatus>) -> &'static str {
    match status {
        None => "TRUE",
        Some(DeliveryStatus::Failed) => {
            "EXISTS (SELECT 1 FROM outbox_deliveries d WHERE d.event_seq = e.id AND d.status = 'failed')"
        }
        Some(DeliveryStatus::Pending) => {
            "(e.handed_over_at IS NULL OR EXISTS (SELECT 1 FROM outbox_deliveries d WHERE d.event_seq = e.id AND \
             d.status = 'pending')) AND NOT EXISTS (SELECT 1 FROM outbox_deliveries d WHERE d.event_seq = e.id AND \
             d.status = 'failed')"
        }
        Some(DeliveryStatus::Delivered) => {
            "e.handed_over_at IS NOT NULL AND NOT EXISTS (SELECT 1 FROM outbox_deliveries d WHERE d.event_seq = e.id \
             AND d.status <> 'delivered')"
        }
    }
}

impl SeaOutbox {
    /// The events of `rows` with their deliveries.
    async fn records(&self, rows: Vec<event::Model>) -> Result<Vec<EventRecord>, DomainError> {
        let seqs: Vec<i64> = rows.iter().map(|r| r.id).collect();
        let mut deliveries: BTreeMap<i64, Vec<Delivery>> = BTreeMap::new();
        if !seqs.is_empty() {
            let found = delivery::Entity::find()
                .filter(delivery::Column::EventSeq.is_in(seqs))
                .order_by_asc(delivery::Column::Sink)
                .all(&self.db)
                .await
                .map_err(db)?;
            for row in found {
                deliveries.entry(row.event_seq).or_default().push(to_delivery(row)?);
            }
        }
        rows.into_iter()
            .map(|row| {
                let mut kept = deliveries.remove(&row.id).unwrap_or_default();
                let batch: Vec<Delivery> =
                    handed_over(&row).into_iter().filter(|h| !kept.iter().any(|k| k.sink == h.sink)).collect();
                kept.extend(batch);
                kept.sort_by(|a, b| a.sink.cmp(&b.sink));
                Ok(EventRecord { event: to_event(row)?, deliveries: kept })
            })
            .collect()
    }
}

/// The deliveries to the batch sinks that the event row records: each had it once, when it was handed over.
fn handed_over(row: &event::Model) -> Vec<Delivery> {
    let (Some(at), Some(sinks)) = (row.handed_over_at, row.delivered_to.as_deref()) else {
        return Vec::new();
    };
    sinks
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|sink| Delivery {
            sink: sink.to_owned(),
            status: DeliveryStatus::Delivered,
            attempts: 1,
            last_error: None,
            next_attempt_at: None,
            delivered_at: Some(at),
        })
        .collect()
}

#[async_trait]
impl Outbox for SeaOutbox {
    async fn claim_new(&self, limit: u64) -> Result<Box<dyn OutboxClaim>, DomainError> {
        let query = event::Entity::find()
            .filter(event::Column::HandedOverAt.is_null())
            .order_by_asc(event::Column::Id)
            .limit(limit);
        let (tx, rows) = if self.postgres() {
            let tx = self.claiming().await?;
            let rows =
                query.lock_with_behavior(LockType::Update, LockBehavior::SkipLocked).all(&tx).await.map_err(db)?;
            (Some(tx), rows)
        } else {
            (None, query.all(&self.db).await.map_err(db)?)
        };
        let events = rows.into_iter().map(to_event).collect::<Result<_, _>>()?;
        Ok(Box::new(NewClaim { outbox: self.clone(), tx, events }))
    }

    async fn claim_due(
        &self,
        sink: &str,
        limit: u64,
        now: DateTime<Utc>,
    ) -> Result<Box<dyn DeliveryClaim>, DomainError> {
        let backend = self.db.get_database_backend();
        let lock = if self.postgres() { " FOR UPDATE OF d SKIP LOCKED" } else { "" };
        // Only the oldest pending event of each order: its later events wait until it is delivered or
        // dead-lettered, so that they arrive in the order they were recorded.
        let sql = format!(
            "SELECT d.event_seq, d.attempts FROM outbox_deliveries d \
             WHERE d.sink = $1 AND d.status = 'pending' AND d.next_attempt_at <= $2 \
             AND NOT EXISTS (SELECT 1 FROM outbox_deliveries p WHERE p.sink = d.sink AND p.status = 'pending' \
             AND p.order_id = d.order_id AND p.event_seq < d.event_seq) \
             ORDER BY d.event_seq LIMIT $3{lock}"
        );
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let stmt = statement(backend, &sql, vec![sink.into(), now.into(), limit.into()]);
        let tx = if self.postgres() { Some(self.claiming().await?) } else { None };
        let rows = match &tx {
            Some(tx) => tx.query_all_raw(stmt).await,
            None => self.db.query_all_raw(stmt).await,
        }
        .map_err(db)?;
        let mut attempts: BTreeMap<i64, u32> = BTreeMap::new();
        for row in rows {
            let seq: i64 = row.try_get("", "event_seq").map_err(db)?;
            let made: i32 = row.try_get("", "attempts").map_err(db)?;
            attempts.insert(seq, u32::try_from(made).map_err(DomainError::unexpected)?);
        }
        let events = if attempts.is_empty() {
            Vec::new()
        } else {
            let find = event::Entity::find().filter(event::Column::Id.is_in(attempts.keys().copied()));
            match &tx {
                Some(tx) => find.all(tx).await,
                None => find.all(&self.db).await,
            }
            .map_err(db)?
        };
        let mut deliveries = events
            .into_iter()
            .map(|row| {
                let made = attempts.get(&row.id).copied().unwrap_or(0);
                Ok((to_event(row)?, made))
            })
            .collect::<Result<Vec<_>, DomainError>>()?;
        deliveries.sort_by_key(|(e, _)| e.seq);
        Ok(Box::new(DueClaim { outbox: self.clone(), tx, sink: sink.to_owned(), deliveries }))
    }

    async fn list(&self, status: Option<DeliveryStatus>, page: PageRequest) -> Result<Page<EventRecord>, DomainError> {
        let backend = self.db.get_database_backend();
        let filter = status_filter(status);
        let count = statement(backend, &format!("SELECT COUNT(*) AS n FROM outbox_events e WHERE {filter}"), vec![]);
        let total: i64 = match self.db.query_one_raw(count).await.map_err(db)? {
            Some(row) => row.try_get("", "n").map_err(db)?,
            None => 0,
        };
        let ids = statement(
            backend,
            &format!("SELECT e.id FROM outbox_events e WHERE {filter} ORDER BY e.id DESC LIMIT $1 OFFSET $2"),
            vec![
                i64::try_from(page.size()).unwrap_or(i64::MAX).into(),
                i64::try_from(page.offset()).unwrap_or(i64::MAX).into(),
            ],
        );
        let seqs: Vec<i64> = self
            .db
            .query_all_raw(ids)
            .await
            .map_err(db)?
            .iter()
            .map(|row| row.try_get("", "id"))
            .collect::<Result<_, _>>()
            .map_err(db)?;
        let rows = event::Entity::find()
            .filter(event::Column::Id.is_in(seqs))
            .order_by_desc(event::Column::Id)
            .all(&self.db)
            .await
            .map_err(db)?;
        Ok(Page {
            items: self.records(rows).await?,
            page: page.page(),
            size: page.size(),
            total: u64::try_from(total).unwrap_or(0),
        })
    }

    async fn find(&self, id: &str) -> Result<Option<EventRecord>, DomainError> {
        let row = event::Entity::find().filter(event::Column::EventId.eq(id)).one(&self.db).await.map_err(db)?;
        Ok(self.records(row.into_iter().collect()).await?.pop())
    }

    async fn retry_failed(&self, id: &str, now: DateTime<Utc>) -> Result<bool, DomainError> {
        let seq = Query::select()
            .column(event::Column::Id)
            .from(event::Entity)
            .and_where(event::Column::EventId.eq(id))
            .to_owned();
        let moved = delivery::Entity::update_many()
            .col_expr(delivery::Column::Status, Expr::value(DeliveryStatus::Pending.as_str()))
            .col_expr(delivery::Column::Attempts, Expr::value(0))
            .col_expr(delivery::Column::NextAttemptAt, Expr::value(now))
            .filter(delivery::Column::EventSeq.in_subquery(seq))
            .filter(delivery::Column::Status.eq(DeliveryStatus::Failed.as_str()))
            .exec(&self.db)
            .await
            .map_err(db)?;
        Ok(moved.rows_affected > 0)
    }

    async fn prune(&self, before: DateTime<Utc>) -> Result<u64, DomainError> {
        let backend = self.db.get_database_backend();
        let undelivered =
            "SELECT 1 FROM outbox_deliveries d WHERE d.event_seq = outbox_events.id AND d.status <> 'delivered'";
        let sql = format!(
            "DELETE FROM outbox_events WHERE occurred_at < $1 AND handed_over_at IS NOT NULL AND NOT EXISTS ({undelivered})"
        );
        // Deliveries go with their event (ON DELETE CASCADE).
        let done = self.db.execute_raw(statement(backend, &sql, vec![before.into()])).await.map_err(db)?;
        Ok(done.rows_affected())
    }

    async fn backlog(&self) -> Result<u64, DomainError> {
        let new =
            event::Entity::find().filter(event::Column::HandedOverAt.is_null()).count(&self.db).await.map_err(db)?;
        let pending = delivery::Entity::find()
            .filter(delivery::Column::Status.eq(DeliveryStatus::Pending.as_str()))
            .count(&self.db)
            .await
            .map_err(db)?;
        Ok(new + pending)
    }
}
