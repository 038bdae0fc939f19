//! The persistence adapter: SeaORM implementations of the domain's repository, unit-of-work and probe ports,
//! one code path for PostgreSQL and SQLite.
//!
//! SeaORM models never leave this crate: every adapter converts rows into domain types. It depends on
//! `shop-domain` and `shop-migrations`, never on HTTP or Redis.
//!
//! - [`db`]: connecting (SQLite in WAL mode with a busy timeout) and migrating.
//! - [`users`], [`products`], [`carts`], [`orders`]: the repositories.
//! - [`uow`]: the unit of work and its transaction.
//! - [`idempotency`]: the Idempotency-Key store.
//! - [`sessions`]: the refresh tokens of signed-in sessions, and the secrets an embedded deployment keeps.
//! - [`probe`]: the readiness probe.
//! - [`seed`]: the demo data of an empty embedded database.
//! - [`entity`]: the SeaORM entities.

pub mod carts;
pub mod db;
pub mod entity;
mod error;
pub mod idempotency;
pub mod orders;
pub mod outbox;
pub mod probe;
pub mod products;
pub mod seed;
pub mod sessions;
pub mod uow;
pub mod users;

pub use carts::SeaCartRepository;
pub use db::{PoolSettings, connect, migrate, supports_row_locks};
pub use idempotency::SeaIdempotencyStore;
pub use orders::SeaOrderRepository;
pub use outbox::SeaOutbox;
pub use probe::DatabaseProbe;
pub use products::SeaProductRepository;
pub use sessions::{SeaSessionStore, stored_secret};
pub use uow::SeaUnitOfWork;
pub use users::SeaUserRepository;
