//! The stock strategies (one named implementation of [`StockStrategy`](crate::ports::StockStrategy) each), and
//! the one rule of who gets stock.
//!
//! - [`allocate`]: arrival order, each order all of its lines or none: what every strategy's batch and the
//!   Redis mirror decide with.
//! - [`conditional`]: `UPDATE ... WHERE stock >= n`; no lock at all (the default).
//! - [`pessimistic`]: row locks (`SELECT ... FOR NO KEY UPDATE`) from the claim to the commit.
//! - [`optimistic`]: compare-and-set on the version; the batch is retried on conflict.
//! - [`local`]: an in-process mutex per option around the transaction (single instance only).
//!
//! The Redis strategies live in `shop-redis`, on the same port.

pub mod allocate;
pub mod conditional;
pub mod local;
pub mod optimistic;
pub mod pessimistic;

pub use allocate::{Allocation, allocate};
pub use conditional::ConditionalStock;
pub use local::{LocalLockStock, OptionLocks, OptionTurn};
pub use optimistic::OptimisticStock;
pub use pessimistic::PessimisticStock;
