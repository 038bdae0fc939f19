//! `x-request-id` on every response (echoed when the client sent a sane one), one tracing span per request, the
//! access log (one `info` line per request, target `shop::access`) and the request-duration histogram.

use std::time::Instant;

use actix_web::HttpMessage;
use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;
use tracing::Instrument;

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The request id of a request, for handlers that log.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

fn sane(id: &str) -> bool {
    (1..=128).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_graphic())
}

/// Middleware: tags the request with its id, stamps the id on the response, logs one access line and records the
/// request's duration by method, route template and status class.
///
/// # Errors
/// Only what the inner service itself fails with; handler errors arrive here as problem responses.
pub async fn middleware(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let id = req
        .headers()
        .get(&X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| sane(v))
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned);
    req.extensions_mut().insert(RequestId(id.clone()));
    let span = tracing::info_span!("request", method = %req.method(), path = %req.path(), request_id = %id);
    let started = Instant::now();
    // Handlers and extractors answer their errors as responses, so an `Err` here is actix's own failure.
    let mut res = next.call(req).instrument(span.clone()).await?.map_into_boxed_body();
    if let Ok(value) = HeaderValue::from_str(&id) {
        res.headers_mut().insert(X_REQUEST_ID, value);
    }
    let status = res.status().as_u16();
    let elapsed = started.elapsed();
    // The route template, never the path: bounded label values, and no ids or tokens in the series.
    let route = res.request().match_pattern().unwrap_or_else(|| "unmatched".to_owned());
    let method = known_method(res.request().method());
    metrics::histogram!(
        "shop_http_request_duration_seconds",
        "method" => method, "route" => route.clone(), "status" => status_class(status)
    )
    .record(elapsed);
    // The path without its query string: a query may carry what a log must not.
    tracing::info!(
        target: "shop::access",
        method,
        route = %route,
        path = %res.request().path(),
        status,
        latency_ms = elapsed.as_secs_f64() * 1000.0,
        request_id = %id,
        "request"
    );
    Ok(res)
}

/// The method as a label: the standard ones, anything else `OTHER` (a client must not grow the series).
fn known_method(method: &actix_web::http::Method) -> &'static str {
    use actix_web::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

/// `2xx`, `4xx` ...
const fn status_class(status: u16) -> &'static str {
    match status / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        _ => "5xx",
    }
}
