//! SeaORM entities of the shop schema, one module per table (see the `shop-migrations` crate).
//!
//! Enum-like columns (`status`, `method`) are plain `String`s here; their allowed values are
//! enforced by CHECK constraints in the database and mapped to domain enums by the adapters.

pub mod app_secret;
pub mod cart;
pub mod daily_popular_product;
pub mod idempotency_key;
pub mod order;
pub mod order_item;
pub mod outbox_delivery;
pub mod outbox_event;
pub mod payment;
pub mod product;
pub mod product_option;
pub mod refresh_token;
pub mod user;
