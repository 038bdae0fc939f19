//! The default event adapter: an in-process broadcast channel, and a subscriber that logs every event.

use shop_domain::ports::{DomainEvent, EventPublisher};
use tokio::sync::broadcast;

/// Publishes to every subscriber of this process. A slow subscriber loses the oldest events (and says so)
/// rather than slowing the request that published.
#[derive(Debug, Clone)]
pub struct BroadcastPublisher {
    sender: broadcast::Sender<DomainEvent>,
}

impl BroadcastPublisher {
    #[must_use]
    pub fn new(capacity: usize) -> Self {
        let (sender, _) = broadcast::channel(capacity);
        Self { sender }
    }

    #[must_use]
    pub fn subscribe(&self) -> broadcast::Receiver<DomainEvent> {
        self.sender.subscribe()
    }
}

impl EventPublisher for BroadcastPublisher {
    fn publish(&self, event: DomainEvent) {
        // No subscriber is not an error: events are notices of what has already committed.
        let _ = self.sender.send(event);
    }
}

/// Logs each event until the channel closes.
pub async fn log_events(mut events: broadcast::Receiver<DomainEvent>) {
    loop {
        match events.recv().await {
            Ok(event) => match &event {
                DomainEvent::OrderCreated { order_id, user_id, total_price } => tracing::info!(
                    event = event.name(),
                    order_id = order_id.get(),
                    user_id = user_id.get(),
                    total_price = total_price.won(),
                    "event"
                ),
                DomainEvent::PaymentCompleted { payment_id, order_id, user_id, amount } => tracing::info!(
                    event = event.name(),
                    payment_id = payment_id.get(),
                    order_id = order_id.get(),
                    user_id = user_id.get(),
                    amount = amount.won(),
                    "event"
                ),
            },
            Err(broadcast::error::RecvError::Lagged(missed)) => tracing::warn!(missed, "event log fell behind"),
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shop_domain::ids::{OrderId, UserId};
    use shop_domain::money::Money;

    #[tokio::test]
    async fn every_subscriber_gets_what_is_published() {
        let bus = BroadcastPublisher::new(16);
        let (mut a, mut b) = (bus.subscribe(), bus.subscribe());
        let event = DomainEvent::OrderCreated {
            order_id: OrderId::new(1).unwrap(),
            user_id: UserId::new(2).unwrap(),
            total_price: Money::new(3).unwrap(),
        };
        bus.publish(event.clone());
        assert_eq!(a.recv().await.unwrap(), event);
        assert_eq!(b.recv().await.unwrap(), event);
        assert_eq!(event.name(), "order.created");
    }
}
