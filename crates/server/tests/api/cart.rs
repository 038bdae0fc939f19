//! The cart: add and merge, limits, listing, removal, and other users' lines.

use std::sync::Arc;

use serde_json::json;
use tokio::sync::Barrier;

use crate::helpers::TestApp;
use crate::on_both_stores;

on_both_stores!(
    adding_an_option_twice_merges_the_line,
    cart_errors,
    removing_lines,
    concurrent_adds_of_one_option_make_one_line,
);

async fn setup(app: &TestApp) -> (i64, i64, i64) {
    let user = app.user("kim").await;
    let p = app.product("shirt", &[("S", 19_000, 5), ("M", 21_000, 5)]).await;
    (user, p["options"][0]["id"].as_i64().unwrap(), p["options"][1]["id"].as_i64().unwrap())
}

async fn adding_an_option_twice_merges_the_line(app: TestApp) {
    let (user, s, m) = setup(&app).await;
    let path = format!("/api/v1/users/{user}/cart/items");
    let first = app.post_as(user, &path, json!({"productOptionId": s, "quantity": 2})).await;
    assert_eq!(first.status, 201, "{first:?}");
    assert_eq!((first.body["productName"].as_str(), first.body["optionName"].as_str()), (Some("shirt"), Some("S")));
    assert_eq!((first.body["price"].as_i64(), first.body["quantity"].as_i64()), (Some(19_000), Some(2)));
    let again = app.post_as(user, &path, json!({"productOptionId": s, "quantity": 3})).await;
    assert_eq!(
        (again.status, again.body["id"].clone(), again.body["quantity"].as_i64()),
        (201, first.body["id"].clone(), Some(5))
    );
    app.post_as(user, &path, json!({"productOptionId": m, "quantity": 1})).await;
    let cart = app.get_as(user, &format!("/api/v1/users/{user}/cart")).await;
    let lines: Vec<_> = cart.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["productOptionId"].as_i64().unwrap(), i["quantity"].as_i64().unwrap()))
        .collect();
    assert_eq!(lines, vec![(s, 5), (m, 1)]);
}

async fn cart_errors(app: TestApp) {
    let (user, s, _) = setup(&app).await;
    let path = format!("/api/v1/users/{user}/cart/items");
    app.post_as(user, &path, json!({"productOptionId": 999_999, "quantity": 1}))
        .await
        .problem(404, "PRODUCT_OPTION_NOT_FOUND");
    // A valid token of a user that no longer exists.
    app.post_as(999_999, "/api/v1/users/999999/cart/items", json!({"productOptionId": s, "quantity": 1}))
        .await
        .problem(404, "USER_NOT_FOUND");
    app.get_as(999_999, "/api/v1/users/999999/cart").await.problem(404, "USER_NOT_FOUND");
    app.post_as(user, &path, json!({"productOptionId": s, "quantity": 0})).await.invalid("quantity");
    app.post_as(user, &path, json!({"productOptionId": s, "quantity": 1001})).await.invalid("quantity");
    app.post_as(user, &path, json!({"productOptionId": 0, "quantity": 1})).await.invalid("productOptionId");
    app.post_as(user, &path, json!({"productOptionId": s})).await.invalid("body");
    app.post_as(user, &path, json!({"productOptionId": s, "quantity": true})).await.invalid("quantity");
    assert_eq!(app.post_as(user, &path, json!({"productOptionId": s, "quantity": 999})).await.status, 201);
    app.post_as(user, &path, json!({"productOptionId": s, "quantity": 2}))
        .await
        .problem(422, "CART_QUANTITY_LIMIT_EXCEEDED");
    let cart = app.get_as(user, &format!("/api/v1/users/{user}/cart")).await;
    assert_eq!(cart.body["items"][0]["quantity"], 999, "a refused add changes nothing");
    assert_eq!(app.post_as(user, &path, json!({"productOptionId": s, "quantity": 1})).await.body["quantity"], 1000);
}

async fn removing_lines(app: TestApp) {
    let (user, s, m) = setup(&app).await;
    let other = app.user("lee").await;
    let line = app
        .post_as(user, &format!("/api/v1/users/{user}/cart/items"), json!({"productOptionId": s, "quantity": 1}))
        .await;
    let line = line.body["id"].as_i64().unwrap();
    app.delete_as(other, &format!("/api/v1/users/{other}/cart/items/{line}")).await.problem(404, "CART_ITEM_NOT_FOUND");
    let r = app.delete_as(user, &format!("/api/v1/users/{user}/cart/items/{line}")).await;
    assert_eq!((r.status, r.body.clone()), (204, serde_json::Value::Null));
    app.delete_as(user, &format!("/api/v1/users/{user}/cart/items/{line}")).await.problem(404, "CART_ITEM_NOT_FOUND");
    app.delete_as(user, &format!("/api/v1/users/{user}/cart/items/abc")).await.invalid("cartItemId");
    app.delete_as(999_999, &format!("/api/v1/users/999999/cart/items/{line}")).await.problem(404, "USER_NOT_FOUND");
    assert_eq!(app.get_as(user, &format!("/api/v1/users/{user}/cart")).await.body["items"], json!([]));
    // After a removal, adding the option again starts a new line.
    let again = app
        .post_as(user, &format!("/api/v1/users/{user}/cart/items"), json!({"productOptionId": s, "quantity": 4}))
        .await;
    assert_eq!(again.body["quantity"], 4);
    assert_ne!(again.body["id"], line);
    let _ = m;
}

async fn concurrent_adds_of_one_option_make_one_line(app: TestApp) {
    let (user, s, _) = setup(&app).await;
    let app = Arc::new(app);
    let barrier = Arc::new(Barrier::new(50));
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (app, barrier) = (app.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                app.post_as(
                    user,
                    &format!("/api/v1/users/{user}/cart/items"),
                    json!({"productOptionId": s, "quantity": 2}),
                )
                .await
                .status
            })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap(), 201);
    }
    let cart = app.get_as(user, &format!("/api/v1/users/{user}/cart")).await;
    assert_eq!(cart.body["items"].as_array().unwrap().len(), 1, "{cart:?}");
    assert_eq!(cart.body["items"][0]["quantity"], 100);
}
