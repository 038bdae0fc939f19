//! A batch of payments (one payment with combining off), in one transaction:
//!
//! 1. Read the batch's orders and their users. A payment of an order that is missing or another user's is
//!    404; of an order that is not pending, or one the batch pays already, 409.
//! 2. Move the rest to PAID with one statement that moves only what is still pending: of concurrent payments
//!    of one order (in other lanes or instances) exactly one proceeds, and a concurrent expiry wins or loses
//!    whole.
//! 3. Decide in arrival order, with [`User::spend`] on the balances read, what each user's balance covers.
//!    Each user's covered payments are spent with one guarded UPDATE for all users; a guard that refuses means
//!    a concurrent transaction spent that balance since the read, and the batch is retried from the start.
//! 4. The day's sales grow by the paid orders' units (one upsert per option, ascending), their payments
//!    complete; an order the balance does not cover is cancelled, its payment fails and its stock goes back,
//!    and its answer is 402.
//!
//! Rows several transactions share are written in one global order (users, then the day's sales, then stock,
//! each ascending), so two payment batches, or a payment batch and an order batch, never wait in a cycle.

use std::collections::BTreeMap;

use tokio::time::Instant;

use super::{Core, PayJob, Tally, give_back};
use crate::error::DomainError;
use crate::events::{CancelReason, NewEvent};
use crate::idempotency::Recorder;
use crate::ids::{OrderId, PaymentId, UserId};
use crate::money::Money;
use crate::order::{Order, OrderStatus};
use crate::payment::{Payment, PaymentStatus};
use crate::sales::DailySales;
use crate::user::User;

/// What a payment job asks.
pub(in crate::services) struct PaymentAsk {
    pub(super) order_id: OrderId,
    pub(super) user_id: UserId,
    pub(super) recorder: Option<Recorder<Payment>>,
}

/// What the batch decided of one payment before writing.
enum Decision {
    /// Answered without a write of its own (not found, not payable, caller gone).
    Refused(DomainError),
    /// Moves to PAID if still pending.
    Candidate,
}

impl Core {
    /// Commits one batch of payments and answers each of them.
    pub(super) async fn pay(&self, batch: Vec<PayJob>) {
        let started = Instant::now();
        let queued = batch.iter().map(|job| started.saturating_duration_since(job.queued_at)).max().unwrap_or_default();
        let batch = self.still_wanted(batch);
        if batch.is_empty() {
            return;
        }
        let outcomes = match self.commit_payments_retrying(&batch).await {
            Ok(outcomes) => outcomes,
            // A dependency that is down fails every order alike: one by one would only multiply the wait.
            Err(e @ DomainError::Unavailable { .. }) => batch.iter().map(|_| Err(e.replicate())).collect(),
            Err(e) if batch.len() > 1 => {
                self.stats.add(Tally::BatchSplits, 1);
                tracing::warn!(size = batch.len(), error = %e, "a payment batch failed; paying its orders one by one");
                let mut outcomes = Vec::with_capacity(batch.len());
                for one in batch.chunks(1) {
                    let outcome = self.commit_payments_retrying(one).await.and_then(|mut outcome| {
                        outcome.pop().unwrap_or_else(|| Err(DomainError::unexpected("a batch of one answered nothing")))
                    });
                    outcomes.push(outcome);
                }
                outcomes
            }
            Err(e) => vec![Err(e)],
        };
        self.stats.batch("payment", batch.len(), queued, started.elapsed());
        if outcomes.iter().any(|o| matches!(o, Ok(_) | Err(DomainError::InsufficientBalance { .. }))) {
            self.events.recorded();
        }
        for (job, outcome) in batch.into_iter().zip(outcomes) {
            job.answer(outcome);
        }
    }

    async fn commit_payments_retrying(
        &self,
        batch: &[PayJob],
    ) -> Result<Vec<Result<Payment, DomainError>>, DomainError> {
        let retry = self.stock.retry_policy();
        let mut attempt = 0;
        loop {
            match self.commit_payments(batch).await {
                Err(DomainError::WriteConflict) if attempt < retry.max_retries => {
                    self.stats.add(Tally::Retries, 1);
                    tokio::time::sleep(retry.delay(attempt)).await;
                    attempt += 1;
                }
                Err(DomainError::WriteConflict) => return Err(DomainError::LockTimeout { retry_after_secs: 1 }),
                other => return other,
            }
        }
    }

    /// One transaction for a batch of payments: `Ok` holds each payment's outcome; `Err` is a failure of the
    /// transaction itself, which then kept nothing.
    async fn commit_payments(&self, batch: &[PayJob]) -> Result<Vec<Result<Payment, DomainError>>, DomainError> {
        let now = self.clock.now();
        let mut tx = self.uow.begin().await?;
        let ids: Vec<OrderId> = batch.iter().map(|job| job.ask.order_id).collect();
        let found: BTreeMap<OrderId, Order> = tx.find_orders(&ids).await?.into_iter().map(|o| (o.id, o)).collect();
        let mut owners: Vec<UserId> = found.values().map(|o| o.user_id).collect();
        owners.sort_unstable();
        owners.dedup();
        let mut users: BTreeMap<UserId, User> = tx.users(&owners).await?.into_iter().map(|u| (u.id, u)).collect();

        let mut claimed: BTreeMap<OrderId, usize> = BTreeMap::new();
        let mut decisions: Vec<Decision> = Vec::with_capacity(batch.len());
        for (i, job) in batch.iter().enumerate() {
            let PaymentAsk { order_id, user_id, .. } = job.ask;
            let order = found.get(&order_id).filter(|o| o.user_id == user_id);
            decisions.push(match order {
                None => Decision::Refused(DomainError::OrderNotFound(order_id)),
                Some(_) if !users.contains_key(&user_id) => Decision::Refused(DomainError::UserNotFound(user_id)),
                Some(order) => match order.ensure_payable() {
                    Err(e) => Decision::Refused(e),
                    // The same order twice in one batch: only its first payment may move it.
                    Ok(()) if claimed.contains_key(&order_id) => {
                        Decision::Refused(DomainError::OrderNotPayable { order_id, status: OrderStatus::Paid })
                    }
                    Ok(()) => match job.abandoned() {
                        Some(why) => {
                            self.stats.add(Tally::Abandoned, 1);
                            Decision::Refused(why)
                        }
                        None => {
                            claimed.insert(order_id, i);
                            Decision::Candidate
                        }
                    },
                },
            });
        }
        let candidates: Vec<OrderId> = claimed.keys().copied().collect();
        let moved = tx.transition_orders(&candidates, OrderStatus::PendingPayment, OrderStatus::Paid, now).await?;
        let lost: Vec<OrderId> = candidates.iter().filter(|id| !moved.contains(id)).copied().collect();
        if !lost.is_empty() {
            // Another payment or the sweeper moved them after our read: say where they are now.
            let now_in: BTreeMap<OrderId, OrderStatus> =
                tx.find_orders(&lost).await?.into_iter().map(|o| (o.id, o.status)).collect();
            for order_id in &lost {
                let status = now_in.get(order_id).copied().unwrap_or(OrderStatus::Cancelled);
                decisions[claimed[order_id]] =
                    Decision::Refused(DomainError::OrderNotPayable { order_id: *order_id, status });
            }
        }

        // What each balance covers, in arrival order: the domain's rule, on the balances read.
        let mut outcomes: Vec<Option<Result<Payment, DomainError>>> = decisions
            .into_iter()
            .map(|d| match d {
                Decision::Refused(e) => Some(Err(e)),
                Decision::Candidate => None,
            })
            .collect();
        let mut paid: Vec<&Order> = Vec::new();
        let mut cancelled: Vec<&Order> = Vec::new();
        let balances_before: BTreeMap<UserId, Money> = users.iter().map(|(id, u)| (*id, u.balance)).collect();
        for (i, job) in batch.iter().enumerate() {
            if outcomes[i].is_some() {
                continue;
            }
            let order = &found[&job.ask.order_id];
            let Some(user) = users.get_mut(&order.user_id) else { continue };
            match user.spend(order.total_price) {
                Ok(_) => {
                    paid.push(order);
                    outcomes[i] = Some(Ok(Payment {
                        status: PaymentStatus::Completed,
                        paid_at: Some(now),
                        ..order.payment.clone()
                    }));
                }
                Err(short) => {
                    cancelled.push(order);
                    outcomes[i] = Some(Err(short));
                }
            }
        }
        let spends: Vec<(UserId, Money)> = users
            .values()
            .filter_map(|u| {
                let before = balances_before.get(&u.id).copied()?;
                let spent = before.checked_sub(u.balance).filter(|s| *s > Money::ZERO)?;
                Some((u.id, spent))
            })
            .collect();
        let spent = tx.spend_balances(&spends, now).await?;
        if spent.len() != spends.len() {
            // A balance changed under us (a payment of this user in another instance): decide again.
            return Err(DomainError::WriteConflict);
        }
        if !paid.is_empty() {
            let items: Vec<_> = paid.iter().flat_map(|o| o.items.iter().cloned()).collect();
            tx.add_daily_sales(&DailySales::of_items(now.date_naive(), &items), now).await?;
            let completed: Vec<PaymentId> = paid.iter().map(|o| o.payment.id).collect();
            tx.settle_payments(&completed, PaymentStatus::Completed, now).await?;
        }
        let returned = if cancelled.is_empty() {
            BTreeMap::new()
        } else {
            let ids: Vec<OrderId> = cancelled.iter().map(|o| o.id).collect();
            tx.transition_orders(&ids, OrderStatus::Paid, OrderStatus::Cancelled, now).await?;
            give_back(tx.as_mut(), &cancelled, now).await?
        };
        let outcomes: Vec<Result<Payment, DomainError>> = outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| Err(DomainError::unexpected("a payment was left undecided"))))
            .collect();
        if self.outbox && !(paid.is_empty() && cancelled.is_empty()) {
            let settled = |order: &Order, status, payment| Order {
                status,
                payment: Payment { status: payment, paid_at: Some(now), ..order.payment.clone() },
                ..order.clone()
            };
            let events: Vec<NewEvent> = paid
                .iter()
                .map(|o| NewEvent::payment_completed(settled(o, OrderStatus::Paid, PaymentStatus::Completed)))
                .chain(cancelled.iter().map(|o| {
                    let order = Order {
                        payment: Payment {
                            paid_at: None,
                            ..settled(o, OrderStatus::Cancelled, PaymentStatus::Failed).payment
                        },
                        ..settled(o, OrderStatus::Cancelled, PaymentStatus::Failed)
                    };
                    NewEvent::order_cancelled(order, CancelReason::InsufficientBalance)
                }))
                .collect();
            tx.record_events(&events, now).await?;
        }
        for (job, outcome) in batch.iter().zip(&outcomes) {
            // Refusals found before any write (not found, not payable) are settled by the caller, as for any
            // outcome that commits nothing; what this transaction decided is recorded in it.
            let decided_here = matches!(outcome, Ok(_) | Err(DomainError::InsufficientBalance { .. }));
            if let (Some(recorder), true) = (&job.ask.recorder, decided_here) {
                recorder.record_in(tx.as_mut(), outcome, now).await?;
            }
        }
        tx.commit().await?;
        self.stats.add(Tally::PaymentBatches, 1);
        // The cancelled orders' units are back in the database: the strategy's copy of the stock hears of them.
        if !returned.is_empty() {
            self.mirror.stock_returned(&returned).await;
            self.catalogue.stock_moved(&returned.keys().copied().collect::<Vec<_>>()).await;
        }
        Ok(outcomes)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use tokio::sync::oneshot;

    use super::super::Job;
    use super::super::testing::*;
    use super::*;
    use crate::events::EventKind;
    use crate::ports::{MockOrderRepository, MockStockMirror, MockTransaction, MockUserRepository};
    use crate::stock::ConditionalStock;

    type Answer = oneshot::Receiver<Result<Payment, DomainError>>;

    fn job(order: i64, user: i64) -> (PayJob, Answer) {
        Job::new(
            PaymentAsk { order_id: order_id(order), user_id: uid(user), recorder: None },
            Duration::from_secs(5),
            None,
        )
    }

    fn user(id: i64, balance: i64) -> User {
        User { id: uid(id), name: format!("u{id}"), balance: Money::new(balance).unwrap() }
    }

    /// A payment transaction that finds `orders` and `users`, and moves every pending order it is asked to.
    fn paying_tx(orders: Vec<Order>, users: Vec<User>) -> MockTransaction {
        let mut tx = MockTransaction::new();
        let found = orders.clone();
        tx.expect_find_orders()
            .returning(move |ids| Ok(found.iter().filter(|o| ids.contains(&o.id)).cloned().collect()));
        tx.expect_users().returning(move |ids| Ok(users.iter().filter(|u| ids.contains(&u.id)).cloned().collect()));
        tx
    }

    async fn outcomes(answers: Vec<Answer>) -> Vec<Result<Payment, DomainError>> {
        let mut out = Vec::new();
        for answer in answers {
            out.push(answer.await.unwrap());
        }
        out
    }

    #[tokio::test]
    async fn a_batch_pays_what_each_balance_covers_in_arrival_order_and_cancels_the_rest() {
        // User 1 has 5,000: orders of 3,000 and 2,000 fit, the third (1,000) does not and is cancelled.
        // User 2 pays 1,000 of 1,000.
        let orders = vec![
            order(1, 1, OrderStatus::PendingPayment, 3),
            order(2, 1, OrderStatus::PendingPayment, 2),
            order(3, 1, OrderStatus::PendingPayment, 1),
            order(4, 2, OrderStatus::PendingPayment, 1),
        ];
        let mut tx = paying_tx(orders, vec![user(1, 5000), user(2, 1000)]);
        tx.expect_transition_orders()
            .withf(|ids, from, to, _| {
                ids.len() == 4 && (*from, *to) == (OrderStatus::PendingPayment, OrderStatus::Paid)
            })
            .times(1)
            .returning(|ids, _, _, _| Ok(ids.to_vec()));
        tx.expect_spend_balances()
            .withf(|spends, _| spends == [(uid(1), Money::new(5000).unwrap()), (uid(2), Money::new(1000).unwrap())])
            .times(1)
            .returning(|spends, _| Ok(spends.iter().map(|(u, _)| *u).collect()));
        tx.expect_add_daily_sales()
            .withf(|sales, _| sales.len() == 1 && sales[0].units == 6)
            .times(1)
            .returning(|_, _| Ok(()));
        tx.expect_settle_payments()
            .withf(|ids, status, _| *status == PaymentStatus::Completed && ids.len() == 3)
            .times(1)
            .returning(|_, _, _| Ok(()));
        tx.expect_transition_orders()
            .withf(|ids, from, to, _| {
                ids == [order_id(3)] && (*from, *to) == (OrderStatus::Paid, OrderStatus::Cancelled)
            })
            .times(1)
            .returning(|ids, _, _, _| Ok(ids.to_vec()));
        tx.expect_settle_payments()
            .withf(|ids, status, _| *status == PaymentStatus::Failed && ids.len() == 1)
            .times(1)
            .returning(|_, _, _| Ok(()));
        tx.expect_restore_stock()
            .withf(|units, _| units.get(&oid(1)) == Some(&1) && units.len() == 1)
            .times(1)
            .returning(|_, _| Ok(()));
        tx.expect_record_events()
            .withf(|events, _| {
                let kinds: Vec<_> =
                    events.iter().map(|e| (e.kind, e.order.id.get(), e.order.status, e.reason)).collect();
                kinds
                    == [
                        (EventKind::PaymentCompleted, 1, OrderStatus::Paid, None),
                        (EventKind::PaymentCompleted, 2, OrderStatus::Paid, None),
                        (EventKind::PaymentCompleted, 4, OrderStatus::Paid, None),
                        (EventKind::OrderCancelled, 3, OrderStatus::Cancelled, Some(CancelReason::InsufficientBalance)),
                    ]
                    && events[0].order.payment.status == PaymentStatus::Completed
                    && events[3].order.payment.status == PaymentStatus::Failed
            })
            .times(1)
            .returning(|_, _| Ok(()));
        tx.expect_commit().times(1).returning(|| Ok(()));
        let (mut core, events) =
            core(vec![tx], Arc::new(ConditionalStock), MockOrderRepository::new(), MockUserRepository::new());
        let mut mirror = MockStockMirror::new();
        mirror.expect_stock_returned().withf(|units| units.get(&oid(1)) == Some(&1)).times(1).returning(|_| ());
        core.mirror = Arc::new(mirror);
        let (jobs, answers): (Vec<_>, Vec<_>) =
            [(1, 1), (2, 1), (3, 1), (4, 2)].iter().map(|(o, u)| job(*o, *u)).unzip();
        core.pay(jobs).await;
        let out = outcomes(answers).await;
        assert!(out[0].is_ok() && out[1].is_ok() && out[3].is_ok());
        assert!(matches!(out[2], Err(DomainError::InsufficientBalance { balance, required })
            if balance == Money::ZERO && required.won() == 1000));
        assert_eq!(out[0].as_ref().unwrap().status, PaymentStatus::Completed);
        assert_eq!(events.load(Ordering::SeqCst), 1, "the relay hears of the commit");
    }

    #[tokio::test]
    async fn the_same_order_paid_twice_in_one_batch_is_paid_once() {
        let mut tx = paying_tx(vec![order(1, 1, OrderStatus::PendingPayment, 2)], vec![user(1, 10_000)]);
        tx.expect_transition_orders().times(1).returning(|ids, _, _, _| Ok(ids.to_vec()));
        tx.expect_spend_balances()
            .withf(|spends, _| spends == [(uid(1), Money::new(2000).unwrap())])
            .times(1)
            .returning(|spends, _| Ok(spends.iter().map(|(u, _)| *u).collect()));
        tx.expect_add_daily_sales().times(1).returning(|_, _| Ok(()));
        tx.expect_settle_payments().times(1).returning(|_, _, _| Ok(()));
        tx.expect_record_events().withf(|events, _| events.len() == 1).times(1).returning(|_, _| Ok(()));
        tx.expect_commit().times(1).returning(|| Ok(()));
        let (core, _) =
            core(vec![tx], Arc::new(ConditionalStock), MockOrderRepository::new(), MockUserRepository::new());
        let (jobs, answers): (Vec<_>, Vec<_>) = [job(1, 1), job(1, 1)].into_iter().unzip();
        core.pay(jobs).await;
        let out = outcomes(answers).await;
        assert!(out[0].is_ok());
        assert!(matches!(out[1], Err(DomainError::OrderNotPayable { status: OrderStatus::Paid, .. })));
    }

    #[tokio::test]
    async fn another_users_order_a_paid_one_and_one_lost_to_a_race_spend_nothing() {
        let orders = vec![
            order(1, 1, OrderStatus::PendingPayment, 1),
            order(2, 1, OrderStatus::Paid, 1),
            order(3, 1, OrderStatus::PendingPayment, 1),
        ];
        let mut tx = MockTransaction::new();
        // Order 3 is moved by someone else between the read and the write: read again, it is cancelled.
        let mut reads = vec![vec![Order { status: OrderStatus::Cancelled, ..orders[2].clone() }], orders];
        tx.expect_find_orders().times(2).returning(move |_| Ok(reads.pop().unwrap_or_default()));
        tx.expect_users().returning(|_| Ok(vec![user(1, 10_000)]));
        tx.expect_transition_orders().times(1).returning(|_, _, _, _| Ok(vec![]));
        tx.expect_spend_balances().returning(|spends, _| Ok(spends.iter().map(|(u, _)| *u).collect()));
        tx.expect_commit().times(1).returning(|| Ok(()));
        let (core, events) =
            core(vec![tx], Arc::new(ConditionalStock), MockOrderRepository::new(), MockUserRepository::new());
        let (jobs, answers): (Vec<_>, Vec<_>) = [job(1, 2), job(2, 1), job(3, 1)].into_iter().unzip();
        core.pay(jobs).await;
        let out = outcomes(answers).await;
        assert!(matches!(out[0], Err(DomainError::OrderNotFound(_))), "another user's order is not found");
        assert!(matches!(out[1], Err(DomainError::OrderNotPayable { status: OrderStatus::Paid, .. })));
        assert!(matches!(out[2], Err(DomainError::OrderNotPayable { status: OrderStatus::Cancelled, .. })));
        assert_eq!(events.load(Ordering::SeqCst), 0, "nothing was recorded");
    }

    #[tokio::test]
    async fn a_balance_spent_elsewhere_since_the_read_retries_the_batch() {
        let mut first = paying_tx(vec![order(1, 1, OrderStatus::PendingPayment, 1)], vec![user(1, 1000)]);
        first.expect_transition_orders().returning(|ids, _, _, _| Ok(ids.to_vec()));
        first.expect_spend_balances().times(1).returning(|_, _| Ok(vec![]));
        first.expect_commit().never();
        // Read again: the balance is gone now, so the order is cancelled instead.
        let mut second = paying_tx(vec![order(1, 1, OrderStatus::PendingPayment, 1)], vec![user(1, 0)]);
        second.expect_transition_orders().returning(|ids, _, _, _| Ok(ids.to_vec()));
        second.expect_spend_balances().withf(|spends, _| spends.is_empty()).returning(|_, _| Ok(vec![]));
        second.expect_settle_payments().returning(|_, _, _| Ok(()));
        second.expect_restore_stock().times(1).returning(|_, _| Ok(()));
        second
            .expect_record_events()
            .withf(|events, _| events.len() == 1 && events[0].reason == Some(CancelReason::InsufficientBalance))
            .times(1)
            .returning(|_, _| Ok(()));
        second.expect_commit().times(1).returning(|| Ok(()));
        let (core, _) = core(
            vec![first, second],
            Arc::new(ConditionalStock),
            MockOrderRepository::new(),
            MockUserRepository::new(),
        );
        let (one, answer) = job(1, 1);
        core.pay(vec![one]).await;
        assert!(matches!(answer.await.unwrap(), Err(DomainError::InsufficientBalance { .. })));
        assert_eq!(core.stats.retries.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_failed_payment_batch_is_split_and_the_others_still_pay() {
        let orders = vec![order(1, 1, OrderStatus::PendingPayment, 1), order(2, 2, OrderStatus::PendingPayment, 1)];
        let users = vec![user(1, 5000), user(2, 5000)];
        let mut failing = paying_tx(orders.clone(), users.clone());
        failing.expect_transition_orders().returning(|_, _, _, _| Err(DomainError::unexpected("disk full")));
        let ok_tx = |orders: Vec<Order>, users: Vec<User>| {
            let mut tx = paying_tx(orders, users);
            tx.expect_transition_orders().returning(|ids, _, _, _| Ok(ids.to_vec()));
            tx.expect_spend_balances().returning(|spends, _| Ok(spends.iter().map(|(u, _)| *u).collect()));
            tx.expect_add_daily_sales().returning(|_, _| Ok(()));
            tx.expect_settle_payments().returning(|_, _, _| Ok(()));
            tx.expect_record_events().returning(|_, _| Ok(()));
            tx.expect_commit().times(1).returning(|| Ok(()));
            tx
        };
        let txs = vec![failing, ok_tx(orders.clone(), users.clone()), ok_tx(orders, users)];
        let (core, events) =
            core(txs, Arc::new(ConditionalStock), MockOrderRepository::new(), MockUserRepository::new());
        let (jobs, answers): (Vec<_>, Vec<_>) = [job(1, 1), job(2, 2)].into_iter().unzip();
        core.pay(jobs).await;
        assert!(outcomes(answers).await.iter().all(Result::is_ok));
        assert_eq!(core.stats.batch_splits.load(Ordering::Relaxed), 1);
        assert_eq!(events.load(Ordering::SeqCst), 1, "one signal for the batch");
    }
}
