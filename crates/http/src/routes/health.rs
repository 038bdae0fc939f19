//! Liveness and readiness.

use std::collections::BTreeMap;

use actix_web::{HttpResponse, get, web};
use serde::Serialize;
use utoipa::ToSchema;

use crate::AppState;
use crate::problem::{ApiError, Problem};

#[derive(Debug, Serialize, ToSchema)]
pub struct HealthResponse {
    /// `UP`.
    #[schema(example = "UP")]
    pub status: &'static str,
    /// Each dependency asked, and its answer.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub checks: BTreeMap<&'static str, &'static str>,
}

/// The process is up.
#[utoipa::path(tag = "health", responses((status = 200, description = "Up", body = HealthResponse)))]
#[get("/health/live")]
pub async fn live() -> HttpResponse {
    HttpResponse::Ok().json(HealthResponse { status: "UP", checks: BTreeMap::new() })
}

/// The database (and Redis, when configured) answer.
#[utoipa::path(
    tag = "health",
    responses(
        (status = 200, description = "Ready", body = HealthResponse),
        (status = 503, description = "NOT_READY: a dependency does not answer", body = Problem, content_type = "application/problem+json"),
    )
)]
#[get("/health/ready")]
pub async fn ready(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let mut checks = BTreeMap::new();
    let mut down = Vec::new();
    for probe in &state.probes {
        match probe.ping().await {
            Ok(()) => {
                checks.insert(probe.name(), "UP");
            }
            Err(e) => {
                tracing::warn!(dependency = probe.name(), error = %e, "readiness check failed");
                down.push(probe.name());
            }
        }
    }
    if down.is_empty() {
        Ok(HttpResponse::Ok().json(HealthResponse { status: "UP", checks }))
    } else {
        Err(ApiError::NotReady(format!("{} did not answer", down.join(", "))))
    }
}

/// Counters of how orders met their stock strategy, in the Prometheus text format.
#[utoipa::path(
    tag = "health",
    responses((status = 200, description = "Prometheus text exposition", body = String, content_type = "text/plain"))
)]
#[get("/metrics")]
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    use std::fmt::Write as _;
    use std::sync::atomic::Ordering::Relaxed;
    let stats = state.orders.stats();
    let strategy = state.orders.stock_strategy();
    let mut text = String::new();
    for (name, help, value) in [
        ("shop_orders_placed_total", "Orders committed.", stats.placed.load(Relaxed)),
        (
            "shop_orders_refused_early_total",
            "Orders refused by the stock read before any transaction.",
            stats.refused_early.load(Relaxed),
        ),
        (
            "shop_order_retries_total",
            "Order transactions retried after an optimistic conflict.",
            stats.retries.load(Relaxed),
        ),
        (
            "shop_stock_lock_acquisitions_total",
            "Stock locks taken before the transaction.",
            stats.lock_acquisitions.load(Relaxed),
        ),
        (
            "shop_stock_lock_wait_microseconds_total",
            "Time spent waiting for those locks.",
            stats.lock_wait_micros.load(Relaxed),
        ),
        (
            "shop_order_batches_total",
            "Order batches committed, each in one transaction (combining on).",
            stats.order_batches.load(Relaxed),
        ),
        (
            "shop_payment_batches_total",
            "Payment batches committed, each in one transaction (combining on).",
            stats.payment_batches.load(Relaxed),
        ),
        (
            "shop_batch_splits_total",
            "Batches whose transaction failed and whose requests were committed one at a time.",
            stats.batch_splits.load(Relaxed),
        ),
    ] {
        let _ =
            writeln!(text, "# HELP {name} {help}\n# TYPE {name} counter\n{name}{{strategy=\"{strategy}\"}} {value}");
    }
    HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(text)
}
