//! The shop's domain: aggregates and their rules, the ports the use cases need, and the use cases themselves.
//!
//! This crate does no I/O and must never depend on sea-orm, fred, actix or utoipa (`.ci/run` checks it with
//! `cargo tree`): adapters depend on it, not the other way round.
//!
//! - [`ids`], [`money`]: typed ids, money and quantities; invalid values cannot be built.
//! - [`user`], [`product`], [`cart`], [`order`], [`payment`], [`sales`]: one module per aggregate.
//! - [`auth`]: passwords, tokens and sessions, and the cap on what one user holds unpaid.
//! - [`idempotency`]: Idempotency-Key claims and the responses they replay.
//! - [`events`]: the events other systems act on, recorded in the outbox, and their delivery.
//! - [`page`]: paging of lists.
//! - [`error`]: [`DomainError`], the one error type of every use case.
//! - [`ports`]: repositories, the unit of work and the roles of a transaction, the stock strategy port, clock,
//!   events, probes.
//! - [`services`]: the use cases, and the lanes that combine orders and payments into batches.
//! - [`stock`]: the allocation rule and the stock strategies order batches are configured with.

pub mod auth;
pub mod cart;
pub mod error;
pub mod events;
pub mod idempotency;
pub mod ids;
pub mod money;
pub mod order;
pub mod page;
pub mod payment;
pub mod ports;
pub mod product;
pub mod sales;
pub mod services;
pub mod stock;
pub mod user;

pub use error::{DomainError, InvalidValue};
