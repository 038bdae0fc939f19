//! Combined orders and payments: what [`super::OrderService`] does with a batch the [`Combiner`] hands it.
//!
//! An order batch first validates and prices its orders with two reads for all of them (which users exist; the
//! options with their products and stock), answering at once the orders that name an unknown user or option, a
//! product off sale, or more than is left. It then takes its strategy's protection once for the union of its options (ascending), reads or
//! locks those rows once, allocates their stock to its orders in arrival order (each order all of its lines or
//! none), and commits every order that fits, with its items, payment, cart removal and idempotency record, in
//! one transaction of multi-row statements. A payment batch moves its orders to PAID with one statement, spends
//! each user's balance, adds the day's sales with one upsert per option for the whole batch, and completes the
//! payments with one statement. Answers go out only after the commit; a batch that fails for a reason of one of
//! its requests is retried one request at a time, so that one bad request never fails the rest.

use std::collections::BTreeMap;
use std::time::Instant;

use tokio::sync::oneshot;

use super::combiner::Combiner;
use super::orders::{OrderService, bump};
use crate::error::DomainError;
use crate::idempotency::Recorder;
use crate::ids::{OrderId, PaymentId, ProductOptionId, UserId};
use crate::money::Money;
use crate::order::{NewOrder, Order, OrderLine, OrderRequest, OrderStatus};
use crate::payment::{Payment, PaymentStatus};
use crate::ports::{DomainEvent, StockRow};
use crate::sales::DailySales;
use crate::stock::{RetryPolicy, StockPermit, union_of};

/// How a batch is retried when its stock write found the row changed since its read (another instance wrote):
/// used by strategies that do not retry single orders (their single write never conflicts).
const BATCH_RETRY: RetryPolicy = RetryPolicy {
    max_retries: 20,
    base: std::time::Duration::from_millis(1),
    cap: std::time::Duration::from_millis(20),
};

/// An order waiting for its batch.
pub(super) struct PendingOrder {
    pub(super) queued_at: Instant,
    pub(super) request: OrderRequest,
    pub(super) recorder: Option<Recorder<Order>>,
    pub(super) reply: oneshot::Sender<Result<Order, DomainError>>,
}

/// An order of a batch that passed validation, priced.
pub(super) struct ValidOrder {
    pending: PendingOrder,
    new: NewOrder,
}

/// A payment waiting for its batch.
pub(super) struct PendingPayment {
    pub(super) order_id: OrderId,
    pub(super) user_id: UserId,
    pub(super) recorder: Option<Recorder<Payment>>,
    pub(super) reply: oneshot::Sender<Result<Payment, DomainError>>,
}

/// The combiners of one [`OrderService`]: `None` when combining is off (`SHOP_ORDER_BATCH_MAX=1`).
#[derive(Clone, Default)]
pub(super) struct Combiners {
    pub(super) placing: Option<Combiner<PendingOrder>>,
    pub(super) paying: Option<Combiner<PendingPayment>>,
}

impl Combiners {
    /// Starts both workers for `service` (whose own combiners are off, so the workers hold no sender of theirs
    /// and end when the last service clone that submits is dropped).
    pub(super) fn spawn(service: &OrderService, max: usize) -> Self {
        let placer = service.clone();
        let payer = service.clone();
        Self {
            placing: Some(Combiner::spawn(max, move |batch| {
                let svc = placer.clone();
                async move { svc.place_batch(batch).await }
            })),
            paying: Some(Combiner::spawn(max, move |batch| {
                let svc = payer.clone();
                async move { svc.pay_batch(batch).await }
            })),
        }
    }
}

fn micros(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Sends `job` to `combiner` and waits for its batch's answer.
pub(super) async fn submit<J: Send + 'static, T>(
    combiner: &Combiner<J>,
    job: impl FnOnce(oneshot::Sender<Result<T, DomainError>>) -> J,
) -> Result<T, DomainError> {
    let (reply, answer) = oneshot::channel();
    combiner.submit(job(reply)).map_err(|_| DomainError::unexpected("the order combiner has stopped"))?;
    answer.await.unwrap_or_else(|_| Err(DomainError::unexpected("the batch ended without an answer")))
}

/// Allocates `left` (units per option) to orders in arrival order: each order gets all of its lines or none.
/// Returns per order `Ok` (its units are taken from `left`) or why it is refused.
pub(crate) fn allocate<'a>(
    left: &mut BTreeMap<ProductOptionId, i64>,
    orders: impl IntoIterator<Item = &'a [OrderLine]>,
) -> Vec<Result<(), DomainError>> {
    orders
        .into_iter()
        .map(|lines| {
            for line in lines {
                match left.get(&line.option_id) {
                    None => return Err(DomainError::ProductOptionNotFound(line.option_id)),
                    Some(units) if *units < line.quantity.get() => {
                        return Err(DomainError::OutOfStock { option_id: line.option_id });
                    }
                    Some(_) => {}
                }
            }
            for line in lines {
                *left.entry(line.option_id).or_default() -= line.quantity.get();
            }
            Ok(())
        })
        .collect()
}

impl OrderService {
    fn batch_retry(&self) -> RetryPolicy {
        let policy = self.stock.retry_policy();
        if policy.max_retries > 0 { policy } else { BATCH_RETRY }
    }

    /// Commits one batch of orders and answers each of them.
    pub(super) async fn place_batch(&self, batch: Vec<PendingOrder>) {
        let started = Instant::now();
        let size = batch.len();
        let queued_us = batch.iter().map(|p| micros(started - p.queued_at)).max().unwrap_or(0);
        let batch = match self.validate_batch(batch).await {
            Ok(valid) if valid.is_empty() => return,
            Ok(valid) => valid,
            Err((batch, e)) => {
                for pending in batch {
                    let _ = pending.reply.send(Err(e.replicate()));
                }
                return;
            }
        };
        let valid = batch.len();
        let validate_us = micros(started.elapsed());
        let lines: Vec<&[OrderLine]> = batch.iter().map(|v| v.pending.request.lines()).collect();
        let waited = Instant::now();
        let admission = match self.stock.acquire_batch(&lines).await {
            Ok(admission) => admission,
            Err(e) => {
                for valid in batch {
                    let _ = valid.pending.reply.send(Err(e.replicate()));
                }
                return;
            }
        };
        if admission.permit.is_held() {
            bump(&self.stats.lock_acquisitions, 1);
            bump(&self.stats.lock_wait_micros, u64::try_from(waited.elapsed().as_micros()).unwrap_or(u64::MAX));
        }
        let mut admitted = Vec::with_capacity(batch.len());
        for (valid, verdict) in batch.into_iter().zip(admission.verdicts) {
            match verdict {
                Ok(()) => admitted.push(valid),
                Err(refused) => {
                    bump(&self.stats.refused_early, 1);
                    let _ = valid.pending.reply.send(Err(refused));
                }
            }
        }
        let acquire_us = micros(waited.elapsed());
        let committing = Instant::now();
        let outcomes = self.commit_orders_isolating(&admitted, &admission.permit).await;
        let commit_us = micros(committing.elapsed());
        let taken: Vec<OrderLine> = admitted
            .iter()
            .zip(&outcomes)
            .filter(|(_, outcome)| outcome.is_ok())
            .flat_map(|(valid, _)| valid.pending.request.lines().iter().copied())
            .collect();
        self.stock.settle(admission.permit, &taken).await;
        for (valid, outcome) in admitted.into_iter().zip(outcomes) {
            if let Ok(order) = &outcome {
                bump(&self.stats.placed, 1);
                self.events.publish(DomainEvent::OrderCreated {
                    order_id: order.id,
                    user_id: order.user_id,
                    total_price: order.total_price,
                });
            }
            let _ = valid.pending.reply.send(outcome);
        }
        // Where a batch's time goes (the benchmark aggregates these): how long its oldest order queued, then
        // validation, the strategy's protection, and the transaction.
        tracing::debug!(
            size,
            valid,
            queued_us,
            validate_us,
            acquire_us,
            commit_us,
            total_us = micros(started.elapsed()),
            "order batch"
        );
    }

    /// Validates and prices every order of the batch against two reads, answers the ones that cannot go on, and
    /// returns the rest in arrival order. On a failed read, the whole batch comes back with the error.
    async fn validate_batch(
        &self,
        batch: Vec<PendingOrder>,
    ) -> Result<Vec<ValidOrder>, (Vec<PendingOrder>, DomainError)> {
        let mut users: Vec<UserId> = batch.iter().map(|p| p.request.user_id()).collect();
        users.sort_unstable();
        users.dedup();
        let lines: Vec<&[OrderLine]> = batch.iter().map(|p| p.request.lines()).collect();
        let ids: Vec<ProductOptionId> = union_of(&lines).iter().map(|l| l.option_id).collect();
        let (known, options) = tokio::join!(self.users.existing(&users), self.orders.orderable_options(&ids));
        let (known, options) = match (known, options) {
            (Ok(known), Ok(options)) => (known, options),
            (Err(e), _) | (_, Err(e)) => return Err((batch, e)),
        };
        let now = self.clock.now();
        let mut valid = Vec::with_capacity(batch.len());
        for pending in batch {
            let request = &pending.request;
            let verdict = if known.contains(&request.user_id()) {
                NewOrder::price(request, &options, now).and_then(|new| {
                    // Short already at the read: refused here, without a lock or a transaction.
                    let short = request.lines().iter().find(|line| {
                        options
                            .iter()
                            .find(|o| o.option.id == line.option_id)
                            .is_some_and(|o| o.option.stock.checked_take(line.quantity).is_none())
                    });
                    match short {
                        Some(line) => {
                            bump(&self.stats.refused_early, 1);
                            Err(DomainError::OutOfStock { option_id: line.option_id })
                        }
                        None => Ok(new),
                    }
                })
            } else {
                Err(DomainError::UserNotFound(request.user_id()))
            };
            match verdict {
                Ok(new) => valid.push(ValidOrder { pending, new }),
                Err(refused) => {
                    let _ = pending.reply.send(Err(refused));
                }
            }
        }
        Ok(valid)
    }

    /// The batch in one transaction; if that fails for any reason but a lost race, each order alone.
    async fn commit_orders_isolating(
        &self,
        batch: &[ValidOrder],
        permit: &StockPermit,
    ) -> Vec<Result<Order, DomainError>> {
        match self.commit_orders_retrying(batch, permit).await {
            Ok(outcomes) => outcomes,
            Err(e) if batch.len() > 1 => {
                bump(&self.stats.batch_splits, 1);
                tracing::warn!(size = batch.len(), error = %e, "an order batch failed; committing its orders one by one");
                let mut outcomes = Vec::with_capacity(batch.len());
                for one in batch.chunks(1) {
                    outcomes.push(self.commit_orders_retrying(one, permit).await.and_then(|mut o| {
                        o.pop().unwrap_or_else(|| Err(DomainError::unexpected("a batch of one answered nothing")))
                    }));
                }
                outcomes
            }
            Err(e) => vec![Err(e)],
        }
    }

    async fn commit_orders_retrying(
        &self,
        batch: &[ValidOrder],
        permit: &StockPermit,
    ) -> Result<Vec<Result<Order, DomainError>>, DomainError> {
        let retry = self.batch_retry();
        let mut attempt = 0;
        loop {
            match self.commit_orders(batch, permit).await {
                Err(DomainError::WriteConflict) if attempt < retry.max_retries => {
                    bump(&self.stats.retries, 1);
                    tokio::time::sleep(retry.delay(attempt)).await;
                    attempt += 1;
                }
                Err(DomainError::WriteConflict) => {
                    tracing::warn!(attempts = attempt + 1, "a batch's stock write kept losing; giving up");
                    return Err(DomainError::LockTimeout { retry_after_secs: 1 });
                }
                other => return other,
            }
        }
    }

    /// One transaction for the batch: `Ok` holds each order's outcome (stored, or refused for stock); `Err` is
    /// a failure of the transaction itself, which then kept nothing.
    async fn commit_orders(
        &self,
        batch: &[ValidOrder],
        permit: &StockPermit,
    ) -> Result<Vec<Result<Order, DomainError>>, DomainError> {
        let now = self.clock.now();
        let lines: Vec<&[OrderLine]> = batch.iter().map(|v| v.pending.request.lines()).collect();
        let ids: Vec<ProductOptionId> = union_of(&lines).iter().map(|l| l.option_id).collect();
        let began = Instant::now();
        let mut tx = self.uow.begin().await?;
        let rows = self.stock.claim(tx.as_mut(), &ids).await?;
        let mut left: BTreeMap<ProductOptionId, i64> = rows.iter().map(|r| (r.option_id, r.stock.get())).collect();
        let verdicts = allocate(&mut left, lines.iter().copied());
        let winners: Vec<&ValidOrder> =
            batch.iter().zip(&verdicts).filter(|(_, v)| v.is_ok()).map(|(p, _)| p).collect();
        if winners.is_empty() {
            // Nothing to write: the transaction rolls back on drop, and every order has its refusal.
            return Ok(verdicts
                .into_iter()
                .map(|v| Err(v.err().unwrap_or_else(|| DomainError::unexpected("an allocated order was lost"))))
                .collect());
        }
        let news: Vec<NewOrder> = winners.iter().map(|p| NewOrder { ordered_at: now, ..p.new.clone() }).collect();
        let orders = tx.insert_orders(&news).await?;
        let carts: Vec<(UserId, Vec<ProductOptionId>)> = winners
            .iter()
            .map(|v| (v.pending.request.user_id(), v.pending.request.lines().iter().map(|l| l.option_id).collect()))
            .collect();
        tx.remove_from_carts(&carts, now).await?;
        let takes: Vec<(StockRow, i64)> = rows
            .iter()
            .filter_map(|row| {
                let units = row.stock.get() - left.get(&row.option_id).copied().unwrap_or(row.stock.get());
                (units > 0).then_some((*row, units))
            })
            .collect();
        // Last, so that whatever it locks is held only until the commit just below.
        self.stock.take_allocated(tx.as_mut(), &takes, permit, now).await?;
        for (valid, order) in winners.iter().zip(&orders) {
            if let Some(recorder) = &valid.pending.recorder {
                recorder.record_in(tx.as_mut(), &Ok(order.clone()), now).await?;
            }
        }
        let statements_us = micros(began.elapsed());
        let committing = Instant::now();
        tx.commit().await?;
        tracing::debug!(
            orders = winners.len(),
            statements_us,
            commit_us = micros(committing.elapsed()),
            "order batch transaction"
        );
        bump(&self.stats.order_batches, 1);
        let mut stored = orders.into_iter();
        Ok(verdicts
            .into_iter()
            .map(|v| {
                v.and_then(|()| {
                    stored.next().ok_or_else(|| DomainError::unexpected("fewer orders stored than allocated"))
                })
            })
            .collect())
    }

    /// Commits one batch of payments and answers each of them.
    pub(super) async fn pay_batch(&self, batch: Vec<PendingPayment>) {
        let outcomes = match self.commit_payments(&batch).await {
            Ok(outcomes) => outcomes,
            Err(e) if batch.len() > 1 => {
                bump(&self.stats.batch_splits, 1);
                tracing::warn!(size = batch.len(), error = %e, "a payment batch failed; paying its orders one by one");
                let mut outcomes = Vec::with_capacity(batch.len());
                for one in &batch {
                    outcomes.push(self.pay_alone(one.order_id, one.user_id, one.recorder.as_ref()).await);
                }
                outcomes
            }
            Err(e) => vec![Err(e)],
        };
        for (pending, outcome) in batch.into_iter().zip(outcomes) {
            if let Ok(payment) = &outcome {
                self.events.publish(DomainEvent::PaymentCompleted {
                    payment_id: payment.id,
                    order_id: pending.order_id,
                    user_id: pending.user_id,
                    amount: payment.amount,
                });
            }
            let _ = pending.reply.send(outcome);
        }
    }

    /// One transaction for a batch of payments. A payment that cannot go on (not found, not payable, short of
    /// balance) gets its answer as in [`OrderService::pay`]; a short balance cancels its order in this same
    /// transaction.
    async fn commit_payments(
        &self,
        batch: &[PendingPayment],
    ) -> Result<Vec<Result<Payment, DomainError>>, DomainError> {
        let now = self.clock.now();
        let mut tx = self.uow.begin().await?;
        let ids: Vec<OrderId> = batch.iter().map(|p| p.order_id).collect();
        let found: BTreeMap<OrderId, Order> = tx.find_orders(&ids).await?.into_iter().map(|o| (o.id, o)).collect();
        // The same order twice in one batch: only its first payment may move it.
        let mut claimed: BTreeMap<OrderId, usize> = BTreeMap::new();
        let mut outcomes: Vec<Option<Result<Payment, DomainError>>> = Vec::with_capacity(batch.len());
        for (i, pending) in batch.iter().enumerate() {
            let order = found.get(&pending.order_id).filter(|o| o.user_id == pending.user_id);
            outcomes.push(match order {
                None => Some(Err(DomainError::OrderNotFound(pending.order_id))),
                Some(order) => match order.ensure_payable() {
                    Err(e) => Some(Err(e)),
                    Ok(()) if claimed.contains_key(&order.id) => {
                        Some(Err(DomainError::OrderNotPayable { order_id: order.id, status: OrderStatus::Paid }))
                    }
                    Ok(()) => {
                        claimed.insert(order.id, i);
                        None
                    }
                },
            });
        }
        let candidates: Vec<OrderId> = claimed.keys().copied().collect();
        let moved = tx.transition_orders(&candidates, OrderStatus::PendingPayment, OrderStatus::Paid, now).await?;
        // Each user's payments of this batch are spent together, with one statement for all users; a user whose
        // balance does not cover the sum is then spent payment by payment in arrival order, so that the ones that
        // fit still go through. Users are taken in ascending id, so two instances' batches lock users' rows in
        // one order and never wait on each other in a cycle.
        let mut spending: Vec<(UserId, usize, OrderId)> =
            claimed.iter().filter(|(id, _)| moved.contains(id)).map(|(id, i)| (found[id].user_id, *i, *id)).collect();
        spending.sort_unstable();
        for (id, i) in &claimed {
            if !moved.contains(id) {
                // Another payment or the sweeper moved it after our read.
                let status = tx.find_order(*id).await?.map_or(OrderStatus::Cancelled, |o| o.status);
                outcomes[*i] = Some(Err(DomainError::OrderNotPayable { order_id: *id, status }));
            }
        }
        let mut sums: BTreeMap<UserId, Option<Money>> = BTreeMap::new();
        for (user, _, id) in &spending {
            let sum = sums.entry(*user).or_insert(Some(Money::ZERO));
            *sum = sum.and_then(|s| s.checked_add(found[id].total_price));
        }
        let together: Vec<(UserId, Money)> = sums.iter().filter_map(|(u, sum)| sum.map(|s| (*u, s))).collect();
        let spent = tx.spend_balances(&together, now).await?;
        let mut paid: Vec<&Order> = Vec::with_capacity(spending.len());
        let mut completed: Vec<PaymentId> = Vec::with_capacity(spending.len());
        for (user, i, id) in &spending {
            let order = &found[id];
            let covered = spent.contains(user) || tx.spend_balance(*user, order.total_price, now).await?.is_some();
            if covered {
                let mut payment = order.payment.clone();
                payment.status = PaymentStatus::Completed;
                payment.paid_at = Some(now);
                paid.push(order);
                completed.push(payment.id);
                outcomes[*i] = Some(Ok(payment));
            } else {
                let balance = tx.balance(order.user_id).await?;
                tx.transition_order(*id, OrderStatus::Paid, OrderStatus::Cancelled, now).await?;
                tx.settle_payment(order.payment.id, PaymentStatus::Failed, now).await?;
                tx.restore_stock(&order.stock_lines(), now).await?;
                outcomes[*i] = Some(Err(DomainError::InsufficientBalance { balance, required: order.total_price }));
            }
        }
        if !paid.is_empty() {
            let items: Vec<_> = paid.iter().flat_map(|o| o.items.iter().cloned()).collect();
            tx.add_daily_sales(&DailySales::of_items(now.date_naive(), &items), now).await?;
            tx.settle_payments(&completed, PaymentStatus::Completed, now).await?;
        }
        let outcomes: Vec<Result<Payment, DomainError>> = outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| Err(DomainError::unexpected("a payment was left undecided"))))
            .collect();
        for (pending, outcome) in batch.iter().zip(&outcomes) {
            // Refusals found before any write (not found, not payable) are settled by the caller as for one
            // payment; what this transaction decided is recorded in it.
            let decided_here = matches!(outcome, Ok(_) | Err(DomainError::InsufficientBalance { .. }));
            if let (Some(recorder), true) = (&pending.recorder, decided_here) {
                recorder.record_in(tx.as_mut(), outcome, now).await?;
            }
        }
        tx.commit().await?;
        bump(&self.stats.payment_batches, 1);
        // The cancelled orders' units are back in the database: the strategy's copy of the stock hears of them.
        let returned: Vec<OrderLine> = batch
            .iter()
            .zip(&outcomes)
            .filter(|(_, outcome)| matches!(outcome, Err(DomainError::InsufficientBalance { .. })))
            .filter_map(|(pending, _)| found.get(&pending.order_id))
            .flat_map(Order::stock_lines)
            .collect();
        if !returned.is_empty() {
            self.mirror.stock_returned(&returned).await;
        }
        Ok(outcomes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money::Quantity;

    fn oid(n: i64) -> ProductOptionId {
        ProductOptionId::new(n).unwrap()
    }

    fn lines(of: &[(i64, i64)]) -> Vec<OrderLine> {
        of.iter().map(|(o, q)| OrderLine { option_id: oid(*o), quantity: Quantity::new(*q).unwrap() }).collect()
    }

    #[test]
    fn stock_goes_to_orders_in_arrival_order_each_whole_or_not_at_all() {
        let mut left = BTreeMap::from([(oid(1), 3), (oid(2), 1)]);
        let orders = [lines(&[(1, 2)]), lines(&[(1, 1), (2, 2)]), lines(&[(1, 1), (2, 1)]), lines(&[(1, 1)])];
        let verdicts = allocate(&mut left, orders.iter().map(Vec::as_slice));
        assert!(verdicts[0].is_ok());
        // Short of option 2: none of its lines is taken, so option 1's unit stays for the next order.
        assert!(matches!(verdicts[1], Err(DomainError::OutOfStock { option_id }) if option_id == oid(2)));
        assert!(verdicts[2].is_ok());
        assert!(matches!(verdicts[3], Err(DomainError::OutOfStock { option_id }) if option_id == oid(1)));
        assert_eq!(left, BTreeMap::from([(oid(1), 0), (oid(2), 0)]));
    }

    #[test]
    fn an_option_without_a_row_is_not_found_and_takes_nothing() {
        let mut left = BTreeMap::from([(oid(1), 5)]);
        let orders = [lines(&[(1, 1), (9, 1)])];
        let verdicts = allocate(&mut left, orders.iter().map(Vec::as_slice));
        assert!(matches!(verdicts[0], Err(DomainError::ProductOptionNotFound(id)) if id == oid(9)));
        assert_eq!(left[&oid(1)], 5);
    }

    #[test]
    fn the_union_of_a_batch_sums_each_option_once_ascending() {
        let orders = [lines(&[(2, 1), (5, 3)]), lines(&[(2, 4)]), lines(&[(1, 1000), (5, 999)])];
        let slices: Vec<&[OrderLine]> = orders.iter().map(Vec::as_slice).collect();
        let union: Vec<(i64, i64)> = union_of(&slices).iter().map(|l| (l.option_id.get(), l.quantity.get())).collect();
        // Option 5 asks 1,002 units in all: a lock needs only its id, so the line saturates at the limit.
        assert_eq!(union, vec![(1, 1000), (2, 5), (5, 1000)]);
    }
}
