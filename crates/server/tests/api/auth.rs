//! Authentication (API v1.1): every user-scoped route acts for the caller only, whatever a client forges;
//! sessions rotate and a copied refresh token revokes its family; failed sign-ins are throttled; one user cannot
//! hold more than the pending caps; an embedded deployment keeps its signing secret across restarts.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use serde_json::{Value, json};
use shop_auth::{AuthSecret, JwtTokens};
use shop_domain::ids::UserId;
use shop_domain::ports::Tokens;
use tokio::sync::Barrier;

use crate::helpers::{AUTH_SECRET, Resp, Store, TestApp, password_of};
use crate::on_both_stores;

on_both_stores!(
    every_user_scoped_route_refuses_forged_and_foreign_tokens_and_changes_nothing,
    signing_in_refreshing_and_signing_out,
    a_replayed_refresh_token_revokes_its_family,
    wrong_passwords_are_throttled_and_the_right_one_waits,
    an_idempotency_key_is_claimed_only_after_the_caller_is_known,
);

/// What a client may send in `Authorization` instead of its own valid token.
fn forgeries(app: &TestApp, victim: i64) -> Vec<(&'static str, Option<String>)> {
    let secret = AuthSecret::new(AUTH_SECRET.as_bytes().to_vec()).unwrap();
    let victim_id = UserId::new(victim).unwrap();
    let expired = JwtTokens::new(&secret, Duration::from_secs(60))
        .access_token(victim_id, Utc::now() - chrono::Duration::hours(1))
        .unwrap()
        .token;
    let other = AuthSecret::new(b"another deployment's secret, 32 bytes or more".to_vec()).unwrap();
    let foreign_secret =
        JwtTokens::new(&other, Duration::from_secs(900)).access_token(victim_id, Utc::now()).unwrap().token;
    let valid = app.token(victim);
    let claims = valid.split('.').nth(1).unwrap().to_owned();
    // {"alg":"none","typ":"JWT"}: the victim's claims, unsigned.
    let unsigned = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{claims}.");
    let truncated = valid[..valid.len() - 5].to_owned();
    vec![
        ("no token", None),
        ("an expired token", Some(expired)),
        ("a token signed with another secret", Some(foreign_secret)),
        ("alg: none", Some(unsigned)),
        ("a truncated token", Some(truncated)),
        ("not a JWT", Some("victim".to_owned())),
    ]
}

/// A route under attack: method, path, body, and what the thief's own valid token gets (status, code).
type Route = (&'static str, String, Option<Value>, (u16, &'static str));

/// Everything of the victim's that a refused request must leave as it was.
async fn victims_world(app: &TestApp, victim: i64, option: i64) -> Vec<i64> {
    vec![
        app.scalar(&format!("SELECT balance FROM users WHERE id = {victim}")).await,
        app.scalar(&format!("SELECT COUNT(*) FROM carts WHERE user_id = {victim} AND deleted_at IS NULL")).await,
        app.scalar(&format!(
            "SELECT CAST(COALESCE(SUM(quantity), 0) AS BIGINT) FROM carts WHERE user_id = {victim} AND deleted_at IS NULL"
        ))
        .await,
        app.scalar("SELECT COUNT(*) FROM orders").await,
        app.scalar(&format!("SELECT COUNT(*) FROM orders WHERE user_id = {victim} AND status = 'PENDING_PAYMENT'"))
            .await,
        app.stock_of(option).await,
        app.scalar("SELECT COUNT(*) FROM payments WHERE status = 'COMPLETED'").await,
        app.scalar("SELECT COUNT(*) FROM idempotency_keys").await,
    ]
}

async fn every_user_scoped_route_refuses_forged_and_foreign_tokens_and_changes_nothing(app: TestApp) {
    let victim = app.users(1, 50_000).await[0];
    let thief = app.user("thief").await;
    let option = app.product("shirt", &[("S", 1000, 10)]).await["options"][0]["id"].as_i64().unwrap();
    let line = app
        .post_as(
            victim,
            &format!("/api/v1/users/{victim}/cart/items"),
            json!({"productOptionId": option, "quantity": 2}),
        )
        .await;
    let line = line.body["id"].as_i64().unwrap();
    let order =
        app.post_as(victim, "/api/v1/orders", json!({"items": [{"productOptionId": option, "quantity": 1}]})).await;
    assert_eq!(order.status, 201, "{order:?}");
    let order = order.body["id"].as_i64().unwrap();
    let before = victims_world(&app, victim, option).await;

    let items = json!([{"productOptionId": option, "quantity": 1}]);
    // Method, path, body, and what the thief's own valid token gets.
    let routes: Vec<Route> = vec![
        ("GET", "/api/v1/me".into(), None, (200, "")),
        ("GET", format!("/api/v1/users/{victim}/balance"), None, (403, "FORBIDDEN")),
        (
            "POST",
            format!("/api/v1/users/{victim}/balance/charge"),
            Some(json!({"amount": 5_000_000})),
            (403, "FORBIDDEN"),
        ),
        ("GET", format!("/api/v1/users/{victim}/cart"), None, (403, "FORBIDDEN")),
        (
            "POST",
            format!("/api/v1/users/{victim}/cart/items"),
            Some(json!({"productOptionId": option, "quantity": 1})),
            (403, "FORBIDDEN"),
        ),
        ("DELETE", format!("/api/v1/users/{victim}/cart/items/{line}"), None, (403, "FORBIDDEN")),
        ("DELETE", format!("/api/v1/users/{thief}/cart/items/{line}"), None, (404, "CART_ITEM_NOT_FOUND")),
        ("GET", format!("/api/v1/users/{victim}/orders"), None, (403, "FORBIDDEN")),
        ("POST", "/api/v1/orders".into(), Some(json!({"userId": victim, "items": items})), (403, "FORBIDDEN")),
        ("GET", format!("/api/v1/orders/{order}"), None, (404, "ORDER_NOT_FOUND")),
        ("POST", format!("/api/v1/orders/{order}/payment"), Some(json!({"userId": victim})), (403, "FORBIDDEN")),
        ("POST", format!("/api/v1/orders/{order}/payment"), Some(json!({})), (404, "ORDER_NOT_FOUND")),
    ];
    let request = |method: &str, path: &str, body: &Option<Value>| {
        let req = match method {
            "GET" => app.client.get(app.url(path)),
            "POST" => app.client.post(app.url(path)),
            _ => app.client.delete(app.url(path)),
        };
        match body {
            Some(body) => req.json(body),
            None => req,
        }
    };
    for (method, path, body, (own_status, own_code)) in &routes {
        for (forgery, token) in forgeries(&app, victim) {
            let mut req = request(method, path, body);
            if let Some(token) = token {
                req = req.bearer_auth(token);
            }
            let r: Resp = app.send(req).await;
            r.problem(401, "UNAUTHORIZED");
            assert_eq!(
                r.headers.get("www-authenticate").and_then(|v| v.to_str().ok()),
                Some("Bearer"),
                "{method} {path} with {forgery}"
            );
        }
        // The scheme's name is case-insensitive; a valid token of someone else still acts for them only.
        let req = request(method, path, body).header("authorization", format!("bEaReR {}", app.token(thief)));
        let r = app.send(req).await;
        if *own_status == 200 {
            assert_eq!((r.status, r.body["id"].as_i64()), (200, Some(thief)), "/me is the caller: {r:?}");
        } else {
            r.problem(*own_status, own_code);
        }
        assert_eq!(victims_world(&app, victim, option).await, before, "{method} {path} changed nothing");
    }
}

async fn signing_in_refreshing_and_signing_out(app: TestApp) {
    let kim = app.user("kim").await;
    let session = app.sign_in("kim").await;
    assert_eq!((session.status, session.body["tokenType"].as_str()), (200, Some("Bearer")), "{session:?}");
    assert_eq!(session.body["expiresIn"], 900);
    let access = session.body["accessToken"].as_str().unwrap().to_owned();
    let me = app.send(app.client.get(app.url("/api/v1/me")).bearer_auth(&access)).await;
    assert_eq!((me.status, me.body["id"].as_i64(), me.body["name"].as_str()), (200, Some(kim), Some("kim")));
    // A wrong password and an unknown name are the same answer.
    let wrong = app.post("/api/v1/auth/token", json!({"name": "kim", "password": "not the password"})).await;
    let nobody = app.post("/api/v1/auth/token", json!({"name": "nobody", "password": password_of("kim")})).await;
    wrong.problem(401, "INVALID_CREDENTIALS");
    nobody.problem(401, "INVALID_CREDENTIALS");
    assert_eq!(wrong.body["detail"], nobody.body["detail"]);
    // Refresh: a new pair; the old refresh token is retired.
    let refresh = session.body["refreshToken"].as_str().unwrap().to_owned();
    let renewed = app.post("/api/v1/auth/refresh", json!({"refreshToken": refresh})).await;
    assert_eq!((renewed.status, renewed.body["userId"].as_i64()), (200, Some(kim)), "{renewed:?}");
    let next = renewed.body["refreshToken"].as_str().unwrap().to_owned();
    assert_ne!(next, refresh);
    let me = app
        .send(app.client.get(app.url("/api/v1/me")).bearer_auth(renewed.body["accessToken"].as_str().unwrap()))
        .await;
    assert_eq!(me.status, 200);
    // Logout revokes the family: the newest refresh token is refused after it.
    assert_eq!(app.post("/api/v1/auth/logout", json!({"refreshToken": next})).await.status, 204);
    app.post("/api/v1/auth/refresh", json!({"refreshToken": next})).await.problem(401, "INVALID_TOKEN");
    app.post("/api/v1/auth/logout", json!({"refreshToken": next})).await.problem(401, "INVALID_TOKEN");
    app.post("/api/v1/auth/refresh", json!({"refreshToken": "never issued"})).await.invalid("refreshToken");
    app.post("/api/v1/auth/refresh", json!({"refreshToken": "f".repeat(64)})).await.problem(401, "INVALID_TOKEN");
    // Only digests are stored.
    let stored = app.scalar(&format!("SELECT COUNT(*) FROM refresh_tokens WHERE token_hash = '{next}'")).await;
    assert_eq!(stored, 0, "the token itself is never stored");
    // The access token expires with its TTL, judged on the service's clock.
    app.clock.advance(Duration::from_secs(901));
    let late = app.send(app.client.get(app.url("/api/v1/me")).bearer_auth(&access)).await;
    late.problem(401, "UNAUTHORIZED");
}

async fn a_replayed_refresh_token_revokes_its_family(app: TestApp) {
    app.user("kim").await;
    let first = app.sign_in("kim").await.body["refreshToken"].as_str().unwrap().to_owned();
    let second = app.post("/api/v1/auth/refresh", json!({"refreshToken": first})).await;
    let second = second.body["refreshToken"].as_str().unwrap().to_owned();
    // Someone presents the retired one: refused, and the family goes with it.
    app.post("/api/v1/auth/refresh", json!({"refreshToken": first})).await.problem(401, "INVALID_TOKEN");
    app.post("/api/v1/auth/refresh", json!({"refreshToken": second})).await.problem(401, "INVALID_TOKEN");
    // Another sign-in is another family, untouched.
    let other = app.sign_in("kim").await.body["refreshToken"].as_str().unwrap().to_owned();
    assert_eq!(app.post("/api/v1/auth/refresh", json!({"refreshToken": other})).await.status, 200);
    // Two concurrent refreshes of one live token: exactly one rotates.
    let live = app.sign_in("kim").await.body["refreshToken"].as_str().unwrap().to_owned();
    let app = Arc::new(app);
    let barrier = Arc::new(Barrier::new(10));
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let (app, barrier, live) = (app.clone(), barrier.clone(), live.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                app.post("/api/v1/auth/refresh", json!({"refreshToken": live})).await.status
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 1, "{statuses:?}");
    assert!(statuses.iter().all(|s| [200, 401].contains(s)), "{statuses:?}");
}

async fn wrong_passwords_are_throttled_and_the_right_one_waits(app: TestApp) {
    app.user("kim").await;
    let attempt = |password: String| app.post("/api/v1/auth/token", json!({"name": "kim", "password": password}));
    let mut throttled = None;
    for n in 0..20 {
        let r = attempt(format!("wrong password {n}")).await;
        match r.status {
            401 => assert!(throttled.is_none(), "once throttled, it stays throttled: {r:?}"),
            429 => {
                r.problem(429, "TOO_MANY_ATTEMPTS");
                let retry: u64 = r.headers.get("retry-after").unwrap().to_str().unwrap().parse().unwrap();
                throttled = throttled.or(Some((n, retry)));
            }
            other => panic!("{other}: {r:?}"),
        }
    }
    let (from, retry_after) = throttled.expect("20 wrong passwords in a row are throttled");
    assert!(from <= 5, "throttled after the fifth failure, not later: {from}");
    // The right password is refused too until the name cools down.
    attempt(password_of("kim")).await.problem(429, "TOO_MANY_ATTEMPTS");
    // Other names are not throttled by kim's failures.
    app.user("lee").await;
    app.clock.advance(Duration::from_secs(retry_after));
    let r = attempt(password_of("kim")).await;
    assert_eq!(r.status, 200, "after Retry-After the right password signs in: {r:?}");
}

/// A hundred orders of one user released at once over ten options (ten lanes, so they really race): with a cap
/// of three unpaid orders, exactly three are placed and the rest are 409 PENDING_LIMIT_EXCEEDED.
async fn a_user_cannot_pass_the_pending_caps_with_a_hundred_concurrent_orders(store: Store) {
    let Some(app) = TestApp::spawn_with(store, |s| {
        s.max_pending_orders_per_user = 3;
        s.db_max_connections = 16;
    })
    .await
    else {
        return;
    };
    let user = app.users(1, 0).await[0];
    let names: Vec<String> = (0..10).map(|n| format!("o{n}")).collect();
    let product = app.product("drop", &names.iter().map(|n| (n.as_str(), 1000, 100)).collect::<Vec<_>>()).await;
    let options: Vec<i64> = product["options"].as_array().unwrap().iter().map(|o| o["id"].as_i64().unwrap()).collect();
    let app = Arc::new(app);
    let (answers, _) = crate::helpers::race(
        std::slice::from_ref(&app),
        &[user; 100],
        |i| json!([{"productOptionId": options[i % 10], "quantity": 1}]),
    )
    .await;
    let created = answers.iter().filter(|r| r.status == 201).count();
    assert_eq!(created, 3, "{:?}", answers.iter().find(|r| ![201, 409].contains(&r.status)));
    for r in answers.iter().filter(|r| r.status != 201) {
        r.problem(409, "PENDING_LIMIT_EXCEEDED");
    }
    assert_eq!(app.scalar("SELECT COUNT(*) FROM orders").await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_cannot_pass_the_pending_caps_with_a_hundred_concurrent_orders_postgres() {
    a_user_cannot_pass_the_pending_caps_with_a_hundred_concurrent_orders(Store::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_cannot_pass_the_pending_caps_with_a_hundred_concurrent_orders_sqlite() {
    a_user_cannot_pass_the_pending_caps_with_a_hundred_concurrent_orders(Store::Sqlite).await;
}

async fn an_idempotency_key_is_claimed_only_after_the_caller_is_known(app: TestApp) {
    let kim = app.user("kim").await;
    let path = format!("/api/v1/users/{kim}/balance/charge");
    let unsigned = app.client.post(app.url(&path)).header("Idempotency-Key", "k1").json(&json!({"amount": 10}));
    app.send(unsigned).await.problem(401, "UNAUTHORIZED");
    assert_eq!(app.scalar("SELECT COUNT(*) FROM idempotency_keys").await, 0, "nothing was claimed");
    let signed = app.client.post(app.url(&path)).header("Idempotency-Key", "k1").json(&json!({"amount": 10}));
    assert_eq!(app.send_as(kim, signed).await.status, 200, "the key is still free for its owner");
}

/// The pending caps count units too: five units is the most, whatever the number of orders.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pending_units_cap_holds_and_paying_frees_it() {
    let Some(app) = TestApp::spawn_with(Store::Postgres, |s| {
        s.max_pending_orders_per_user = 10;
        s.max_pending_units_per_user = 5;
    })
    .await
    else {
        return;
    };
    let user = app.users(1, 1_000_000).await[0];
    let option = app.product("x", &[("o", 1000, 100)]).await["options"][0]["id"].as_i64().unwrap();
    let order =
        |q: i64| app.post_as(user, "/api/v1/orders", json!({"items": [{"productOptionId": option, "quantity": q}]}));
    let first = order(4).await;
    assert_eq!(first.status, 201);
    order(2).await.problem(409, "PENDING_LIMIT_EXCEEDED");
    assert_eq!(order(1).await.status, 201, "exactly up to five units");
    let id = first.body["id"].as_i64().unwrap();
    assert_eq!(app.post_as(user, &format!("/api/v1/orders/{id}/payment"), json!({})).await.status, 200);
    assert_eq!(order(2).await.status, 201, "a paid order no longer counts");
}

/// With Redis configured, failed sign-ins count across every instance: kim fails on both, and both refuse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_sign_ins_are_counted_across_instances_with_redis() {
    if !crate::redis_locks::redis_up().await {
        return;
    }
    let Some(apps) = TestApp::spawn_cluster(Store::Postgres, 2, |s| {
        s.redis_url = Some(crate::redis_locks::REDIS.into());
        s.redis_key_prefix = crate::redis_locks::prefix();
    })
    .await
    else {
        return;
    };
    apps[0].user("kim").await;
    let wrong = json!({"name": "kim", "password": "wrong password"});
    let mut statuses = Vec::new();
    for i in 0..6 {
        statuses.push(apps[i % 2].post("/api/v1/auth/token", wrong.clone()).await.status);
    }
    assert_eq!(statuses, vec![401, 401, 401, 401, 401, 429], "five failures over two instances, then refused");
    for app in &apps {
        let r = app.post("/api/v1/auth/token", json!({"name": "kim", "password": password_of("kim")})).await;
        r.problem(429, "TOO_MANY_ATTEMPTS");
        assert!(r.headers.get("retry-after").is_some());
    }
}

/// An embedded deployment without SHOP_AUTH_SECRET generates one, keeps it in its database, and a restart keeps
/// every token valid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_deployment_keeps_its_generated_secret_across_restarts() {
    let Some(app) = TestApp::spawn_with(Store::Sqlite, |s| s.auth_secret = None).await else { return };
    let kim = app.user("kim").await;
    let access = app.sign_in("kim").await.body["accessToken"].as_str().unwrap().to_owned();
    let secret = app.scalars("SELECT CAST(LENGTH(value) AS BIGINT) FROM app_secrets WHERE name = 'auth_secret'").await;
    assert_eq!(secret, vec![64], "a 256-bit secret, hex");
    let again = app.second_instance().await;
    let me = again.send(again.client.get(again.url("/api/v1/me")).bearer_auth(&access)).await;
    assert_eq!((me.status, me.body["id"].as_i64()), (200, Some(kim)), "{me:?}");
    // A token signed with the test suite's usual secret is not this deployment's.
    let foreign = again.send(again.client.get(again.url("/api/v1/me")).bearer_auth(again.token(kim))).await;
    foreign.problem(401, "UNAUTHORIZED");
}
