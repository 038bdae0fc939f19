//! The catalogue's read cache: invalidated by the commits that change it, here at once and on other instances
//! through Redis, bounded by its staleness when a message is lost; `ETag`, `If-None-Match` and `Cache-Control`.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use fred::prelude::PubsubInterface;

use crate::helpers::{Resp, Store, TestApp, eventually};
use crate::proxy::FaultProxy;
use crate::redis_locks::{REDIS, prefix, redis_up};

/// The staleness bound these tests run with (the default).
const BOUND: Duration = Duration::from_secs(1);

async fn order(app: &TestApp, user: i64, option: i64, quantity: i64) -> Resp {
    let body = json!({"items": [{"productOptionId": option, "quantity": quantity}]});
    app.post_as(user, "/api/v1/orders", body).await
}

async fn stock_read(app: &TestApp, product: i64) -> i64 {
    let r = app.get(&format!("/api/v1/products/{product}")).await;
    assert_eq!(r.status, 200, "{r:?}");
    r.body["options"][0]["stock"].as_i64().unwrap()
}

/// How long until `app` shows `expected` units of `product`'s option (polled every 2 ms, for at most 3 s).
async fn until_shown(app: &TestApp, product: i64, expected: i64) -> Duration {
    let started = Instant::now();
    while stock_read(app, product).await != expected {
        assert!(started.elapsed() < Duration::from_secs(3), "stock {expected} never shown");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    started.elapsed()
}

/// How many clients listen on `channel`.
async fn listeners(redis: &fred::prelude::Client, channel: &str) -> i64 {
    let reply: Vec<fred::types::Value> = redis.pubsub_numsub(channel).await.unwrap();
    reply.get(1).and_then(fred::types::Value::as_i64).unwrap_or(0)
}

fn ids(product: &Value) -> (i64, i64) {
    (product["id"].as_i64().unwrap(), product["options"][0]["id"].as_i64().unwrap())
}

/// Two instances with Redis: an order on A shows on B (whose cache held the product) through the pub/sub
/// message, long before the bound; so does sold out. B's Redis then cut: a change still shows within the bound,
/// by expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_instance_shows_an_order_at_once_and_within_the_bound_without_redis() {
    if !redis_up().await {
        return;
    }
    let prefix = prefix();
    let Some(a) = TestApp::spawn_with(Store::Postgres, |s| {
        s.redis_url = Some(REDIS.into());
        s.redis_key_prefix = prefix.clone();
    })
    .await
    else {
        return;
    };
    let upstream = REDIS.trim_start_matches("redis://").trim_end_matches('/');
    let proxy = FaultProxy::start(upstream).await;
    let routed = proxy.route(REDIS, upstream);
    let b = a.second_instance_with(|s| s.redis_url = Some(routed)).await;
    let (redis, channel) = (crate::outbox::raw(REDIS).await, format!("{}:catalogue", a.stock_prefix));
    eventually("both instances listen for catalogue changes", || async { listeners(&redis, &channel).await >= 2 })
        .await;
    let (product, option) = ids(&a.product("cached", &[("one", 10, 5)]).await);
    let buyers = a.users(5, 0).await;
    assert_eq!(stock_read(&b, product).await, 5);
    // B's copy is cached now: read it again to be sure it serves from the cache (the same ETag).
    let first = b.get(&format!("/api/v1/products/{product}")).await;
    tokio::time::sleep(Duration::from_millis(50)).await;

    assert_eq!(order(&a, buyers[0], option, 1).await.status, 201);
    let heard = until_shown(&b, product, 4).await;
    assert!(heard < BOUND / 2, "B showed the order after {heard:?}: not through the message");
    assert_eq!(order(&a, buyers[1], option, 4).await.status, 201);
    let sold_out = until_shown(&b, product, 0).await;
    assert!(sold_out < BOUND / 2, "B showed sold out after {sold_out:?}");
    assert_ne!(b.get(&format!("/api/v1/products/{product}")).await.headers["etag"], first.headers["etag"]);

    // Without Redis, B hears nothing; its entry expires within the bound.
    proxy.cut();
    let (other, other_option) = ids(&a.product("uncached", &[("one", 10, 5)]).await);
    assert_eq!(stock_read(&b, other).await, 5);
    let ordered = Instant::now();
    assert_eq!(order(&a, buyers[2], other_option, 1).await.status, 201);
    until_shown(&b, other, 4).await;
    let expired = ordered.elapsed();
    assert!(expired <= BOUND + Duration::from_millis(200), "B showed the order only after {expired:?}");
    eprintln!(
        "[catalogue] B showed an order on A after {heard:?}, sold out after {sold_out:?}; with B's Redis cut, \
         after {expired:?} (bound {BOUND:?})"
    );
}

/// On the instance that made it, an admin's stock count, an order, a new product and an expired order show at
/// once, whatever the cache held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn this_instance_shows_its_own_changes_at_once() {
    let Some(app) = TestApp::spawn(Store::Postgres).await else { return };
    let (product, option) = ids(&app.product("edited", &[("one", 10, 5)]).await);
    let user = app.users(1, 0).await[0];
    assert_eq!(stock_read(&app, product).await, 5);
    let page = app.get("/api/v1/products?page=1&size=20").await;
    assert_eq!(page.body["total"], 1);

    let r = app.admin_put(&format!("/api/v1/admin/product-options/{option}/stock"), json!({"stock": 9})).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(stock_read(&app, product).await, 9, "an admin count shows at once");
    let page = app.get("/api/v1/products?page=1&size=20").await;
    assert_eq!(page.body["items"][0]["options"][0]["stock"], 9, "and on the page that shows it");

    assert_eq!(order(&app, user, option, 2).await.status, 201);
    assert_eq!(stock_read(&app, product).await, 7, "an order shows at once");

    app.product("added", &[("one", 10, 1)]).await;
    assert_eq!(app.get("/api/v1/products?page=1&size=20").await.body["total"], 2, "a new product shows at once");

    app.clock.advance(Duration::from_secs(16 * 60));
    assert_eq!(app.orders.expire_overdue(Duration::from_secs(15 * 60), 100).await.unwrap(), 1);
    assert_eq!(stock_read(&app, product).await, 9, "an expired order's units show at once");
}

/// `ETag` and `Cache-Control` on the public catalogue: 304 for a matching `If-None-Match` (also a weak or listed
/// one), 200 with a new tag after a change; none on a user-scoped route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etags_answer_304_until_the_product_changes() {
    let Some(app) = TestApp::spawn(Store::Postgres).await else { return };
    let (product, option) = ids(&app.product("tagged", &[("one", 10, 5)]).await);
    let user = app.users(1, 0).await[0];
    let path = format!("/api/v1/products/{product}");
    let first = app.get(&path).await;
    let etag = first.headers["etag"].to_str().unwrap().to_owned();
    assert!(etag.starts_with('"') && etag.len() > 10, "{etag}");
    assert_eq!(first.headers["cache-control"], "public, max-age=1");
    for asked in [etag.clone(), format!("W/{etag}"), format!("\"other\", {etag}"), "*".to_owned()] {
        let r = app.client.get(app.url(&path)).header("if-none-match", &asked).send().await.unwrap();
        assert_eq!(r.status(), 304, "If-None-Match: {asked}");
        assert_eq!(r.headers()["etag"].to_str().unwrap(), etag);
        assert!(r.bytes().await.unwrap().is_empty());
    }
    let r = app.client.get(app.url(&path)).header("if-none-match", "\"stale\"").send().await.unwrap();
    assert_eq!(r.status(), 200);

    assert_eq!(order(&app, user, option, 1).await.status, 201);
    let r = app.client.get(app.url(&path)).header("if-none-match", &etag).send().await.unwrap();
    assert_eq!(r.status(), 200, "changed since");
    assert_ne!(r.headers()["etag"].to_str().unwrap(), etag);

    for public in ["/api/v1/products?page=1&size=5", "/api/v1/products/popular"] {
        let r = app.get(public).await;
        assert_eq!(r.status, 200);
        assert!(r.headers.contains_key("etag"), "{public}");
        assert!(r.headers["cache-control"].to_str().unwrap().starts_with("public, max-age="), "{public}");
    }
    assert_eq!(app.get("/api/v1/products/popular").await.headers["cache-control"], "public, max-age=30");
    let me = app.get_as(user, "/api/v1/me").await;
    assert_eq!(me.status, 200);
    assert!(!me.headers.contains_key("etag") && !me.headers.contains_key("cache-control"), "{me:?}");
    assert_eq!(app.get("/api/v1/products/999999").await.status, 404, "a missing product is not cached as found");
}
