//! Orders and payment.

use std::sync::Arc;

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, get, post, web};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use shop_domain::idempotency::Recorder;
use shop_domain::ids::{OrderId, ProductOptionId, UserId};
use shop_domain::money::Quantity;
use shop_domain::order::{Order, OrderLine, OrderRequest};
use shop_domain::payment::Payment;
use utoipa::ToSchema;
use validator::Validate;

use crate::AppState;
use crate::connection;
use crate::extract::{Caller, OptionalJson, ValidJson, ValidQuery};
use crate::idempotency::{Begin, IdempotencyKeyParam, KeyHeader, begin, finish, renderer, request_hash};
use crate::problem::{ApiError, Problem};
use crate::routes::products::PageQuery;

#[derive(Debug, Serialize, Deserialize, Validate, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrderLineRequest {
    #[validate(range(min = 1))]
    #[schema(minimum = 1, example = 4)]
    pub product_option_id: i64,
    /// 1..=1000; lines of the same option are merged and their sum must stay within 1000.
    #[validate(range(min = 1, max = 1000))]
    #[schema(minimum = 1, maximum = 1000, example = 1)]
    pub quantity: i64,
}

#[derive(Debug, Serialize, Deserialize, Validate, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreateOrderRequest {
    /// Optional; when given, the caller's id.
    #[validate(range(min = 1))]
    #[schema(minimum = 1, example = 1)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<i64>,
    /// 1..=50 lines.
    #[validate(length(min = 1, max = 50), nested)]
    #[schema(min_items = 1, max_items = 50)]
    pub items: Vec<OrderLineRequest>,
}

#[derive(Debug, Default, Serialize, Deserialize, Validate, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PayRequest {
    /// Optional; when given, the caller's id (the order's owner).
    #[validate(range(min = 1))]
    #[schema(minimum = 1, example = 1)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrderItemResponse {
    #[schema(example = 4)]
    pub product_option_id: i64,
    #[schema(example = "Oxford shirt")]
    pub product_name: String,
    #[schema(example = "M / black")]
    pub option_name: String,
    #[schema(example = 2)]
    pub quantity: i64,
    /// Won, the price when ordered.
    #[schema(example = 19_000)]
    pub unit_price: i64,
    #[schema(example = 38_000)]
    pub total_price_at_order: i64,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PaymentResponse {
    #[schema(example = 1)]
    pub id: i64,
    #[schema(example = 1)]
    pub order_id: i64,
    /// `PENDING`, `COMPLETED` or `FAILED`.
    #[schema(example = "COMPLETED")]
    pub status: &'static str,
    /// `BALANCE`.
    #[schema(example = "BALANCE")]
    pub method: &'static str,
    /// Won.
    #[schema(example = 38_000)]
    pub amount: i64,
    /// When it completed; null until then.
    pub paid_at: Option<DateTime<Utc>>,
}

impl From<Payment> for PaymentResponse {
    fn from(p: Payment) -> Self {
        Self {
            id: p.id.get(),
            order_id: p.order_id.get(),
            status: p.status.as_str(),
            method: p.method.as_str(),
            amount: p.amount.won(),
            paid_at: p.paid_at,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrderResponse {
    #[schema(example = 1)]
    pub id: i64,
    #[schema(example = 1)]
    pub user_id: i64,
    /// `PENDING_PAYMENT` (stock held), `PAID` or `CANCELLED`.
    #[schema(example = "PENDING_PAYMENT")]
    pub status: &'static str,
    /// Won.
    #[schema(example = 38_000)]
    pub total_price: i64,
    pub ordered_at: DateTime<Utc>,
    pub items: Vec<OrderItemResponse>,
    pub payment: PaymentResponse,
}

impl From<Order> for OrderResponse {
    fn from(o: Order) -> Self {
        Self {
            id: o.id.get(),
            user_id: o.user_id.get(),
            status: o.status.as_str(),
            total_price: o.total_price.won(),
            ordered_at: o.ordered_at,
            items: o
                .items
                .into_iter()
                .map(|i| OrderItemResponse {
                    product_option_id: i.product_option_id.get(),
                    product_name: i.product_name,
                    option_name: i.option_name,
                    quantity: i.quantity.get(),
                    unit_price: i.unit_price.won(),
                    total_price_at_order: i.total_price.won(),
                })
                .collect(),
            payment: PaymentResponse::from(o.payment),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrderPage {
    pub items: Vec<OrderResponse>,
    #[schema(example = 1)]
    pub page: u64,
    #[schema(example = 20)]
    pub size: u64,
    #[schema(example = 1)]
    pub total: u64,
}

/// Places an order: takes the stock of every line at once or of none, holds it until payment (or expiry), and
/// takes the ordered options out of the user's cart. The same option twice is one line. With an
/// `Idempotency-Key`, a retry replays the first answer (the same order) instead of ordering again.
#[utoipa::path(
    tag = "orders",
    security(("bearer" = [])),
    params(IdempotencyKeyParam),
    request_body = CreateOrderRequest,
    responses(
        (status = 201, description = "The order, PENDING_PAYMENT with a PENDING payment", body = OrderResponse),
        (status = 400, description = "VALIDATION_FAILED", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "UNAUTHORIZED: no valid access token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "FORBIDDEN: the body's userId is another user", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "USER_NOT_FOUND or PRODUCT_OPTION_NOT_FOUND", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "OUT_OF_STOCK (names the option in productOptionId) or PRODUCT_NOT_ON_SALE, nothing was taken; PENDING_LIMIT_EXCEEDED: the caller holds as many unpaid orders or units as one user may; or IDEMPOTENCY_KEY_IN_USE", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "IDEMPOTENCY_KEY_REUSED: the key came with a different request", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "LOCK_TIMEOUT: the stock could not be had in time; or SERVICE_UNAVAILABLE: too many orders wait for this option, or a dependency is down. Nothing was taken; retry after Retry-After seconds", body = Problem, content_type = "application/problem+json"),
    )
)]
#[post("/api/v1/orders")]
pub async fn create_order(
    req: HttpRequest,
    state: web::Data<AppState>,
    caller: Caller,
    key: KeyHeader,
    body: ValidJson<CreateOrderRequest>,
) -> Result<HttpResponse, ApiError> {
    let body = body.0;
    let user = match body.user_id {
        Some(named) => caller.must_be(UserId::new(named)?)?,
        None => caller.0,
    };
    let lines = body
        .items
        .iter()
        .map(|l| {
            Ok(OrderLine {
                option_id: ProductOptionId::new(l.product_option_id)?,
                quantity: Quantity::new(l.quantity)?,
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let request = OrderRequest::new(user, lines)?;
    let render = Arc::new(renderer(StatusCode::CREATED, |order: &Order| OrderResponse::from(order.clone())));
    // The request as it acts: the caller's, whether or not the body named them.
    let acting = serde_json::json!({"userId": user.get(), "items": &body.items});
    let claim = match begin(&state, user, key.0, || request_hash("POST /api/v1/orders", &acting)).await? {
        Begin::Replay(response) => return Ok(response),
        Begin::Run(claim) => claim,
    };
    let recorder = claim.as_ref().map(|c| Recorder::new(c.clone(), render.clone()));
    let outcome = state.orders.place(request, recorder.as_ref(), connection::of(&req)).await;
    finish(&state, claim.as_ref(), outcome, render.as_ref()).await
}

/// One of the caller's orders, with its items and payment.
#[utoipa::path(
    tag = "orders",
    security(("bearer" = [])),
    params(("orderId" = i64, Path, minimum = 1, description = "Order id")),
    responses(
        (status = 200, description = "The order", body = OrderResponse),
        (status = 400, description = "VALIDATION_FAILED", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "UNAUTHORIZED: no valid access token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "ORDER_NOT_FOUND (also for another user's order)", body = Problem, content_type = "application/problem+json"),
    )
)]
#[get("/api/v1/orders/{orderId}")]
pub async fn get_order(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<i64>,
) -> Result<HttpResponse, ApiError> {
    let order = state.orders.get_for(OrderId::new(path.into_inner())?, caller.0).await?;
    Ok(HttpResponse::Ok().json(OrderResponse::from(order)))
}

/// The caller's orders, newest first.
#[utoipa::path(
    tag = "orders",
    security(("bearer" = [])),
    params(("userId" = i64, Path, minimum = 1, description = "User id: the caller's"), PageQuery),
    responses(
        (status = 200, description = "A page of orders", body = OrderPage),
        (status = 400, description = "VALIDATION_FAILED", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "UNAUTHORIZED: no valid access token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "FORBIDDEN: the path names another user", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "USER_NOT_FOUND", body = Problem, content_type = "application/problem+json"),
    )
)]
#[get("/api/v1/users/{userId}/orders")]
pub async fn list_orders(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<i64>,
    ValidQuery(query): ValidQuery<PageQuery>,
) -> Result<HttpResponse, ApiError> {
    let user = caller.must_be(UserId::new(path.into_inner())?)?;
    let page = state.orders.list(user, query.parse()?).await?;
    Ok(HttpResponse::Ok().json(OrderPage {
        items: page.items.into_iter().map(OrderResponse::from).collect(),
        page: page.page,
        size: page.size,
        total: page.total,
    }))
}

/// Pays one of the caller's orders from their balance. Of concurrent payments of one order exactly one succeeds.
/// The body may be empty (`{}`). With an `Idempotency-Key`, a retry replays the first answer.
#[utoipa::path(
    tag = "orders",
    security(("bearer" = [])),
    params(("orderId" = i64, Path, minimum = 1, description = "Order id"), IdempotencyKeyParam),
    request_body = PayRequest,
    responses(
        (status = 200, description = "The payment, COMPLETED; the order is PAID", body = PaymentResponse),
        (status = 400, description = "VALIDATION_FAILED", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "UNAUTHORIZED: no valid access token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "FORBIDDEN: the body's userId is another user", body = Problem, content_type = "application/problem+json"),
        (status = 402, description = "INSUFFICIENT_BALANCE: the payment FAILED, the order is CANCELLED and its stock given back", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "ORDER_NOT_FOUND (also for another user's order)", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "ORDER_NOT_PAYABLE: the order is not PENDING_PAYMENT; or IDEMPOTENCY_KEY_IN_USE", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "IDEMPOTENCY_KEY_REUSED: the key came with a different request", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "SERVICE_UNAVAILABLE: too many payments wait, or a dependency is down; nothing was done, retry after Retry-After seconds", body = Problem, content_type = "application/problem+json"),
    )
)]
#[post("/api/v1/orders/{orderId}/payment")]
pub async fn pay_order(
    req: HttpRequest,
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<i64>,
    key: KeyHeader,
    body: OptionalJson<PayRequest>,
) -> Result<HttpResponse, ApiError> {
    let order = OrderId::new(path.into_inner())?;
    let user = match body.0.user_id {
        Some(named) => caller.must_be(UserId::new(named)?)?,
        None => caller.0,
    };
    let render = Arc::new(renderer(StatusCode::OK, |payment: &Payment| PaymentResponse::from(payment.clone())));
    let route = format!("POST /api/v1/orders/{order}/payment");
    let acting = serde_json::json!({"userId": user.get()});
    let claim = match begin(&state, user, key.0, || request_hash(&route, &acting)).await? {
        Begin::Replay(response) => return Ok(response),
        Begin::Run(claim) => claim,
    };
    let recorder = claim.as_ref().map(|c| Recorder::new(c.clone(), render.clone()));
    let outcome = state.orders.pay(order, user, recorder.as_ref(), connection::of(&req)).await;
    finish(&state, claim.as_ref(), outcome, render.as_ref()).await
}
