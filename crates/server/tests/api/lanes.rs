//! Orders combined per option, in lanes: a blocked option's batch holds up no other option's orders, for every
//! strategy; a flash sale beside a whole catalogue keeps every option's stock right; a full lane sheds at once;
//! and an order whose client hangs up while it waits is never committed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sea_orm::{ConnectionTrait, DatabaseTransaction, Statement, TransactionTrait};
use serde_json::{Value, json};
use shop_domain::ids::ProductOptionId;
use shop_redis::{DistributedLock, LockGuard, PubSubLock, Redlock, SpinLock, option_lock_key};
use shop_server::StockStrategyName as S;
use tokio::sync::Barrier;

use crate::helpers::{Resp, Store, TestApp, eventually, lock_waiters};
use crate::redis_locks::{REDIS, RedisNodes, prefix, redis_up};

/// One instance on a fresh PostgreSQL database with `strategy` (and its Redis), patient lock waits.
async fn instance(
    strategy: S,
    nodes: Option<&RedisNodes>,
    tweak: impl FnOnce(&mut shop_server::Settings),
) -> Option<TestApp> {
    let needs_redis = !matches!(strategy, S::Conditional | S::Pessimistic | S::Optimistic | S::Local);
    if needs_redis && !redis_up().await {
        return None;
    }
    let redlock = nodes.map(|n| n.urls.clone()).unwrap_or_default();
    TestApp::spawn_with(Store::Postgres, move |s| {
        s.stock_strategy = strategy;
        s.redis_url = Some(REDIS.into());
        s.redis_key_prefix = prefix();
        s.redlock_urls = redlock;
        s.db_max_connections = 16;
        s.lock_wait_ms = 60_000;
        tweak(s);
    })
    .await
}

/// What keeps option A's batch from committing: its row locked by another session, or its Redis lock held by
/// another client.
enum Block {
    Row(DatabaseTransaction),
    Lock(LockGuard),
}

impl Block {
    async fn hold(app: &TestApp, option: i64, nodes: Option<&RedisNodes>) -> Self {
        let lease = Duration::from_secs(30);
        let lock: Option<Arc<dyn DistributedLock>> = match app.strategy {
            S::RedisSpin => Some(Arc::new(SpinLock::connect(REDIS, lease).await.unwrap())),
            S::RedisPubsub => Some(Arc::new(PubSubLock::connect(REDIS, lease).await.unwrap())),
            S::RedisRedlock => Some(Arc::new(Redlock::connect(&nodes.unwrap().urls, lease).await.unwrap())),
            _ => None,
        };
        if let Some(lock) = lock {
            let key = option_lock_key(&app.stock_prefix, ProductOptionId::new(option).unwrap());
            return Self::Lock(lock.lock(&key, tokio::time::Instant::now() + Duration::from_secs(5)).await.unwrap());
        }
        let tx = app.db.begin().await.unwrap();
        let sql = format!("SELECT stock FROM product_options WHERE id = {option} FOR UPDATE");
        tx.execute_raw(Statement::from_string(tx.get_database_backend(), sql)).await.unwrap();
        Self::Row(tx)
    }

    /// Until the blocked batch waits: on the row lock, or (for a Redis lock, which the database cannot see)
    /// until its lane runs with nothing left queued.
    async fn until_blocked(&self, app: &TestApp) {
        match self {
            Self::Row(_) => eventually("the batch waits for the row", || async { lock_waiters(app).await > 0 }).await,
            Self::Lock(_) => {
                eventually("the batch runs", || async {
                    let load = app.orders.placing_load();
                    load.lanes == 1 && load.queued == 0
                })
                .await;
            }
        }
    }

    async fn release(self) {
        match self {
            Self::Row(tx) => tx.commit().await.unwrap(),
            Self::Lock(mut guard) => guard.release().await.unwrap(),
        }
    }
}

fn line(option: i64, quantity: i64) -> Value {
    json!({"productOptionId": option, "quantity": quantity})
}

async fn order(app: &TestApp, user: i64, option: i64) -> Resp {
    app.post_as(user, "/api/v1/orders", json!({"userId": user, "items": [line(option, 1)]})).await
}

fn option_of(product: &Value) -> i64 {
    product["options"][0]["id"].as_i64().unwrap()
}

/// While option A's batch cannot commit, orders of option B on the same instance answer as fast as ever; A's
/// order then commits once A is free.
async fn a_blocked_option_holds_up_no_other(strategy: S) {
    let nodes = if strategy == S::RedisRedlock { Some(RedisNodes::start(3).await) } else { None };
    let Some(app) = instance(strategy, nodes.as_ref(), |_| {}).await else { return };
    let app = Arc::new(app);
    let (a, b) = (
        option_of(&app.product("hot", &[("a", 100, 10)]).await),
        option_of(&app.product("cold", &[("b", 100, 20)]).await),
    );
    let users = app.users(12, 0).await;
    // Warm the connections (HTTP, the pool) so the timing below is the order's own.
    assert_eq!(order(&app, users[0], b).await.status, 201);

    let block = Block::hold(&app, a, nodes.as_ref()).await;
    let blocked = {
        let (app, user) = (app.clone(), users[1]);
        tokio::spawn(async move { order(&app, user, a).await })
    };
    block.until_blocked(&app).await;
    let mut took = Vec::new();
    for user in &users[2..] {
        let started = Instant::now();
        let r = order(&app, *user, b).await;
        took.push(started.elapsed());
        assert_eq!(r.status, 201, "{r:?}");
    }
    assert!(!blocked.is_finished(), "option A's order is still waiting");
    took.sort_unstable();
    let median = took[took.len() / 2];
    eprintln!("[lanes] {strategy}: option B answered in {took:?} while option A was blocked");
    assert!(median < Duration::from_millis(100), "{strategy}: option B took {took:?} behind a blocked option A");
    block.release().await;
    let r = blocked.await.unwrap();
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!((app.stock_of(a).await, app.stock_of(b).await), (9, 9));
}

macro_rules! every_strategy {
    ($test:ident: $($name:ident => $strategy:ident),* $(,)?) => {
        mod $test {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$test(shop_server::StockStrategyName::$strategy).await;
                }
            )*
        }
    };
}

every_strategy!(a_blocked_option_holds_up_no_other:
    conditional => Conditional,
    pessimistic => Pessimistic,
    optimistic => Optimistic,
    local => Local,
    redis_spin => RedisSpin,
    redis_pubsub => RedisPubsub,
    redis_redlock => RedisRedlock,
    redis_optimistic => RedisOptimistic,
);

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// 2,000 buyers of 50 options (40 each, 30 units each) and 1,000 of one hot option (500 units), released at
/// once: every option sells exactly what it has, every 201 is an order, and the cold options' latency is
/// reported beside the hot option's.
async fn a_flash_sale_beside_the_catalogue_keeps_every_option_right(strategy: S) {
    let nodes = if strategy == S::RedisRedlock { Some(RedisNodes::start(3).await) } else { None };
    // 3,000 connections opened at once in a debug build beside another test: the server may take longer than
    // its defaults to read a request's head, and the buyers' warm connections must outlive the warm-up.
    let Some(app) = instance(strategy, nodes.as_ref(), |s| {
        s.http_keep_alive = Duration::from_secs(60);
        s.http_request_timeout = Duration::from_secs(60);
    })
    .await
    else {
        return;
    };
    let app = Arc::new(app);
    let hot = option_of(&app.product("hot", &[("one", 1000, 500)]).await);
    let mut cold = Vec::new();
    for i in 0..50 {
        cold.push(option_of(&app.product(&format!("cold {i}"), &[("one", 1000, 30)]).await));
    }
    let buyers = app.users(3000, 0).await;
    // Every buyer's connection is opened before the release, as a sale's visitors are on the page already: the
    // race is between orders, not between 3,000 TCP handshakes.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .pool_idle_timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let barrier = Arc::new(Barrier::new(buyers.len() + 1));
    let tasks: Vec<_> = buyers
        .iter()
        .enumerate()
        .map(|(i, user)| {
            let option = if i % 3 == 0 { hot } else { cold[i % 50] };
            let (app, barrier, user, client) = (app.clone(), barrier.clone(), *user, client.clone());
            // Signed in before the release.
            let token = app.token(user);
            tokio::spawn(async move {
                assert_eq!(app.send(client.get(app.url("/health/live"))).await.status, 200);
                barrier.wait().await;
                let started = Instant::now();
                let body = json!({"userId": user, "items": [line(option, 1)]});
                let r = app.send(client.post(app.url("/api/v1/orders")).bearer_auth(token).json(&body)).await;
                (option, r, started.elapsed())
            })
        })
        .collect();
    barrier.wait().await;
    let mut answers = Vec::with_capacity(tasks.len());
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    let unexpected: Vec<&Resp> =
        answers.iter().map(|(_, r, _)| r).filter(|r| ![201, 409].contains(&r.status)).collect();
    assert!(unexpected.is_empty(), "{strategy}: only 201 and 409: {:?}", unexpected.first());
    for (option, start) in std::iter::once((hot, 500)).chain(cold.iter().map(|o| (*o, 30))) {
        let created = answers.iter().filter(|(o, r, _)| *o == option && r.status == 201).count() as i64;
        let stored = app.scalar(&format!("SELECT COUNT(*) FROM order_items WHERE product_option_id = {option}")).await;
        let left = app.stock_of(option).await;
        assert_eq!(stored, created, "{strategy}: option {option}: every 201 is an order, and only they");
        assert_eq!(left + created, start, "{strategy}: option {option}: {left} left + {created} sold");
        assert!(left >= 0);
    }
    assert_eq!(app.stock_of(hot).await, 0, "1,000 buyers sell out 500 units");
    let latencies = |want_hot: bool| {
        let mut l: Vec<Duration> =
            answers.iter().filter(|(o, _, _)| (*o == hot) == want_hot).map(|(_, _, d)| *d).collect();
        l.sort_unstable();
        l
    };
    let (hot_l, cold_l) = (latencies(true), latencies(false));
    eprintln!(
        "[lanes] {strategy}: 1,000 hot buyers p50 {:?} p99 {:?}; 2,000 cold buyers of 50 options p50 {:?} p99 {:?}",
        percentile(&hot_l, 0.5),
        percentile(&hot_l, 0.99),
        percentile(&cold_l, 0.5),
        percentile(&cold_l, 0.99)
    );
}

every_strategy!(a_flash_sale_beside_the_catalogue_keeps_every_option_right:
    conditional => Conditional,
    pessimistic => Pessimistic,
    optimistic => Optimistic,
    local => Local,
    redis_spin => RedisSpin,
    redis_pubsub => RedisPubsub,
    redis_redlock => RedisRedlock,
    redis_optimistic => RedisOptimistic,
);

/// With room for five in option A's lane while its batch is blocked, twenty more orders of A: five queue and the
/// other fifteen are answered 503 with Retry-After at once and leave nothing behind; once A is free, exactly the
/// blocked and the queued orders are committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_lane_sheds_at_once_and_commits_nothing_for_what_it_shed() {
    let Some(app) = instance(S::Conditional, None, |s| s.order_queue_max = 5).await else { return };
    let app = Arc::new(app);
    let a = option_of(&app.product("hot", &[("a", 100, 100)]).await);
    let users = app.users(21, 0).await;
    let block = Block::hold(&app, a, None).await;
    let first = {
        let (app, user) = (app.clone(), users[0]);
        tokio::spawn(async move { order(&app, user, a).await })
    };
    block.until_blocked(&app).await;
    let started = Instant::now();
    let rest: Vec<_> = users[1..]
        .iter()
        .map(|user| {
            let (app, user) = (app.clone(), *user);
            tokio::spawn(async move { (user, order(&app, user, a).await) })
        })
        .collect();
    eventually("five queue", || async { app.orders.placing_load().queued == 5 }).await;
    eventually("fifteen are answered", || async { rest.iter().filter(|t| t.is_finished()).count() == 15 }).await;
    let (mut shed, mut waiting) = (Vec::new(), Vec::new());
    for task in rest {
        if task.is_finished() { shed.push(task.await.unwrap()) } else { waiting.push(task) }
    }
    let shed_in = started.elapsed();
    assert_eq!(shed.len(), 15);
    for (_, r) in &shed {
        r.problem(503, "SERVICE_UNAVAILABLE");
        assert_eq!(r.headers.get("retry-after").and_then(|v| v.to_str().ok()), Some("1"), "{r:?}");
    }
    assert!(!first.is_finished(), "A is still blocked while the fifteen were shed (in {shed_in:?})");
    block.release().await;
    assert_eq!(first.await.unwrap().status, 201);
    for task in waiting {
        let (_, r) = task.await.unwrap();
        assert_eq!(r.status, 201, "{r:?}");
    }
    assert_eq!(app.scalar("SELECT COUNT(*) FROM orders").await, 6);
    for (user, _) in &shed {
        assert_eq!(app.scalar(&format!("SELECT COUNT(*) FROM orders WHERE user_id = {user}")).await, 0);
    }
    assert_eq!(app.stock_of(a).await, 94);
    assert_eq!(app.orders.stats().shed.load(std::sync::atomic::Ordering::Relaxed), 15);
}

/// A client that gives up (its connection closed) while its order waits, in a lane behind a blocked batch or
/// (with combining off and a second batch in the pipeline) for the row itself, leaves no order behind; the client
/// that stayed gets its order.
async fn a_client_that_hangs_up_while_queued_leaves_no_order(batch: u32) {
    let Some(app) = instance(S::Conditional, None, |s| s.order_batch_max = batch).await else { return };
    let app = Arc::new(app);
    let a = option_of(&app.product("hot", &[("a", 100, 100)]).await);
    let users = app.users(3, 0).await;
    let (stays, leaves) = (users[1], users[2]);
    let block = Block::hold(&app, a, None).await;
    let first = {
        let (app, user) = (app.clone(), users[0]);
        tokio::spawn(async move { order(&app, user, a).await })
    };
    block.until_blocked(&app).await;
    let staying = {
        let (app, user) = (app.clone(), stays);
        tokio::spawn(async move { order(&app, user, a).await })
    };
    // Its own client, so that closing its connection closes nothing else.
    let impatient = reqwest::Client::builder().timeout(Duration::from_millis(500)).build().unwrap();
    let gave_up = impatient
        .post(app.url("/api/v1/orders"))
        .bearer_auth(app.token(leaves))
        .json(&json!({"items": [line(a, 1)]}))
        .send()
        .await;
    assert!(gave_up.is_err_and(|e| e.is_timeout()), "the impatient client gave up waiting");
    drop(impatient);
    block.release().await;
    assert_eq!(first.await.unwrap().status, 201);
    assert_eq!(staying.await.unwrap().status, 201);
    eventually("the abandoned order is dropped", || async {
        app.orders.stats().abandoned.load(std::sync::atomic::Ordering::Relaxed) == 1
    })
    .await;
    assert_eq!(app.scalar(&format!("SELECT COUNT(*) FROM orders WHERE user_id = {leaves}")).await, 0);
    assert_eq!(app.scalar("SELECT COUNT(*) FROM orders").await, 2);
    assert_eq!(app.stock_of(a).await, 98);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_while_queued_leaves_no_order_combined() {
    a_client_that_hangs_up_while_queued_leaves_no_order(128).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_while_waiting_for_the_row_leaves_no_order_one_by_one() {
    a_client_that_hangs_up_while_queued_leaves_no_order(1).await;
}
