//! The tasks every instance runs beside the server: the sweeper of unpaid orders and expired idempotency keys,
//! and the reconciliation of the `redis-optimistic` stock mirror. Several instances may run them all at once.

use std::time::Duration;

use shop_domain::services::{AuthService, IdempotencyService, OrderService, Relay};
use shop_redis::RedisOptimisticStock;

/// Every `interval`, for as long as the server runs: reconciles the stock mirror. Several instances may all
/// run it: a repair is a watched transaction, and an option that moves meanwhile is left for the next run.
pub async fn reconcile_periodically(mirror: RedisOptimisticStock, interval: Duration) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate; a freshly started instance has nothing of its own to repair yet.
    ticks.tick().await;
    loop {
        ticks.tick().await;
        match mirror.reconcile().await {
            Ok(report) if report.repairs.is_empty() && report.busy.is_empty() => {}
            Ok(report) => tracing::info!(
                checked = report.checked,
                repaired = report.repairs.len(),
                busy = report.busy.len(),
                "reconciled the stock mirror"
            ),
            Err(e) => tracing::warn!(error = %e, "reconciling the stock mirror failed; it runs again next interval"),
        }
    }
}

/// Every `interval`, for as long as the server runs: cancels unpaid orders past the timeout and deletes expired
/// idempotency keys and refresh tokens, and the events past the outbox's retention that every sink has had.
/// Each order is cancelled, and its stock given back, exactly once.
pub async fn sweep(
    orders: OrderService,
    idempotency: IdempotencyService,
    auth: AuthService,
    relay: Option<Relay>,
    timeout: Duration,
    interval: Duration,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        match orders.expire_overdue(timeout, 100).await {
            Ok(0) => {}
            Ok(cancelled) => tracing::info!(cancelled, "cancelled unpaid orders past the payment timeout"),
            Err(e) => tracing::warn!(error = %e, "the overdue-order sweep failed; it runs again next interval"),
        }
        match idempotency.purge_expired().await {
            Ok(0) => {}
            Ok(purged) => tracing::info!(purged, "deleted expired idempotency keys"),
            Err(e) => tracing::warn!(error = %e, "the idempotency-key purge failed; it runs again next interval"),
        }
        match auth.purge_expired().await {
            Ok(0) => {}
            Ok(purged) => tracing::info!(purged, "deleted expired refresh tokens"),
            Err(e) => tracing::warn!(error = %e, "the refresh-token purge failed; it runs again next interval"),
        }
        if let Some(relay) = &relay {
            match relay.prune().await {
                Ok(0) => {}
                Ok(pruned) => tracing::info!(pruned, "deleted delivered events past the retention"),
                Err(e) => tracing::warn!(error = %e, "the outbox prune failed; it runs again next interval"),
            }
        }
    }
}
