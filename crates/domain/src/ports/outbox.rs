//! The outbox: where recorded events wait for the relay, where each sink's deliveries are kept, and the sinks.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::error::DomainError;
use crate::events::{Attempt, DeliveryStatus, EventRecord, OutboxEvent};
use crate::page::{Page, PageRequest};

/// Events claimed from the outbox, not yet handed to the sinks, in a transaction of their own: other relays
/// skip them meanwhile. Dropping the claim gives them back untouched.
#[async_trait]
pub trait OutboxClaim: Send {
    /// The claimed events, oldest first.
    fn events(&self) -> &[OutboxEvent];

    /// Records, for every claimed event, each of `delivered` as delivered now and each of `queued` as pending
    /// (due now), marks the events handed over, and commits.
    async fn hand_over(
        self: Box<Self>,
        delivered: &[&str],
        queued: &[&str],
        now: DateTime<Utc>,
    ) -> Result<(), DomainError>;
}

/// One sink's deliveries that are due, claimed in a transaction of their own (other relays skip them).
#[async_trait]
pub trait DeliveryClaim: Send {
    /// Each claimed event with the attempts made so far, oldest first.
    fn deliveries(&self) -> &[(OutboxEvent, u32)];

    /// Records what each attempt came to (by the event's `seq`) and commits.
    async fn settle(self: Box<Self>, attempts: &[(i64, Attempt)], now: DateTime<Utc>) -> Result<(), DomainError>;
}

#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait Outbox: Send + Sync {
    /// Claims up to `limit` events that no relay has handed over yet, oldest first.
    async fn claim_new(&self, limit: u64) -> Result<Box<dyn OutboxClaim>, DomainError>;

    /// Claims up to `limit` of `sink`'s pending deliveries due by `now`, oldest first, and only the oldest
    /// pending one of each order: an order's events reach a sink in the order they were recorded.
    async fn claim_due(
        &self,
        sink: &str,
        limit: u64,
        now: DateTime<Utc>,
    ) -> Result<Box<dyn DeliveryClaim>, DomainError>;

    /// Events with where they stand, newest first, only those of `status` when given.
    async fn list(&self, status: Option<DeliveryStatus>, page: PageRequest) -> Result<Page<EventRecord>, DomainError>;

    /// One event by its id.
    async fn find(&self, id: &str) -> Result<Option<EventRecord>, DomainError>;

    /// Puts the event's dead-lettered deliveries back to pending, due now, with their attempts reset: whether
    /// there was any.
    async fn retry_failed(&self, id: &str, now: DateTime<Utc>) -> Result<bool, DomainError>;

    /// Deletes the events every sink has had and that were recorded before `before`: how many.
    async fn prune(&self, before: DateTime<Utc>) -> Result<u64, DomainError>;

    /// Events not handed over yet, and deliveries pending.
    async fn backlog(&self) -> Result<u64, DomainError>;
}

/// Somewhere events go.
#[async_trait]
pub trait EventSink: Send + Sync {
    /// Its name in the delivery records (`redis-stream`, `webhook:https://...`, `log`).
    fn name(&self) -> &str;

    /// Whether each event is delivered and retried on its own, with backoff, up to a number of attempts
    /// (a webhook). Otherwise the sink takes each claimed batch whole when it is handed over, and a failure gives
    /// the batch back to be claimed again (a Redis stream, the log).
    fn per_event(&self) -> bool;

    /// Delivers these events in this order: each one's outcome.
    async fn deliver(&self, events: &[OutboxEvent]) -> Vec<Result<(), String>>;
}

/// Told when a transaction has recorded events, so that the relay hands them over at once instead of at its
/// next poll. Never blocks and never fails.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
pub trait OutboxSignal: Send + Sync {
    fn recorded(&self);
}
