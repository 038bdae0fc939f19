//! SeaORM migrations of the shop schema.
//!
//! [`Migrator`] lists every migration in order; apply them with
//! `Migrator::up(&db, None)` and roll them back with `Migrator::down(&db, None)`
//! ([`MigratorTrait`] is re-exported so callers need no direct dependency on
//! `sea-orm-migration`). Each migration is written with the portable schema
//! builder and runs unchanged on PostgreSQL and SQLite, inside one transaction
//! on both backends.

pub use sea_orm_migration::MigratorTrait;
use sea_orm_migration::prelude::*;

mod m20261125_000001_initial_schema;
mod m20261125_000002_option_fence_token;
mod m20261125_000003_idempotency_keys;
mod m20261202_000004_accounts;
mod m20261202_000005_upper_bounds;
mod m20261203_000006_outbox;
mod m20261203_000007_live_products_index;
mod m20261203_000008_outbox_handed_over_to;

/// The ordered list of the shop's schema migrations.
#[derive(Debug, Clone, Copy, Default)]
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261125_000001_initial_schema::Migration),
            Box::new(m20261125_000002_option_fence_token::Migration),
            Box::new(m20261125_000003_idempotency_keys::Migration),
            Box::new(m20261202_000004_accounts::Migration),
            Box::new(m20261202_000005_upper_bounds::Migration),
            Box::new(m20261203_000006_outbox::Migration),
            Box::new(m20261203_000007_live_products_index::Migration),
            Box::new(m20261203_000008_outbox_handed_over_to::Migration),
        ]
    }
}
