//! Connecting to PostgreSQL or SQLite, and running the migrations.

use std::time::Duration;

use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, DbErr};
use shop_migrations::{Migrator, MigratorTrait};

/// How the pool is sized and how long a request may wait for a connection.
#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    pub max_connections: u32,
    /// A request that cannot get a connection in this time fails instead of queueing forever.
    pub acquire_timeout: Duration,
    /// PostgreSQL: the longest one statement may run (`statement_timeout` of every session).
    pub statement_timeout: Duration,
    /// The longest one statement may wait for a lock: PostgreSQL's `lock_timeout` of every session, SQLite's
    /// busy timeout (how long a writer waits for another to finish before "database is locked").
    pub lock_timeout: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            max_connections: 16,
            acquire_timeout: Duration::from_secs(10),
            statement_timeout: Duration::from_secs(30),
            lock_timeout: Duration::from_secs(10),
        }
    }
}

/// Opens a pool. SQLite gets WAL and a busy timeout (the lock timeout) so that writers on several connections
/// queue instead of failing with "database is locked" at once, and enforced foreign keys.
///
/// # Errors
/// The driver's error when the database cannot be reached or opened.
pub async fn connect(url: &str, pool: PoolSettings) -> Result<DatabaseConnection, DbErr> {
    let mut options = ConnectOptions::new(url.to_owned());
    options
        .max_connections(pool.max_connections)
        .min_connections(1)
        .acquire_timeout(pool.acquire_timeout)
        .sqlx_logging(false);
    if url.starts_with("postgres") {
        // Set at connect time on every session, so that no request waits on the database past its budget; a
        // statement cut short answers 503, not a hung request.
        let (statement, lock) =
            (pool.statement_timeout.as_millis().to_string(), pool.lock_timeout.as_millis().to_string());
        options.map_sqlx_postgres_opts(move |o| {
            o.options([("statement_timeout", statement.as_str()), ("lock_timeout", lock.as_str())])
        });
    }
    if url.starts_with("sqlite:") {
        options.map_sqlx_sqlite_opts(move |o| {
            o.journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(pool.lock_timeout)
                .foreign_keys(true)
                .create_if_missing(true)
        });
    }
    Database::connect(options).await
}

/// An arbitrary constant naming the migration lock among the database's advisory locks.
const MIGRATION_LOCK: i64 = 0x5348_4f50_4d49_4752; // "SHOPMIGR"

/// Applies every pending migration. On PostgreSQL several instances may start at once over one database: a
/// session-level advisory lock, held on a connection of its own, lets one migrate while the others wait and
/// then find nothing pending.
///
/// # Errors
/// The migration's error; nothing of a failed migration is kept (each runs in a transaction).
pub async fn migrate(db: &DatabaseConnection, url: &str) -> Result<(), DbErr> {
    if db.get_database_backend() != DbBackend::Postgres {
        return Migrator::up(db, None).await;
    }
    let mut options = ConnectOptions::new(url.to_owned());
    options.max_connections(1).sqlx_logging(false);
    let lock = Database::connect(options).await?;
    lock.execute_unprepared(&format!("SELECT pg_advisory_lock({MIGRATION_LOCK})")).await?;
    let migrated = Migrator::up(db, None).await;
    lock.execute_unprepared(&format!("SELECT pg_advisory_unlock({MIGRATION_LOCK})")).await?;
    lock.close().await?;
    migrated
}

/// Whether the store can lock rows (`SELECT ... FOR NO KEY UPDATE`): PostgreSQL can, SQLite silently cannot.
#[must_use]
pub fn supports_row_locks(db: &DatabaseConnection) -> bool {
    matches!(db.get_database_backend(), DbBackend::Postgres)
}
