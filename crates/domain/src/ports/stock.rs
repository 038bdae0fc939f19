//! The stock strategy port, the rows and permits it works with, and the stock mirror.
//!
//! An order batch runs every strategy the same way: [`StockStrategy::admit`] before its transaction (a lock
//! taken outside the database, a reservation), [`StockStrategy::claim`] inside it (read or lock the rows), the
//! domain's allocation (arrival order, each order all of its lines or none), [`StockStrategy::take`] last in the
//! transaction (the guarded write), and [`StockStrategy::settle`] once the transaction has ended. Options are
//! always handled in ascending id order, so row locks and distributed locks are taken in one global order and
//! two batches never wait on each other in a cycle.

use std::any::Any;
use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rand::Rng;

use crate::error::DomainError;
use crate::ids::ProductOptionId;
use crate::money::{Quantity, Stock};
use crate::order::OrderLine;
use crate::ports::transaction::StockTx;

/// What a guarded stock write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FencedWrite {
    Written,
    /// The row no longer holds the units.
    OutOfStock,
    /// The row has accepted a newer fencing token (`newest`): this holder's token is stale.
    Fenced {
        newest: u64,
    },
}

/// An option's stock and the version that optimistic writers compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StockRow {
    pub option_id: ProductOptionId,
    pub stock: Stock,
    pub version: i64,
}

/// What a batch takes of one option: the row as [`StockStrategy::claim`] found it, and the units its orders
/// were allocated (a sum over orders, which may pass one line's limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StockTake {
    pub row: StockRow,
    pub units: i64,
}

/// Whatever a strategy holds from before the transaction until after it (lock guards, a reservation; dropping
/// the permit releases them), and the fencing token each lock was granted with.
#[derive(Default)]
pub struct StockPermit {
    guard: Option<Box<dyn Any + Send + Sync>>,
    /// `Some` for a strategy that fences: every option it writes must have a token.
    fences: Option<BTreeMap<ProductOptionId, u64>>,
}

impl StockPermit {
    #[must_use]
    pub fn none() -> Self {
        Self::default()
    }

    pub fn holding(guard: impl Send + Sync + 'static) -> Self {
        Self { guard: Some(Box::new(guard)), fences: None }
    }

    /// A permit whose locks carry fencing tokens: strictly increasing per option, so the row can refuse a write
    /// from a holder whose lock has already passed to someone newer.
    pub fn fenced(guard: impl Send + Sync + 'static, fences: BTreeMap<ProductOptionId, u64>) -> Self {
        Self { guard: Some(Box::new(guard)), fences: Some(fences) }
    }

    /// The guard this permit holds, taken back out if it is a `T`: how a strategy's [`StockStrategy::settle`]
    /// finds what its own [`StockStrategy::admit`] put in (a reservation to give back).
    ///
    /// # Errors
    /// The permit itself when it holds nothing or something else than a `T`.
    pub fn into_guard<T: Any>(self) -> Result<T, Self> {
        match self.guard.map(|guard| guard.downcast::<T>()) {
            Some(Ok(guard)) => Ok(*guard),
            Some(Err(other)) => Err(Self { guard: Some(other), fences: self.fences }),
            None => Err(Self { guard: None, fences: self.fences }),
        }
    }

    /// The guard this permit holds, if it is a `T`.
    #[must_use]
    pub fn guard<T: Any>(&self) -> Option<&T> {
        self.guard.as_ref().and_then(|guard| guard.downcast_ref::<T>())
    }

    /// Whether this permit holds something taken outside the database (a lock, a reservation).
    #[must_use]
    pub fn is_held(&self) -> bool {
        self.guard.is_some()
    }

    /// The fencing token to write `option` with: `None` for a strategy that does not fence.
    ///
    /// # Errors
    /// [`DomainError::Unexpected`] when the strategy fences but has no token for this option (a strategy bug:
    /// writing unfenced would let a stale holder through).
    pub fn fence(&self, option: ProductOptionId) -> Result<Option<u64>, DomainError> {
        match &self.fences {
            None => Ok(None),
            Some(fences) => fences
                .get(&option)
                .copied()
                .map(Some)
                .ok_or_else(|| DomainError::unexpected(format!("no fencing token for option {option}"))),
        }
    }
}

impl std::fmt::Debug for StockPermit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StockPermit").field("held", &self.guard.is_some()).field("fences", &self.fences).finish()
    }
}

/// What a batch may do after [`StockStrategy::admit`]: the permit held over its transaction, and per order (same
/// positions) `Ok` to go on or the reason it is refused.
#[derive(Debug)]
pub struct Admission {
    pub permit: StockPermit,
    pub verdicts: Vec<Result<(), DomainError>>,
}

impl Admission {
    /// Every one of `orders` orders may go on, under `permit`.
    #[must_use]
    pub fn everyone(permit: StockPermit, orders: usize) -> Self {
        Self { permit, verdicts: (0..orders).map(|_| Ok(())).collect() }
    }
}

/// How often and how patiently a batch's transaction is retried after a [`DomainError::WriteConflict`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub max_retries: u32,
    pub base: Duration,
    pub cap: Duration,
}

impl RetryPolicy {
    /// The retries of a batch whose guarded write found the row changed since its read (another instance, or
    /// another lane of this one, wrote the option): short, because the next read sees the new value.
    pub const BATCH: Self = Self { max_retries: 20, base: Duration::from_millis(1), cap: Duration::from_millis(20) };

    /// Full-jitter exponential backoff: uniform in `0..=min(cap, base * 2^attempt)`. The jitter spreads the
    /// losers of one race over time so that they do not collide again on the next try.
    #[must_use]
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.base.saturating_mul(2u32.saturating_pow(attempt.min(20))).min(self.cap);
        let micros = u64::try_from(ceiling.as_micros()).unwrap_or(u64::MAX);
        Duration::from_micros(rand::rng().random_range(0..=micros))
    }
}

/// A way of protecting stock while a batch of orders takes it.
#[async_trait]
pub trait StockStrategy: Send + Sync {
    /// The name configuration selects it by (`SHOP_STOCK_STRATEGY`).
    fn name(&self) -> &'static str;

    /// Runs before a batch's transaction begins, for its orders in arrival order: the protection for the union
    /// of their options, and per order whether it may go on. A strategy that decides outside the database (a
    /// Redis reservation) refuses here, with [`DomainError::OutOfStock`], the orders that do not fit. The
    /// default takes nothing and admits everyone.
    ///
    /// # Errors
    /// [`DomainError::LockTimeout`] when a lock could not be had in the configured wait; an error fails the
    /// whole batch.
    async fn admit(&self, orders: &[&[OrderLine]]) -> Result<Admission, DomainError> {
        Ok(Admission::everyone(StockPermit::none(), orders.len()))
    }

    /// Inside the batch's transaction, before the batch allocates: the current stock of its options
    /// (ascending). The default reads them, which is exact for strategies that hold a lock outside the database
    /// and a first guess for the others (their write checks).
    ///
    /// # Errors
    /// What the store reports.
    async fn claim(&self, tx: &mut dyn StockTx, ids: &[ProductOptionId]) -> Result<Vec<StockRow>, DomainError> {
        tx.read_stock(ids).await
    }

    /// Last in the batch's transaction, after it allocated: writes what the batch takes (ascending). The default
    /// is the conditional decrement, fenced with the permit's token where the strategy fences.
    ///
    /// # Errors
    /// [`DomainError::WriteConflict`] when the row no longer holds the units (written since the claim: the
    /// batch is retried per [`StockStrategy::retry_policy`]); [`DomainError::StaleLock`] when the fence refused.
    async fn take(
        &self,
        tx: &mut dyn StockTx,
        takes: &[StockTake],
        permit: &StockPermit,
        now: DateTime<Utc>,
    ) -> Result<(), DomainError> {
        for take in takes {
            let option = take.row.option_id;
            match tx.decrement_stock(option, take.units, permit.fence(option)?, now).await? {
                FencedWrite::Written => {}
                FencedWrite::OutOfStock => return Err(DomainError::WriteConflict),
                FencedWrite::Fenced { .. } => return Err(DomainError::StaleLock { option_id: option }),
            }
        }
        Ok(())
    }

    /// How a batch's transaction is retried on [`DomainError::WriteConflict`].
    fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy::BATCH
    }

    /// How many batches of one option may run at once in this instance at most (the next ones validated and
    /// written while the current one takes its stock and commits), as batches of two instances do; the configured
    /// pipeline may ask fewer. No limit of its own unless more would only queue or lose: a compare-and-set on a
    /// version the first is about to change (1), or a lock outside the database that covers the whole
    /// transaction (2: the next batch validated and written beside the holder is all that overlap wins).
    fn max_pipeline(&self) -> usize {
        if self.locks_whole_transaction() { 2 } else { usize::MAX }
    }

    /// Whether [`StockStrategy::admit`] takes a lock outside the database that covers the whole transaction
    /// and refuses no order. Then a batch begins its transaction and writes its orders before it asks for the
    /// lock, so that the lock covers only the claim, the stock write and the commit; the claim, under the lock,
    /// reads the stock exactly.
    fn locks_whole_transaction(&self) -> bool {
        false
    }

    /// Runs once the transaction that used `permit` has ended: `taken` is what it committed (empty when it
    /// rolled back). The default drops the permit, releasing its locks; a strategy that reserved stock outside
    /// the database gives back whatever it reserved and the transaction did not take.
    async fn settle(&self, permit: StockPermit, taken: &[OrderLine]) {
        let _ = taken;
        drop(permit);
    }
}

/// Every option of these orders once, ascending, with the units all of them ask for (saturating at the line
/// limit: strategies that lock use only the ids).
#[must_use]
pub fn union_of(orders: &[&[OrderLine]]) -> Vec<OrderLine> {
    let mut units: BTreeMap<ProductOptionId, i64> = BTreeMap::new();
    for line in orders.iter().flat_map(|lines| lines.iter()) {
        *units.entry(line.option_id).or_default() += line.quantity.get();
    }
    units
        .into_iter()
        .filter_map(|(option_id, n)| Some(OrderLine { option_id, quantity: Quantity::new(n.min(Quantity::MAX)).ok()? }))
        .collect()
}

/// Told, after the commit, when stock moved other than by an order taking it: an admin's count, or units that
/// an expired or unpaid order gave back. A strategy that keeps a copy of the stock outside the database (the
/// Redis mirror of `redis-optimistic`) updates its copy; every other strategy has none and uses
/// [`NoStockMirror`].
///
/// Never fails the use case: the database has committed and stays the source of truth, and a copy that missed
/// a notice is repaired by its own reconciliation. Implementations log what they could not do.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait StockMirror: Send + Sync {
    /// The option's stock was set to `stock` (an admin's count).
    async fn stock_set(&self, option_id: ProductOptionId, stock: Stock);

    /// These units came back to stock (orders cancelled by expiry or by a failed payment), per option.
    async fn stock_returned(&self, units: &BTreeMap<ProductOptionId, i64>);
}

/// The mirror of every strategy that keeps no copy of the stock: ignores every notice.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoStockMirror;

#[async_trait]
impl StockMirror for NoStockMirror {
    async fn stock_set(&self, _option_id: ProductOptionId, _stock: Stock) {}

    async fn stock_returned(&self, _units: &BTreeMap<ProductOptionId, i64>) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::transaction::MockStockTx;

    fn take(id: i64, units: i64) -> StockTake {
        StockTake {
            row: StockRow { option_id: ProductOptionId::new(id).unwrap(), stock: Stock::new(10).unwrap(), version: 0 },
            units,
        }
    }

    struct Default;

    #[async_trait]
    impl StockStrategy for Default {
        fn name(&self) -> &'static str {
            "default"
        }
    }

    #[tokio::test]
    async fn the_default_take_carries_each_options_token_and_reports_a_stale_lock() {
        let fences = BTreeMap::from([(ProductOptionId::new(1).unwrap(), 41), (ProductOptionId::new(2).unwrap(), 7)]);
        let permit = StockPermit::fenced((), fences);
        let mut tx = MockStockTx::new();
        tx.expect_decrement_stock()
            .withf(|id, units, fence, _| (id.get(), *units, *fence) == (1, 3, Some(41)))
            .returning(|_, _, _, _| Ok(FencedWrite::Written));
        tx.expect_decrement_stock()
            .withf(|id, _, fence, _| (id.get(), *fence) == (2, Some(7)))
            .returning(|_, _, _, _| Ok(FencedWrite::Fenced { newest: 9 }));
        let err = Default.take(&mut tx, &[take(1, 3), take(2, 1)], &permit, Utc::now()).await.unwrap_err();
        assert!(matches!(err, DomainError::StaleLock { option_id } if option_id.get() == 2));
    }

    #[tokio::test]
    async fn a_fencing_permit_without_a_token_is_a_bug_not_a_silent_write() {
        let mut tx = MockStockTx::new();
        tx.expect_decrement_stock().never();
        let permit = StockPermit::fenced((), BTreeMap::new());
        let err = Default.take(&mut tx, &[take(1, 1)], &permit, Utc::now()).await.unwrap_err();
        assert!(matches!(err, DomainError::Unexpected(_)));
    }

    #[tokio::test]
    async fn a_row_written_since_the_claim_is_a_conflict_the_batch_retries() {
        let mut tx = MockStockTx::new();
        tx.expect_decrement_stock()
            .withf(|_, _, fence, _| fence.is_none())
            .returning(|_, _, _, _| Ok(FencedWrite::OutOfStock));
        let err = Default.take(&mut tx, &[take(1, 1)], &StockPermit::none(), Utc::now()).await.unwrap_err();
        assert!(matches!(err, DomainError::WriteConflict));
    }

    #[test]
    fn a_permit_gives_its_guard_back_only_as_its_own_type() {
        let permit = StockPermit::holding(41_u32);
        let permit = permit.into_guard::<String>().unwrap_err();
        assert!(permit.is_held(), "a foreign type leaves the guard in place");
        assert_eq!(permit.into_guard::<u32>().unwrap(), 41);
        assert!(StockPermit::none().into_guard::<u32>().is_err());
    }

    #[test]
    fn backoff_is_jittered_below_an_exponential_ceiling() {
        let p = RetryPolicy { max_retries: 50, base: Duration::from_millis(2), cap: Duration::from_millis(50) };
        for attempt in 0..60 {
            let d = p.delay(attempt);
            let ceiling = Duration::from_millis(2 * 2u64.pow(attempt.min(20))).min(Duration::from_millis(50));
            assert!(d <= ceiling, "attempt {attempt}: {d:?} > {ceiling:?}");
        }
        let spread: std::collections::HashSet<_> = (0..50).map(|_| p.delay(10)).collect();
        assert!(spread.len() > 10, "delays are jittered, not fixed");
    }

    #[test]
    fn the_union_of_a_batch_sums_each_option_once_ascending() {
        let line = |o: i64, q: i64| OrderLine {
            option_id: ProductOptionId::new(o).unwrap(),
            quantity: Quantity::new(q).unwrap(),
        };
        let orders = [vec![line(2, 1), line(5, 3)], vec![line(2, 4)], vec![line(1, 1000), line(5, 999)]];
        let slices: Vec<&[OrderLine]> = orders.iter().map(Vec::as_slice).collect();
        let union: Vec<(i64, i64)> = union_of(&slices).iter().map(|l| (l.option_id.get(), l.quantity.get())).collect();
        // Option 5 asks 1,002 units in all: a lock needs only its id, so the line saturates at the limit.
        assert_eq!(union, vec![(1, 1000), (2, 5), (5, 1000)]);
    }
}
