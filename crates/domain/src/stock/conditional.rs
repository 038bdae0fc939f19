//! `conditional`: one `UPDATE ... SET stock = stock - n WHERE id = ? AND stock >= n` per line. No lock is taken
//! before the write; the row's own write lock lasts from the UPDATE to the commit, which is the shortest any
//! strategy can hold it.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::{StockPermit, StockStrategy};
use crate::error::DomainError;
use crate::order::OrderLine;
use crate::ports::Transaction;

#[derive(Debug, Clone, Copy, Default)]
pub struct ConditionalStock;

#[async_trait]
impl StockStrategy for ConditionalStock {
    fn name(&self) -> &'static str {
        "conditional"
    }

    async fn take(
        &self,
        tx: &mut dyn Transaction,
        lines: &[OrderLine],
        _permit: &StockPermit,
        now: DateTime<Utc>,
    ) -> Result<(), DomainError> {
        for line in lines {
            if !tx.decrement_stock(line.option_id, line.quantity, now).await? {
                return Err(DomainError::OutOfStock { option_id: line.option_id });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::ProductOptionId;
    use crate::money::Quantity;
    use crate::ports::MockTransaction;

    fn line(id: i64) -> OrderLine {
        OrderLine { option_id: ProductOptionId::new(id).unwrap(), quantity: Quantity::new(1).unwrap() }
    }

    #[tokio::test]
    async fn stops_at_the_first_short_line() {
        let mut tx = MockTransaction::new();
        let mut seq = mockall::Sequence::new();
        tx.expect_decrement_stock().times(1).in_sequence(&mut seq).returning(|id, _, _| Ok(id.get() == 1));
        tx.expect_decrement_stock().times(1).in_sequence(&mut seq).returning(|_, _, _| Ok(false));
        let err = ConditionalStock
            .take(&mut tx, &[line(1), line(2), line(3)], &StockPermit::none(), Utc::now())
            .await
            .unwrap_err();
        assert!(matches!(err, DomainError::OutOfStock { option_id } if option_id.get() == 2));
    }
}
