//! The binary's commands besides serving: `migrate`, and `reconcile` of the `redis-optimistic` stock mirror.

use std::sync::Arc;

use shop_persistence::SeaOrderRepository;
use shop_redis::ReconcileReport;

use crate::config::{ConfigError, Settings, StockStrategy as StockStrategyName};
use crate::startup::{StartupError, connect_and_migrate};
use crate::wiring;

/// `shop-server migrate`: applies pending migrations.
///
/// # Errors
/// [`StartupError::Database`] when the database cannot be reached or migrated.
pub async fn migrate(settings: &Settings) -> Result<(), StartupError> {
    let db = connect_and_migrate(settings).await?;
    db.close().await.ok();
    Ok(())
}

/// `shop-server reconcile`: compares the `redis-optimistic` stock mirror with the database once, repairs what
/// drifted (each repair is also logged) and reports it.
///
/// # Errors
/// [`StartupError::Config`] when the configured strategy keeps no mirror; [`StartupError::Database`] or
/// [`StartupError::Redis`] when either cannot be reached; [`StartupError::Reconcile`] when a step failed.
pub async fn reconcile(settings: &Settings) -> Result<ReconcileReport, StartupError> {
    settings.validate()?;
    if settings.stock_strategy != StockStrategyName::RedisOptimistic {
        return Err(ConfigError::Invalid {
            key: "SHOP_STOCK_STRATEGY",
            message: format!(
                "{} keeps no stock mirror to reconcile: reconcile applies to redis-optimistic",
                settings.stock_strategy
            ),
        }
        .into());
    }
    let db = shop_persistence::connect(&settings.database_url, settings.pool(2))
        .await
        .map_err(StartupError::database(settings))?;
    let prefix = wiring::stock_prefix(settings, &db, chrono::Utc::now()).await?;
    let mirror = wiring::redis_optimistic(settings, Arc::new(SeaOrderRepository::new(db.clone())), prefix).await?;
    let report = mirror.reconcile().await.map_err(StartupError::Reconcile);
    db.close().await.ok();
    report
}
