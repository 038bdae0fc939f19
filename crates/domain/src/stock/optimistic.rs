//! `optimistic`: read stock and version, allocate, then compare-and-set each option. A lost race is a
//! [`DomainError::WriteConflict`] and the whole batch transaction is retried with jittered exponential backoff,
//! at most `max_retries` times; exhausted retries are a 503 `LOCK_TIMEOUT`, never a wrong stock.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::error::DomainError;
use crate::money::Stock;
use crate::ports::{RetryPolicy, StockPermit, StockStrategy, StockTake, StockTx};

#[derive(Debug, Clone, Copy)]
pub struct OptimisticStock {
    retry: RetryPolicy,
}

impl OptimisticStock {
    #[must_use]
    pub const fn new(retry: RetryPolicy) -> Self {
        Self { retry }
    }
}

#[async_trait]
impl StockStrategy for OptimisticStock {
    fn name(&self) -> &'static str {
        "optimistic"
    }

    /// Each option's new stock is written only if its version is still the one the batch allocated from.
    async fn take(
        &self,
        tx: &mut dyn StockTx,
        takes: &[StockTake],
        _permit: &StockPermit,
        now: DateTime<Utc>,
    ) -> Result<(), DomainError> {
        for take in takes {
            // Allocation never takes more than the row held: a negative result is a changed row.
            let left = Stock::new(take.row.stock.get() - take.units).map_err(|_| DomainError::WriteConflict)?;
            if !tx.write_stock(take.row.option_id, left, Some(take.row.version), now).await? {
                return Err(DomainError::WriteConflict);
            }
        }
        Ok(())
    }

    fn retry_policy(&self) -> RetryPolicy {
        self.retry
    }

    /// A second batch would read the version the first is about to bump, and lose.
    fn max_pipeline(&self) -> usize {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::ProductOptionId;
    use crate::ports::{MockStockTx, StockRow};

    fn take(stock: i64, version: i64, units: i64) -> StockTake {
        StockTake {
            row: StockRow { option_id: ProductOptionId::new(1).unwrap(), stock: Stock::new(stock).unwrap(), version },
            units,
        }
    }

    fn strategy() -> OptimisticStock {
        OptimisticStock::new(RetryPolicy::BATCH)
    }

    #[tokio::test]
    async fn writes_what_is_left_with_the_version_it_read() {
        let mut tx = MockStockTx::new();
        tx.expect_write_stock()
            .withf(|_, stock, expected, _| stock.get() == 3 && *expected == Some(7))
            .times(1)
            .returning(|_, _, _, _| Ok(true));
        strategy().take(&mut tx, &[take(5, 7, 2)], &StockPermit::none(), Utc::now()).await.unwrap();
    }

    #[tokio::test]
    async fn a_changed_version_is_a_conflict() {
        let mut tx = MockStockTx::new();
        tx.expect_write_stock().returning(|_, _, _, _| Ok(false));
        let outcome = strategy().take(&mut tx, &[take(5, 7, 2)], &StockPermit::none(), Utc::now()).await;
        assert!(matches!(outcome, Err(DomainError::WriteConflict)));
    }
}
