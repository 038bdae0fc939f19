//! `conditional`: one `UPDATE ... SET stock = stock - n WHERE id = ? AND stock >= n` per option of a batch. No
//! lock is taken before the write; the row's own write lock lasts from the UPDATE to the commit, which is the
//! shortest any strategy can hold it. Everything it needs is the port's default behaviour.

use async_trait::async_trait;

use crate::ports::StockStrategy;

#[derive(Debug, Clone, Copy, Default)]
pub struct ConditionalStock;

#[async_trait]
impl StockStrategy for ConditionalStock {
    fn name(&self) -> &'static str {
        "conditional"
    }
}
