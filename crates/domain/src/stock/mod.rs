//! How order creation protects stock: a port with one named implementation per strategy.
//!
//! Every strategy takes stock *last* in the order's transaction and in ascending option-id order (the order of
//! [`crate::order::OrderRequest::lines`]), so row locks are held for as little time as possible and two orders
//! never wait on each other in a cycle. A strategy may also take something *before* the transaction begins (an
//! in-process or distributed lock), held by the returned [`StockPermit`] until the transaction has ended.
//!
//! - [`conditional`]: `UPDATE ... WHERE stock >= n`; no lock at all (the default).
//! - [`pessimistic`]: row locks (`SELECT ... FOR NO KEY UPDATE`), then write.
//! - [`optimistic`]: compare-and-set on the version; the whole transaction is retried on conflict.
//! - [`local`]: an in-process mutex per option around the transaction (single instance only).

pub mod conditional;
pub mod local;
pub mod optimistic;
pub mod pessimistic;

use std::any::Any;
use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rand::Rng;

use crate::error::DomainError;
use crate::ids::ProductOptionId;
use crate::money::Quantity;
use crate::order::OrderLine;
use crate::ports::{FencedWrite, StockRow, Transaction};

pub use conditional::ConditionalStock;
pub use local::{LocalLockStock, OptionLocks};
pub use optimistic::OptimisticStock;
pub use pessimistic::PessimisticStock;

/// Whatever a strategy holds from before the transaction until after it (lock guards; dropping the permit
/// releases them), and the fencing token each lock was granted with.
#[derive(Default)]
pub struct StockPermit {
    guard: Option<Box<dyn Any + Send + Sync>>,
    fences: BTreeMap<ProductOptionId, u64>,
}

impl StockPermit {
    #[must_use]
    pub fn none() -> Self {
        Self::default()
    }

    pub fn holding(guard: impl Send + Sync + 'static) -> Self {
        Self { guard: Some(Box::new(guard)), fences: BTreeMap::new() }
    }

    /// A permit whose locks carry fencing tokens: strictly increasing per option, so the row can refuse a write
    /// from a holder whose lock has already passed to someone newer.
    pub fn fenced(guard: impl Send + Sync + 'static, fences: BTreeMap<ProductOptionId, u64>) -> Self {
        Self { guard: Some(Box::new(guard)), fences }
    }

    /// The guard this permit holds, taken back out if it is a `T`: how a strategy's
    /// [`StockStrategy::settle`] finds what its own [`StockStrategy::acquire`] put in (a reservation to give
    /// back). Any other permit is returned unchanged.
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

    /// Whether this permit holds locks taken outside the database.
    #[must_use]
    pub fn is_held(&self) -> bool {
        self.guard.is_some()
    }

    /// The fencing token of this option's lock, if the strategy fences.
    #[must_use]
    pub fn fence(&self, option: ProductOptionId) -> Option<u64> {
        self.fences.get(&option).copied()
    }
}

impl std::fmt::Debug for StockPermit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StockPermit").field("held", &self.guard.is_some()).field("fences", &self.fences).finish()
    }
}

/// What `rows` (read or locked for `lines`) leave of `line`'s option after taking it: the decision the
/// pessimistic and optimistic strategies make in Rust before they write.
///
/// # Errors
/// [`DomainError::ProductOptionNotFound`] when the row is missing; [`DomainError::OutOfStock`].
pub(crate) fn left_after(rows: &[StockRow], line: &OrderLine) -> Result<StockRow, DomainError> {
    let row = rows
        .iter()
        .find(|r| r.option_id == line.option_id)
        .ok_or(DomainError::ProductOptionNotFound(line.option_id))?;
    let left = row.stock.checked_take(line.quantity).ok_or(DomainError::OutOfStock { option_id: line.option_id })?;
    Ok(StockRow { stock: left, ..*row })
}

/// Takes every line with the conditional decrement, carrying each option's fencing token: the write of a
/// strategy that locks outside the database (Redis). A holder that was paused past its lease finds its token
/// older than the row's and its write refused.
///
/// # Errors
/// [`DomainError::OutOfStock`]; [`DomainError::StaleLock`] when the row has accepted a newer token;
/// [`DomainError::Unexpected`] when the permit has no token for a line (a strategy bug).
pub async fn take_fenced(
    tx: &mut dyn Transaction,
    lines: &[OrderLine],
    permit: &StockPermit,
    now: DateTime<Utc>,
) -> Result<(), DomainError> {
    for line in lines {
        let fence = permit
            .fence(line.option_id)
            .ok_or_else(|| DomainError::unexpected(format!("no fencing token for option {}", line.option_id)))?;
        match tx.decrement_stock_fenced(line.option_id, line.quantity, fence, now).await? {
            FencedWrite::Written => {}
            FencedWrite::OutOfStock => return Err(DomainError::OutOfStock { option_id: line.option_id }),
            FencedWrite::Fenced => return Err(DomainError::StaleLock { option_id: line.option_id }),
        }
    }
    Ok(())
}

/// How often and how patiently a transaction is retried after a [`DomainError::WriteConflict`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub max_retries: u32,
    pub base: Duration,
    pub cap: Duration,
}

impl RetryPolicy {
    /// No retries: a conflict is an error.
    pub const NONE: Self = Self { max_retries: 0, base: Duration::ZERO, cap: Duration::ZERO };

    /// Full-jitter exponential backoff: uniform in `0..=min(cap, base * 2^attempt)`. The jitter spreads the
    /// losers of one race over time so that they do not collide again on the next try.
    #[must_use]
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.base.saturating_mul(2u32.saturating_pow(attempt.min(20))).min(self.cap);
        let micros = u64::try_from(ceiling.as_micros()).unwrap_or(u64::MAX);
        Duration::from_micros(rand::rng().random_range(0..=micros))
    }
}

/// A way of taking stock for an order.
#[async_trait]
pub trait StockStrategy: Send + Sync {
    /// The name configuration selects it by (`SHOP_STOCK_STRATEGY`).
    fn name(&self) -> &'static str;

    /// Runs before the order's transaction begins; the permit is dropped after it ended.
    ///
    /// # Errors
    /// [`DomainError::LockTimeout`] when a lock could not be had in the configured wait.
    async fn acquire(&self, lines: &[OrderLine]) -> Result<StockPermit, DomainError> {
        let _ = lines;
        Ok(StockPermit::none())
    }

    /// Takes the stock of every line inside `tx`, lines ascending by option id. `permit` is what
    /// [`StockStrategy::acquire`] returned (with its fencing tokens, for strategies that fence).
    ///
    /// # Errors
    /// [`DomainError::OutOfStock`] naming the first short option (the caller rolls back);
    /// [`DomainError::WriteConflict`] when an optimistic write lost a race (the caller retries per
    /// [`StockStrategy::retry_policy`]).
    async fn take(
        &self,
        tx: &mut dyn Transaction,
        lines: &[OrderLine],
        permit: &StockPermit,
        now: DateTime<Utc>,
    ) -> Result<(), DomainError>;

    /// How the whole order transaction is retried on [`DomainError::WriteConflict`].
    fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy::NONE
    }

    /// Runs before a *batch* of orders (in arrival order) begins its one transaction: the protection for the
    /// union of their options, and per order whether it may go on. A strategy that decides outside the database
    /// (a Redis reservation) refuses here, with [`DomainError::OutOfStock`], the orders that do not fit; the
    /// default takes [`StockStrategy::acquire`] for the union and admits every order.
    ///
    /// # Errors
    /// As [`StockStrategy::acquire`]; an error fails the whole batch.
    async fn acquire_batch(&self, orders: &[&[OrderLine]]) -> Result<Admission, DomainError> {
        let union = union_of(orders);
        let permit = self.acquire(&union).await?;
        Ok(Admission { permit, verdicts: orders.iter().map(|_| Ok(())).collect() })
    }

    /// Inside a batch's transaction, before the batch allocates: the current stock of the batch's options
    /// (ascending). The pessimistic strategy locks the rows here; the default reads them, which is exact for
    /// strategies that hold a lock outside the database and a first guess for the others (their write checks).
    ///
    /// # Errors
    /// What the store reports.
    async fn claim(&self, tx: &mut dyn Transaction, ids: &[ProductOptionId]) -> Result<Vec<StockRow>, DomainError> {
        tx.read_stock(ids).await
    }

    /// Inside a batch's transaction, after it allocated: writes what the batch takes, per option its row as
    /// [`StockStrategy::claim`] read it and the units allocated (ascending). The default is the conditional
    /// decrement, fenced with the permit's token where the strategy fences.
    ///
    /// # Errors
    /// [`DomainError::WriteConflict`] when the row no longer holds the units (another instance wrote since the
    /// claim: the batch is retried); [`DomainError::StaleLock`] when the fence refused the write.
    async fn take_allocated(
        &self,
        tx: &mut dyn Transaction,
        takes: &[(StockRow, i64)],
        permit: &StockPermit,
        now: DateTime<Utc>,
    ) -> Result<(), DomainError> {
        for (row, units) in takes {
            match tx.decrement_stock_by(row.option_id, *units, permit.fence(row.option_id), now).await? {
                FencedWrite::Written => {}
                FencedWrite::OutOfStock => return Err(DomainError::WriteConflict),
                FencedWrite::Fenced => return Err(DomainError::StaleLock { option_id: row.option_id }),
            }
        }
        Ok(())
    }

    /// Runs once the transaction that used `permit` has ended: `taken` is what it committed (empty when it
    /// rolled back). The default drops the permit, releasing its locks; a strategy that reserved stock outside
    /// the database gives back whatever it reserved and the transaction did not take.
    async fn settle(&self, permit: StockPermit, taken: &[OrderLine]) {
        let _ = taken;
        drop(permit);
    }
}

/// What a batch may do after [`StockStrategy::acquire_batch`]: the permit held over its transaction, and per
/// order (same positions) `Ok` to go on or the reason it is refused.
#[derive(Debug)]
pub struct Admission {
    pub permit: StockPermit,
    pub verdicts: Vec<Result<(), DomainError>>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::MockTransaction;

    fn line(id: i64) -> OrderLine {
        OrderLine { option_id: ProductOptionId::new(id).unwrap(), quantity: Quantity::new(1).unwrap() }
    }

    #[tokio::test]
    async fn fenced_take_carries_each_options_token_and_reports_a_stale_lock() {
        let fences = BTreeMap::from([(ProductOptionId::new(1).unwrap(), 41), (ProductOptionId::new(2).unwrap(), 7)]);
        let permit = StockPermit::fenced((), fences);
        let mut tx = MockTransaction::new();
        tx.expect_decrement_stock_fenced()
            .withf(|id, _, fence, _| (id.get(), *fence) == (1, 41))
            .returning(|_, _, _, _| Ok(FencedWrite::Written));
        tx.expect_decrement_stock_fenced()
            .withf(|id, _, fence, _| (id.get(), *fence) == (2, 7))
            .returning(|_, _, _, _| Ok(FencedWrite::Fenced));
        let err = take_fenced(&mut tx, &[line(1), line(2)], &permit, Utc::now()).await.unwrap_err();
        assert!(matches!(err, DomainError::StaleLock { option_id } if option_id.get() == 2));
    }

    #[tokio::test]
    async fn fenced_take_without_a_token_is_a_bug_not_a_silent_write() {
        let mut tx = MockTransaction::new();
        tx.expect_decrement_stock_fenced().never();
        let err = take_fenced(&mut tx, &[line(1)], &StockPermit::none(), Utc::now()).await.unwrap_err();
        assert!(matches!(err, DomainError::Unexpected(_)));
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
}
