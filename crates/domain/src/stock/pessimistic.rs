//! `pessimistic`: lock the option rows (`SELECT ... FOR NO KEY UPDATE`, ascending), check in Rust, then write.
//!
//! `FOR NO KEY UPDATE` rather than `FOR UPDATE`: the order's own `order_items` insert has already taken a
//! `KEY SHARE` lock on the same option rows (its foreign key), which `FOR UPDATE` conflicts with; two orders
//! could then deadlock. `NO KEY UPDATE` excludes every other stock writer and nothing else.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::{StockPermit, StockStrategy, left_after};
use crate::error::DomainError;
use crate::ids::ProductOptionId;
use crate::order::OrderLine;
use crate::ports::{StockRow, Transaction};

#[derive(Debug, Clone, Copy, Default)]
pub struct PessimisticStock;

#[async_trait]
impl StockStrategy for PessimisticStock {
    fn name(&self) -> &'static str {
        "pessimistic"
    }

    async fn take(
        &self,
        tx: &mut dyn Transaction,
        lines: &[OrderLine],
        _permit: &StockPermit,
        now: DateTime<Utc>,
    ) -> Result<(), DomainError> {
        let ids: Vec<ProductOptionId> = lines.iter().map(|l| l.option_id).collect();
        let rows = tx.lock_stock(&ids).await?;
        for line in lines {
            // The lock makes this read the current value until commit, so deciding in Rust is safe.
            let left = left_after(&rows, line)?;
            tx.write_stock(line.option_id, left.stock, None, now).await?;
        }
        Ok(())
    }

    /// A batch locks its rows before it allocates, so that the allocation reads what the write will find.
    async fn claim(&self, tx: &mut dyn Transaction, ids: &[ProductOptionId]) -> Result<Vec<StockRow>, DomainError> {
        tx.lock_stock(ids).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money::{Quantity, Stock};
    use crate::ports::MockTransaction;

    fn line(id: i64, qty: i64) -> OrderLine {
        OrderLine { option_id: ProductOptionId::new(id).unwrap(), quantity: Quantity::new(qty).unwrap() }
    }

    fn row(id: i64, stock: i64) -> StockRow {
        StockRow { option_id: ProductOptionId::new(id).unwrap(), stock: Stock::new(stock).unwrap(), version: 0 }
    }

    #[tokio::test]
    async fn locks_all_rows_then_writes_what_is_left() {
        let mut tx = MockTransaction::new();
        tx.expect_lock_stock()
            .withf(|ids| ids.iter().map(|i| i.get()).collect::<Vec<_>>() == vec![1, 2])
            .returning(|_| Ok(vec![row(1, 5), row(2, 3)]));
        tx.expect_write_stock()
            .withf(|id, stock, expected, _| expected.is_none() && matches!((id.get(), stock.get()), (1, 3) | (2, 0)))
            .times(2)
            .returning(|_, _, _, _| Ok(true));
        PessimisticStock.take(&mut tx, &[line(1, 2), line(2, 3)], &StockPermit::none(), Utc::now()).await.unwrap();
    }

    #[tokio::test]
    async fn a_short_line_writes_nothing_after_it() {
        let mut tx = MockTransaction::new();
        tx.expect_lock_stock().returning(|_| Ok(vec![row(1, 1)]));
        tx.expect_write_stock().never();
        let err = PessimisticStock.take(&mut tx, &[line(1, 2)], &StockPermit::none(), Utc::now()).await.unwrap_err();
        assert!(matches!(err, DomainError::OutOfStock { .. }));
    }
}
