//! Liveness and readiness.

use std::collections::BTreeMap;
use std::time::Duration;

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

/// How long `/health/ready` waits for each dependency. Each probe has a connection budget of its own (the
/// database probe its own one-connection pool), so the answer comes within this bound even when a sale keeps
/// every pooled connection busy.
pub const READY_BUDGET: Duration = Duration::from_secs(1);

/// The database (and Redis, when configured) answer, each within [`READY_BUDGET`], asked at once.
///
/// A balancer should take an instance out of rotation while this answers 503 (the problem's `checks` name the
/// dependency that is `DOWN`) and put it back once it answers 200; `/health/live` says whether to restart it.
#[utoipa::path(
    tag = "health",
    responses(
        (status = 200, description = "Ready", body = HealthResponse),
        (status = 503, description = "NOT_READY: a dependency does not answer in time; `checks` names it", body = Problem, content_type = "application/problem+json"),
    )
)]
#[get("/health/ready")]
pub async fn ready(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let answers = futures::future::join_all(state.probes.iter().map(|probe| async move {
        let answer = match tokio::time::timeout(READY_BUDGET, probe.ping()).await {
            Ok(Ok(())) => return (probe.name(), UP),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {} ms", READY_BUDGET.as_millis()),
        };
        tracing::warn!(dependency = probe.name(), error = %answer, "readiness check failed");
        (probe.name(), DOWN)
    }))
    .await;
    let checks: BTreeMap<_, _> = answers.into_iter().collect();
    let down: Vec<_> = checks.iter().filter(|(_, answer)| **answer == DOWN).map(|(name, _)| *name).collect();
    if down.is_empty() {
        Ok(HttpResponse::Ok().json(HealthResponse { status: UP, checks }))
    } else {
        Err(ApiError::NotReady { detail: format!("{} did not answer", down.join(", ")), checks })
    }
}

const UP: &str = "UP";
const DOWN: &str = "DOWN";

/// The service's metrics in the Prometheus text format: request latency by route, stock waits, batch sizes and
/// commit times, lane and pool gauges, and the order counters (the README lists every series).
#[utoipa::path(
    tag = "health",
    responses((status = 200, description = "Prometheus text exposition", body = String, content_type = "text/plain"))
)]
#[get("/metrics")]
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain; version=0.0.4").body((state.metrics)())
}
