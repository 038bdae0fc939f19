//! Extractors that answer problem documents: a JSON body that names the field at fault, the caller of a
//! user-scoped route (its bearer access token), and the admin token.

use std::future::Future;
use std::pin::Pin;

use actix_web::dev::Payload;
use actix_web::error::PayloadError;
use actix_web::http::header;
use actix_web::{FromRequest, HttpRequest, web};
use serde::de::DeserializeOwned;
use validator::Validate;

use sha2::{Digest, Sha256};
use shop_domain::ids::UserId;
use subtle::ConstantTimeEq;

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
        let bytes = body(req, payload);
        Box::pin(async move { valid(&bytes.await?).map(Self) })
    }
}

/// [`ValidJson`] for a body that may be left out: an empty body is `T::default()`.
#[derive(Debug)]
pub struct OptionalJson<T>(pub T);

impl<T: DeserializeOwned + Validate + Default + 'static> FromRequest for OptionalJson<T> {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let bytes = body(req, payload);
        Box::pin(async move {
            let bytes = bytes.await?;
            if bytes.iter().all(u8::is_ascii_whitespace) { Ok(Self(T::default())) } else { valid(&bytes).map(Self) }
        })
    }
}

/// The request's body, within [`MAX_BODY_BYTES`].
fn body(req: &HttpRequest, payload: &mut Payload) -> impl Future<Output = Result<web::Bytes, ApiError>> + use<> {
    let bytes = web::Bytes::from_request(req, payload);
    async move {
        bytes.await.map_err(|e| match e.as_error::<PayloadError>() {
            Some(PayloadError::Overflow) => ApiError::PayloadTooLarge { limit: MAX_BODY_BYTES },
            _ => ApiError::Validation { field: "body".into(), detail: format!("body: {e}") },
        })
    }
}

/// A body that parses and passes its `validator` rules.
fn valid<T: DeserializeOwned + Validate>(bytes: &[u8]) -> Result<T, ApiError> {
    let value = parse::<T>(bytes)?;
    value.validate()?;
    Ok(value)
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

/// The bearer token of `Authorization`, the scheme matched case-insensitively (RFC 7235); `None` when the header
/// is missing or is not a bearer token.
fn bearer(req: &HttpRequest) -> Option<&str> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The user a request acts for: the subject of a valid access token in `Authorization: Bearer`. The one place
/// identity comes from; a missing, malformed, expired or badly signed token is 401 `UNAUTHORIZED` with
/// `WWW-Authenticate: Bearer`. Checking it reads no database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller(pub UserId);

impl Caller {
    /// That the caller is `user` (a path's `{userId}`, a body's `userId`).
    ///
    /// # Errors
    /// [`ApiError::Forbidden`] for anyone else.
    pub fn must_be(self, user: UserId) -> Result<UserId, ApiError> {
        if self.0 == user { Ok(user) } else { Err(ApiError::Forbidden) }
    }
}

impl FromRequest for Caller {
    type Error = ApiError;
    type Future = std::future::Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        std::future::ready(caller(req))
    }
}

fn caller(req: &HttpRequest) -> Result<Caller, ApiError> {
    let state = req.app_data::<web::Data<AppState>>().ok_or(ApiError::Unauthorized)?;
    let token = bearer(req).ok_or(ApiError::Unauthorized)?;
    let user = state.tokens.verify_access(token, state.clock.now()).map_err(|_| ApiError::Unauthorized)?;
    Ok(Caller(user))
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
    let given = bearer(req).ok_or(ApiError::Unauthorized)?;
    if same_secret(given.as_bytes(), expected.as_bytes()) { Ok(Admin) } else { Err(ApiError::Unauthorized) }
}

/// Compares two secrets in time that depends on neither: both are hashed to 32 bytes first, so not even their
/// lengths show, and the digests are compared without an early exit.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    Sha256::digest(a).ct_eq(&Sha256::digest(b)).into()
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
    fn secret_comparison() {
        assert!(same_secret(b"secret", b"secret"));
        assert!(!same_secret(b"secret", b"secreT"));
        assert!(!same_secret(b"secret", b"secret2"));
        assert!(!same_secret(b"", b"secret"));
    }
}
