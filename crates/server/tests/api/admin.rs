//! The admin API: token checks, product creation and stock setting.

use serde_json::json;

use crate::helpers::{Store, TestApp};
use crate::on_both_stores;

on_both_stores!(admin_needs_the_right_token, creating_products_validates_every_field, setting_stock);

async fn admin_needs_the_right_token(app: TestApp) {
    let body = json!({"name": "shirt", "options": [{"name": "S", "price": 1, "stock": 1}]});
    let url = app.url("/api/v1/admin/products");
    let none = app.send(app.client.post(&url).json(&body)).await;
    none.problem(401, "UNAUTHORIZED");
    assert_eq!(none.headers.get("www-authenticate").unwrap(), "Bearer");
    app.send(app.client.post(&url).bearer_auth("wrong-token").json(&body)).await.problem(401, "UNAUTHORIZED");
    app.send(app.client.post(&url).header("authorization", "Basic abc").json(&body)).await.problem(401, "UNAUTHORIZED");
    // The token is checked before the body: an unauthorised caller learns nothing about validation.
    app.send(app.client.post(&url).body("garbage")).await.problem(401, "UNAUTHORIZED");
    assert_eq!(app.get("/api/v1/products").await.body["total"], 0, "nothing was created");
}

#[tokio::test]
async fn admin_api_is_disabled_without_a_configured_token() {
    let app = TestApp::spawn_with(Store::Sqlite, |s| s.admin_token = None).await.unwrap();
    let body = json!({"name": "shirt", "options": [{"name": "S", "price": 1, "stock": 1}]});
    app.admin_post("/api/v1/admin/products", body).await.problem(403, "ADMIN_DISABLED");
    app.admin_put("/api/v1/admin/product-options/1/stock", json!({"stock": 1})).await.problem(403, "ADMIN_DISABLED");
}

async fn creating_products_validates_every_field(app: TestApp) {
    let create = |body| app.admin_post("/api/v1/admin/products", body);
    let r = create(json!({"name": " shirt ", "options": [{"name": "S", "price": 0, "stock": 0}, {"name": "M", "price": 5, "stock": 9}]})).await;
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!((r.body["name"].as_str(), r.body["status"].as_str()), (Some("shirt"), Some("ACTIVE")));
    assert_eq!(r.body["options"].as_array().unwrap().len(), 2);
    let inactive =
        create(json!({"name": "off", "status": "INACTIVE", "options": [{"name": "S", "price": 1, "stock": 1}]})).await;
    assert_eq!(inactive.body["status"], "INACTIVE");
    create(json!({"name": "", "options": [{"name": "S", "price": 1, "stock": 1}]})).await.invalid("name");
    create(json!({"name": "x", "options": []})).await.invalid("options");
    create(json!({"name": "x"})).await.invalid("body");
    create(json!({"name": "x", "options": [{"name": "S", "price": -1, "stock": 1}]})).await.invalid("options[0].price");
    create(json!({"name": "x", "options": [{"name": "S", "price": 1, "stock": -1}]})).await.invalid("options[0].stock");
    create(json!({"name": "x", "options": [{"name": "S", "price": 1, "stock": 1_000_000_001}]}))
        .await
        .invalid("options[0].stock");
    create(json!({"name": "x", "options": [{"name": "S", "price": "1", "stock": 1}]}))
        .await
        .invalid("options[0].price");
    create(json!({"name": "x", "status": "SOLD", "options": [{"name": "S", "price": 1, "stock": 1}]}))
        .await
        .invalid("status");
    let twice =
        json!({"name": "x", "options": [{"name": "S", "price": 1, "stock": 1}, {"name": "S", "price": 2, "stock": 1}]});
    create(twice).await.invalid("options");
    let many: Vec<_> = (0..51).map(|i| json!({"name": i.to_string(), "price": 1, "stock": 1})).collect();
    create(json!({"name": "x", "options": many})).await.invalid("options");
    assert_eq!(app.get("/api/v1/products").await.body["total"], 2, "only the two valid products exist");
}

async fn setting_stock(app: TestApp) {
    let p = app.product("shirt", &[("S", 1, 5)]).await;
    let option = p["options"][0]["id"].as_i64().unwrap();
    let path = format!("/api/v1/admin/product-options/{option}/stock");
    let r = app.admin_put(&path, json!({"stock": 1000})).await;
    assert_eq!((r.status, r.body["stock"].as_i64(), r.body["id"].as_i64()), (200, Some(1000), Some(option)), "{r:?}");
    assert_eq!(app.get(&format!("/api/v1/products/{}", p["id"])).await.body["options"][0]["stock"], 1000);
    app.admin_put(&path, json!({"stock": -1})).await.invalid("stock");
    app.admin_put(&path, json!({"stock": "many"})).await.invalid("stock");
    app.admin_put("/api/v1/admin/product-options/777777/stock", json!({"stock": 1}))
        .await
        .problem(404, "PRODUCT_OPTION_NOT_FOUND");
    app.admin_put("/api/v1/admin/product-options/x/stock", json!({"stock": 1})).await.invalid("optionId");
    assert_eq!(app.admin_put(&path, json!({"stock": 0})).await.body["stock"], 0);
}
