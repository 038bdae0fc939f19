//! The cart: list, add (merging into the option's line), delete.

use actix_web::{HttpResponse, delete, get, post, web};
use serde::{Deserialize, Serialize};
use shop_domain::cart::CartItem;
use shop_domain::ids::{CartItemId, ProductOptionId, UserId};
use shop_domain::money::Quantity;
use utoipa::ToSchema;
use validator::Validate;

use crate::AppState;
use crate::extract::{Caller, ValidJson};
use crate::problem::{ApiError, Problem};

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CartItemResponse {
    #[schema(example = 1)]
    pub id: i64,
    #[schema(example = 4)]
    pub product_option_id: i64,
    #[schema(example = 2)]
    pub product_id: i64,
    #[schema(example = "Oxford shirt")]
    pub product_name: String,
    #[schema(example = "M / black")]
    pub option_name: String,
    /// Won, the option's current price.
    #[schema(example = 19_000)]
    pub price: i64,
    #[schema(example = 2)]
    pub quantity: i64,
}

impl From<CartItem> for CartItemResponse {
    fn from(i: CartItem) -> Self {
        Self {
            id: i.id.get(),
            product_option_id: i.product_option_id.get(),
            product_id: i.product_id.get(),
            product_name: i.product_name,
            option_name: i.option_name,
            price: i.price.won(),
            quantity: i.quantity,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CartResponse {
    pub items: Vec<CartItemResponse>,
}

#[derive(Debug, Deserialize, Validate, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AddCartItemRequest {
    #[validate(range(min = 1))]
    #[schema(minimum = 1, example = 4)]
    pub product_option_id: i64,
    /// 1..=1000; added to the line when the option is already in the cart (the line may hold at most 1000).
    #[validate(range(min = 1, max = 1000))]
    #[schema(minimum = 1, maximum = 1000, example = 2)]
    pub quantity: i64,
}

/// The caller's cart, oldest line first.
#[utoipa::path(
    tag = "cart",
    security(("bearer" = [])),
    params(("userId" = i64, Path, minimum = 1, description = "User id: the caller's")),
    responses(
        (status = 200, description = "The cart", body = CartResponse),
        (status = 400, description = "VALIDATION_FAILED", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "UNAUTHORIZED: no valid access token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "FORBIDDEN: the path names another user", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "USER_NOT_FOUND", body = Problem, content_type = "application/problem+json"),
    )
)]
#[get("/api/v1/users/{userId}/cart")]
pub async fn get_cart(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<i64>,
) -> Result<HttpResponse, ApiError> {
    let user = caller.must_be(UserId::new(path.into_inner())?)?;
    let items = state.cart.list(user).await?;
    Ok(HttpResponse::Ok().json(CartResponse { items: items.into_iter().map(CartItemResponse::from).collect() }))
}

/// Adds units of an option; an option already in the cart has its line's quantity increased.
#[utoipa::path(
    tag = "cart",
    security(("bearer" = [])),
    params(("userId" = i64, Path, minimum = 1, description = "User id: the caller's")),
    request_body = AddCartItemRequest,
    responses(
        (status = 201, description = "The cart line as it now is", body = CartItemResponse),
        (status = 400, description = "VALIDATION_FAILED", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "UNAUTHORIZED: no valid access token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "FORBIDDEN: the path names another user", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "USER_NOT_FOUND or PRODUCT_OPTION_NOT_FOUND", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "CART_QUANTITY_LIMIT_EXCEEDED: the line would hold more than 1000", body = Problem, content_type = "application/problem+json"),
    )
)]
#[post("/api/v1/users/{userId}/cart/items")]
pub async fn add_cart_item(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<i64>,
    body: ValidJson<AddCartItemRequest>,
) -> Result<HttpResponse, ApiError> {
    let user = caller.must_be(UserId::new(path.into_inner())?)?;
    let option = ProductOptionId::new(body.0.product_option_id)?;
    let quantity = Quantity::new(body.0.quantity)?;
    let item = state.cart.add(user, option, quantity).await?;
    Ok(HttpResponse::Created().json(CartItemResponse::from(item)))
}

/// Removes a line from the caller's cart.
#[utoipa::path(
    tag = "cart",
    security(("bearer" = [])),
    params(
        ("userId" = i64, Path, minimum = 1, description = "User id: the caller's"),
        ("cartItemId" = i64, Path, minimum = 1, description = "Cart line id"),
    ),
    responses(
        (status = 204, description = "Removed"),
        (status = 400, description = "VALIDATION_FAILED", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "UNAUTHORIZED: no valid access token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "FORBIDDEN: the path names another user", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "USER_NOT_FOUND, or CART_ITEM_NOT_FOUND (also for another user's line)", body = Problem, content_type = "application/problem+json"),
    )
)]
#[delete("/api/v1/users/{userId}/cart/items/{cartItemId}")]
pub async fn delete_cart_item(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<(i64, i64)>,
) -> Result<HttpResponse, ApiError> {
    let (user, item) = path.into_inner();
    let user = caller.must_be(UserId::new(user)?)?;
    let item = CartItemId::new(item)?;
    state.cart.remove(user, item).await?;
    Ok(HttpResponse::NoContent().finish())
}
