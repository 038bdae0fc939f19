//! `POST /api/v1/users` (sign-up), `GET /api/v1/me`, the balance and its charge.

use std::sync::Arc;

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, get, post, web};
use serde::{Deserialize, Serialize};
use shop_domain::auth::Password;
use shop_domain::idempotency::Recorder;
use shop_domain::ids::UserId;
use shop_domain::money::Money;
use shop_domain::user::{ChargeAmount, User, UserName};
use utoipa::ToSchema;
use validator::Validate;

use crate::AppState;
use crate::extract::{Caller, ValidJson};
use crate::idempotency::{Begin, IdempotencyKeyParam, KeyHeader, begin, finish, renderer, request_hash};
use crate::problem::{ApiError, Problem};

#[derive(Debug, Deserialize, Validate, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreateUserRequest {
    /// 1..=50 characters, unique among live users; surrounding blanks are trimmed. The name signs in.
    #[validate(length(min = 1, max = 50))]
    #[schema(min_length = 1, max_length = 50, example = "kim")]
    pub name: String,
    /// 8..=128 characters. Stored only as its Argon2id hash.
    #[schema(min_length = 8, max_length = 128, example = "correct horse", format = Password)]
    pub password: String,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UserResponse {
    #[schema(example = 1)]
    pub id: i64,
    #[schema(example = "kim")]
    pub name: String,
    /// Won.
    #[schema(example = 0)]
    pub balance: i64,
}

impl From<User> for UserResponse {
    fn from(user: User) -> Self {
        Self { id: user.id.get(), name: user.name, balance: user.balance.won() }
    }
}

#[derive(Debug, Serialize, Deserialize, Validate, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChargeRequest {
    /// Won, 1..=10,000,000 per charge.
    #[validate(range(min = 1, max = 10_000_000))]
    #[schema(minimum = 1, maximum = 10_000_000, example = 10_000)]
    pub amount: i64,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BalanceResponse {
    #[schema(example = 1)]
    pub user_id: i64,
    /// Won.
    #[schema(example = 10_000)]
    pub balance: i64,
}

/// Creates a user with a zero balance, who signs in with the name and password (`POST /api/v1/auth/token`).
#[utoipa::path(
    tag = "users",
    request_body = CreateUserRequest,
    responses(
        (status = 201, description = "The user", body = UserResponse),
        (status = 400, description = "VALIDATION_FAILED", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "USER_NAME_TAKEN: a live user has this name", body = Problem, content_type = "application/problem+json"),
    )
)]
#[post("/api/v1/users")]
pub async fn create_user(
    state: web::Data<AppState>,
    body: ValidJson<CreateUserRequest>,
) -> Result<HttpResponse, ApiError> {
    let name = UserName::new(&body.0.name)?;
    let password = Password::new(&body.0.password)?;
    let user = state.users.create(name, &password).await?;
    Ok(HttpResponse::Created().json(UserResponse::from(user)))
}

/// The signed-in user.
#[utoipa::path(
    tag = "users",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The caller", body = UserResponse),
        (status = 401, description = "UNAUTHORIZED: no valid access token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "USER_NOT_FOUND: the token's user is gone", body = Problem, content_type = "application/problem+json"),
    )
)]
#[get("/api/v1/me")]
pub async fn me(state: web::Data<AppState>, caller: Caller) -> Result<HttpResponse, ApiError> {
    let user = state.users.find(caller.0).await?;
    Ok(HttpResponse::Ok().json(UserResponse::from(user)))
}

/// The caller's balance.
#[utoipa::path(
    tag = "users",
    security(("bearer" = [])),
    params(("userId" = i64, Path, minimum = 1, description = "User id: the caller's")),
    responses(
        (status = 200, description = "The balance", body = BalanceResponse),
        (status = 400, description = "VALIDATION_FAILED", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "UNAUTHORIZED: no valid access token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "FORBIDDEN: the path names another user", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "USER_NOT_FOUND", body = Problem, content_type = "application/problem+json"),
    )
)]
#[get("/api/v1/users/{userId}/balance")]
pub async fn get_balance(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<i64>,
) -> Result<HttpResponse, ApiError> {
    let id = caller.must_be(UserId::new(path.into_inner())?)?;
    let balance = state.users.balance(id).await?;
    Ok(HttpResponse::Ok().json(BalanceResponse { user_id: id.get(), balance: balance.won() }))
}

/// Adds to the balance in one atomic update: concurrent charges never lose one another. With an
/// `Idempotency-Key`, a retry replays the first answer (`Idempotent-Replayed: true`) instead of charging again.
#[utoipa::path(
    tag = "users",
    security(("bearer" = [])),
    params(("userId" = i64, Path, minimum = 1, description = "User id: the caller's"), IdempotencyKeyParam),
    request_body = ChargeRequest,
    responses(
        (status = 200, description = "The new balance", body = BalanceResponse),
        (status = 400, description = "VALIDATION_FAILED", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "UNAUTHORIZED: no valid access token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "FORBIDDEN: the path names another user", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "USER_NOT_FOUND", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "IDEMPOTENCY_KEY_IN_USE: the first request with this key is still running", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "BALANCE_LIMIT_EXCEEDED: the balance would pass 1,000,000,000,000; or IDEMPOTENCY_KEY_REUSED: the key came with a different request", body = Problem, content_type = "application/problem+json"),
    )
)]
#[post("/api/v1/users/{userId}/balance/charge")]
pub async fn charge_balance(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<i64>,
    key: KeyHeader,
    body: ValidJson<ChargeRequest>,
) -> Result<HttpResponse, ApiError> {
    let id = caller.must_be(UserId::new(path.into_inner())?)?;
    let amount = ChargeAmount::new(body.0.amount)?;
    let render = Arc::new(renderer(StatusCode::OK, move |balance: &Money| BalanceResponse {
        user_id: id.get(),
        balance: balance.won(),
    }));
    let route = format!("POST /api/v1/users/{id}/balance/charge");
    let claim = match begin(&state, id, key.0, || request_hash(&route, &body.0)).await? {
        Begin::Replay(response) => return Ok(response),
        Begin::Run(claim) => claim,
    };
    let recorder = claim.as_ref().map(|c| Recorder::new(c.clone(), render.clone()));
    let outcome = state.users.charge(id, amount, recorder.as_ref()).await;
    finish(&state, claim.as_ref(), outcome, render.as_ref()).await
}
