//! Use cases, one module per aggregate. Each service holds the ports it needs as `Arc<dyn Port>`.

pub mod cart;
pub mod catalog;
pub mod orders;
pub mod users;

pub use cart::CartService;
pub use catalog::CatalogService;
pub use orders::OrderService;
pub use users::UserService;
