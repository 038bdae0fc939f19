//! The admin API of the outbox: the events recorded, where each stands with every sink, and the retry of a
//! dead-lettered one. Needs `Authorization: Bearer <SHOP_ADMIN_TOKEN>`.

use actix_web::{HttpResponse, get, post, web};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use shop_domain::events::{DeliveryStatus, EventRecord};
use shop_domain::page::PageRequest;
use shop_domain::{DomainError, InvalidValue};
use utoipa::{IntoParams, ToSchema};

use crate::AppState;
use crate::extract::{Admin, ValidQuery};
use crate::problem::{ApiError, Problem};

/// `?status=pending|delivered|failed&page=1&size=20`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// `pending` (not yet with every sink), `delivered` (every sink has it) or `failed` (a sink dead-lettered
    /// it); every event when left out.
    #[param(example = "failed")]
    pub status: Option<String>,
    /// From 1.
    #[param(minimum = 1, default = 1)]
    pub page: Option<i64>,
    /// 1..=100.
    #[param(minimum = 1, maximum = 100, default = 20)]
    pub size: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryResponse {
    /// `redis-stream`, `webhook:<url>` or `log`.
    #[schema(example = "webhook:https://hooks.example.com/shop")]
    pub sink: String,
    /// `pending`, `delivered` or `failed`.
    #[schema(example = "failed")]
    pub status: &'static str,
    #[schema(example = 10)]
    pub attempts: u32,
    pub last_error: Option<String>,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub delivered_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventResponse {
    /// The event's id: what consumers deduplicate by.
    #[schema(example = "0f8e2a8c-8d0e-4c5b-9a57-3f1d2b6c7e90")]
    pub id: String,
    /// `order.created`, `payment.completed` or `order.cancelled`.
    #[serde(rename = "type")]
    #[schema(example = "order.created")]
    pub kind: &'static str,
    #[schema(example = 1)]
    pub order_id: i64,
    pub occurred_at: DateTime<Utc>,
    /// Where it stands overall: `failed` if any sink dead-lettered it, else `pending` until every sink has it.
    #[schema(example = "delivered")]
    pub status: &'static str,
    /// One per sink, once the relay has handed the event over.
    pub deliveries: Vec<DeliveryResponse>,
    /// The envelope every sink receives.
    #[schema(value_type = Object)]
    pub envelope: serde_json::Value,
}

impl From<EventRecord> for EventResponse {
    fn from(record: EventRecord) -> Self {
        let status = record.status().as_str();
        let e = record.event;
        Self {
            envelope: serde_json::from_str(&e.envelope).unwrap_or(serde_json::Value::Null),
            id: e.id,
            kind: e.kind.as_str(),
            order_id: e.order_id.get(),
            occurred_at: e.occurred_at,
            status,
            deliveries: record
                .deliveries
                .into_iter()
                .map(|d| DeliveryResponse {
                    status: d.status.as_str(),
                    attempts: d.attempts,
                    last_error: d.last_error,
                    next_attempt_at: d.next_attempt_at,
                    delivered_at: d.delivered_at,
                    sink: d.sink,
                })
                .collect(),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventPage {
    pub items: Vec<EventResponse>,
    #[schema(example = 1)]
    pub page: u64,
    #[schema(example = 20)]
    pub size: u64,
    #[schema(example = 1)]
    pub total: u64,
}

fn relay(state: &AppState) -> Result<&shop_domain::services::Relay, ApiError> {
    state
        .relay
        .as_ref()
        .ok_or_else(|| ApiError::Domain(DomainError::unavailable("the outbox is off (SHOP_OUTBOX=false)")))
}

/// The events recorded, newest first, with where each stands with every sink.
#[utoipa::path(
    tag = "admin",
    security(("admin_token" = [])),
    params(EventsQuery),
    responses(
        (status = 200, description = "A page of events", body = EventPage),
        (status = 400, description = "VALIDATION_FAILED", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "UNAUTHORIZED", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "ADMIN_DISABLED", body = Problem, content_type = "application/problem+json"),
    )
)]
#[get("/api/v1/admin/events")]
pub async fn list_events(
    _: Admin,
    state: web::Data<AppState>,
    ValidQuery(query): ValidQuery<EventsQuery>,
) -> Result<HttpResponse, ApiError> {
    let status = query
        .status
        .as_deref()
        .map(|s| s.parse::<DeliveryStatus>())
        .transpose()
        .map_err(|e: InvalidValue| ApiError::from(e))?;
    let page = PageRequest::new(query.page.unwrap_or(1), query.size.unwrap_or(PageRequest::DEFAULT_SIZE))?;
    let page = relay(&state)?.list(status, page).await?;
    Ok(HttpResponse::Ok().json(EventPage {
        items: page.items.into_iter().map(EventResponse::from).collect(),
        page: page.page,
        size: page.size,
        total: page.total,
    }))
}

/// Re-queues a dead-lettered event: its failed deliveries go back to pending, due at once, attempts reset.
#[utoipa::path(
    tag = "admin",
    security(("admin_token" = [])),
    params(("eventId" = String, Path, description = "The event's id")),
    responses(
        (status = 202, description = "Re-queued: the event as it now stands", body = EventResponse),
        (status = 401, description = "UNAUTHORIZED", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "ADMIN_DISABLED", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "EVENT_NOT_FOUND", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "EVENT_NOT_FAILED: no sink dead-lettered it", body = Problem, content_type = "application/problem+json"),
    )
)]
#[post("/api/v1/admin/events/{eventId}/retry")]
pub async fn retry_event(
    _: Admin,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let record = relay(&state)?.retry(&path.into_inner()).await?;
    Ok(HttpResponse::Accepted().json(EventResponse::from(record)))
}
