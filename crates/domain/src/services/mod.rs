//! Use cases, one module per aggregate. Each service holds the ports it needs as `Arc<dyn Port>`.

mod batch;
pub mod cart;
pub mod catalog;
pub mod combiner;
pub mod idempotency;
pub mod orders;
pub mod users;

pub use cart::CartService;
pub use catalog::CatalogService;
pub use idempotency::{Claimed, IdempotencyService};
pub use orders::{OrderService, OrderStats};
pub use users::UserService;
