//! Users and balance: creation, reads, charges, their limits, and concurrent charges.

use std::sync::Arc;

use serde_json::json;
use tokio::sync::Barrier;

use crate::helpers::TestApp;
use crate::on_both_stores;

on_both_stores!(
    creating_a_user_starts_at_zero_balance,
    bad_user_bodies_are_validation_problems,
    names_are_unique_among_live_users,
    balance_of_unknown_or_malformed_ids,
    charge_adds_and_answers_the_new_balance,
    bad_charges_change_nothing,
    charge_past_the_balance_limit_is_refused_and_changes_nothing,
    hundred_concurrent_charges_lose_nothing,
);

async fn creating_a_user_starts_at_zero_balance(app: TestApp) {
    let r = app.post("/api/v1/users", json!({"name": "  kim  ", "password": "correct horse"})).await;
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(r.body["name"], "kim", "names are trimmed");
    assert_eq!(r.body["balance"], 0);
    assert!(r.body.get("password").is_none() && r.body.get("passwordHash").is_none());
    let id = r.body["id"].as_i64().unwrap();
    let stored = app.scalars(&format!("SELECT CAST(LENGTH(password_hash) AS BIGINT) FROM users WHERE id = {id}")).await;
    let hash_of_kim =
        app.scalars(&format!("SELECT COUNT(*) FROM users WHERE id = {id} AND password_hash LIKE '$argon2id$%'")).await;
    assert!(stored[0] > 50 && hash_of_kim == [1], "only an Argon2id hash is stored");
    let b = app.get_as(id, &format!("/api/v1/users/{id}/balance")).await;
    assert_eq!((b.status, b.body["userId"].as_i64(), b.body["balance"].as_i64()), (200, Some(id), Some(0)));
}

async fn bad_user_bodies_are_validation_problems(app: TestApp) {
    let pw = "correct horse";
    app.post("/api/v1/users", json!({"name": "", "password": pw})).await.invalid("name");
    app.post("/api/v1/users", json!({"name": "   ", "password": pw})).await.invalid("name");
    app.post("/api/v1/users", json!({"name": "a".repeat(51), "password": pw})).await.invalid("name");
    app.post("/api/v1/users", json!({"name": 5, "password": pw})).await.invalid("name");
    app.post("/api/v1/users", json!({"name": "kim"})).await.invalid("body");
    app.post("/api/v1/users", json!({"name": "kim", "password": "short"})).await.invalid("password");
    app.post("/api/v1/users", json!({"name": "kim", "password": "p".repeat(129)})).await.invalid("password");
    app.post("/api/v1/users", json!({})).await.invalid("body");
    app.post_raw("/api/v1/users", "{\"name\": ").await.invalid("name");
    app.post_raw("/api/v1/users", "not json").await.invalid("body");
    app.post_raw("/api/v1/users", "").await.invalid("body");
    let missing = app.post("/api/v1/users", json!({})).await;
    assert!(missing.body["detail"].as_str().unwrap().contains("name"), "a missing field is named: {missing:?}");
    assert!(
        app.post("/api/v1/users", json!({"name": "가".repeat(50), "password": pw})).await.status == 201,
        "50 characters, not bytes"
    );
    assert_eq!(app.scalar("SELECT COUNT(*) FROM users").await, 1, "nothing else was created");
}

async fn names_are_unique_among_live_users(app: TestApp) {
    use sea_orm::ConnectionTrait;
    let kim = app.user("kim").await;
    let again = app.post("/api/v1/users", json!({"name": " kim ", "password": "another one"})).await;
    again.problem(409, "USER_NAME_TAKEN");
    app.db
        .execute_unprepared(&format!("UPDATE users SET deleted_at = CURRENT_TIMESTAMP WHERE id = {kim}"))
        .await
        .unwrap();
    let reborn = app.post("/api/v1/users", json!({"name": "kim", "password": "another one"})).await;
    assert_eq!(reborn.status, 201, "a soft-deleted user frees the name: {reborn:?}");
}

async fn balance_of_unknown_or_malformed_ids(app: TestApp) {
    // A valid token of a user that does not (or no longer) exist.
    app.get_as(999_999, "/api/v1/users/999999/balance").await.problem(404, "USER_NOT_FOUND");
    let kim = app.user("kim").await;
    for bad in ["0", "-3", "abc", "99999999999999999999"] {
        app.get_as(kim, &format!("/api/v1/users/{bad}/balance")).await.invalid("userId");
    }
}

async fn charge_adds_and_answers_the_new_balance(app: TestApp) {
    let id = app.user("kim").await;
    let r = app.post_as(id, &format!("/api/v1/users/{id}/balance/charge"), json!({"amount": 10_000})).await;
    assert_eq!((r.status, r.body["balance"].as_i64()), (200, Some(10_000)), "{r:?}");
    let r = app.post_as(id, &format!("/api/v1/users/{id}/balance/charge"), json!({"amount": 10_000_000})).await;
    assert_eq!(r.body["balance"], 10_010_000);
    assert_eq!(app.get_as(id, &format!("/api/v1/users/{id}/balance")).await.body["balance"], 10_010_000);
    app.post_as(424_242, "/api/v1/users/424242/balance/charge", json!({"amount": 1}))
        .await
        .problem(404, "USER_NOT_FOUND");
}

async fn bad_charges_change_nothing(app: TestApp) {
    let id = app.user("kim").await;
    let path = format!("/api/v1/users/{id}/balance/charge");
    for amount in [json!(0), json!(-5), json!(10_000_001), json!(i64::MAX), json!(1.5), json!("100"), json!(null)] {
        app.post_as(id, &path, json!({ "amount": amount })).await.invalid("amount");
    }
    let raw =
        |body: &'static str| app.client.post(app.url(&path)).header("content-type", "application/json").body(body);
    app.send_as(id, raw("{\"amount\": 1e400}")).await.invalid("amount");
    app.send_as(id, raw("{\"amount\": 99999999999999999999999}")).await.invalid("amount");
    app.post_as(id, &path, json!({})).await.invalid("body");
    assert_eq!(app.get_as(id, &format!("/api/v1/users/{id}/balance")).await.body["balance"], 0);
}

async fn charge_past_the_balance_limit_is_refused_and_changes_nothing(app: TestApp) {
    use sea_orm::ConnectionTrait;
    let id = app.user("whale").await;
    // Arrange a balance near the limit behind the API: reaching it by charges would take 100,000 requests.
    app.db.execute_unprepared(&format!("UPDATE users SET balance = 999999999999 WHERE id = {id}")).await.unwrap();
    let path = format!("/api/v1/users/{id}/balance/charge");
    let r = app.post_as(id, &path, json!({"amount": 1})).await;
    assert_eq!(r.body["balance"], 1_000_000_000_000_i64, "up to the limit is fine: {r:?}");
    app.post_as(id, &path, json!({"amount": 1})).await.problem(422, "BALANCE_LIMIT_EXCEEDED");
    assert_eq!(app.get_as(id, &format!("/api/v1/users/{id}/balance")).await.body["balance"], 1_000_000_000_000_i64);
}

async fn hundred_concurrent_charges_lose_nothing(app: TestApp) {
    let id = app.user("kim").await;
    let app = Arc::new(app);
    let barrier = Arc::new(Barrier::new(100));
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let (app, barrier) = (app.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                app.post_as(id, &format!("/api/v1/users/{id}/balance/charge"), json!({"amount": 1000})).await.status
            })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap(), 200);
    }
    let balance = app.get_as(id, &format!("/api/v1/users/{id}/balance")).await.body["balance"].as_i64();
    assert_eq!(balance, Some(100_000), "every one of 100 concurrent charges of 1,000 counted ({:?})", app.store);
}
