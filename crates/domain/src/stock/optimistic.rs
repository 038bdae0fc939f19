//! `optimistic`: read stock and version, then compare-and-set. A lost race is a [`DomainError::WriteConflict`]
//! and the whole order transaction is retried with jittered exponential backoff, at most `max_retries` times;
//! exhausted retries are a 503 `LOCK_TIMEOUT`, never a wrong stock.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::{RetryPolicy, StockPermit, StockStrategy, left_after};
use crate::error::DomainError;
use crate::ids::ProductOptionId;
use crate::money::Stock;
use crate::order::OrderLine;
use crate::ports::{StockRow, Transaction};

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

    async fn take(
        &self,
        tx: &mut dyn Transaction,
        lines: &[OrderLine],
        _permit: &StockPermit,
        now: DateTime<Utc>,
    ) -> Result<(), DomainError> {
        let ids: Vec<ProductOptionId> = lines.iter().map(|l| l.option_id).collect();
        let rows = tx.read_stock(&ids).await?;
        for line in lines {
            let left = left_after(&rows, line)?;
            if !tx.write_stock(line.option_id, left.stock, Some(left.version), now).await? {
                return Err(DomainError::WriteConflict);
            }
        }
        Ok(())
    }

    /// A batch writes each option's new stock only if its version is still the one it allocated from.
    async fn take_allocated(
        &self,
        tx: &mut dyn Transaction,
        takes: &[(StockRow, i64)],
        _permit: &StockPermit,
        now: DateTime<Utc>,
    ) -> Result<(), DomainError> {
        for (row, units) in takes {
            let left = Stock::new(row.stock.get() - units).map_err(|_| DomainError::WriteConflict)?;
            if !tx.write_stock(row.option_id, left, Some(row.version), now).await? {
                return Err(DomainError::WriteConflict);
            }
        }
        Ok(())
    }

    fn retry_policy(&self) -> RetryPolicy {
        self.retry
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money::Quantity;
    use crate::ports::MockTransaction;

    fn line(qty: i64) -> OrderLine {
        OrderLine { option_id: ProductOptionId::new(1).unwrap(), quantity: Quantity::new(qty).unwrap() }
    }

    fn strategy() -> OptimisticStock {
        OptimisticStock::new(RetryPolicy::NONE)
    }

    fn reads(tx: &mut MockTransaction, stock: i64, version: i64) {
        tx.expect_read_stock()
            .returning(move |ids| Ok(vec![StockRow { option_id: ids[0], stock: Stock::new(stock).unwrap(), version }]));
    }

    #[tokio::test]
    async fn writes_with_the_version_it_read() {
        let mut tx = MockTransaction::new();
        reads(&mut tx, 5, 7);
        tx.expect_write_stock()
            .withf(|_, stock, expected, _| stock.get() == 3 && *expected == Some(7))
            .returning(|_, _, _, _| Ok(true));
        strategy().take(&mut tx, &[line(2)], &StockPermit::none(), Utc::now()).await.unwrap();
    }

    #[tokio::test]
    async fn a_changed_version_is_a_conflict() {
        let mut tx = MockTransaction::new();
        reads(&mut tx, 5, 7);
        tx.expect_write_stock().returning(|_, _, _, _| Ok(false));
        assert!(matches!(
            strategy().take(&mut tx, &[line(2)], &StockPermit::none(), Utc::now()).await,
            Err(DomainError::WriteConflict)
        ));
    }

    #[tokio::test]
    async fn short_stock_is_out_of_stock_without_writing() {
        let mut tx = MockTransaction::new();
        reads(&mut tx, 1, 7);
        tx.expect_write_stock().never();
        assert!(matches!(
            strategy().take(&mut tx, &[line(2)], &StockPermit::none(), Utc::now()).await,
            Err(DomainError::OutOfStock { .. })
        ));
    }
}
