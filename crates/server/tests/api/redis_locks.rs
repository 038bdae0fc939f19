//! The Redis strategies in the application: order races over two instances sharing PostgreSQL and Redis
//! (Redlock over three redis-server nodes started here; `redis-optimistic` too, whose own tests are in
//! `redis_optimistic`), the fence refusing a holder paused past its lease, a lock wait that runs out, and
//! readiness.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::json;
use shop_domain::DomainError;
use shop_domain::ids::ProductOptionId;
use shop_domain::money::Quantity;
use shop_domain::order::OrderLine;
use shop_domain::ports::{StockPermit, StockStrategy, StockTake, UnitOfWork};
use shop_persistence::SeaUnitOfWork;
use shop_redis::{DistributedLock, RedisLockStock, SpinLock, option_lock_key};
use shop_server::StockStrategyName;

use crate::helpers::{Store, TestApp, races_over_instances};

pub(crate) const REDIS: &str = "redis://127.0.0.1:6379";

/// Redis at 6379, or a skip (a failure in CI).
pub(crate) async fn redis_up() -> bool {
    let up = tokio::net::TcpStream::connect("127.0.0.1:6379").await.is_ok();
    if !up {
        assert!(std::env::var_os("CI").is_none(), "Redis is required in CI and is not reachable at {REDIS}");
        eprintln!("skipping: Redis is not reachable at {REDIS}");
    }
    up
}

/// Throwaway redis-server processes (Redlock's nodes, a server a test may flush), killed when dropped.
pub(crate) struct RedisNodes {
    children: Vec<Child>,
    pub(crate) urls: Vec<String>,
}

impl RedisNodes {
    pub(crate) async fn start(n: usize) -> Self {
        let mut nodes = Self { children: Vec::new(), urls: Vec::new() };
        for _ in 0..n {
            let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .stdout(Stdio::null())
                .spawn()
                .expect("redis-server starts");
            nodes.children.push(child);
            nodes.urls.push(format!("redis://127.0.0.1:{port}"));
        }
        for url in &nodes.urls {
            let addr = url.trim_start_matches("redis://").to_owned();
            let deadline = Instant::now() + Duration::from_secs(10);
            while tokio::net::TcpStream::connect(&addr).await.is_err() {
                assert!(Instant::now() < deadline, "redis-server at {addr} did not start");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        nodes
    }
}

impl Drop for RedisNodes {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A key namespace of this test's own: every test database numbers its options from 1.
pub(crate) fn prefix() -> String {
    format!("test-{}", uuid::Uuid::new_v4().simple())
}

/// Two instances over one fresh PostgreSQL database and the strategy's Redis.
async fn cluster(
    strategy: StockStrategyName,
    nodes: Option<&RedisNodes>,
    batch: u32,
    fair: Option<bool>,
) -> Option<Vec<TestApp>> {
    if !redis_up().await {
        return None;
    }
    let redlock = nodes.map(|n| n.urls.clone()).unwrap_or_default();
    TestApp::spawn_cluster(Store::Postgres, 2, move |s| {
        s.stock_strategy = strategy;
        s.redis_key_prefix = prefix();
        s.redis_url = Some(REDIS.into());
        s.redlock_urls = redlock;
        s.db_max_connections = 16;
        s.lock_wait_ms = 30_000;
        s.order_batch_max = batch;
        s.lock_fair = fair;
    })
    .await
}

/// The races of [`races_over_instances`] over two instances sharing the strategy's Redis; afterwards every lock
/// is free.
async fn races_hold_over_two_instances(strategy: StockStrategyName, nodes: Option<&RedisNodes>, batch: u32) {
    races_hold_over_two_instances_with(strategy, nodes, batch, None).await;
}

async fn races_hold_over_two_instances_with(
    strategy: StockStrategyName,
    nodes: Option<&RedisNodes>,
    batch: u32,
    fair: Option<bool>,
) {
    let Some(apps) = cluster(strategy, nodes, batch, fair).await else { return };
    let apps: Vec<Arc<TestApp>> = apps.into_iter().map(Arc::new).collect();
    let app = &apps[0];
    let options = races_over_instances(&apps, &format!("{strategy:?} batch {batch}")).await;
    // Every lock was released after its commit: nothing of this test is left locked.
    for option in options {
        let key = option_lock_key(&app.stock_prefix, ProductOptionId::new(option).unwrap());
        let held = SpinLock::connect(nodes.map_or(REDIS, |n| n.urls[0].as_str()), Duration::from_secs(1))
            .await
            .unwrap()
            .lock(&key, tokio::time::Instant::now() + Duration::from_millis(200))
            .await;
        assert!(held.is_ok(), "{key} was left locked");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_spin_orders_race_over_two_instances() {
    races_hold_over_two_instances(StockStrategyName::RedisSpin, None, 128).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_spin_orders_race_over_two_instances_one_by_one() {
    races_hold_over_two_instances(StockStrategyName::RedisSpin, None, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_pubsub_orders_race_over_two_instances() {
    races_hold_over_two_instances(StockStrategyName::RedisPubsub, None, 128).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_pubsub_orders_race_over_two_instances_one_by_one() {
    races_hold_over_two_instances(StockStrategyName::RedisPubsub, None, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_optimistic_orders_race_over_two_instances() {
    races_hold_over_two_instances(StockStrategyName::RedisOptimistic, None, 128).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_optimistic_orders_race_over_two_instances_one_by_one() {
    races_hold_over_two_instances(StockStrategyName::RedisOptimistic, None, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_redlock_orders_race_over_two_instances() {
    if !redis_up().await {
        return;
    }
    let nodes = RedisNodes::start(3).await;
    races_hold_over_two_instances(StockStrategyName::RedisRedlock, Some(&nodes), 128).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_redlock_orders_race_over_two_instances_one_by_one() {
    if !redis_up().await {
        return;
    }
    let nodes = RedisNodes::start(3).await;
    races_hold_over_two_instances(StockStrategyName::RedisRedlock, Some(&nodes), 1).await;
}

/// The fair modes of the spin and Redlock locks (`SHOP_LOCK_FAIR=true`), and the pub/sub lock racing, hold the
/// same races.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fair_spin_orders_race_over_two_instances_one_by_one() {
    races_hold_over_two_instances_with(StockStrategyName::RedisSpin, None, 1, Some(true)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_pubsub_orders_race_over_two_instances_one_by_one() {
    races_hold_over_two_instances_with(StockStrategyName::RedisPubsub, None, 1, Some(false)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fair_redlock_orders_race_over_two_instances() {
    if !redis_up().await {
        return;
    }
    let nodes = RedisNodes::start(3).await;
    races_hold_over_two_instances_with(StockStrategyName::RedisRedlock, Some(&nodes), 128, Some(true)).await;
}

/// A holder whose lock expired while it was paused (its watchdog stopped, as in a long GC pause or a stopped
/// VM) finds a newer holder's write on the row, and its own write is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_paused_past_its_lease_has_its_stock_write_refused() {
    if !redis_up().await {
        return;
    }
    let Some(app) = TestApp::spawn(Store::Postgres).await else { return };
    let option = app.product("fenced", &[("one", 1, 10)]).await["options"][0]["id"].as_i64().unwrap();
    let option_id = ProductOptionId::new(option).unwrap();
    let lease = Duration::from_millis(300);
    let lock = SpinLock::connect(REDIS, lease).await.unwrap();
    let line = [OrderLine { option_id, quantity: Quantity::new(1).unwrap() }];
    let prefix = prefix();

    // The first holder takes the lock, then pauses: no renewal, no release.
    let paused = lock
        .lock(&option_lock_key(&prefix, option_id), tokio::time::Instant::now() + Duration::from_secs(5))
        .await
        .unwrap();
    let stale_fence = paused.fence();
    paused.abandon();

    // Once its lease ran out, a second holder gets the lock and writes.
    let strategy = RedisLockStock::new(SpinLock::connect(REDIS, lease).await.unwrap(), Duration::from_secs(5), prefix);
    let started = Instant::now();
    let permit = strategy.admit(&[&line]).await.unwrap().permit;
    assert!(started.elapsed() >= Duration::from_millis(200), "it waited for the lease, not for nothing");
    let uow = SeaUnitOfWork::new(app.db.clone());
    let mut tx = uow.begin().await.unwrap();
    let take = [StockTake { row: tx.read_stock(&[option_id]).await.unwrap()[0], units: 1 }];
    strategy.take(tx.as_mut(), &take, &permit, Utc::now()).await.unwrap();
    tx.commit().await.unwrap();
    drop(permit);

    // The first holder wakes up and writes under its old token: refused, and the transaction rolls back.
    let stale = StockPermit::fenced((), BTreeMap::from([(option_id, stale_fence)]));
    let mut tx = uow.begin().await.unwrap();
    let err = strategy.take(tx.as_mut(), &take, &stale, Utc::now()).await.unwrap_err();
    assert!(matches!(err, DomainError::StaleLock { .. }), "{err:?}");
    drop(tx);
    assert_eq!(app.stock_of(option).await, 9, "only the current holder's unit was taken");
}

/// An order that cannot get its lock within `SHOP_LOCK_WAIT_MS` is a 503 LOCK_TIMEOUT with Retry-After and
/// takes nothing; Redis is part of readiness.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_wait_that_runs_out_is_503_with_retry_after() {
    if !redis_up().await {
        return;
    }
    let Some(app) = TestApp::spawn_with(Store::Postgres, |s| {
        s.stock_strategy = StockStrategyName::RedisPubsub;
        s.redis_url = Some(REDIS.into());
        s.redis_key_prefix = prefix();
        s.lock_wait_ms = 300;
    })
    .await
    else {
        return;
    };
    let ready = app.get("/health/ready").await;
    assert_eq!((ready.status, ready.body["checks"]["redis"].as_str()), (200, Some("UP")), "{ready:?}");
    let option = app.product("held", &[("one", 1, 5)]).await["options"][0]["id"].as_i64().unwrap();
    let user = app.user("kim").await;
    let blocker = SpinLock::connect(REDIS, Duration::from_secs(10)).await.unwrap();
    let key = option_lock_key(&app.stock_prefix, ProductOptionId::new(option).unwrap());
    let mut held = blocker.lock(&key, tokio::time::Instant::now() + Duration::from_secs(5)).await.unwrap();
    let r = app
        .post_as(user, "/api/v1/orders", json!({"userId": user, "items": [{"productOptionId": option, "quantity": 1}]}))
        .await;
    r.problem(503, "LOCK_TIMEOUT");
    assert_eq!(r.headers.get("retry-after").unwrap(), "1");
    assert_eq!(app.stock_of(option).await, 5);
    held.release().await.unwrap();
    let r = app
        .post_as(user, "/api/v1/orders", json!({"userId": user, "items": [{"productOptionId": option, "quantity": 1}]}))
        .await;
    assert_eq!(r.status, 201, "{r:?}");
}
