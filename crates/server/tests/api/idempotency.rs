//! Idempotency-Key on charge, order and payment: replays, reuse, concurrency, expiry, and two instances.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::Barrier;

use crate::helpers::{Resp, TestApp};
use crate::on_both_stores;

on_both_stores!(
    ten_concurrent_charges_with_one_key_move_the_balance_once,
    an_order_retried_with_its_key_returns_the_same_order_and_takes_stock_once,
    the_same_key_with_another_body_is_refused_and_changes_nothing,
    a_refusal_is_replayed_too,
    a_payment_retried_with_its_key_spends_once,
    keys_are_per_user_and_expired_keys_act_anew,
    a_malformed_key_is_a_validation_problem,
    two_instances_racing_one_key_make_one_effect,
);

/// `user` sends `body` to `path` with an Idempotency-Key.
async fn keyed(app: &TestApp, user: i64, path: &str, key: &str, body: Value) -> Resp {
    app.send_as(user, app.client.post(app.url(path)).header("Idempotency-Key", key).json(&body)).await
}

fn replayed(r: &Resp) -> bool {
    r.headers.get("idempotent-replayed").is_some_and(|v| v == "true")
}

async fn balance(app: &TestApp, user: i64) -> i64 {
    app.get_as(user, &format!("/api/v1/users/{user}/balance")).await.body["balance"].as_i64().unwrap()
}

async fn ten_concurrent_charges_with_one_key_move_the_balance_once(app: TestApp) {
    let user = app.user("kim").await;
    let app = Arc::new(app);
    let barrier = Arc::new(Barrier::new(10));
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let (app, barrier) = (app.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                keyed(&app, user, &format!("/api/v1/users/{user}/balance/charge"), "charge-1", json!({"amount": 5000}))
                    .await
            })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    let first: Vec<&Resp> = answers.iter().filter(|r| r.status == 200 && !replayed(r)).collect();
    assert_eq!(first.len(), 1, "exactly one request acted: {answers:?}");
    for r in &answers {
        match r.status {
            200 => assert_eq!(r.body, first[0].body, "a replay is the first answer"),
            409 => assert_eq!(r.body["code"], "IDEMPOTENCY_KEY_IN_USE"),
            other => panic!("unexpected {other}: {r:?}"),
        }
    }
    assert_eq!(balance(&app, user).await, 5000, "the balance moved once");
    let again =
        keyed(&app, user, &format!("/api/v1/users/{user}/balance/charge"), "charge-1", json!({"amount": 5000})).await;
    assert!(replayed(&again) && again.status == 200 && again.body["balance"] == 5000, "{again:?}");
}

async fn an_order_retried_with_its_key_returns_the_same_order_and_takes_stock_once(app: TestApp) {
    let user = app.user("kim").await;
    let p = app.product("shirt", &[("S", 1000, 5)]).await;
    let option = p["options"][0]["id"].as_i64().unwrap();
    let body = json!({"userId": user, "items": [{"productOptionId": option, "quantity": 2}]});
    let first = keyed(&app, user, "/api/v1/orders", "order-abc", body.clone()).await;
    assert_eq!((first.status, replayed(&first)), (201, false), "{first:?}");
    // The response was recorded with the order, in its transaction.
    let recorded = app
        .scalar(&format!("SELECT CAST(response_status AS BIGINT) FROM idempotency_keys WHERE user_id = {user} AND idem_key = 'order-abc' AND state = 'COMPLETED'"))
        .await;
    assert_eq!(recorded, 201);
    // Same body, other key order and whitespace: the same request.
    let same = r#"{ "items": [ { "quantity": 2, "productOptionId": OPTION } ], "userId": USER }"#
        .replace("OPTION", &option.to_string())
        .replace("USER", &user.to_string());
    let retry = app
        .send_as(
            user,
            app.client
                .post(app.url("/api/v1/orders"))
                .header("Idempotency-Key", "order-abc")
                .header("content-type", "application/json")
                .body(same),
        )
        .await;
    assert_eq!((retry.status, replayed(&retry)), (201, true), "{retry:?}");
    assert_eq!(retry.body, first.body, "the same order, byte for byte");
    assert_eq!(
        app.scalar(&format!("SELECT stock FROM product_options WHERE id = {option}")).await,
        3,
        "stock taken once"
    );
    assert_eq!(app.scalar("SELECT COUNT(*) FROM orders").await, 1);
}

async fn the_same_key_with_another_body_is_refused_and_changes_nothing(app: TestApp) {
    let user = app.user("kim").await;
    let path = format!("/api/v1/users/{user}/balance/charge");
    assert_eq!(keyed(&app, user, &path, "k1", json!({"amount": 100})).await.status, 200);
    keyed(&app, user, &path, "k1", json!({"amount": 200})).await.problem(422, "IDEMPOTENCY_KEY_REUSED");
    assert_eq!(balance(&app, user).await, 100);
    // The key is bound to its route too.
    let other = app.user("lee").await;
    let _ = other;
    let p = app.product("x", &[("S", 1, 5)]).await;
    let order = json!({"userId": user, "items": [{"productOptionId": p["options"][0]["id"], "quantity": 1}]});
    keyed(&app, user, "/api/v1/orders", "k1", order).await.problem(422, "IDEMPOTENCY_KEY_REUSED");
    assert_eq!(app.scalar("SELECT COUNT(*) FROM orders").await, 0);
}

async fn a_refusal_is_replayed_too(app: TestApp) {
    let user = app.user("kim").await;
    let p = app.product("x", &[("S", 1, 1)]).await;
    let option = p["options"][0]["id"].as_i64().unwrap();
    let body = json!({"userId": user, "items": [{"productOptionId": option, "quantity": 2}]});
    keyed(&app, user, "/api/v1/orders", "oos", body.clone()).await.problem(409, "OUT_OF_STOCK");
    app.admin_put(&format!("/api/v1/admin/product-options/{option}/stock"), json!({"stock": 10})).await;
    let retry = keyed(&app, user, "/api/v1/orders", "oos", body).await;
    retry.problem(409, "OUT_OF_STOCK");
    assert!(replayed(&retry), "the first answer, not a new attempt: {retry:?}");
    assert_eq!(app.scalar("SELECT COUNT(*) FROM orders").await, 0);
}

async fn a_payment_retried_with_its_key_spends_once(app: TestApp) {
    let user = app.users(1, 10_000).await[0];
    let p = app.product("x", &[("S", 3000, 5)]).await;
    let placed = app
        .post_as(
            user,
            "/api/v1/orders",
            json!({"userId": user, "items": [{"productOptionId": p["options"][0]["id"], "quantity": 1}]}),
        )
        .await;
    let path = format!("/api/v1/orders/{}/payment", placed.body["id"]);
    let first = keyed(&app, user, &path, "pay-1", json!({"userId": user})).await;
    assert_eq!((first.status, first.body["status"].as_str()), (200, Some("COMPLETED")), "{first:?}");
    let retry = keyed(&app, user, &path, "pay-1", json!({"userId": user})).await;
    assert_eq!((retry.status, replayed(&retry)), (200, true), "a retry is the same success, not 409: {retry:?}");
    assert_eq!(retry.body, first.body);
    assert_eq!(balance(&app, user).await, 7000, "spent once");
    // Without the key, a second payment is the contract's 409.
    app.post_as(user, &path, json!({"userId": user})).await.problem(409, "ORDER_NOT_PAYABLE");
}

async fn keys_are_per_user_and_expired_keys_act_anew(app: TestApp) {
    let (kim, lee) = (app.user("kim").await, app.user("lee").await);
    let charge = async |user: i64| {
        keyed(&app, user, &format!("/api/v1/users/{user}/balance/charge"), "shared", json!({"amount": 10})).await
    };
    let r = charge(kim).await;
    assert_eq!((r.status, replayed(&r)), (200, false));
    app.clock.advance(Duration::from_secs(12 * 3600));
    let r = charge(lee).await;
    assert_eq!((r.status, replayed(&r)), (200, false), "each user has their own key space");
    // A day and a minute after kim's first use, half a day after lee's.
    app.clock.advance(Duration::from_secs(12 * 3600 + 60));
    let anew = charge(kim).await;
    assert_eq!((anew.status, replayed(&anew)), (200, false), "an expired key acts anew: {anew:?}");
    assert_eq!(balance(&app, kim).await, 20);
    let replay = charge(lee).await;
    assert_eq!((replay.status, replayed(&replay)), (200, true), "lee's key is still live");
    assert_eq!(balance(&app, lee).await, 10);
    // Half a day later lee's key has expired and kim's second one has not: the purge deletes only lee's.
    app.clock.advance(Duration::from_secs(12 * 3600));
    let purged = app.idempotency.purge_expired().await.unwrap();
    assert_eq!(purged, 1);
    assert_eq!(app.scalar(&format!("SELECT COUNT(*) FROM idempotency_keys WHERE user_id = {kim}")).await, 1);
}

async fn a_malformed_key_is_a_validation_problem(app: TestApp) {
    let user = app.user("kim").await;
    let path = format!("/api/v1/users/{user}/balance/charge");
    keyed(&app, user, &path, &"k".repeat(256), json!({"amount": 1})).await.invalid("Idempotency-Key");
    keyed(&app, user, &path, "", json!({"amount": 1})).await.invalid("Idempotency-Key");
    assert_eq!(keyed(&app, user, &path, &"k".repeat(255), json!({"amount": 1})).await.status, 200);
    assert_eq!(balance(&app, user).await, 1);
}

async fn two_instances_racing_one_key_make_one_effect(app: TestApp) {
    let user = app.user("kim").await;
    let p = app.product("x", &[("S", 100, 50)]).await;
    let option = p["options"][0]["id"].as_i64().unwrap();
    let second = Arc::new(app.second_instance().await);
    let first = Arc::new(app);
    let barrier = Arc::new(Barrier::new(20));
    let body = json!({"userId": user, "items": [{"productOptionId": option, "quantity": 1}]});
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let (instance, barrier, body) =
                (if i % 2 == 0 { first.clone() } else { second.clone() }, barrier.clone(), body.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                keyed(&instance, user, "/api/v1/orders", "one-order", body).await
            })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    assert_eq!(answers.iter().filter(|r| r.status == 201 && !replayed(r)).count(), 1, "{answers:?}");
    assert!(answers.iter().all(|r| r.status == 201 || r.body["code"] == "IDEMPOTENCY_KEY_IN_USE"), "{answers:?}");
    assert_eq!(first.scalar("SELECT COUNT(*) FROM orders").await, 1, "one effect");
    assert_eq!(first.scalar(&format!("SELECT stock FROM product_options WHERE id = {option}")).await, 49);
}
