//! `pessimistic`: the batch locks its option rows (`SELECT ... FOR NO KEY UPDATE`, ascending) when it claims
//! them, allocates what it read, and writes under the lock until the commit.
//!
//! `FOR NO KEY UPDATE` rather than `FOR UPDATE`: an order's `order_items` insert takes a `KEY SHARE` lock on the
//! same option rows (its foreign key), which `FOR UPDATE` conflicts with; two batches could then deadlock.
//! `NO KEY UPDATE` excludes every other stock writer and nothing else.

use async_trait::async_trait;

use crate::error::DomainError;
use crate::ids::ProductOptionId;
use crate::ports::{StockRow, StockStrategy, StockTx};

#[derive(Debug, Clone, Copy, Default)]
pub struct PessimisticStock;

#[async_trait]
impl StockStrategy for PessimisticStock {
    fn name(&self) -> &'static str {
        "pessimistic"
    }

    /// The lock makes the allocation's read the current value until the commit.
    async fn claim(&self, tx: &mut dyn StockTx, ids: &[ProductOptionId]) -> Result<Vec<StockRow>, DomainError> {
        tx.lock_stock(ids).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::MockStockTx;

    #[tokio::test]
    async fn the_claim_locks_the_rows_it_reads() {
        let mut tx = MockStockTx::new();
        tx.expect_lock_stock()
            .withf(|ids| ids.iter().map(|i| i.get()).collect::<Vec<_>>() == vec![1, 2])
            .times(1)
            .returning(|_| Ok(vec![]));
        tx.expect_read_stock().never();
        let ids = [ProductOptionId::new(1).unwrap(), ProductOptionId::new(2).unwrap()];
        PessimisticStock.claim(&mut tx, &ids).await.unwrap();
    }
}
