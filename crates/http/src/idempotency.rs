//! The `Idempotency-Key` header on the endpoints that move money or stock: claim before running, replay the
//! stored response, and settle after.
//!
//! A handler calls [`begin`]; on [`Begin::Replay`] it answers the stored response, otherwise it hands the use
//! case a [`Recorder`] of the claim (the use case records its response inside its own transaction) and ends
//! with [`finish`].

use std::future::Ready;

use actix_web::dev::Payload;
use actix_web::http::StatusCode;
use actix_web::http::header::{CONTENT_TYPE, ContentType, HeaderName, HeaderValue};
use actix_web::{FromRequest, HttpRequest, HttpResponse};
use serde::Serialize;
use sha2::{Digest, Sha256};
use shop_domain::DomainError;
use shop_domain::idempotency::{IdempotencyClaim, IdempotencyKey, StoredResponse};
use shop_domain::ids::UserId;
use shop_domain::services::Claimed;

use crate::AppState;
use crate::problem::{ApiError, domain_problem};

pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// The `Idempotency-Key` header as the OpenAPI document describes it.
#[derive(Debug, utoipa::IntoParams)]
#[into_params(parameter_in = Header)]
pub struct IdempotencyKeyParam {
    /// 1..=255 printable ASCII characters, unique per user and intent. A retry with the same key and body replays
    /// the first response (with `Idempotent-Replayed: true`); keys are kept for 24 hours.
    #[param(rename = "Idempotency-Key", min_length = 1, max_length = 255)]
    #[allow(dead_code)]
    idempotency_key: Option<String>,
}

/// The optional `Idempotency-Key` header; a malformed one is a 400 naming it.
#[derive(Debug)]
pub struct KeyHeader(pub Option<IdempotencyKey>);

impl FromRequest for KeyHeader {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let parsed = match req.headers().get(&IDEMPOTENCY_KEY) {
            None => Ok(Self(None)),
            Some(value) => value
                .to_str()
                .map_err(|_| {
                    shop_domain::InvalidValue::new("Idempotency-Key", "must be 1 to 255 printable ASCII characters")
                })
                .and_then(IdempotencyKey::new)
                .map(|key| Self(Some(key)))
                .map_err(ApiError::from),
        };
        std::future::ready(parsed)
    }
}

/// The hash a key is bound to: the route and the parsed body, canonically serialized (object keys sorted), so
/// that the same request with other whitespace or key order is the same request.
#[must_use]
pub fn request_hash(route: &str, body: &impl Serialize) -> String {
    let canonical = serde_json::to_value(body).map(|v| v.to_string()).unwrap_or_default();
    let digest =
        Sha256::new().chain_update(route.as_bytes()).chain_update([0]).chain_update(canonical.as_bytes()).finalize();
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// A renderer for [`shop_domain::idempotency::Recorder`]: the success body with `status`, or the problem document.
pub fn renderer<T, B: Serialize>(
    status: StatusCode,
    body: impl Fn(&T) -> B + Send + Sync,
) -> impl Fn(&Result<T, DomainError>) -> StoredResponse + Send + Sync {
    move |outcome| match outcome {
        Ok(value) => {
            StoredResponse { status: status.as_u16(), body: serde_json::to_string(&body(value)).unwrap_or_default() }
        }
        Err(error) => {
            let problem = domain_problem(error);
            StoredResponse { status: problem.status, body: serde_json::to_string(&problem).unwrap_or_default() }
        }
    }
}

/// What the handler does next.
#[derive(Debug)]
pub enum Begin {
    /// Answer this: the same request already ran.
    Replay(HttpResponse),
    /// Run the use case, recording into this claim when there is one.
    Run(Option<IdempotencyClaim>),
}

/// Claims the key when the request has one.
///
/// # Errors
/// 422 `IDEMPOTENCY_KEY_REUSED`, 409 `IDEMPOTENCY_KEY_IN_USE`.
pub async fn begin(
    state: &AppState,
    user: UserId,
    key: Option<IdempotencyKey>,
    hash: impl FnOnce() -> String,
) -> Result<Begin, ApiError> {
    let Some(key) = key else { return Ok(Begin::Run(None)) };
    match state.idempotency.claim(user, &key, &hash()).await? {
        Claimed::Run(claim) => Ok(Begin::Run(Some(claim))),
        Claimed::Replay(stored) => Ok(Begin::Replay(replay(&stored))),
    }
}

fn replay(stored: &StoredResponse) -> HttpResponse {
    let status = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let content_type = if status.is_success() { "application/json" } else { "application/problem+json" };
    HttpResponse::build(status)
        .insert_header((CONTENT_TYPE, content_type))
        .insert_header((IDEMPOTENT_REPLAYED, HeaderValue::from_static("true")))
        .body(stored.body.clone())
}

/// Settles the claim (records an outcome that committed nothing, or releases the key after a 5xx) and turns the
/// outcome into the response.
///
/// # Errors
/// The use case's error, as its problem response.
pub async fn finish<T>(
    state: &AppState,
    claim: Option<&IdempotencyClaim>,
    outcome: Result<T, DomainError>,
    render: &(dyn Fn(&Result<T, DomainError>) -> StoredResponse + Send + Sync),
) -> Result<HttpResponse, ApiError> {
    let response = render(&outcome);
    if let (Some(claim), Err(_)) = (claim, &outcome) {
        // A success was recorded by the use case inside its own transaction; only failures are settled here.
        state.idempotency.settle(claim, &response).await?;
    }
    outcome?;
    let status = StatusCode::from_u16(response.status).unwrap_or(StatusCode::OK);
    Ok(HttpResponse::build(status).content_type(ContentType::json()).body(response.body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_ignores_key_order_and_whitespace_but_not_values_or_routes() {
        let a: serde_json::Value =
            serde_json::from_str(r#"{"userId": 1, "items": [{"quantity": 1, "productOptionId": 2}]}"#).unwrap();
        let b: serde_json::Value =
            serde_json::from_str(r#"{"items":[{"productOptionId":2,"quantity":1}],"userId":1}"#).unwrap();
        let c: serde_json::Value =
            serde_json::from_str(r#"{"items":[{"productOptionId":2,"quantity":2}],"userId":1}"#).unwrap();
        assert_eq!(request_hash("POST /api/v1/orders", &a), request_hash("POST /api/v1/orders", &b));
        assert_ne!(request_hash("POST /api/v1/orders", &a), request_hash("POST /api/v1/orders", &c));
        assert_ne!(request_hash("POST /api/v1/orders", &a), request_hash("POST /api/v1/orders/1/payment", &a));
        assert_eq!(request_hash("x", &a).len(), 64);
    }
}
