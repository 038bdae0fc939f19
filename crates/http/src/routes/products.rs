//! The catalogue: paged list, one product, and the popular-products ranking.

use actix_web::{HttpRequest, HttpResponse, get, web};
use chrono::NaiveDate;
use serde::{Deserialize, Serialize};
use shop_domain::ids::ProductId;
use shop_domain::page::PageRequest;
use shop_domain::product::{Product, ProductOption};
use shop_domain::sales::{PopularProduct, RankingLimit};
use utoipa::{IntoParams, ToSchema};

use crate::AppState;
use crate::extract::ValidQuery;
use crate::problem::{ApiError, Problem};

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OptionResponse {
    #[schema(example = 1)]
    pub id: i64,
    #[schema(example = 1)]
    pub product_id: i64,
    #[schema(example = "M / black")]
    pub name: String,
    /// Won.
    #[schema(example = 19_000)]
    pub price: i64,
    #[schema(example = 100)]
    pub stock: i64,
}

impl From<ProductOption> for OptionResponse {
    fn from(o: ProductOption) -> Self {
        Self {
            id: o.id.get(),
            product_id: o.product_id.get(),
            name: o.name,
            price: o.price.won(),
            stock: o.stock.get(),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProductResponse {
    #[schema(example = 1)]
    pub id: i64,
    #[schema(example = "Oxford shirt")]
    pub name: String,
    /// `ACTIVE` (on sale) or `INACTIVE`.
    #[schema(example = "ACTIVE")]
    pub status: &'static str,
    pub options: Vec<OptionResponse>,
}

impl From<Product> for ProductResponse {
    fn from(p: Product) -> Self {
        Self {
            id: p.id.get(),
            name: p.name,
            status: p.status.as_str(),
            options: p.options.into_iter().map(OptionResponse::from).collect(),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProductPage {
    pub items: Vec<ProductResponse>,
    #[schema(example = 1)]
    pub page: u64,
    #[schema(example = 20)]
    pub size: u64,
    /// How many products there are in all.
    #[schema(example = 3)]
    pub total: u64,
}

/// `If-None-Match`, as the OpenAPI document describes it.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Header)]
pub struct IfNoneMatchParam {
    /// The `ETag` of a copy the client holds: answered 304 with no body while it is current.
    #[param(rename = "If-None-Match")]
    #[allow(dead_code)]
    if_none_match: Option<String>,
}

/// `?page=1&size=20`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// From 1.
    #[param(minimum = 1, default = 1)]
    pub page: Option<i64>,
    /// 1..=100.
    #[param(minimum = 1, maximum = 100, default = 20)]
    pub size: Option<i64>,
}

impl PageQuery {
    pub(crate) fn parse(&self) -> Result<PageRequest, ApiError> {
        Ok(PageRequest::new(self.page.unwrap_or(1), self.size.unwrap_or(PageRequest::DEFAULT_SIZE))?)
    }
}

/// Products on the shelf (not soft-deleted), by id, with their options. Served from the instance's cache: the
/// stock shown is at most `SHOP_CATALOGUE_MAX_STALENESS` old (1 s by default), and current at once after a change
/// this deployment made when Redis carries the news between instances.
#[utoipa::path(
    tag = "products",
    params(PageQuery, IfNoneMatchParam),
    responses(
        (status = 200, description = "A page of products", body = ProductPage, headers(("ETag" = String, description = "This version of the response"), ("Cache-Control" = String, description = "public, max-age: how long the instance itself may serve it unchanged"))),
        (status = 304, description = "Not modified: the If-None-Match tag is this version (no body)"),
        (status = 400, description = "VALIDATION_FAILED", body = Problem, content_type = "application/problem+json"),
    )
)]
#[get("/api/v1/products")]
pub async fn list_products(
    request: HttpRequest,
    state: web::Data<AppState>,
    ValidQuery(query): ValidQuery<PageQuery>,
) -> Result<HttpResponse, ApiError> {
    let wanted = query.parse()?;
    let (catalog, cache) = (state.catalog.clone(), state.catalogue_cache.clone());
    let cached = state
        .catalogue_cache
        .page(wanted.page(), wanted.size(), async move {
            // The count (when the cache does not hold it) and the page at once: one round trip for a miss.
            let (total, items) = futures::try_join!(cache.total(catalog.count()), catalog.list_items(wanted))?;
            let shown: Vec<(i64, i64)> =
                items.iter().flat_map(|p| p.options.iter().map(move |o| (p.id.get(), o.id.get()))).collect();
            let body = ProductPage {
                items: items.into_iter().map(ProductResponse::from).collect(),
                page: wanted.page(),
                size: wanted.size(),
                total,
            };
            Ok((body, shown))
        })
        .await?;
    Ok(cached.respond(&request))
}

/// `?from=2026-11-23&to=2026-11-25&limit=5`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PopularQuery {
    /// First day (inclusive), `YYYY-MM-DD`. Default: two days before `to`.
    pub from: Option<NaiveDate>,
    /// Last day (inclusive), `YYYY-MM-DD`. Default: today (UTC).
    pub to: Option<NaiveDate>,
    /// 1..=50.
    #[param(minimum = 1, maximum = 50, default = 5)]
    pub limit: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PopularItem {
    #[schema(example = 1)]
    pub rank: u32,
    #[schema(example = 3)]
    pub product_id: i64,
    #[schema(example = "Oxford shirt")]
    pub name: String,
    /// Units sold in paid orders over the range.
    #[schema(example = 42)]
    pub total_sold: i64,
}

impl From<PopularProduct> for PopularItem {
    fn from(p: PopularProduct) -> Self {
        Self { rank: p.rank, product_id: p.product_id.get(), name: p.name, total_sold: p.total_sold }
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PopularResponse {
    #[schema(value_type = String, format = Date, example = "2026-11-23")]
    pub from: NaiveDate,
    #[schema(value_type = String, format = Date, example = "2026-11-25")]
    pub to: NaiveDate,
    pub items: Vec<PopularItem>,
}

/// Best sellers: units sold in paid orders, summed per product over `from..=to`, best first, ties by product
/// id. The range may span at most 92 days.
#[utoipa::path(
    tag = "products",
    params(PopularQuery, IfNoneMatchParam),
    responses(
        (status = 200, description = "The ranking", body = PopularResponse, headers(("ETag" = String, description = "This version of the response"), ("Cache-Control" = String, description = "public, max-age: how long the instance itself may serve it unchanged"))),
        (status = 304, description = "Not modified: the If-None-Match tag is this version (no body)"),
        (status = 400, description = "VALIDATION_FAILED: bad date, from after to, range over 92 days, or limit out of 1..=50", body = Problem, content_type = "application/problem+json"),
    )
)]
#[get("/api/v1/products/popular")]
pub async fn popular_products(
    request: HttpRequest,
    state: web::Data<AppState>,
    ValidQuery(query): ValidQuery<PopularQuery>,
) -> Result<HttpResponse, ApiError> {
    let limit = query.limit.map(RankingLimit::new).transpose()?.unwrap_or(RankingLimit::DEFAULT);
    let key = (query.from, query.to, u8::try_from(limit.get()).unwrap_or(u8::MAX));
    let catalog = state.catalog.clone();
    let cached = state
        .catalogue_cache
        .popular(key, async move {
            let ranking = catalog.popular(query.from, query.to, limit).await?;
            Ok(PopularResponse {
                from: ranking.range.from(),
                to: ranking.range.to(),
                items: ranking.items.into_iter().map(PopularItem::from).collect(),
            })
        })
        .await?;
    Ok(cached.respond(&request))
}

/// One product with its options. Soft-deleted products are 404. Cached as the list is (its stock at most
/// `SHOP_CATALOGUE_MAX_STALENESS` old); orders never read the cache.
#[utoipa::path(
    tag = "products",
    params(("productId" = i64, Path, minimum = 1, description = "Product id"), IfNoneMatchParam),
    responses(
        (status = 200, description = "The product", body = ProductResponse, headers(("ETag" = String, description = "This version of the response"), ("Cache-Control" = String, description = "public, max-age: how long the instance itself may serve it unchanged"))),
        (status = 304, description = "Not modified: the If-None-Match tag is this version (no body)"),
        (status = 400, description = "VALIDATION_FAILED", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "PRODUCT_NOT_FOUND", body = Problem, content_type = "application/problem+json"),
    )
)]
#[get("/api/v1/products/{productId}")]
pub async fn get_product(
    request: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<i64>,
) -> Result<HttpResponse, ApiError> {
    let id = ProductId::new(path.into_inner())?;
    let catalog = state.catalog.clone();
    let cached = state
        .catalogue_cache
        .product(id.get(), async move {
            let product = catalog.get(id).await?;
            let options = product.options.iter().map(|o| o.id.get()).collect();
            Ok((ProductResponse::from(product), options))
        })
        .await?;
    Ok(cached.respond(&request))
}
