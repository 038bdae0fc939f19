//! Orders and payment over real HTTP: the contract's behaviour, and races that prove the stock and balance
//! invariants for every stock strategy on every store that serves it.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::Barrier;

use crate::helpers::{Resp, TestApp};
use crate::{on_both_stores, on_every_strategy};

on_every_strategy!(
    hundred_buyers_take_a_hundred_units,
    thousand_buyers_on_a_hundred_units_never_oversell,
    thousand_buyers_on_a_thousand_units_all_get_one,
    opposite_line_orders_race_without_deadlock,
);

on_both_stores!(
    placing_an_order,
    order_errors_change_nothing,
    reading_and_listing_orders,
    paying_an_order,
    ten_concurrent_payments_spend_once,
    a_payment_short_of_balance_cancels_and_gives_stock_back,
    an_expired_order_gives_its_stock_back_once,
);

async fn option_stock(app: &TestApp, option: i64) -> i64 {
    app.scalar(&format!("SELECT stock FROM product_options WHERE id = {option}")).await
}

async fn order(app: &TestApp, user: i64, items: Value) -> Resp {
    app.post_as(user, "/api/v1/orders", json!({ "userId": user, "items": items })).await
}

/// A product with one option of `stock` units at 1,000 won; the option's id.
async fn hot_option(app: &TestApp, stock: i64) -> i64 {
    app.product("limited drop", &[("one size", 1000, stock)]).await["options"][0]["id"].as_i64().unwrap()
}

/// Releases every buyer at once on this one instance; every answer, and how long the last took.
async fn race(app: TestApp, buyers: &[i64], items: impl Fn(usize) -> Value) -> (Arc<TestApp>, Vec<Resp>, Duration) {
    let app = Arc::new(app);
    let (answers, took) = crate::helpers::race(std::slice::from_ref(&app), buyers, items).await;
    (app, answers, took)
}

fn count(answers: &[Resp], status: u16) -> usize {
    answers.iter().filter(|r| r.status == status).count()
}

/// Every 201 has its order row with its items and a payment; nothing else was written.
async fn check_orders_behind(app: &TestApp, answers: &[Resp], expected: usize) {
    let created: Vec<i64> =
        answers.iter().filter(|r| r.status == 201).map(|r| r.body["id"].as_i64().unwrap()).collect();
    assert_eq!(created.len(), expected);
    assert_eq!(app.scalar("SELECT COUNT(*) FROM orders").await, expected as i64, "no order row without a 201");
    assert_eq!(app.scalar("SELECT COUNT(*) FROM payments").await, expected as i64, "no stray payment");
    assert_eq!(app.scalar("SELECT COUNT(*) FROM order_items").await, expected as i64);
    let rows = app.scalars("SELECT id FROM orders ORDER BY id").await;
    let mut sorted = created.clone();
    sorted.sort_unstable();
    assert_eq!(rows, sorted, "every 201 has its order row");
}

async fn hundred_buyers_take_a_hundred_units(app: TestApp) {
    let option = hot_option(&app, 100).await;
    let buyers = app.users(100, 0).await;
    let (app, answers, _) = race(app, &buyers, |_| json!([{"productOptionId": option, "quantity": 1}])).await;
    assert_eq!(count(&answers, 201), 100, "{:?}", answers.iter().find(|r| r.status != 201));
    assert_eq!(option_stock(&app, option).await, 0);
    check_orders_behind(&app, &answers, 100).await;
}

async fn thousand_buyers_on_a_hundred_units_never_oversell(app: TestApp) {
    let option = hot_option(&app, 100).await;
    let buyers = app.users(1000, 0).await;
    let (app, answers, took) = race(app, &buyers, |_| json!([{"productOptionId": option, "quantity": 1}])).await;
    eprintln!(
        "[race] {:?} {:?}: 1000 buyers on 100 units, last answer after {} ms",
        app.store,
        app.strategy,
        took.as_millis()
    );
    assert_eq!(count(&answers, 201), 100, "{:?}", answers.iter().find(|r| r.status != 201 && r.status != 409));
    let refused: Vec<&Resp> = answers.iter().filter(|r| r.status == 409).collect();
    assert_eq!(
        refused.len(),
        900,
        "neither 201 nor 409: {:?}",
        answers.iter().find(|r| r.status != 201 && r.status != 409)
    );
    assert!(refused.iter().all(|r| r.body["code"] == "OUT_OF_STOCK" && r.body["productOptionId"] == option));
    assert_eq!(option_stock(&app, option).await, 0);
    check_orders_behind(&app, &answers, 100).await;
}

async fn thousand_buyers_on_a_thousand_units_all_get_one(app: TestApp) {
    let option = hot_option(&app, 1000).await;
    let buyers = app.users(1000, 0).await;
    let (app, answers, took) = race(app, &buyers, |_| json!([{"productOptionId": option, "quantity": 1}])).await;
    eprintln!(
        "[race] {:?} {:?}: 1000 buyers on 1000 units, last answer after {} ms",
        app.store,
        app.strategy,
        took.as_millis()
    );
    assert_eq!(count(&answers, 201), 1000, "{:?}", answers.iter().find(|r| r.status != 201));
    assert_eq!(option_stock(&app, option).await, 0);
    check_orders_behind(&app, &answers, 1000).await;
}

async fn opposite_line_orders_race_without_deadlock(app: TestApp) {
    let p = app.product("pair", &[("left", 10, 100), ("right", 10, 100)]).await;
    let (a, b) = (p["options"][0]["id"].as_i64().unwrap(), p["options"][1]["id"].as_i64().unwrap());
    let buyers = app.users(200, 0).await;
    let (app, answers, _) = race(app, &buyers, |i| {
        let (first, second) = if i % 2 == 0 { (a, b) } else { (b, a) };
        json!([{"productOptionId": first, "quantity": 1}, {"productOptionId": second, "quantity": 1}])
    })
    .await;
    assert_eq!(count(&answers, 201), 100, "{:?}", answers.iter().find(|r| r.status != 201 && r.status != 409));
    assert_eq!(
        count(&answers, 409),
        100,
        "the rest are refused, none failed: {:?}",
        answers.iter().find(|r| r.status >= 500)
    );
    assert_eq!((option_stock(&app, a).await, option_stock(&app, b).await), (0, 0), "both lines or neither");
}

async fn placing_an_order(app: TestApp) {
    let user = app.user("kim").await;
    let p = app.product("shirt", &[("S", 19_000, 5), ("M", 21_000, 5)]).await;
    let (s, m) = (p["options"][0]["id"].as_i64().unwrap(), p["options"][1]["id"].as_i64().unwrap());
    for option in [s, m] {
        app.post_as(
            user,
            &format!("/api/v1/users/{user}/cart/items"),
            json!({"productOptionId": option, "quantity": 1}),
        )
        .await;
    }
    let r =
        order(&app, user, json!([{"productOptionId": m, "quantity": 1}, {"productOptionId": m, "quantity": 1}])).await;
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!((r.body["status"].as_str(), r.body["totalPrice"].as_i64()), (Some("PENDING_PAYMENT"), Some(42_000)));
    assert_eq!(r.body["userId"], user);
    assert!(r.body["orderedAt"].as_str().unwrap().ends_with('Z'), "RFC 3339 UTC: {r:?}");
    let items = r.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "the same option twice is one line");
    assert_eq!(
        items[0],
        json!({"productOptionId": m, "productName": "shirt", "optionName": "M", "quantity": 2,
        "unitPrice": 21_000, "totalPriceAtOrder": 42_000})
    );
    let payment = &r.body["payment"];
    assert_eq!(
        (payment["status"].as_str(), payment["method"].as_str(), payment["amount"].as_i64()),
        (Some("PENDING"), Some("BALANCE"), Some(42_000))
    );
    assert!(payment["paidAt"].is_null());
    assert_eq!(option_stock(&app, m).await, 3);
    let cart = app.get_as(user, &format!("/api/v1/users/{user}/cart")).await;
    let left: Vec<i64> =
        cart.body["items"].as_array().unwrap().iter().map(|i| i["productOptionId"].as_i64().unwrap()).collect();
    assert_eq!(left, vec![s], "the ordered option left the cart, the other stayed");
}

async fn order_errors_change_nothing(app: TestApp) {
    let user = app.user("kim").await;
    let option = hot_option(&app, 2).await;
    let off = app
        .admin_post(
            "/api/v1/admin/products",
            json!({"name": "off", "status": "INACTIVE", "options": [{"name": "x", "price": 1, "stock": 5}]}),
        )
        .await;
    let off = off.body["options"][0]["id"].as_i64().unwrap();
    let line = |o: i64, q: i64| json!({"productOptionId": o, "quantity": q});
    // A valid token of a user that no longer exists.
    order(&app, 999_999, json!([line(option, 1)])).await.problem(404, "USER_NOT_FOUND");
    order(&app, user, json!([line(option, 1), line(888_888, 1)])).await.problem(404, "PRODUCT_OPTION_NOT_FOUND");
    order(&app, user, json!([line(off, 1)])).await.problem(409, "PRODUCT_NOT_ON_SALE");
    let short = order(&app, user, json!([line(option, 1), line(off, 1)])).await;
    short.problem(409, "PRODUCT_NOT_ON_SALE");
    let short = order(&app, user, json!([line(option, 3)])).await;
    assert_eq!(short.problem(409, "OUT_OF_STOCK")["productOptionId"], option);
    order(&app, user, json!([])).await.invalid("items");
    order(&app, user, json!((1..=51).map(|i| line(i, 1)).collect::<Vec<_>>())).await.invalid("items");
    order(&app, user, json!([line(option, 0)])).await.invalid("items[0].quantity");
    order(&app, user, json!([line(option, 1001)])).await.invalid("items[0].quantity");
    order(&app, user, json!([line(option, 600), line(option, 401)])).await.invalid("items");
    order(&app, user, json!([line(0, 1)])).await.invalid("items[0].productOptionId");
    app.post_as(user, "/api/v1/orders", json!({"userId": "kim", "items": [line(option, 1)]})).await.invalid("userId");
    app.post_as(user, "/api/v1/orders", json!({"userId": user})).await.invalid("body");
    let lee = app.user("lee").await;
    app.post_as(user, "/api/v1/orders", json!({"userId": lee, "items": [line(option, 1)]}))
        .await
        .problem(403, "FORBIDDEN");
    app.post("/api/v1/orders", json!({"userId": user, "items": [line(option, 1)]})).await.problem(401, "UNAUTHORIZED");
    assert_eq!(option_stock(&app, option).await, 2, "no refused order took stock");
    assert_eq!(app.scalar("SELECT COUNT(*) FROM orders").await, 0);
    assert_eq!(app.scalar("SELECT COUNT(*) FROM payments").await, 0);
}

async fn reading_and_listing_orders(app: TestApp) {
    let user = app.user("kim").await;
    let other = app.user("lee").await;
    let option = hot_option(&app, 10).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(
            order(&app, user, json!([{"productOptionId": option, "quantity": 1}])).await.body["id"].as_i64().unwrap(),
        );
    }
    let one = app.get_as(user, &format!("/api/v1/orders/{}", ids[0])).await;
    assert_eq!((one.status, one.body["id"].as_i64()), (200, Some(ids[0])));
    assert_eq!(one.body["items"][0]["quantity"], 1);
    app.get_as(other, &format!("/api/v1/orders/{}", ids[0])).await.problem(404, "ORDER_NOT_FOUND");
    app.get_as(user, "/api/v1/orders/424242").await.problem(404, "ORDER_NOT_FOUND");
    app.get_as(user, "/api/v1/orders/x").await.invalid("orderId");
    let page = app.get_as(user, &format!("/api/v1/users/{user}/orders?page=1&size=2")).await;
    assert_eq!(page.status, 200, "{page:?}");
    let listed: Vec<i64> = page.body["items"].as_array().unwrap().iter().map(|o| o["id"].as_i64().unwrap()).collect();
    assert_eq!(listed, vec![ids[2], ids[1]], "newest first");
    assert_eq!(page.body["total"], 3);
    assert_eq!(app.get_as(other, &format!("/api/v1/users/{other}/orders")).await.body["total"], 0);
    app.get_as(999_999, "/api/v1/users/999999/orders").await.problem(404, "USER_NOT_FOUND");
    app.get_as(user, &format!("/api/v1/users/{user}/orders?size=0")).await.invalid("size");
}

async fn paying_an_order(app: TestApp) {
    let user = app.users(1, 50_000).await[0];
    let other = app.user("lee").await;
    let p = app.product("shirt", &[("S", 19_000, 5)]).await;
    let option = p["options"][0]["id"].as_i64().unwrap();
    let placed = order(&app, user, json!([{"productOptionId": option, "quantity": 2}])).await;
    let id = placed.body["id"].as_i64().unwrap();
    let path = format!("/api/v1/orders/{id}/payment");
    let pay = |who: i64| app.post_as(who, &path, json!({"userId": who}));
    pay(other).await.problem(404, "ORDER_NOT_FOUND");
    app.post_as(other, &path, json!({"userId": user})).await.problem(403, "FORBIDDEN");
    let paid = pay(user).await;
    assert_eq!(paid.status, 200, "{paid:?}");
    assert_eq!(
        (paid.body["status"].as_str(), paid.body["amount"].as_i64(), paid.body["orderId"].as_i64()),
        (Some("COMPLETED"), Some(38_000), Some(id))
    );
    assert!(paid.body["paidAt"].is_string());
    assert_eq!(app.get_as(user, &format!("/api/v1/users/{user}/balance")).await.body["balance"], 12_000);
    let after = app.get_as(user, &format!("/api/v1/orders/{id}")).await;
    assert_eq!(
        (after.body["status"].as_str(), after.body["payment"]["status"].as_str()),
        (Some("PAID"), Some("COMPLETED"))
    );
    pay(user).await.problem(409, "ORDER_NOT_PAYABLE");
    // The body may be left out: the caller pays.
    app.send_as(user, app.client.post(app.url(&path))).await.problem(409, "ORDER_NOT_PAYABLE");
    app.post_as(user, "/api/v1/orders/999999/payment", json!({"userId": user})).await.problem(404, "ORDER_NOT_FOUND");
    app.post_as(user, &path, json!({"userId": "x"})).await.invalid("userId");
    // The sale counts towards today's best sellers.
    let popular = app.get("/api/v1/products/popular").await;
    assert_eq!(popular.body["items"][0]["productId"], p["id"]);
    assert_eq!(popular.body["items"][0]["totalSold"], 2);
    assert_eq!(option_stock(&app, option).await, 3, "a payment does not touch stock");
}

async fn ten_concurrent_payments_spend_once(app: TestApp) {
    let user = app.users(1, 100_000).await[0];
    let option = hot_option(&app, 10).await;
    let id = order(&app, user, json!([{"productOptionId": option, "quantity": 3}])).await.body["id"].as_i64().unwrap();
    let app = Arc::new(app);
    let barrier = Arc::new(Barrier::new(10));
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let (app, barrier) = (app.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                app.post_as(user, &format!("/api/v1/orders/{id}/payment"), json!({"userId": user})).await
            })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    assert_eq!(count(&answers, 200), 1, "{answers:?}");
    assert_eq!(count(&answers, 409), 9, "{answers:?}");
    assert!(answers.iter().filter(|r| r.status == 409).all(|r| r.body["code"] == "ORDER_NOT_PAYABLE"));
    assert_eq!(app.get_as(user, &format!("/api/v1/users/{user}/balance")).await.body["balance"], 97_000, "spent once");
    assert_eq!(app.scalar("SELECT CAST(SUM(total_sold) AS BIGINT) FROM daily_popular_products").await, 3, "sold once");
}

async fn a_payment_short_of_balance_cancels_and_gives_stock_back(app: TestApp) {
    let user = app.users(1, 1_500).await[0];
    let option = hot_option(&app, 5).await;
    let id = order(&app, user, json!([{"productOptionId": option, "quantity": 2}])).await.body["id"].as_i64().unwrap();
    assert_eq!(option_stock(&app, option).await, 3);
    let r = app.post_as(user, &format!("/api/v1/orders/{id}/payment"), json!({"userId": user})).await;
    r.problem(402, "INSUFFICIENT_BALANCE");
    let after = app.get_as(user, &format!("/api/v1/orders/{id}")).await;
    assert_eq!(
        (after.body["status"].as_str(), after.body["payment"]["status"].as_str()),
        (Some("CANCELLED"), Some("FAILED"))
    );
    assert_eq!(option_stock(&app, option).await, 5, "the stock came back");
    assert_eq!(
        app.get_as(user, &format!("/api/v1/users/{user}/balance")).await.body["balance"],
        1_500,
        "nothing spent"
    );
    assert_eq!(app.scalar("SELECT COUNT(*) FROM daily_popular_products").await, 0, "nothing sold");
    app.post_as(user, &format!("/api/v1/orders/{id}/payment"), json!({"userId": user}))
        .await
        .problem(409, "ORDER_NOT_PAYABLE");
}

async fn an_expired_order_gives_its_stock_back_once(app: TestApp) {
    let user = app.users(1, 100_000).await[0];
    let option = hot_option(&app, 10).await;
    let stale =
        order(&app, user, json!([{"productOptionId": option, "quantity": 4}])).await.body["id"].as_i64().unwrap();
    app.clock.advance(Duration::from_secs(10 * 60));
    let fresh =
        order(&app, user, json!([{"productOptionId": option, "quantity": 1}])).await.body["id"].as_i64().unwrap();
    assert_eq!(option_stock(&app, option).await, 5);
    // Sixteen minutes after the first order and six after the second: only the first is past the timeout.
    app.clock.advance(Duration::from_secs(6 * 60));
    // Four sweepers at once, as four instances would run them.
    let app = Arc::new(app);
    let sweeps: Vec<_> = (0..4)
        .map(|_| {
            let orders = app.orders.clone();
            tokio::spawn(async move { orders.expire_overdue(Duration::from_secs(15 * 60), 100).await.unwrap() })
        })
        .collect();
    let mut cancelled = 0;
    for s in sweeps {
        cancelled += s.await.unwrap();
    }
    assert_eq!(cancelled, 1, "one sweeper cancelled it, the others found nothing");
    assert_eq!(option_stock(&app, option).await, 9, "its 4 units came back, once");
    let stale_now = app.get_as(user, &format!("/api/v1/orders/{stale}")).await;
    assert_eq!(
        (stale_now.body["status"].as_str(), stale_now.body["payment"]["status"].as_str()),
        (Some("CANCELLED"), Some("FAILED"))
    );
    assert_eq!(app.get_as(user, &format!("/api/v1/orders/{fresh}")).await.body["status"], "PENDING_PAYMENT");
    app.post_as(user, &format!("/api/v1/orders/{stale}/payment"), json!({"userId": user}))
        .await
        .problem(409, "ORDER_NOT_PAYABLE");
}
