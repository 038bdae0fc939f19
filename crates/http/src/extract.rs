//! Extractors that answer problem documents: a JSON body that names the field at fault, and the admin token.

use std::future::Future;
use std::pin::Pin;

use actix_web::dev::Payload;
use actix_web::error::PayloadError;
use actix_web::http::header;
use actix_web::{FromRequest, HttpRequest, web};
use serde::de::DeserializeOwned;
use validator::Validate;

use crate::AppState;
use crate::problem::ApiError;

/// The largest body any endpoint accepts: an order of 50 lines is about 3 KiB.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// A JSON body that deserialized and passed its `validator` rules. A malformed body, a wrong type or a missing
/// field is a 400 `VALIDATION_FAILED` naming the field (`items[0].quantity`), never a plain-text actix error.
#[derive(Debug)]
pub struct ValidJson<T>(pub T);

impl<T: DeserializeOwned + Validate + 'static> FromRequest for ValidJson<T> {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let bytes = web::Bytes::from_request(req, payload);
        Box::pin(async move {
            let bytes = bytes.await.map_err(|e| match e.as_error::<PayloadError>() {
                Some(PayloadError::Overflow) => ApiError::PayloadTooLarge { limit: MAX_BODY_BYTES },
                _ => ApiError::Validation { field: "body".into(), detail: format!("body: {e}") },
            })?;
            let value = parse::<T>(&bytes)?;
            value.validate()?;
            Ok(Self(value))
        })
    }
}

fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::Validation { field: "body".into(), detail: "body: a JSON body is required".into() });
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { "body".to_owned() } else { path };
        let inner = e.into_inner();
        // serde_json already names a missing field; strip its position, which only matters to a parser.
        let message = inner.to_string();
        let message = message.split(" at line ").next().unwrap_or(&message).to_owned();
        ApiError::Validation { detail: format!("{field}: {message}"), field }
    })
}

/// A query string that deserialized, naming the parameter at fault (`page: invalid digit found in string`).
#[derive(Debug)]
pub struct ValidQuery<T>(pub T);

impl<T: DeserializeOwned> FromRequest for ValidQuery<T> {
    type Error = ApiError;
    type Future = std::future::Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(req.query_string().as_bytes()));
        std::future::ready(serde_path_to_error::deserialize(de).map(Self).map_err(|e| {
            let field = match e.path().to_string() {
                path if path == "." => "query".to_owned(),
                path => path,
            };
            ApiError::Validation { detail: format!("{field}: {}", e.into_inner()), field }
        }))
    }
}

/// Proof that the request carries the configured admin token.
#[derive(Debug)]
pub struct Admin;

impl FromRequest for Admin {
    type Error = ApiError;
    type Future = std::future::Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        std::future::ready(check_admin(req))
    }
}

fn check_admin(req: &HttpRequest) -> Result<Admin, ApiError> {
    let state = req.app_data::<web::Data<AppState>>().ok_or(ApiError::AdminDisabled)?;
    let expected = state.admin_token.as_deref().ok_or(ApiError::AdminDisabled)?;
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or(ApiError::Unauthorized)?;
    if constant_time_eq(given.trim().as_bytes(), expected.as_bytes()) { Ok(Admin) } else { Err(ApiError::Unauthorized) }
}

/// Compares without an early exit, so response time does not tell how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    #[allow(dead_code)]
    struct Line {
        product_option_id: i64,
        quantity: i64,
    }

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Body {
        items: Vec<Line>,
    }

    fn field_of(json: &str) -> String {
        match parse::<Body>(json.as_bytes()) {
            Err(ApiError::Validation { field, .. }) => field,
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn wrong_types_name_their_field() {
        assert_eq!(field_of(r#"{"items":[{"productOptionId":1,"quantity":"two"}]}"#), "items[0].quantity");
    }

    #[test]
    fn missing_fields_and_malformed_json_are_validation_errors() {
        assert_eq!(field_of(r#"{"items":[{"quantity":1}]}"#), "items[0]");
        assert_eq!(field_of(r#"{"items": ["#), "items");
        assert_eq!(field_of(""), "body");
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
    }
}
