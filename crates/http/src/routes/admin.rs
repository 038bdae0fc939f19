//! The admin API: create products, set stock. Needs `Authorization: Bearer <SHOP_ADMIN_TOKEN>`.

use actix_web::{HttpResponse, post, put, web};
use serde::{Deserialize, Serialize};
use shop_domain::ids::ProductOptionId;
use shop_domain::money::Stock;
use shop_domain::product::{NewOption, NewProduct, ProductStatus};
use utoipa::ToSchema;
use validator::Validate;

use crate::AppState;
use crate::extract::{Admin, ValidJson};
use crate::problem::{ApiError, Problem};
use crate::routes::products::{OptionResponse, ProductResponse};

#[derive(Debug, Serialize, Deserialize, Validate, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NewOptionRequest {
    #[validate(length(min = 1, max = 100))]
    #[schema(min_length = 1, max_length = 100, example = "M / black")]
    pub name: String,
    /// Won, 0..=1,000,000,000.
    #[validate(range(min = 0, max = 1_000_000_000))]
    #[schema(minimum = 0, maximum = 1_000_000_000, example = 19_000)]
    pub price: i64,
    /// 0..=1,000,000,000 units.
    #[validate(range(min = 0, max = 1_000_000_000))]
    #[schema(minimum = 0, maximum = 1_000_000_000, example = 100)]
    pub stock: i64,
}

#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ProductStatusDto {
    Active,
    Inactive,
}

#[derive(Debug, Deserialize, Validate, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreateProductRequest {
    #[validate(length(min = 1, max = 200))]
    #[schema(min_length = 1, max_length = 200, example = "Oxford shirt")]
    pub name: String,
    /// `ACTIVE` when left out.
    pub status: Option<ProductStatusDto>,
    /// 1..=50 options with distinct names.
    #[validate(length(min = 1, max = 50), nested)]
    #[schema(min_items = 1, max_items = 50)]
    pub options: Vec<NewOptionRequest>,
}

#[derive(Debug, Deserialize, Validate, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SetStockRequest {
    /// The units on hand, 0..=1,000,000,000.
    #[validate(range(min = 0, max = 1_000_000_000))]
    #[schema(minimum = 0, maximum = 1_000_000_000, example = 1000)]
    pub stock: i64,
}

/// Creates a product with its options.
#[utoipa::path(
    tag = "admin",
    security(("admin_token" = [])),
    request_body = CreateProductRequest,
    responses(
        (status = 201, description = "The product", body = ProductResponse),
        (status = 400, description = "VALIDATION_FAILED", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "UNAUTHORIZED: missing or wrong token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "ADMIN_DISABLED: no admin token is configured", body = Problem, content_type = "application/problem+json"),
    )
)]
#[post("/api/v1/admin/products")]
pub async fn create_product(
    _: Admin,
    state: web::Data<AppState>,
    body: ValidJson<CreateProductRequest>,
) -> Result<HttpResponse, ApiError> {
    let body = body.0;
    let options =
        body.options.iter().map(|o| NewOption::new(&o.name, o.price, o.stock)).collect::<Result<Vec<_>, _>>()?;
    let status = match body.status {
        None | Some(ProductStatusDto::Active) => ProductStatus::Active,
        Some(ProductStatusDto::Inactive) => ProductStatus::Inactive,
    };
    let product = state.catalog.create(NewProduct::new(&body.name, status, options)?).await?;
    Ok(HttpResponse::Created().json(ProductResponse::from(product)))
}

/// Sets an option's stock to a counted figure.
#[utoipa::path(
    tag = "admin",
    security(("admin_token" = [])),
    params(("optionId" = i64, Path, minimum = 1, description = "Product option id")),
    request_body = SetStockRequest,
    responses(
        (status = 200, description = "The option", body = OptionResponse),
        (status = 400, description = "VALIDATION_FAILED", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "UNAUTHORIZED", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "ADMIN_DISABLED", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "PRODUCT_OPTION_NOT_FOUND", body = Problem, content_type = "application/problem+json"),
    )
)]
#[put("/api/v1/admin/product-options/{optionId}/stock")]
pub async fn set_stock(
    _: Admin,
    state: web::Data<AppState>,
    path: web::Path<i64>,
    body: ValidJson<SetStockRequest>,
) -> Result<HttpResponse, ApiError> {
    let id = ProductOptionId::new(path.into_inner())?;
    let stock = Stock::new(body.0.stock)?;
    let option = state.catalog.set_stock(id, stock).await?;
    Ok(HttpResponse::Ok().json(OptionResponse::from(option)))
}
