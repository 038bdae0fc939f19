//! Health, request ids, unknown routes, payload limits, the OpenAPI document and Swagger UI.

use serde_json::json;

use crate::helpers::{Store, TestApp};

async fn app() -> TestApp {
    TestApp::spawn(Store::Sqlite).await.unwrap()
}

#[tokio::test]
async fn health_endpoints_answer() {
    let app = app().await;
    let live = app.get("/health/live").await;
    assert_eq!((live.status, live.body["status"].as_str()), (200, Some("UP")));
    let ready = app.get("/health/ready").await;
    assert_eq!((ready.status, ready.body["checks"]["database"].as_str()), (200, Some("UP")), "{ready:?}");
}

/// The per-instance counts behind `/metrics` (the exposition itself, whose recorder is global to a process and so
/// shared by this binary's tests, is checked on a process of its own in `tests/telemetry.rs`).
#[tokio::test]
async fn metrics_count_placed_and_early_refused_orders() {
    use std::sync::atomic::Ordering::Relaxed;
    let app = app().await;
    let user = app.user("kim").await;
    let option = app.product("x", &[("S", 1, 1)]).await["options"][0]["id"].as_i64().unwrap();
    let order = json!({"userId": user, "items": [{"productOptionId": option, "quantity": 1}]});
    assert_eq!(app.post_as(user, "/api/v1/orders", order.clone()).await.status, 201);
    assert_eq!(app.post_as(user, "/api/v1/orders", order).await.status, 409);
    let stats = app.orders.stats();
    assert_eq!((stats.placed.load(Relaxed), stats.refused_early.load(Relaxed)), (1, 1));
    let metrics = app.get("/metrics").await;
    assert_eq!(metrics.status, 200);
    let text = metrics.body.as_str().unwrap();
    for series in ["shop_orders_placed_total{strategy=\"conditional\"}", "shop_http_request_duration_seconds_bucket"] {
        assert!(text.contains(series), "{series}: {text}");
    }
}

#[tokio::test]
async fn ready_names_each_dependency_on_a_connection_of_its_own() {
    let app = app().await;
    let ready = app.get("/health/ready").await;
    assert_eq!((ready.status, &ready.body["checks"]["database"]), (200, &json!("UP")), "{ready:?}");
    app.db.close_by_ref().await.unwrap();
    assert_eq!(app.get("/health/ready").await.status, 200, "readiness does not wait on the busy pool");
    assert_eq!(app.get("/health/live").await.status, 200, "liveness does not depend on the database");
}

#[tokio::test]
async fn every_response_carries_a_request_id() {
    let app = app().await;
    let echoed = app.send(app.client.get(app.url("/health/live")).header("x-request-id", "abc-123")).await;
    assert_eq!(echoed.headers.get("x-request-id").unwrap(), "abc-123");
    let generated = app.get("/api/v1/products/0").await;
    assert_eq!(generated.headers.get("x-request-id").unwrap().len(), 36, "a UUID when the client sent none");
    let not_found = app.get("/no/such/route").await;
    assert!(not_found.headers.contains_key("x-request-id"));
    not_found.problem(404, "NOT_FOUND");
}

#[tokio::test]
async fn wrong_method_and_oversized_bodies_are_problems() {
    let app = app().await;
    app.delete("/api/v1/products").await.problem(404, "NOT_FOUND");
    let huge = "x".repeat(100 * 1024);
    let r = app.post("/api/v1/users", json!({ "name": huge, "password": "correct horse" })).await;
    r.problem(413, "PAYLOAD_TOO_LARGE");
}

#[tokio::test]
async fn served_openapi_document_is_the_checked_in_one() {
    let app = app().await;
    let served = app.get("/api-docs/openapi.json").await;
    assert_eq!(served.status, 200);
    assert_eq!(served.body["openapi"], "3.1.0");
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../openapi/openapi.json");
    let checked_in: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("openapi/openapi.json exists")).unwrap();
    assert!(
        served.body == checked_in,
        "openapi/openapi.json is stale: regenerate it with `cargo run -p shop-server -- openapi > openapi/openapi.json`"
    );
    for route in [
        "/api/v1/users",
        "/api/v1/me",
        "/api/v1/auth/token",
        "/api/v1/auth/refresh",
        "/api/v1/auth/logout",
        "/api/v1/users/{userId}/balance",
        "/api/v1/users/{userId}/balance/charge",
        "/api/v1/products",
        "/api/v1/products/{productId}",
        "/api/v1/products/popular",
        "/api/v1/admin/products",
        "/api/v1/admin/product-options/{optionId}/stock",
        "/api/v1/users/{userId}/cart",
        "/api/v1/users/{userId}/cart/items",
        "/api/v1/users/{userId}/cart/items/{cartItemId}",
        "/api/v1/orders",
        "/api/v1/orders/{orderId}",
        "/api/v1/orders/{orderId}/payment",
        "/api/v1/users/{userId}/orders",
        "/health/live",
        "/health/ready",
        "/metrics",
    ] {
        assert!(served.body["paths"][route].is_object(), "{route} is documented");
    }
}

#[tokio::test]
async fn every_documented_response_has_a_description() {
    let doc = shop_http::openapi();
    let json = serde_json::to_value(&doc).unwrap();
    for (path, item) in json["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            for (status, response) in op["responses"].as_object().unwrap() {
                assert!(response["description"].is_string(), "{method} {path} {status} has no description");
            }
            let errors: Vec<_> = op["responses"]
                .as_object()
                .unwrap()
                .keys()
                .filter(|s| s.starts_with('4') || s.starts_with('5'))
                .collect();
            for status in errors {
                let response = &op["responses"][status];
                let content = &response["content"]["application/problem+json"];
                assert!(content.is_object(), "{method} {path} {status} is a problem document");
                // Each documented error shows its own status and code, not one shared example.
                let examples =
                    content["examples"].as_object().unwrap_or_else(|| panic!("{method} {path} {status}: examples"));
                assert!(!examples.is_empty(), "{method} {path} {status} shows an example");
                for (code, example) in examples {
                    assert_eq!(example["value"]["code"], code.as_str());
                    assert_eq!(example["value"]["status"].to_string(), *status, "{method} {path}: {code}");
                    let description = response["description"].as_str().unwrap();
                    assert!(description.contains(code.as_str()), "{method} {path} {status}: {code} is documented");
                }
            }
        }
    }
}

/// The bearer scheme is declared on exactly the routes that need a user's token; the admin routes keep theirs.
#[tokio::test]
async fn the_bearer_scheme_is_declared_on_exactly_the_user_scoped_routes() {
    let json = serde_json::to_value(shop_http::openapi()).unwrap();
    assert_eq!(json["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
    assert_eq!(json["components"]["securitySchemes"]["bearer"]["bearerFormat"], "JWT");
    let user_scoped = [
        ("get", "/api/v1/me"),
        ("get", "/api/v1/users/{userId}/balance"),
        ("post", "/api/v1/users/{userId}/balance/charge"),
        ("get", "/api/v1/users/{userId}/cart"),
        ("post", "/api/v1/users/{userId}/cart/items"),
        ("delete", "/api/v1/users/{userId}/cart/items/{cartItemId}"),
        ("get", "/api/v1/users/{userId}/orders"),
        ("post", "/api/v1/orders"),
        ("get", "/api/v1/orders/{orderId}"),
        ("post", "/api/v1/orders/{orderId}/payment"),
    ];
    for (path, item) in json["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let schemes: Vec<String> = op["security"]
                .as_array()
                .map(|s| s.iter().flat_map(|r| r.as_object().unwrap().keys().cloned()).collect())
                .unwrap_or_default();
            let wants_bearer = user_scoped.contains(&(method.as_str(), path.as_str()));
            assert_eq!(schemes.contains(&"bearer".to_owned()), wants_bearer, "{method} {path}: {schemes:?}");
            if path.starts_with("/api/v1/admin") {
                assert_eq!(schemes, vec!["admin_token".to_owned()], "{method} {path}");
            }
        }
    }
}

#[tokio::test]
async fn swagger_ui_is_served_offline() {
    let app = app().await;
    let ui = app.send(app.client.get(app.url("/swagger-ui/"))).await;
    assert_eq!(ui.status, 200);
    assert!(ui.body.as_str().unwrap().contains("swagger"), "the vendored Swagger UI page");
    let bundle = app.send(app.client.get(app.url("/swagger-ui/swagger-ui-bundle.js"))).await;
    assert_eq!(bundle.status, 200, "the JS bundle is served from the binary");
    let redirect = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(app.url("/swagger-ui"))
        .send()
        .await
        .unwrap();
    assert_eq!(redirect.headers().get("location").unwrap(), "/swagger-ui/");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_started_together_over_one_fresh_database_all_come_up() {
    let Some(cluster) = TestApp::spawn_cluster(Store::Postgres, 3, |_| {}).await else { return };
    for app in &cluster {
        assert_eq!(app.get("/health/ready").await.status, 200);
    }
    let user = cluster[0].user("kim").await;
    let balance = cluster[2].get_as(user, &format!("/api/v1/users/{user}/balance")).await;
    assert_eq!(balance.status, 200, "one shared database, one signing secret: {balance:?}");
}
