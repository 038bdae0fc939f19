//! Events that other systems act on, and their delivery.
//!
//! Every order, payment and cancellation records its event in the same transaction as its effect (the outbox):
//! nothing rolled back is ever published, and nothing committed is lost by a crash. A relay
//! ([`crate::services::Relay`]) then hands each event to every sink (a Redis stream, webhooks, the log) at least
//! once, in commit order per order; consumers deduplicate by the event's id.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};

use crate::error::InvalidValue;
use crate::ids::OrderId;
use crate::order::Order;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    OrderCreated,
    PaymentCompleted,
    OrderCancelled,
}

impl EventKind {
    /// The event's `type` on the wire.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::OrderCreated => "order.created",
            Self::PaymentCompleted => "payment.completed",
            Self::OrderCancelled => "order.cancelled",
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EventKind {
    type Err = InvalidValue;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Self::OrderCreated, Self::PaymentCompleted, Self::OrderCancelled]
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or(InvalidValue::new("type", "must be order.created, payment.completed or order.cancelled"))
    }
}

/// Why an order was cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelReason {
    /// Unpaid past the payment timeout: the sweeper cancelled it.
    PaymentTimeout,
    /// Its payment found too little balance.
    InsufficientBalance,
}

impl CancelReason {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::PaymentTimeout => "PAYMENT_TIMEOUT",
            Self::InsufficientBalance => "INSUFFICIENT_BALANCE",
        }
    }
}

/// An event as a use case records it, in the transaction of its effect: the order as that transaction leaves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    pub kind: EventKind,
    pub order: Order,
    /// For [`EventKind::OrderCancelled`].
    pub reason: Option<CancelReason>,
}

impl NewEvent {
    #[must_use]
    pub const fn order_created(order: Order) -> Self {
        Self { kind: EventKind::OrderCreated, order, reason: None }
    }

    #[must_use]
    pub const fn payment_completed(order: Order) -> Self {
        Self { kind: EventKind::PaymentCompleted, order, reason: None }
    }

    #[must_use]
    pub const fn order_cancelled(order: Order, reason: CancelReason) -> Self {
        Self { kind: EventKind::OrderCancelled, order, reason: Some(reason) }
    }
}

/// A recorded event, as sinks receive it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEvent {
    /// Its place in the outbox: increasing in the order the events were recorded.
    pub seq: i64,
    /// The event's id (a UUID), the consumers' deduplication key.
    pub id: String,
    pub kind: EventKind,
    pub order_id: OrderId,
    pub occurred_at: DateTime<Utc>,
    /// The envelope every sink delivers as is: `{"id", "type", "occurredAt", "data"}`.
    pub envelope: String,
}

/// Where one event stands with one sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryStatus {
    /// Not delivered yet: waiting for its first try or its next one.
    Pending,
    Delivered,
    /// Dead-lettered: every attempt failed; an admin retry puts it back to pending.
    Failed,
}

impl DeliveryStatus {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Delivered => "delivered",
            Self::Failed => "failed",
        }
    }
}

impl FromStr for DeliveryStatus {
    type Err = InvalidValue;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Self::Pending, Self::Delivered, Self::Failed]
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or(InvalidValue::new("status", "must be pending, delivered or failed"))
    }
}

/// One sink's record of one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub sink: String,
    pub status: DeliveryStatus,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub delivered_at: Option<DateTime<Utc>>,
}

/// An event with where it stands with every sink: what the admin API lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRecord {
    pub event: OutboxEvent,
    /// Empty while the relay has not yet handed it to the sinks.
    pub deliveries: Vec<Delivery>,
}

impl EventRecord {
    /// `failed` when a sink dead-lettered it, else `pending` until every sink has it, else `delivered`.
    #[must_use]
    pub fn status(&self) -> DeliveryStatus {
        if self.deliveries.iter().any(|d| d.status == DeliveryStatus::Failed) {
            DeliveryStatus::Failed
        } else if self.deliveries.is_empty() || self.deliveries.iter().any(|d| d.status == DeliveryStatus::Pending) {
            DeliveryStatus::Pending
        } else {
            DeliveryStatus::Delivered
        }
    }
}

/// What one attempt to deliver one event came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    Delivered,
    /// Try again at `retry_at`.
    Retry {
        error: String,
        retry_at: DateTime<Utc>,
    },
    /// The last attempt allowed failed: dead-lettered.
    GaveUp {
        error: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_statuses_round_trip_through_their_names() {
        for kind in [EventKind::OrderCreated, EventKind::PaymentCompleted, EventKind::OrderCancelled] {
            assert_eq!(kind.as_str().parse::<EventKind>().unwrap(), kind);
        }
        for status in [DeliveryStatus::Pending, DeliveryStatus::Delivered, DeliveryStatus::Failed] {
            assert_eq!(status.as_str().parse::<DeliveryStatus>().unwrap(), status);
        }
        assert!("order.shipped".parse::<EventKind>().is_err());
    }

    fn delivery(status: DeliveryStatus) -> Delivery {
        Delivery { sink: "s".into(), status, attempts: 1, last_error: None, next_attempt_at: None, delivered_at: None }
    }

    #[test]
    fn an_event_is_failed_if_any_sink_gave_up_and_delivered_only_once_every_sink_has_it() {
        let event = OutboxEvent {
            seq: 1,
            id: "e".into(),
            kind: EventKind::OrderCreated,
            order_id: OrderId::new(1).unwrap(),
            occurred_at: Utc::now(),
            envelope: "{}".into(),
        };
        let record = |statuses: &[DeliveryStatus]| EventRecord {
            event: event.clone(),
            deliveries: statuses.iter().copied().map(delivery).collect(),
        };
        assert_eq!(record(&[]).status(), DeliveryStatus::Pending, "not yet handed to the sinks");
        assert_eq!(record(&[DeliveryStatus::Delivered, DeliveryStatus::Pending]).status(), DeliveryStatus::Pending);
        assert_eq!(record(&[DeliveryStatus::Failed, DeliveryStatus::Pending]).status(), DeliveryStatus::Failed);
        assert_eq!(record(&[DeliveryStatus::Delivered; 2]).status(), DeliveryStatus::Delivered);
    }
}
