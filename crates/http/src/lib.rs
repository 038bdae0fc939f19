//! The HTTP adapter: actix-web handlers, their DTOs, RFC 9457 problem responses and the OpenAPI document.
//!
//! It depends on `shop-domain` and drives its use cases; it never touches a store. DTOs stay here and are
//! converted to domain values at the edge, where a bad value becomes a 400 problem.
//!
//! - [`problem`]: [`ApiError`] and the one table from error to status and `code`.
//! - [`cache`]: the catalogue's read cache of serialized responses, with their `ETag`s.
//! - [`connection`]: whether a request's client is still connected (for requests that wait in a queue).
//! - [`extract`]: the JSON body extractor that names the field at fault, and the admin token check.
//! - [`request_id`]: `x-request-id` and the per-request tracing span.
//! - [`idempotency`]: the `Idempotency-Key` header: claim, replay, settle.
//! - [`routes`]: one module per resource.
//! - [`openapi()`]: the OpenAPI 3.1 document, built from the same registrations that serve the routes.

pub mod cache;
pub mod connection;
pub mod extract;
pub mod idempotency;
pub mod problem;
pub mod request_id;
pub mod routes;

use std::sync::Arc;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceFactory, ServiceRequest, ServiceResponse};
use actix_web::middleware::from_fn;
use actix_web::{App, HttpRequest, HttpResponse, web};
use shop_domain::ports::{Clock, Probe, Tokens};
use shop_domain::services::{
    AuthService, CartService, CatalogService, IdempotencyService, OrderService, Relay, UserService,
};
use utoipa::OpenApi;
use utoipa::openapi::security::{Http, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa_actix_web::AppExt;
use utoipa_actix_web::service_config::ServiceConfig;
use utoipa_swagger_ui::SwaggerUi;

pub use problem::{ApiError, Problem};

/// What every handler can reach: the use cases and the few settings HTTP needs.
#[derive(Clone)]
pub struct AppState {
    pub users: UserService,
    pub auth: AuthService,
    /// Checks the access tokens of user-scoped routes (no database read).
    pub tokens: Arc<dyn Tokens>,
    pub clock: Arc<dyn Clock>,
    /// Count sign-in failures per the address a trusted proxy forwarded (`X-Forwarded-For`, `Forwarded`)
    /// rather than per the peer: on only behind a proxy that sets them.
    pub trust_forwarded_for: bool,
    pub catalog: CatalogService,
    /// The serialized catalogue responses (detail, pages, rankings) this instance serves without the database.
    pub catalogue_cache: cache::CatalogueCache,
    pub cart: CartService,
    pub orders: OrderService,
    pub idempotency: IdempotencyService,
    /// `None` disables the admin API (403 `ADMIN_DISABLED`).
    pub admin_token: Option<Arc<str>>,
    /// Asked by `/health/ready`.
    pub probes: Vec<Arc<dyn Probe>>,
    /// The Prometheus text of `/metrics` (the server owns the recorder).
    pub metrics: RenderMetrics,
    /// The outbox's relay, for the admin events API; `None` with the outbox off.
    pub relay: Option<Relay>,
}

/// Renders the metrics of the process in the Prometheus text format.
pub type RenderMetrics = Arc<dyn Fn() -> String + Send + Sync>;

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("admin_token", &self.admin_token.as_ref().map(|_| "<set>"))
            .field("probes", &self.probes.iter().map(|p| p.name()).collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Shop API",
        version = "1.0.0",
        description = "Users and balance, products and stock, cart, orders and payment. Every error is an RFC 9457 \
                       problem document (`application/problem+json`) with a stable `code`. User-scoped routes act for \
                       the caller only: sign up with `POST /api/v1/users`, sign in with `POST /api/v1/auth/token`, and \
                       send the access token as `Authorization: Bearer <accessToken>` (Swagger UI: Authorize)."
    ),
    components(schemas(Problem)),
    modifiers(&SecuritySchemes),
    tags(
        (name = "users", description = "Users and their balance"),
        (name = "auth", description = "Signing in: access and refresh tokens"),
        (name = "products", description = "The catalogue and the best sellers"),
        (name = "cart", description = "A user's cart"),
        (name = "orders", description = "Orders and their payment"),
        (name = "admin", description = "Catalogue administration (bearer token)"),
        (name = "health", description = "Liveness and readiness"),
    )
)]
struct ApiDoc;

/// `bearer`: a user's access token (a JWT from `/api/v1/auth/token`); `admin_token`: `SHOP_ADMIN_TOKEN`.
struct SecuritySchemes;

impl utoipa::Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let jwt = HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT").build();
        components.add_security_scheme("bearer", SecurityScheme::Http(jwt));
        components.add_security_scheme("admin_token", SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
    }
}

/// Every documented route. The popular ranking is registered before `/products/{productId}` so that
/// `popular` is not read as an id.
fn routes(cfg: &mut ServiceConfig<'_>) {
    use routes::{admin, auth, cart, events, health, orders, products, users};
    cfg.service(users::create_user)
        .service(users::me)
        .service(auth::sign_in)
        .service(auth::refresh)
        .service(auth::logout)
        .service(users::get_balance)
        .service(users::charge_balance)
        .service(products::list_products)
        .service(products::popular_products)
        .service(products::get_product)
        .service(admin::create_product)
        .service(admin::set_stock)
        .service(events::list_events)
        .service(events::retry_event)
        .service(cart::get_cart)
        .service(cart::add_cart_item)
        .service(cart::delete_cart_item)
        .service(orders::create_order)
        .service(orders::get_order)
        .service(orders::list_orders)
        .service(orders::pay_order)
        .service(health::live)
        .service(health::ready)
        .service(health::metrics);
}

/// The OpenAPI document: `openapi/openapi.json` is this, pretty-printed.
#[must_use]
pub fn openapi() -> utoipa::openapi::OpenApi {
    let (_, mut doc) = App::new().into_utoipa_app().openapi(ApiDoc::openapi()).configure(routes).split_for_parts();
    problem::document_examples(&mut doc);
    doc
}

/// The document as the repository keeps it (`openapi/openapi.json`).
///
/// # Panics
/// Never in practice: the document is plain data that always serializes.
#[must_use]
pub fn openapi_json() -> String {
    #[allow(clippy::expect_used)]
    let mut json = openapi().to_pretty_json().expect("the OpenAPI document serializes");
    json.push('\n');
    json
}

/// Bad paths and queries answer problem documents, like bad bodies.
fn extractor_configs(cfg: &mut web::ServiceConfig) {
    cfg.app_data(web::PathConfig::default().error_handler(|_, req| {
        // Every path parameter is an id: name the first one that is not an integer.
        let field = req
            .match_info()
            .iter()
            .find(|(_, value)| value.parse::<i64>().is_err())
            .map_or_else(|| "path".to_owned(), |(name, _)| name.to_owned());
        ApiError::Validation { detail: format!("{field}: must be a positive integer"), field }.into()
    }))
    .app_data(web::PayloadConfig::new(extract::MAX_BODY_BYTES));
}

async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::RouteNotFound)
}

async fn swagger_redirect(_: HttpRequest) -> HttpResponse {
    HttpResponse::PermanentRedirect().insert_header(("Location", "/swagger-ui/")).finish()
}

/// The whole application: middleware, routes, OpenAPI and Swagger UI. `doc` is [`openapi()`], built once by the
/// caller so that every worker shares it.
pub fn app(
    state: AppState,
    doc: utoipa::openapi::OpenApi,
) -> App<
    impl ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<impl MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    App::new()
        .wrap(from_fn(request_id::middleware))
        .app_data(web::Data::new(state))
        .configure(extractor_configs)
        .configure(|cfg| routes(&mut ServiceConfig::new(cfg)))
        .route("/swagger-ui", web::get().to(swagger_redirect))
        .service(SwaggerUi::new("/swagger-ui/{_:.*}").url("/api-docs/openapi.json", doc))
        .default_service(web::to(not_found))
}
