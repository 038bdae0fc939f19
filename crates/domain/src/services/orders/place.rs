//! A batch of orders (one order with combining off), in five steps:
//!
//! 1. **Validate** with two reads for the whole batch (which users exist; the options with their products and
//!    stock): orders that name an unknown user or option, a product off sale, or more than the read shows are
//!    answered at once, without a lock or a transaction. Under a flash sale most buyers arrive after the last
//!    unit went; this is where they learn it.
//! 2. **Admit**: the strategy's protection for the union of the batch's options (ascending): a lock, a
//!    reservation, or nothing; a strategy that decides outside the database refuses here what does not fit.
//! 3. **Write, claim and allocate**, in the transaction: the orders, items and payments with one multi-row
//!    statement per table; then the strategy reads (or locks) the rows, and the domain's allocation gives stock
//!    to the orders in arrival order, each all of its lines or none; the orders it refuses are deleted again.
//!    Writing before claiming keeps a locking claim's rows locked only for the few statements after it. Under a
//!    lock outside the database that covers the whole transaction (`local`, the Redis locks), the transaction
//!    begins and writes before step 2, for the same reason.
//! 4. **Take and commit**: the winners' cart lines removed, the stock taken last (so row locks are held only
//!    until the commit just after), and each idempotent response recorded, all in one commit.
//! 5. **Settle** the strategy's permit with what was committed, then answer and publish.
//!
//! A transaction that fails for a reason of one order is retried one order at a time, so one bad order never
//! fails the rest; one that lost an optimistic race is retried whole, per the strategy's policy.

use std::collections::BTreeMap;

use std::time::Duration;

use tokio::time::Instant;

use super::{Core, PlaceJob, Tally, micros};
use crate::auth::{Pending, PendingCaps};
use crate::error::DomainError;
use crate::events::NewEvent;
use crate::idempotency::Recorder;
use crate::ids::{ProductOptionId, UserId};
use crate::money::Stock;
use crate::order::{NewOrder, Order, OrderLine, OrderRequest};
use crate::ports::stock::union_of;
use crate::ports::{OrderTx, StockPermit, StockTake, Transaction};
use crate::services::lanes::Handoff;
use crate::stock::allocate;

/// What an order job asks.
pub(in crate::services) struct OrderAsk {
    pub(super) request: OrderRequest,
    pub(super) recorder: Option<Recorder<Order>>,
}

/// What one attempt at a batch's transaction came to.
enum Committed {
    /// Committed, or rolled back with nothing to write: each order's outcome.
    Done(Vec<Result<Order, DomainError>>),
    /// Rolled back because a caller left while the transaction ran; the batch runs again without it.
    Abandoned,
}

/// A batch's transaction once [`Core::prepare`] has begun it.
pub(super) enum Begun {
    /// Its orders written, the stock not claimed yet.
    Open(Prepared),
    /// Nothing to write (every caller gone, or every order past the caps): each order's outcome.
    Done(Vec<Result<Order, DomainError>>),
}

/// An open transaction with the batch's orders written.
pub(super) struct Prepared {
    tx: Box<dyn Transaction>,
    now: chrono::DateTime<chrono::Utc>,
    /// When it began.
    began: Instant,
    /// The positions in the batch of the orders it wrote, and what it stored for each, in that order.
    candidates: Vec<usize>,
    stored: Vec<Option<Order>>,
    outcomes: Vec<Option<Result<Order, DomainError>>>,
}

/// An order of the batch that passed validation, priced.
pub(super) struct ValidOrder {
    job: PlaceJob,
    new: NewOrder,
}

impl ValidOrder {
    fn lines(&self) -> &[OrderLine] {
        self.job.ask.request.lines()
    }
}

impl Core {
    /// Commits one batch of orders and answers each of them; a lane's `handoff` is handed off once the batch is
    /// validated, so that the lane's next batch is validated and written while this one takes stock and commits.
    pub(super) async fn place(&self, batch: Vec<PlaceJob>, mut handoff: Option<Handoff>) {
        let started = Instant::now();
        let size = batch.len();
        let queued_us =
            batch.iter().map(|job| micros(started.saturating_duration_since(job.queued_at))).max().unwrap_or(0);
        let batch = self.still_wanted(batch);
        if batch.is_empty() {
            return;
        }
        let (valid, levels) = match self.validate(batch).await {
            Ok((valid, _)) if valid.is_empty() => return,
            Ok(validated) => validated,
            Err((batch, e)) => {
                for job in batch {
                    job.answer(Err(e.replicate()));
                }
                return;
            }
        };
        let validate_us = micros(started.elapsed());
        if let Some(handoff) = &mut handoff {
            handoff.hand_off();
        }
        let lines: Vec<&[OrderLine]> = valid.iter().map(ValidOrder::lines).collect();
        // Under a lock that covers the whole transaction, the transaction begins and writes the orders before the
        // lock is taken, so that the lock covers only the claim, the stock write and the commit.
        let mut early = if self.stock.locks_whole_transaction() { Some(self.prepare(&valid).await) } else { None };
        let waited = Instant::now();
        let admission = match self.stock.admit(&lines).await {
            Ok(admission) => admission,
            Err(e) => {
                for order in valid {
                    order.job.answer(Err(e.replicate()));
                }
                return;
            }
        };
        if admission.permit.is_held() {
            self.stats.stock_wait(waited.elapsed());
        }
        let validated = valid.len();
        let mut admitted = Vec::with_capacity(valid.len());
        for (order, verdict) in valid.into_iter().zip(admission.verdicts) {
            match verdict {
                Ok(()) => admitted.push(order),
                Err(refused) => {
                    self.stats.add(Tally::RefusedEarly, 1);
                    order.job.answer(Err(refused));
                }
            }
        }
        if admitted.len() < validated {
            // Written for orders the strategy refused: that transaction rolls back, the rest begin again.
            early = None;
        }
        if early.is_none() && admission.permit.is_held() && !admitted.is_empty() && !ample(&levels, &admitted) {
            admitted = self.refuse_short_under_lock(admitted).await;
        }
        let acquire_us = micros(waited.elapsed());
        let committing = Instant::now();
        let outcomes = self.commit_isolating(&admitted, &admission.permit, early).await;
        let commit_us = micros(committing.elapsed());
        if !admitted.is_empty() {
            let queued = Duration::from_micros(queued_us);
            self.stats.batch("order", admitted.len(), queued, committing.elapsed());
        }
        let taken: Vec<OrderLine> = admitted
            .iter()
            .zip(&outcomes)
            .filter(|(_, outcome)| outcome.is_ok())
            .flat_map(|(order, _)| order.lines().iter().copied())
            .collect();
        // The permit (locks, a reservation) is settled only now, after the commit or the rollback.
        self.stock.settle(admission.permit, &taken).await;
        let placed = outcomes.iter().filter(|o| o.is_ok()).count();
        if placed > 0 {
            self.stats.add(Tally::Placed, placed as u64);
            self.events.recorded();
        }
        for (order, outcome) in admitted.into_iter().zip(outcomes) {
            order.job.answer(outcome);
        }
        // Where a batch's time goes (the benchmark aggregates these): how long its oldest order queued, then
        // validation, the strategy's protection, and the transaction.
        tracing::debug!(
            size,
            queued_us,
            validate_us,
            acquire_us,
            commit_us,
            total_us = micros(started.elapsed()),
            "order batch"
        );
    }

    /// Validates and prices every order against two reads, answers the ones that cannot go on, and returns the
    /// rest in arrival order, with the stock levels it read. On a failed read, the whole batch comes back with the
    /// error.
    async fn validate(&self, batch: Vec<PlaceJob>) -> Result<Validated, (Vec<PlaceJob>, DomainError)> {
        let mut users: Vec<UserId> = batch.iter().map(|job| job.ask.request.user_id()).collect();
        users.sort_unstable();
        users.dedup();
        let lines: Vec<&[OrderLine]> = batch.iter().map(|job| job.ask.request.lines()).collect();
        let ids: Vec<ProductOptionId> = union_of(&lines).iter().map(|l| l.option_id).collect();
        let (known, options) = tokio::join!(self.users.existing(&users), self.orders.orderable_options(&ids));
        let (known, options) = match (known, options) {
            (Ok(known), Ok(options)) => (known, options),
            (Err(e), _) | (_, Err(e)) => return Err((batch, e)),
        };
        let levels: BTreeMap<ProductOptionId, Stock> = options.iter().map(|o| (o.option.id, o.option.stock)).collect();
        let now = self.clock.now();
        let mut valid = Vec::with_capacity(batch.len());
        for job in batch {
            let request = &job.ask.request;
            let verdict = if known.contains(&request.user_id()) {
                NewOrder::price(request, &options, now).and_then(|new| {
                    // Short already at the read (judged alone: the batch's allocation decides between them).
                    match allocate(&levels, [request.lines()]).verdicts.pop() {
                        Some(Err(short)) => {
                            self.stats.add(Tally::RefusedEarly, 1);
                            Err(short)
                        }
                        _ => Ok(new),
                    }
                })
            } else {
                Err(DomainError::UserNotFound(request.user_id()))
            };
            match verdict {
                Ok(new) => valid.push(ValidOrder { job, new }),
                Err(refused) => job.answer(Err(refused)),
            }
        }
        Ok((valid, levels))
    }

    /// Buyers who waited for the strategy's lock while the last units went learn it from one read under the
    /// lock (exact now for a lock holder: stock only falls by a holder), not from a whole transaction.
    async fn refuse_short_under_lock(&self, admitted: Vec<ValidOrder>) -> Vec<ValidOrder> {
        let lines: Vec<&[OrderLine]> = admitted.iter().map(ValidOrder::lines).collect();
        let ids: Vec<ProductOptionId> = union_of(&lines).iter().map(|l| l.option_id).collect();
        let levels = match self.orders.stock_levels(&ids).await {
            Ok(rows) => rows.into_iter().map(|r| (r.option_id, r.stock)).collect(),
            // The transaction decides anyway; this read only spares it work.
            Err(_) => return admitted,
        };
        let verdicts = allocate(&levels, lines.iter().copied()).verdicts;
        let mut fit = Vec::with_capacity(admitted.len());
        for (order, verdict) in admitted.into_iter().zip(verdicts) {
            match verdict {
                Err(short @ DomainError::OutOfStock { .. }) => {
                    self.stats.add(Tally::RefusedEarly, 1);
                    order.job.answer(Err(short));
                }
                _ => fit.push(order),
            }
        }
        fit
    }

    /// The batch in one transaction (the `early` one when given); if that fails for any reason but a lost race
    /// or a dependency that is down, each order alone.
    async fn commit_isolating(
        &self,
        batch: &[ValidOrder],
        permit: &StockPermit,
        early: Option<Result<Begun, DomainError>>,
    ) -> Vec<Result<Order, DomainError>> {
        match self.commit_retrying(batch, permit, early).await {
            Ok(outcomes) => outcomes,
            // A dependency that is down fails every order alike: one by one would only multiply the wait.
            Err(e @ DomainError::Unavailable { .. }) => batch.iter().map(|_| Err(e.replicate())).collect(),
            Err(e) if batch.len() > 1 => {
                self.stats.add(Tally::BatchSplits, 1);
                tracing::warn!(size = batch.len(), error = %e, "an order batch failed; committing its orders one by one");
                let mut outcomes = Vec::with_capacity(batch.len());
                for one in batch.chunks(1) {
                    let outcome = self.commit_retrying(one, permit, None).await.and_then(|mut outcome| {
                        outcome.pop().unwrap_or_else(|| Err(DomainError::unexpected("a batch of one answered nothing")))
                    });
                    outcomes.push(outcome);
                }
                outcomes
            }
            Err(e) => vec![Err(e)],
        }
    }

    /// The batch's transaction, retried per the strategy's policy; the first attempt goes on from `early` when
    /// given.
    async fn commit_retrying(
        &self,
        batch: &[ValidOrder],
        permit: &StockPermit,
        mut early: Option<Result<Begun, DomainError>>,
    ) -> Result<Vec<Result<Order, DomainError>>, DomainError> {
        let retry = self.stock.retry_policy();
        let mut attempt = 0;
        loop {
            match self.commit(batch, permit, early.take()).await {
                Ok(Committed::Done(outcomes)) => return Ok(outcomes),
                // At once and without counting: the next attempt leaves the caller that left out.
                Ok(Committed::Abandoned) => {}
                Err(DomainError::WriteConflict) if attempt < retry.max_retries => {
                    self.stats.add(Tally::Retries, 1);
                    tokio::time::sleep(retry.delay(attempt)).await;
                    attempt += 1;
                }
                Err(DomainError::WriteConflict) => {
                    tracing::warn!(attempts = attempt + 1, "a batch's stock write kept losing; giving up");
                    return Err(DomainError::LockTimeout { retry_after_secs: 1 });
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Begins the batch's transaction and writes its orders (those whose callers are still here, within the
    /// pending caps), before the strategy claims any stock.
    async fn prepare(&self, batch: &[ValidOrder]) -> Result<Begun, DomainError> {
        let now = self.clock.now();
        let began = Instant::now();
        let mut outcomes: Vec<Option<Result<Order, DomainError>>> = batch.iter().map(|_| None).collect();
        let mut candidates: Vec<usize> = Vec::with_capacity(batch.len());
        for (i, order) in batch.iter().enumerate() {
            match order.job.abandoned() {
                Some(why) => {
                    self.stats.add(Tally::Abandoned, 1);
                    outcomes[i] = Some(Err(why));
                }
                None => candidates.push(i),
            }
        }
        if candidates.is_empty() {
            return Ok(Begun::Done(settled(outcomes)));
        }
        let mut tx = self.uow.begin().await?;
        if self.caps != PendingCaps::NONE {
            candidates = self.within_caps(tx.as_mut(), batch, candidates, &mut outcomes).await?;
            if candidates.is_empty() {
                return Ok(Begun::Done(settled(outcomes)));
            }
        }
        // Every candidate is written before the stock is claimed, so that a claim that locks (pessimistic) holds
        // its rows only for the few statements after it; the orders the allocation refuses are then deleted.
        let news: Vec<NewOrder> =
            candidates.iter().map(|i| NewOrder { ordered_at: now, ..batch[*i].new.clone() }).collect();
        let stored: Vec<Option<Order>> = tx.insert_orders(&news).await?.into_iter().map(Some).collect();
        Ok(Begun::Open(Prepared { tx, now, began, candidates, stored, outcomes }))
    }

    /// One transaction for the batch, going on from `early` when given (else [`Core::prepare`] first): `Ok`
    /// holds each order's outcome (stored, or refused), or says that a caller left while it ran; `Err` is a
    /// failure of the transaction itself, which then kept nothing.
    async fn commit(
        &self,
        batch: &[ValidOrder],
        permit: &StockPermit,
        early: Option<Result<Begun, DomainError>>,
    ) -> Result<Committed, DomainError> {
        let begun = match early {
            Some(begun) => begun?,
            None => self.prepare(batch).await?,
        };
        let Prepared { mut tx, now, began, candidates, mut stored, mut outcomes } = match begun {
            Begun::Open(prepared) => prepared,
            Begun::Done(outcomes) => return Ok(Committed::Done(outcomes)),
        };
        let lines: Vec<&[OrderLine]> = candidates.iter().map(|i| batch[*i].lines()).collect();
        let ids: Vec<ProductOptionId> = union_of(&lines).iter().map(|l| l.option_id).collect();
        let rows = self.stock.claim(tx.as_mut(), &ids).await?;
        // The claim may have waited for row locks: an order whose caller has gone meanwhile is not allocated.
        let present: Vec<bool> = candidates.iter().map(|i| batch[*i].job.abandoned().is_none()).collect();
        let available: BTreeMap<ProductOptionId, Stock> = rows.iter().map(|r| (r.option_id, r.stock)).collect();
        let wanted = candidates.iter().zip(&present).filter(|(_, here)| **here).map(|(i, _)| batch[*i].lines());
        let allocation = allocate(&available, wanted);
        let mut verdicts = allocation.verdicts.into_iter();
        let (mut winners, mut losers) = (Vec::new(), Vec::new());
        for (k, (i, here)) in candidates.iter().zip(&present).enumerate() {
            let verdict = if *here {
                verdicts.next().unwrap_or_else(|| Err(DomainError::unexpected("an order was not allocated")))
            } else {
                self.stats.add(Tally::Abandoned, 1);
                batch[*i].job.abandoned().map_or(Ok(()), Err)
            };
            match verdict {
                Ok(()) => winners.push((*i, k)),
                Err(refused) => {
                    outcomes[*i] = Some(Err(refused));
                    losers.push(k);
                }
            }
        }
        if winners.is_empty() {
            // Nothing is kept: the transaction rolls back on drop, with the orders it wrote.
            return Ok(Committed::Done(settled(outcomes)));
        }
        if !losers.is_empty() {
            let gone: Vec<_> = losers.iter().filter_map(|k| stored[*k].take().map(|o| o.id)).collect();
            tx.delete_orders(&gone).await?;
        }
        let carts: Vec<(UserId, Vec<ProductOptionId>)> = winners
            .iter()
            .map(|(i, _)| {
                (batch[*i].job.ask.request.user_id(), batch[*i].lines().iter().map(|l| l.option_id).collect())
            })
            .collect();
        tx.remove_from_carts(&carts, now).await?;
        let recording = Instant::now();
        if self.outbox {
            let events: Vec<NewEvent> =
                winners.iter().filter_map(|(_, k)| stored[*k].clone().map(NewEvent::order_created)).collect();
            // Stamped now, not at the transaction's start: a pessimistic claim may have queued for the row since,
            // and the relay's lag is measured from this stamp to the delivery.
            tx.record_events(&events, self.clock.now()).await?;
        }
        let outbox_us = micros(recording.elapsed());
        let takes: Vec<StockTake> = rows
            .iter()
            .filter_map(|row| allocation.taken.get(&row.option_id).map(|units| StockTake { row: *row, units: *units }))
            .collect();
        // Last, so that whatever it locks is held only until the commit just below.
        self.stock.take(tx.as_mut(), &takes, permit, now).await?;
        if winners.iter().any(|(i, _)| batch[*i].job.abandoned().is_some()) {
            // The write may have waited for the row (a lock held elsewhere) while a caller hung up: roll back
            // and run the batch again, which leaves that order out.
            return Ok(Committed::Abandoned);
        }
        for (i, k) in &winners {
            let placed =
                stored[*k].take().ok_or_else(|| DomainError::unexpected("an allocated order was not stored"))?;
            if let Some(recorder) = &batch[*i].job.ask.recorder {
                recorder.record_in(tx.as_mut(), &Ok(placed.clone()), now).await?;
            }
            outcomes[*i] = Some(Ok(placed));
        }
        let statements_us = micros(began.elapsed());
        let committing = Instant::now();
        tx.commit().await?;
        let moved: Vec<ProductOptionId> = takes.iter().map(|t| t.row.option_id).collect();
        self.catalogue.stock_moved(&moved).await;
        tracing::debug!(
            orders = winners.len(),
            statements_us,
            outbox_us,
            commit_us = micros(committing.elapsed()),
            "order batch transaction"
        );
        self.stats.add(Tally::OrderBatches, 1);
        Ok(Committed::Done(settled(outcomes)))
    }
}

impl Core {
    /// The candidates whose users stay within the pending caps, in arrival order (an earlier order of a user
    /// counts against their later ones); the rest are refused. The users' rows stay locked until the commit, so
    /// no other batch can place an order for them in between.
    async fn within_caps(
        &self,
        tx: &mut dyn OrderTx,
        batch: &[ValidOrder],
        candidates: Vec<usize>,
        outcomes: &mut [Option<Result<Order, DomainError>>],
    ) -> Result<Vec<usize>, DomainError> {
        let mut users: Vec<UserId> = candidates.iter().map(|i| batch[*i].job.ask.request.user_id()).collect();
        users.sort_unstable();
        users.dedup();
        let mut held: BTreeMap<UserId, Pending> = tx.hold_users(&users).await?.into_iter().collect();
        let mut within = Vec::with_capacity(candidates.len());
        for i in candidates {
            let request = &batch[i].job.ask.request;
            let units = request.lines().iter().map(|l| l.quantity.get()).sum();
            let pending = held.entry(request.user_id()).or_default();
            match pending.with_order(units, self.caps) {
                Some(next) => {
                    *pending = next;
                    within.push(i);
                }
                None => outcomes[i] = Some(Err(DomainError::PendingLimitExceeded { user_id: request.user_id() })),
            }
        }
        Ok(within)
    }
}

/// The orders that passed validation, and the stock levels that validation read.
type Validated = (Vec<ValidOrder>, BTreeMap<ProductOptionId, Stock>);

/// Whether validation saw at least twice what the batch asks of each of its options. Then the read under a lock
/// outside the database ([`Core::refuse_short_under_lock`]) is skipped: it spares a transaction only to buyers
/// whose units went while they waited for the lock, which takes more than a batch's worth of orders going first,
/// and otherwise is one more round trip inside every lock hold. The transaction's own read under the lock still
/// decides, so a wrong guess costs a transaction that is refused, never a unit.
fn ample(levels: &BTreeMap<ProductOptionId, Stock>, batch: &[ValidOrder]) -> bool {
    let lines: Vec<&[OrderLine]> = batch.iter().map(ValidOrder::lines).collect();
    union_of(&lines).iter().all(|line| {
        levels.get(&line.option_id).is_some_and(|level| level.get() >= line.quantity.get().saturating_mul(2))
    })
}

/// Every order's outcome, once each has one.
fn settled(outcomes: Vec<Option<Result<Order, DomainError>>>) -> Vec<Result<Order, DomainError>> {
    outcomes
        .into_iter()
        .map(|o| o.unwrap_or_else(|| Err(DomainError::unexpected("an order was left undecided"))))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use async_trait::async_trait;
    use tokio::sync::{Semaphore, oneshot};

    use super::super::testing::*;
    use super::super::{Combining, Job};
    use super::*;
    use crate::events::EventKind;
    use crate::ids::{OrderId, PaymentId};
    use crate::money::Money;
    use crate::order::OrderStatus;
    use crate::payment::{Payment, PaymentMethod, PaymentStatus};
    use crate::ports::{
        Admission, Connection, FencedWrite, MockOrderRepository, MockTransaction, MockUserRepository, RetryPolicy,
        StockRow, StockStrategy,
    };
    use crate::product::ProductStatus;
    use crate::stock::{ConditionalStock, OptimisticStock};

    type Answer = oneshot::Receiver<Result<Order, DomainError>>;

    fn job(user: i64, lines: &[(i64, i64)]) -> (PlaceJob, Answer) {
        Job::new(OrderAsk { request: request(user, lines), recorder: None }, Duration::from_secs(5), None)
    }

    fn job_on(user: i64, lines: &[(i64, i64)], connection: Arc<dyn Connection>) -> (PlaceJob, Answer) {
        Job::new(OrderAsk { request: request(user, lines), recorder: None }, Duration::from_secs(5), Some(connection))
    }

    /// What the store returns for inserted orders: ids from 1 in the order given.
    fn stored(news: &[NewOrder]) -> Vec<Order> {
        news.iter()
            .enumerate()
            .map(|(i, new)| {
                let id = OrderId::new(i as i64 + 1).unwrap();
                Order {
                    id,
                    user_id: new.user_id,
                    status: OrderStatus::PendingPayment,
                    total_price: new.total_price,
                    ordered_at: new.ordered_at,
                    items: new.items.clone(),
                    payment: Payment {
                        id: PaymentId::new(i as i64 + 1).unwrap(),
                        order_id: id,
                        user_id: new.user_id,
                        status: PaymentStatus::Pending,
                        method: PaymentMethod::Balance,
                        amount: new.total_price,
                        paid_at: None,
                    },
                }
            })
            .collect()
    }

    /// A transaction of a batch over options with `stock` units each, that inserts `orders` orders, keeps the
    /// ones it can (`winners`, each recording its `order.created`), takes `units` of option 1, then commits.
    fn batch_tx(stock: i64, orders: usize, winners: usize, units: i64) -> MockTransaction {
        let mut tx = MockTransaction::new();
        tx.expect_read_stock().returning(move |ids| {
            Ok(ids
                .iter()
                .map(|id| StockRow { option_id: *id, stock: Stock::new(stock).unwrap(), version: 1 })
                .collect())
        });
        tx.expect_insert_orders().withf(move |news| news.len() == orders).times(1).returning(|news| Ok(stored(news)));
        tx.expect_remove_from_carts().returning(|_, _| Ok(()));
        tx.expect_record_events()
            .withf(move |events, _| {
                events.len() == winners
                    && events.iter().all(|e| e.kind == EventKind::OrderCreated && e.reason.is_none())
            })
            .times(1)
            .returning(|_, _| Ok(()));
        tx.expect_decrement_stock()
            .withf(move |id, n, fence, _| id.get() != 1 || (*n == units && fence.is_none()))
            .returning(|_, _, _, _| Ok(FencedWrite::Written));
        tx.expect_commit().times(1).returning(|| Ok(()));
        tx
    }

    #[tokio::test]
    async fn a_batch_allocates_in_arrival_order_and_commits_the_winners_in_one_transaction() {
        // Three units for four buyers of one each, and a fifth who wants two: the first three win, the rest are
        // refused inside the transaction, and one commit holds the three orders.
        let mut tx = batch_tx(3, 5, 3, 3);
        // All five were written before the claim; the two the allocation refused are deleted again.
        tx.expect_delete_orders().withf(|ids| ids.len() == 2).times(1).returning(|_| Ok(()));
        let (core, events) = core(vec![tx], Arc::new(ConditionalStock), catalogue(3), everyone());
        let jobs: Vec<_> = (1..=4).map(|u| job(u, &[(1, 1)])).chain([job(5, &[(1, 2)])]).collect();
        let (jobs, answers): (Vec<_>, Vec<_>) = jobs.into_iter().unzip();
        core.place(jobs, None).await;
        let mut outcomes = Vec::new();
        for answer in answers {
            outcomes.push(answer.await.unwrap());
        }
        assert!(outcomes[..3].iter().all(Result::is_ok));
        for refused in &outcomes[3..] {
            assert!(matches!(refused, Err(DomainError::OutOfStock { option_id }) if *option_id == oid(1)));
        }
        assert_eq!(events.load(Ordering::SeqCst), 1, "the relay hears of the commit, once");
        assert_eq!(core.stats.order_batches.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn unknown_users_options_and_products_off_sale_are_answered_before_any_transaction() {
        let mut orders = MockOrderRepository::new();
        orders
            .expect_orderable_options()
            .returning(|_| Ok(vec![orderable(1, 5, ProductStatus::Active), orderable(2, 5, ProductStatus::Inactive)]));
        let mut users = MockUserRepository::new();
        users.expect_existing().returning(|ids| Ok(ids.iter().filter(|id| id.get() != 9).copied().collect()));
        // No transaction is expected: `uow` fails the test if one begins.
        let (core, _) = core(vec![], Arc::new(ConditionalStock), orders, users);
        let (a, ra) = job(9, &[(1, 1)]);
        let (b, rb) = job(1, &[(1, 1), (3, 1)]);
        let (c, rc) = job(1, &[(2, 1)]);
        let (d, rd) = job(1, &[(1, 6)]);
        core.place(vec![a, b, c, d], None).await;
        assert!(matches!(ra.await.unwrap(), Err(DomainError::UserNotFound(_))));
        assert!(matches!(rb.await.unwrap(), Err(DomainError::ProductOptionNotFound(id)) if id == oid(3)));
        assert!(matches!(rc.await.unwrap(), Err(DomainError::ProductNotOnSale { .. })));
        assert!(matches!(rd.await.unwrap(), Err(DomainError::OutOfStock { .. })), "short at the read");
        assert_eq!(core.stats.refused_early.load(Ordering::Relaxed), 1);
    }

    /// A strategy that admits only the orders of odd users, as a reservation that ran out would.
    struct OddUsersOnly;

    #[async_trait]
    impl StockStrategy for OddUsersOnly {
        fn name(&self) -> &'static str {
            "odd"
        }

        async fn admit(&self, orders: &[&[OrderLine]]) -> Result<Admission, DomainError> {
            let verdicts = (0..orders.len())
                .map(|i| if i % 2 == 0 { Ok(()) } else { Err(DomainError::OutOfStock { option_id: oid(1) }) })
                .collect();
            Ok(Admission { permit: StockPermit::none(), verdicts })
        }
    }

    #[tokio::test]
    async fn orders_the_strategy_does_not_admit_never_reach_the_transaction() {
        let (core, _) = core(vec![batch_tx(10, 2, 2, 2)], Arc::new(OddUsersOnly), catalogue(10), everyone());
        let (jobs, answers): (Vec<_>, Vec<_>) = (1..=4).map(|u| job(u, &[(1, 1)])).unzip();
        core.place(jobs, None).await;
        let mut fitted = Vec::new();
        for answer in answers {
            fitted.push(answer.await.unwrap().is_ok());
        }
        assert_eq!(fitted, vec![true, false, true, false]);
    }

    /// A lock outside the database that covers the whole transaction, which notes whether the batch's orders
    /// were already written when it was asked for.
    struct WholeTransactionLock {
        written: Arc<AtomicBool>,
        written_before_lock: Arc<AtomicBool>,
    }

    #[async_trait]
    impl StockStrategy for WholeTransactionLock {
        fn name(&self) -> &'static str {
            "whole-transaction lock"
        }

        fn locks_whole_transaction(&self) -> bool {
            true
        }

        async fn admit(&self, orders: &[&[OrderLine]]) -> Result<Admission, DomainError> {
            self.written_before_lock.store(self.written.load(Ordering::SeqCst), Ordering::SeqCst);
            Ok(Admission::everyone(StockPermit::holding(()), orders.len()))
        }
    }

    #[tokio::test]
    async fn under_a_lock_that_covers_the_transaction_the_orders_are_written_before_the_lock_is_asked_for() {
        let written = Arc::new(AtomicBool::new(false));
        let written_before_lock = Arc::new(AtomicBool::new(false));
        let mut tx = MockTransaction::new();
        let noted = written.clone();
        tx.expect_insert_orders().times(1).returning(move |news| {
            noted.store(true, Ordering::SeqCst);
            Ok(stored(news))
        });
        // Under the lock: the claim reads the stock (one unit for two buyers), then the one winner is written.
        tx.expect_read_stock().times(1).returning(|ids| {
            Ok(ids.iter().map(|id| StockRow { option_id: *id, stock: Stock::new(1).unwrap(), version: 1 }).collect())
        });
        tx.expect_delete_orders().withf(|ids| ids.len() == 1).times(1).returning(|_| Ok(()));
        tx.expect_remove_from_carts().returning(|_, _| Ok(()));
        tx.expect_record_events().withf(|events, _| events.len() == 1).times(1).returning(|_, _| Ok(()));
        tx.expect_decrement_stock()
            .withf(|id, n, _, _| id.get() == 1 && *n == 1)
            .times(1)
            .returning(|_, _, _, _| Ok(FencedWrite::Written));
        tx.expect_commit().times(1).returning(|| Ok(()));
        let strategy = WholeTransactionLock { written, written_before_lock: written_before_lock.clone() };
        // Validation read 10 units (ample), so nothing but the transaction's claim reads under the lock.
        let (core, _) = core(vec![tx], Arc::new(strategy), catalogue(10), everyone());
        let (jobs, answers): (Vec<_>, Vec<_>) = (1..=2).map(|u| job(u, &[(1, 1)])).unzip();
        core.place(jobs, None).await;
        let mut outcomes = Vec::new();
        for answer in answers {
            outcomes.push(answer.await.unwrap());
        }
        assert!(written_before_lock.load(Ordering::SeqCst), "the orders were written before the lock was asked for");
        assert!(outcomes[0].is_ok());
        assert!(matches!(outcomes[1], Err(DomainError::OutOfStock { .. })), "the claim under the lock decided");
    }

    #[tokio::test]
    async fn a_failed_batch_is_split_and_only_the_failing_order_fails() {
        let mut failing = MockTransaction::new();
        failing.expect_read_stock().returning(|ids| {
            Ok(ids.iter().map(|id| StockRow { option_id: *id, stock: Stock::new(10).unwrap(), version: 1 }).collect())
        });
        failing.expect_insert_orders().returning(|_| Err(DomainError::unexpected("a trigger refused one row")));
        failing.expect_commit().never();
        let mut alone_fails = MockTransaction::new();
        alone_fails.expect_read_stock().returning(|ids| {
            Ok(ids.iter().map(|id| StockRow { option_id: *id, stock: Stock::new(10).unwrap(), version: 1 }).collect())
        });
        alone_fails.expect_insert_orders().returning(|_| Err(DomainError::unexpected("a trigger refused one row")));
        alone_fails.expect_commit().never();
        let txs = vec![failing, batch_tx(10, 1, 1, 1), alone_fails, batch_tx(10, 1, 1, 1)];
        let (core, events) = core(txs, Arc::new(ConditionalStock), catalogue(10), everyone());
        let (jobs, answers): (Vec<_>, Vec<_>) = (1..=3).map(|u| job(u, &[(1, 1)])).unzip();
        core.place(jobs, None).await;
        let mut outcomes = Vec::new();
        for answer in answers {
            outcomes.push(answer.await.unwrap());
        }
        assert!(outcomes[0].is_ok() && outcomes[2].is_ok());
        assert!(matches!(outcomes[1], Err(DomainError::Unexpected(_))));
        assert_eq!(core.stats.batch_splits.load(Ordering::Relaxed), 1);
        assert_eq!(events.load(Ordering::SeqCst), 1, "one signal for the batch and its two commits");
    }

    fn optimistic_tx(wins: bool) -> MockTransaction {
        let mut tx = MockTransaction::new();
        tx.expect_read_stock()
            .returning(|ids| Ok(vec![StockRow { option_id: ids[0], stock: Stock::new(10).unwrap(), version: 3 }]));
        tx.expect_insert_orders().returning(|news| Ok(stored(news)));
        tx.expect_remove_from_carts().returning(|_, _| Ok(()));
        tx.expect_record_events().returning(|_, _| Ok(()));
        tx.expect_write_stock()
            .withf(|_, left, version, _| left.get() == 9 && *version == Some(3))
            .returning(move |_, _, _, _| Ok(wins));
        if wins {
            tx.expect_commit().times(1).returning(|| Ok(()));
        } else {
            tx.expect_commit().never();
        }
        tx
    }

    fn optimistic(max_retries: u32) -> Arc<OptimisticStock> {
        Arc::new(OptimisticStock::new(RetryPolicy {
            max_retries,
            base: Duration::from_millis(1),
            cap: Duration::from_millis(4),
        }))
    }

    #[tokio::test]
    async fn a_lost_optimistic_race_retries_the_whole_transaction_and_is_counted() {
        let txs = vec![optimistic_tx(false), optimistic_tx(false), optimistic_tx(true)];
        let (core, _) = core(txs, optimistic(5), catalogue(10), everyone());
        let (one, answer) = job(1, &[(1, 1)]);
        core.place(vec![one], None).await;
        assert!(answer.await.unwrap().is_ok());
        assert_eq!(core.stats.retries.load(Ordering::Relaxed), 2);
        assert_eq!(core.stats.lock_acquisitions.load(Ordering::Relaxed), 0, "optimistic takes no lock");
    }

    #[tokio::test]
    async fn optimistic_retries_that_run_out_are_a_lock_timeout() {
        let txs = vec![optimistic_tx(false), optimistic_tx(false), optimistic_tx(false)];
        let (core, _) = core(txs, optimistic(2), catalogue(10), everyone());
        let (one, answer) = job(1, &[(1, 1)]);
        core.place(vec![one], None).await;
        assert!(matches!(answer.await.unwrap(), Err(DomainError::LockTimeout { .. })));
    }

    #[tokio::test]
    async fn a_caller_gone_before_the_batch_is_answered_without_a_read() {
        let closed = Arc::new(TestConnection(AtomicBool::new(true)));
        // Neither the validation reads nor a transaction may run.
        let (core, _) = core(vec![], Arc::new(ConditionalStock), MockOrderRepository::new(), MockUserRepository::new());
        let (gone, answer) = job_on(1, &[(1, 1)], closed);
        let (dropped, dropped_answer) = job(2, &[(1, 1)]);
        drop(dropped_answer);
        core.place(vec![gone, dropped], None).await;
        assert!(matches!(answer.await.unwrap(), Err(DomainError::Unavailable { .. })));
        assert_eq!(core.stats.abandoned.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn a_caller_who_hangs_up_while_the_batch_waits_for_its_rows_is_not_committed() {
        let hangs_up = Arc::new(TestConnection(AtomicBool::new(false)));
        let closer = hangs_up.clone();
        let mut tx = MockTransaction::new();
        // The claim is where a batch waits (a row lock held elsewhere): the caller hangs up meanwhile.
        tx.expect_read_stock().returning(move |ids| {
            closer.0.store(true, Ordering::SeqCst);
            Ok(ids.iter().map(|id| StockRow { option_id: *id, stock: Stock::new(10).unwrap(), version: 1 }).collect())
        });
        tx.expect_insert_orders().withf(|news| news.len() == 2).times(1).returning(|news| Ok(stored(news)));
        // Written before the claim, the leaver's order is deleted again.
        tx.expect_delete_orders().withf(|ids| ids.len() == 1 && ids[0].get() == 1).times(1).returning(|_| Ok(()));
        tx.expect_remove_from_carts()
            .withf(|carts, _| carts.len() == 1 && carts[0].0 == uid(2))
            .returning(|_, _| Ok(()));
        tx.expect_record_events()
            .withf(|events, _| events.len() == 1 && events[0].order.user_id == uid(2))
            .times(1)
            .returning(|_, _| Ok(()));
        tx.expect_decrement_stock()
            .withf(|_, units, _, _| *units == 1)
            .times(1)
            .returning(|_, _, _, _| Ok(FencedWrite::Written));
        tx.expect_commit().times(1).returning(|| Ok(()));
        let (core, events) = core(vec![tx], Arc::new(ConditionalStock), catalogue(10), everyone());
        let (leaving, left) = job_on(1, &[(1, 1)], hangs_up);
        let (staying, stays) = job(2, &[(1, 1)]);
        core.place(vec![leaving, staying], None).await;
        assert!(matches!(left.await.unwrap(), Err(DomainError::Unavailable { .. })));
        assert_eq!(stays.await.unwrap().unwrap().user_id, uid(2));
        assert_eq!(events.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_caller_who_hangs_up_while_the_write_waits_is_rolled_back_and_the_batch_runs_without_it() {
        let hangs_up = Arc::new(TestConnection(AtomicBool::new(false)));
        let closer = hangs_up.clone();
        // The conditional write is where a batch waits for a row another session holds.
        let mut waits = MockTransaction::new();
        waits.expect_read_stock().returning(|ids| {
            Ok(ids.iter().map(|id| StockRow { option_id: *id, stock: Stock::new(10).unwrap(), version: 1 }).collect())
        });
        waits.expect_insert_orders().withf(|news| news.len() == 2).returning(|news| Ok(stored(news)));
        waits.expect_remove_from_carts().returning(|_, _| Ok(()));
        // Recorded, then rolled back with everything else.
        waits.expect_record_events().returning(|_, _| Ok(()));
        waits.expect_decrement_stock().returning(move |_, _, _, _| {
            closer.0.store(true, Ordering::SeqCst);
            Ok(FencedWrite::Written)
        });
        waits.expect_commit().never();
        let txs = vec![waits, batch_tx(10, 1, 1, 1)];
        let (core, events) = core(txs, Arc::new(ConditionalStock), catalogue(10), everyone());
        let (leaving, left) = job_on(1, &[(1, 1)], hangs_up);
        let (staying, stays) = job(2, &[(1, 1)]);
        core.place(vec![leaving, staying], None).await;
        assert!(matches!(left.await.unwrap(), Err(DomainError::Unavailable { .. })));
        assert_eq!(stays.await.unwrap().unwrap().user_id, uid(2));
        assert_eq!(events.load(Ordering::SeqCst), 1, "only the commit signals");
        assert_eq!(core.stats.retries.load(Ordering::Relaxed), 0, "not a conflict");
    }

    #[tokio::test]
    async fn orders_past_a_users_pending_caps_are_refused_in_arrival_order() {
        // User 1 holds one unpaid order of one unit already; two orders and five units are the most one may hold.
        let mut tx = batch_tx(10, 2, 2, 4);
        tx.expect_hold_users()
            .withf(|ids| ids == [uid(1), uid(2), uid(3)])
            .times(1)
            .returning(|_| Ok(vec![(uid(1), Pending { orders: 1, units: 1 })]));
        let (mut core, _) = core(vec![tx], Arc::new(ConditionalStock), catalogue(10), everyone());
        core.caps = PendingCaps { orders: 2, units: 5 };
        let (jobs, answers): (Vec<_>, Vec<_>) =
            [job(1, &[(1, 1)]), job(1, &[(1, 1)]), job(2, &[(1, 6)]), job(3, &[(1, 3)])].into_iter().unzip();
        core.place(jobs, None).await;
        let mut outcomes = Vec::new();
        for answer in answers {
            outcomes.push(answer.await.unwrap());
        }
        assert!(outcomes[0].is_ok(), "a second order for user 1");
        assert!(matches!(outcomes[1], Err(DomainError::PendingLimitExceeded { user_id }) if user_id == uid(1)));
        assert!(matches!(outcomes[2], Err(DomainError::PendingLimitExceeded { user_id }) if user_id == uid(2)));
        assert!(outcomes[3].is_ok());
    }

    #[tokio::test]
    async fn an_order_past_its_deadline_is_a_lock_timeout_without_a_transaction() {
        let (core, _) = core(vec![], Arc::new(ConditionalStock), MockOrderRepository::new(), MockUserRepository::new());
        let (late, answer) =
            Job::new(OrderAsk { request: request(1, &[(1, 1)]), recorder: None }, Duration::ZERO, None);
        core.place(vec![late], None).await;
        assert!(matches!(answer.await.unwrap(), Err(DomainError::LockTimeout { .. })));
    }

    /// A strategy whose admission waits for a permit the test hands out, then refuses: a lock held elsewhere.
    struct Gate(Arc<Semaphore>);

    #[async_trait]
    impl StockStrategy for Gate {
        fn name(&self) -> &'static str {
            "gate"
        }

        async fn admit(&self, _: &[&[OrderLine]]) -> Result<Admission, DomainError> {
            let _permit = self.0.acquire().await.map_err(DomainError::unexpected)?;
            Err(DomainError::LockTimeout { retry_after_secs: 1 })
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_lane_sheds_at_once_while_other_options_still_queue() {
        let gate = Arc::new(Semaphore::new(0));
        let (service, _) = service(vec![], Arc::new(Gate(gate.clone())), catalogue(10), everyone());
        let service =
            service.combining(Combining { batch_max: 1_000, queue_max: 2, wait: Duration::from_secs(30), pipeline: 1 });
        let place = |user: i64, option: i64| {
            let service = service.clone();
            tokio::spawn(async move { service.place(request(user, &[(option, 1)]), None, None).await })
        };
        // The first order holds option 1's lane at the gate; two more queue behind it; the fourth is shed.
        let first = place(1, 1);
        let lanes = service.placing.clone();
        while lanes.active() != 1 || lanes.queued() != 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let queued = [place(2, 1), place(3, 1)];
        while service.placing_load().queued != 2 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let shed = service.place(request(4, &[(1, 1)]), None, None).await;
        assert!(matches!(shed, Err(DomainError::Unavailable { .. })), "{shed:?}");
        assert_eq!(service.core.stats.shed.load(Ordering::Relaxed), 1);
        // Option 2 has its own lane, with room.
        let other = place(5, 2);
        gate.add_permits(10);
        for task in [first, other].into_iter().chain(queued) {
            assert!(matches!(task.await.unwrap(), Err(DomainError::LockTimeout { .. })));
        }
    }

    #[tokio::test]
    async fn with_combining_off_an_order_is_a_batch_of_one_in_the_callers_task() {
        let (service, events) =
            service(vec![batch_tx(5, 1, 1, 2)], Arc::new(ConditionalStock), catalogue(5), everyone());
        let placed = service.place(request(1, &[(1, 2)]), None, None).await.unwrap();
        assert_eq!(placed.total_price, Money::new(2000).unwrap());
        assert_eq!(events.load(Ordering::SeqCst), 1);
    }
}
