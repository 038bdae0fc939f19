//! Upper bounds on stock and balance, beside the lower bounds of the initial schema: an option holds at most
//! 1,000,000,000 units and a user at most 1,000,000,000,000 won, what the domain's `Stock` and `Money` accept
//! when a row is read back. The domain never writes past them; the constraints make sure nothing else does.
//!
//! PostgreSQL gets named CHECK constraints. SQLite cannot add a constraint to an existing table, so it gets
//! triggers of the same names that abort the insert or update.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DatabaseBackend;

#[derive(DeriveMigrationName)]
pub struct Migration;

/// (table, column, upper bound, rule name).
const BOUNDS: [(&str, &str, i64, &str); 2] = [
    ("product_options", "stock", 1_000_000_000, "ck_product_options_stock_max"),
    ("users", "balance", 1_000_000_000_000, "ck_users_balance_max"),
];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        for (table, column, max, name) in BOUNDS {
            let sql = match manager.get_database_backend() {
                DatabaseBackend::Sqlite => format!(
                    "CREATE TRIGGER {name}_insert BEFORE INSERT ON {table} WHEN NEW.{column} > {max} \
                     BEGIN SELECT RAISE(ABORT, '{name}'); END; \
                     CREATE TRIGGER {name}_update BEFORE UPDATE OF {column} ON {table} WHEN NEW.{column} > {max} \
                     BEGIN SELECT RAISE(ABORT, '{name}'); END;"
                ),
                _ => format!("ALTER TABLE {table} ADD CONSTRAINT {name} CHECK ({column} <= {max})"),
            };
            db.execute_unprepared(&sql).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        for (table, _, _, name) in BOUNDS {
            let sql = match manager.get_database_backend() {
                DatabaseBackend::Sqlite => {
                    format!("DROP TRIGGER IF EXISTS {name}_insert; DROP TRIGGER IF EXISTS {name}_update;")
                }
                _ => format!("ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {name}"),
            };
            db.execute_unprepared(&sql).await?;
        }
        Ok(())
    }
}
