//! Signing in: `POST /api/v1/auth/token`, `/refresh` and `/logout`.

use actix_web::{HttpRequest, HttpResponse, post, web};
use serde::{Deserialize, Serialize};
use shop_domain::auth::{RefreshToken, Session};
use utoipa::ToSchema;
use validator::Validate;

use crate::AppState;
use crate::extract::ValidJson;
use crate::problem::{ApiError, Problem};

#[derive(Debug, Deserialize, Validate, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenRequest {
    #[schema(example = "kim")]
    pub name: String,
    #[schema(example = "correct horse", format = Password)]
    pub password: String,
}

#[derive(Debug, Deserialize, Validate, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RefreshRequest {
    /// The refresh token of the last sign-in or refresh.
    #[schema(example = "6f1c0a4e9d7b2c3a5e8f0b1d2c4a6e8f0a1b3c5d7e9f1a3b5c7d9e1f3a5b7c9d")]
    pub refresh_token: String,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionResponse {
    #[schema(example = 1)]
    pub user_id: i64,
    /// `Bearer`.
    #[schema(example = "Bearer")]
    pub token_type: &'static str,
    /// A signed JWT for `Authorization: Bearer`, valid `expiresIn` seconds.
    #[schema(example = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl")]
    pub access_token: String,
    #[schema(example = 900)]
    pub expires_in: u64,
    /// Opaque; exchange it at `/api/v1/auth/refresh` for a new pair. Each use retires it.
    #[schema(example = "6f1c0a4e9d7b2c3a5e8f0b1d2c4a6e8f0a1b3c5d7e9f1a3b5c7d9e1f3a5b7c9d")]
    pub refresh_token: String,
}

impl From<Session> for SessionResponse {
    fn from(s: Session) -> Self {
        Self {
            user_id: s.user_id.get(),
            token_type: "Bearer",
            access_token: s.access.token,
            expires_in: s.access.expires_in.as_secs(),
            refresh_token: s.refresh.expose().to_owned(),
        }
    }
}

/// The client's address, as the throttle counts it: the peer, or (behind a proxy the settings trust) the
/// address the proxy forwarded.
fn client_address(req: &HttpRequest, state: &AppState) -> Option<String> {
    let info = req.connection_info();
    let address = if state.trust_forwarded_for { info.realip_remote_addr() } else { info.peer_addr() };
    // The port differs per connection; the address is the client.
    address.map(|a| a.parse::<std::net::SocketAddr>().map_or_else(|_| a.to_owned(), |s| s.ip().to_string()))
}

/// Signs in: an access token (`Authorization: Bearer`, short-lived) and a refresh token. A wrong name and a
/// wrong password are the same answer. Repeated failures for one name, or from one address, are refused for a
/// while with 429 and `Retry-After`, right password or not.
#[utoipa::path(
    tag = "auth",
    request_body = TokenRequest,
    responses(
        (status = 200, description = "A new session", body = SessionResponse),
        (status = 400, description = "VALIDATION_FAILED", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "INVALID_CREDENTIALS: wrong name or password", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "TOO_MANY_ATTEMPTS: too many failures for this name or address; retry after Retry-After seconds", body = Problem, content_type = "application/problem+json"),
    )
)]
#[post("/api/v1/auth/token")]
pub async fn sign_in(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: ValidJson<TokenRequest>,
) -> Result<HttpResponse, ApiError> {
    let client = client_address(&req, &state);
    let session = state.auth.sign_in(&body.0.name, &body.0.password, client.as_deref()).await?;
    Ok(HttpResponse::Ok().json(SessionResponse::from(session)))
}

/// Exchanges a refresh token for a new pair; the old one is retired. A retired token presented again revokes
/// every token of its sign-in (it was copied).
#[utoipa::path(
    tag = "auth",
    request_body = RefreshRequest,
    responses(
        (status = 200, description = "A new session of the same sign-in", body = SessionResponse),
        (status = 400, description = "VALIDATION_FAILED", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "INVALID_TOKEN: unknown, expired, retired or revoked", body = Problem, content_type = "application/problem+json"),
    )
)]
#[post("/api/v1/auth/refresh")]
pub async fn refresh(state: web::Data<AppState>, body: ValidJson<RefreshRequest>) -> Result<HttpResponse, ApiError> {
    let token = RefreshToken::new(&body.0.refresh_token)?;
    let session = state.auth.refresh(&token).await?;
    Ok(HttpResponse::Ok().json(SessionResponse::from(session)))
}

/// Signs out: revokes every refresh token of this sign-in. Access tokens already issued expire on their own.
#[utoipa::path(
    tag = "auth",
    request_body = RefreshRequest,
    responses(
        (status = 204, description = "Signed out"),
        (status = 400, description = "VALIDATION_FAILED", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "INVALID_TOKEN: unknown, expired, retired or revoked", body = Problem, content_type = "application/problem+json"),
    )
)]
#[post("/api/v1/auth/logout")]
pub async fn logout(state: web::Data<AppState>, body: ValidJson<RefreshRequest>) -> Result<HttpResponse, ApiError> {
    let token = RefreshToken::new(&body.0.refresh_token)?;
    state.auth.logout(&token).await?;
    Ok(HttpResponse::NoContent().finish())
}
