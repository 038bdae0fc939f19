//! Use cases, one module per aggregate. Each service holds the ports it needs as `Arc<dyn Port>`.
//!
//! - [`users`], [`auth`], [`catalog`], [`cart`], [`idempotency`]: one service each.
//! - [`orders`]: placing, paying and expiring orders, in batches.
//! - [`lanes`]: the per-key queues that combine requests into batches.
//! - [`relay`]: hands the outbox's events to the sinks.

pub mod auth;
pub mod cart;
pub mod catalog;
pub mod idempotency;
pub mod lanes;
pub mod orders;
pub mod relay;
pub mod users;

pub use auth::AuthService;
pub use cart::CartService;
pub use catalog::CatalogService;
pub use idempotency::{Claimed, IdempotencyService};
pub use orders::{Combining, Events, LaneLoad, OrderService, OrderStats};
pub use relay::{Relay, RelayPolicy};
pub use users::UserService;
