//! The sweeper: pending orders older than the payment timeout are cancelled, their payments failed and their
//! stock given back, in batches of one transaction each. Each order is cancelled once even when several
//! instances sweep at the same time: the status moves only from PENDING_PAYMENT, and only one transaction can
//! move it (on PostgreSQL the sweepers also skip each other's locked rows).

use std::time::Duration;

use super::{Core, give_back};
use crate::error::DomainError;
use crate::events::{CancelReason, NewEvent};
use crate::order::{Order, OrderStatus};
use crate::payment::{Payment, PaymentStatus};

impl Core {
    pub(super) async fn expire_overdue(&self, timeout: Duration, batch: u64) -> Result<usize, DomainError> {
        let now = self.clock.now();
        let cutoff = now - chrono::Duration::from_std(timeout).unwrap_or(chrono::Duration::MAX);
        let mut cancelled = 0;
        loop {
            let mut tx = self.uow.begin().await?;
            let due = tx.overdue_orders(cutoff, batch).await?;
            let moved = tx.transition_orders(&due, OrderStatus::PendingPayment, OrderStatus::Cancelled, now).await?;
            let orders = tx.find_orders(&moved).await?;
            let returned = give_back(tx.as_mut(), &orders.iter().collect::<Vec<_>>(), now).await?;
            if self.outbox && !orders.is_empty() {
                // The orders as this transaction leaves them: cancelled, their payments failed.
                let events: Vec<NewEvent> = orders
                    .into_iter()
                    .map(|o| {
                        let payment = Payment { status: PaymentStatus::Failed, ..o.payment.clone() };
                        NewEvent::order_cancelled(
                            Order { status: OrderStatus::Cancelled, payment, ..o },
                            CancelReason::PaymentTimeout,
                        )
                    })
                    .collect();
                tx.record_events(&events, now).await?;
            }
            tx.commit().await?;
            if !moved.is_empty() {
                self.events.recorded();
            }
            if !returned.is_empty() {
                self.mirror.stock_returned(&returned).await;
                self.catalogue.stock_moved(&returned.keys().copied().collect::<Vec<_>>()).await;
            }
            cancelled += moved.len();
            if (due.len() as u64) < batch {
                return Ok(cancelled);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::testing::*;
    use super::*;
    use crate::events::EventKind;
    use crate::ports::{MockOrderRepository, MockStockMirror, MockTransaction, MockUserRepository};
    use crate::stock::ConditionalStock;

    #[tokio::test]
    async fn expiry_cancels_only_what_it_moves_and_gives_stock_back_summed_per_option() {
        let mut tx = MockTransaction::new();
        tx.expect_overdue_orders().returning(|_, _| Ok(vec![order_id(1), order_id(2)]));
        // Order 2 was cancelled by another sweeper in between: it does not move, and nothing of it is touched.
        tx.expect_transition_orders()
            .withf(|ids, from, to, _| {
                ids.len() == 2 && (*from, *to) == (OrderStatus::PendingPayment, OrderStatus::Cancelled)
            })
            .returning(|_, _, _, _| Ok(vec![order_id(1)]));
        tx.expect_find_orders()
            .withf(|ids| ids == [order_id(1)])
            .returning(|_| Ok(vec![order(1, 1, OrderStatus::Cancelled, 4)]));
        tx.expect_settle_payments().withf(|ids, _, _| ids.len() == 1).times(1).returning(|_, _, _| Ok(()));
        tx.expect_restore_stock().withf(|units, _| units.get(&oid(1)) == Some(&4)).times(1).returning(|_, _| Ok(()));
        tx.expect_record_events()
            .withf(|events, _| {
                events.len() == 1
                    && events[0].kind == EventKind::OrderCancelled
                    && events[0].reason == Some(CancelReason::PaymentTimeout)
                    && events[0].order.id == order_id(1)
                    && events[0].order.payment.status == PaymentStatus::Failed
            })
            .times(1)
            .returning(|_, _| Ok(()));
        let mut seq = mockall::Sequence::new();
        tx.expect_commit().times(1).in_sequence(&mut seq).returning(|| Ok(()));
        let mut mirror = MockStockMirror::new();
        mirror
            .expect_stock_returned()
            .withf(|units| units.get(&oid(1)) == Some(&4))
            .times(1)
            .in_sequence(&mut seq)
            .returning(|_| ());
        let (mut core, events) =
            core(vec![tx], Arc::new(ConditionalStock), MockOrderRepository::new(), MockUserRepository::new());
        core.mirror = Arc::new(mirror);
        assert_eq!(core.expire_overdue(Duration::from_secs(900), 10).await.unwrap(), 1);
        assert_eq!(events.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}
