//! Faults under load: PostgreSQL and Redis cut off behind a fault proxy, SQLite locked by another writer, Redis
//! flushed, a fresh or restored database under an old mirror, a saturated pool, input the stores cannot hold.
//!
//! Each sustained-load test keeps a hundred buyers ordering through the fault and checks what the contract
//! promises: every answer is 201, 409 or 503 (with `Retry-After`), never 500; every 201 is a committed order;
//! the stock plus the units of the orders that hold it equals the start; and orders sell again within five
//! seconds of the dependency's return.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fred::prelude::{Builder, ClientLike, Config};
use sea_orm::{ConnectOptions, ConnectionTrait, Database};
use serde_json::json;
use shop_server::{Settings, StockStrategyName as S};
use tokio::sync::Barrier;

use crate::helpers::{Resp, Store, TestApp};
use crate::proxy::FaultProxy;
use crate::redis_locks::{REDIS, RedisNodes, prefix, redis_up};

const POSTGRES: &str = "127.0.0.1:5432";
const REDIS_ADDR: &str = "127.0.0.1:6379";
/// Buyers ordering at once, each again and again, through the fault.
const BUYERS: usize = 100;
const START: i64 = 1_000_000;
/// How long the dependency stays away: longer than every wait the settings bound (pool, lock, Redis command),
/// so that the requests caught by it do answer 503 rather than just take longer.
const OUTAGE: Duration = Duration::from_secs(3);
/// What the contract allows between the dependency's return and the next sale.
const RECOVERY: Duration = Duration::from_secs(5);

/// One answer of the sustained load: when its request left, when it was answered, and what it said.
struct Answer {
    sent: Instant,
    at: Instant,
    resp: Resp,
}

/// What a load through one fault came to.
struct Outcome {
    answers: Vec<Answer>,
    restored_at: Instant,
}

impl Outcome {
    fn count(&self, status: u16) -> usize {
        self.answers.iter().filter(|a| a.resp.status == status).count()
    }

    /// From the dependency's return to the first 201 of a request sent after it.
    fn recovery(&self) -> Option<Duration> {
        self.answers
            .iter()
            .filter(|a| a.resp.status == 201 && a.sent >= self.restored_at)
            .map(|a| a.at - self.restored_at)
            .min()
    }
}

/// Settings every fault test shares: unpaid orders uncapped (each buyer orders again and again), waits short
/// enough that a request caught by the fault answers 503 within seconds.
fn faulty(s: &mut Settings) {
    s.max_pending_orders_per_user = 100_000;
    s.max_pending_units_per_user = 100_000;
    s.db_acquire_timeout_secs = 2;
    s.db_lock_timeout = Duration::from_secs(2);
    s.db_statement_timeout = Duration::from_secs(5);
    s.lock_wait_ms = 2_000;
    s.db_max_connections = 8;
}

/// [`BUYERS`] buyers, released together, order one unit of `option` each, again and again; after half a
/// second `fault` runs, [`OUTAGE`] later `restore`, and the load goes on for [`RECOVERY`] more.
async fn through(app: &Arc<TestApp>, option: i64, fault: impl FnOnce(), restore: impl FnOnce()) -> Outcome {
    let buyers = app.users(BUYERS, 0).await;
    let barrier = Arc::new(Barrier::new(BUYERS + 1));
    let stop = Arc::new(std::sync::OnceLock::<Instant>::new());
    let tasks: Vec<_> = buyers
        .into_iter()
        .map(|user| {
            let (app, barrier, stop) = (app.clone(), barrier.clone(), stop.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                let mut answers = Vec::new();
                while stop.get().is_none_or(|end| Instant::now() < *end) {
                    let body = json!({"userId": user, "items": [{"productOptionId": option, "quantity": 1}]});
                    let sent = Instant::now();
                    let resp = app.post_as(user, "/api/v1/orders", body).await;
                    answers.push(Answer { sent, at: Instant::now(), resp });
                }
                answers
            })
        })
        .collect();
    barrier.wait().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    fault();
    tokio::time::sleep(OUTAGE).await;
    restore();
    let restored_at = Instant::now();
    stop.set(restored_at + RECOVERY).expect("set once");
    let mut answers = Vec::new();
    for task in tasks {
        answers.extend(task.await.expect("a buyer task"));
    }
    Outcome { answers, restored_at }
}

/// The contract under a fault, checked on the outcome and the database; prints the figures.
async fn holds_up(app: &TestApp, option: i64, outcome: &Outcome, label: &str) {
    holds_up_with(app, option, outcome, label, true).await;
}

/// [`holds_up`]; `felt`: whether the fault must have turned some answers into 503.
async fn holds_up_with(app: &TestApp, option: i64, outcome: &Outcome, label: &str, felt: bool) {
    let (created, conflict, unavailable) = (outcome.count(201), outcome.count(409), outcome.count(503));
    let recovery = outcome.recovery();
    let slowest = outcome.answers.iter().map(|a| a.at - a.sent).max().unwrap_or_default();
    eprintln!(
        "[fault] {label}: {} answers: 201 x{created}, 409 x{conflict}, 503 x{unavailable}; slowest {} ms; sold \
         again {} ms after the dependency returned",
        outcome.answers.len(),
        slowest.as_millis(),
        recovery.map_or(-1, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
    );
    for a in &outcome.answers {
        assert!(matches!(a.resp.status, 201 | 409 | 503), "{label}: {:?}", a.resp);
        if a.resp.status == 503 {
            assert!(a.resp.headers.contains_key("retry-after"), "{label}: {:?}", a.resp);
        }
    }
    assert!(!felt || unavailable > 0, "{label}: the fault was never felt");
    let recovery = recovery.unwrap_or_else(|| panic!("{label}: nothing sold after the dependency returned"));
    assert!(recovery < RECOVERY, "{label}: sold again only {recovery:?} after the dependency returned");

    let committed: HashSet<i64> = app.scalars("SELECT id FROM orders").await.into_iter().collect();
    for a in outcome.answers.iter().filter(|a| a.resp.status == 201) {
        let id = a.resp.body["id"].as_i64().expect("an order id");
        assert!(committed.contains(&id), "{label}: order {id} was answered 201 and is not in the database");
    }
    let held = app.held_units(option).await;
    let stock = app.stock_of(option).await;
    assert!(stock >= 0);
    assert_eq!(stock + held, START, "{label}: stock {stock} + held {held}");
}

async fn hot_option(app: &TestApp) -> i64 {
    app.product("hot", &[("one", 1, START)]).await["options"][0]["id"].as_i64().unwrap()
}

/// PostgreSQL cut off for a second under a hundred buyers, then back.
async fn postgres_cut(strategy: S, batch: u32) {
    let proxy = FaultProxy::start(POSTGRES).await;
    let needs_redis = matches!(strategy, S::RedisOptimistic);
    if needs_redis && !redis_up().await {
        return;
    }
    let route = |url: &str| proxy.route(url, POSTGRES);
    let Some(app) = TestApp::spawn_with(Store::Postgres, |s| {
        s.database_url = route(&s.database_url);
        s.stock_strategy = strategy;
        s.order_batch_max = batch;
        s.redis_url = Some(REDIS.into());
        s.redis_key_prefix = prefix();
        faulty(s);
    })
    .await
    else {
        return;
    };
    let app = Arc::new(app);
    let option = hot_option(&app).await;
    let ready = Arc::new(std::sync::Mutex::new(None));
    let outcome = through(
        &app,
        option,
        || {
            proxy.cut();
            // Readiness, asked in the middle of the outage, tells a balancer which dependency is gone, promptly.
            let (app, ready) = (app.clone(), ready.clone());
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let asked = Instant::now();
                let r = app.get("/health/ready").await;
                *ready.lock().unwrap() = Some((r, asked.elapsed()));
            });
        },
        || proxy.restore(),
    )
    .await;
    holds_up(&app, option, &outcome, &format!("PostgreSQL cut, {strategy:?} batch {batch}")).await;
    let (r, took) = ready.lock().unwrap().take().expect("readiness was asked");
    r.problem(503, "NOT_READY");
    assert_eq!(r.body["checks"]["database"], "DOWN", "{r:?}");
    assert!(took < Duration::from_millis(1_900), "readiness took {took:?}");
    assert_eq!(app.get("/health/ready").await.status, 200);
}

/// Every PostgreSQL connection reset once under load (a network blip, a proxy restarting): the requests caught
/// by it answer 503 and the pool reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_connections_reset_under_load() {
    let proxy = FaultProxy::start(POSTGRES).await;
    let route = |url: &str| proxy.route(url, POSTGRES);
    let Some(app) = TestApp::spawn_with(Store::Postgres, |s| {
        s.database_url = route(&s.database_url);
        s.stock_strategy = S::Conditional;
        faulty(s);
    })
    .await
    else {
        return;
    };
    let app = Arc::new(app);
    let option = hot_option(&app).await;
    let outcome = through(&app, option, || proxy.reset(), || {}).await;
    holds_up_with(&app, option, &outcome, "PostgreSQL connections reset, conditional", false).await;
}

/// Redis answering every packet 300 ms late: slow, never wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_delayed_under_load_spin() {
    if !redis_up().await {
        return;
    }
    let proxy = FaultProxy::start(REDIS_ADDR).await;
    let Some(app) = TestApp::spawn_with(Store::Postgres, |s| {
        s.stock_strategy = S::RedisSpin;
        s.redis_url = Some(format!("redis://{}", proxy.addr));
        s.redis_key_prefix = prefix();
        faulty(s);
    })
    .await
    else {
        return;
    };
    let app = Arc::new(app);
    let option = hot_option(&app).await;
    let outcome = through(&app, option, || proxy.delay(Duration::from_millis(300)), || proxy.restore()).await;
    holds_up_with(&app, option, &outcome, "Redis 300 ms late, redis-spin", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_cut_under_load_pessimistic_one_by_one() {
    postgres_cut(S::Pessimistic, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_cut_under_load_conditional() {
    postgres_cut(S::Conditional, 128).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_cut_under_load_optimistic() {
    postgres_cut(S::Optimistic, 128).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_cut_under_load_redis_optimistic() {
    postgres_cut(S::RedisOptimistic, 128).await;
}

/// SQLite has no network to cut: its fault is another writer holding the database (a backup, a migration, a
/// stuck process) for longer than the lock timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_locked_by_another_writer_under_load() {
    let app = TestApp::spawn_with(Store::Sqlite, |s| {
        s.stock_strategy = S::Conditional;
        faulty(s);
        s.db_lock_timeout = Duration::from_millis(500);
    })
    .await
    .expect("sqlite");
    let app = Arc::new(app);
    let option = hot_option(&app).await;
    let mut options = ConnectOptions::new(app.settings.database_url.clone());
    options.max_connections(1).sqlx_logging(false);
    let writer = Database::connect(options).await.unwrap();
    let locked = Arc::new(tokio::sync::Notify::new());
    let outcome = through(
        &app,
        option,
        || {
            let (writer, locked) = (writer.clone(), locked.clone());
            tokio::spawn(async move {
                writer.execute_unprepared("BEGIN IMMEDIATE").await.unwrap();
                locked.notified().await;
                writer.execute_unprepared("COMMIT").await.unwrap();
            });
        },
        || locked.notify_one(),
    )
    .await;
    holds_up(&app, option, &outcome, "SQLite locked by another writer, conditional").await;
}

/// Redis cut off for a second under a hundred buyers (PostgreSQL stays up), then back.
async fn redis_cut(strategy: S) {
    if !redis_up().await {
        return;
    }
    let nodes = if strategy == S::RedisRedlock { Some(RedisNodes::start(3).await) } else { None };
    let upstreams: Vec<String> = match &nodes {
        Some(nodes) => nodes.urls.iter().map(|u| u.trim_start_matches("redis://").to_owned()).collect(),
        None => vec![REDIS_ADDR.to_owned()],
    };
    let mut proxies = Vec::new();
    for upstream in &upstreams {
        proxies.push(FaultProxy::start(upstream).await);
    }
    let routed: Vec<String> = proxies.iter().map(|p| format!("redis://{}", p.addr)).collect();
    let Some(app) = TestApp::spawn_with(Store::Postgres, |s| {
        s.stock_strategy = strategy;
        s.redis_url = Some(routed[0].clone());
        s.redlock_urls = routed.clone();
        s.redis_key_prefix = prefix();
        faulty(s);
    })
    .await
    else {
        return;
    };
    let app = Arc::new(app);
    let option = hot_option(&app).await;
    let outcome = through(
        &app,
        option,
        || proxies.iter().for_each(FaultProxy::cut),
        || proxies.iter().for_each(FaultProxy::restore),
    )
    .await;
    holds_up(&app, option, &outcome, &format!("Redis cut, {strategy:?}")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cut_under_load_spin() {
    redis_cut(S::RedisSpin).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cut_under_load_pubsub() {
    redis_cut(S::RedisPubsub).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cut_under_load_redlock() {
    redis_cut(S::RedisRedlock).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cut_under_load_redis_optimistic() {
    redis_cut(S::RedisOptimistic).await;
}

/// After 300 sales under a lock strategy, Redis loses everything (FLUSHALL, what a restart without persistence
/// does): the fence counter starts over below the row's last fence, and the next order still sells at once.
async fn flushed_after_300_sales(strategy: S) {
    if !redis_up().await {
        return;
    }
    let nodes = RedisNodes::start(if strategy == S::RedisRedlock { 3 } else { 1 }).await;
    let Some(app) = TestApp::spawn_with(Store::Postgres, |s| {
        s.stock_strategy = strategy;
        s.redis_url = Some(nodes.urls[0].clone());
        s.redlock_urls = nodes.urls.clone();
        s.redis_key_prefix = prefix();
        // One lock grant per sale, as the reference runs it: 300 sales push the row's fence to 300.
        s.order_batch_max = 1;
        s.lock_wait_ms = 60_000;
        s.max_pending_orders_per_user = 1_000;
        s.max_pending_units_per_user = 1_000;
    })
    .await
    else {
        return;
    };
    let app = Arc::new(app);
    let option = app.product("flushed", &[("one", 1, 1_000)]).await["options"][0]["id"].as_i64().unwrap();
    let buyers = app.users(30, 0).await;
    let order = move |app: Arc<TestApp>, user: i64| async move {
        app.post_as(
            user,
            "/api/v1/orders",
            json!({"userId": user, "items": [{"productOptionId": option, "quantity": 1}]}),
        )
        .await
    };
    let sales: Vec<_> = buyers
        .iter()
        .map(|&user| {
            let app = app.clone();
            tokio::spawn(async move {
                for _ in 0..10 {
                    assert_eq!(order(app.clone(), user).await.status, 201);
                }
            })
        })
        .collect();
    for sale in sales {
        sale.await.unwrap();
    }
    let fence_sql = format!("SELECT fence_token FROM product_options WHERE id = {option}");
    let fence = || app.scalar(&fence_sql);
    let before = fence().await;
    assert!(before >= 300, "300 sales, one grant each: fence {before}");

    for url in &nodes.urls {
        let redis = Builder::from_config(Config::from_url(url).unwrap()).build().unwrap();
        redis.init().await.unwrap();
        let () = redis.flushall(false).await.unwrap();
    }
    let started = Instant::now();
    let r = order(app.clone(), buyers[0]).await;
    assert_eq!(r.status, 201, "{strategy:?}: the first order after the flush: {r:?}");
    eprintln!(
        "[fault] FLUSHALL after 300 sales, {strategy:?}: next order sold in {} ms",
        started.elapsed().as_millis()
    );
    assert!(fence().await > before, "the counter was raised past the row's fence");
    for _ in 0..5 {
        assert_eq!(order(app.clone(), buyers[1]).await.status, 201);
    }
    assert_eq!(app.stock_of(option).await, 1_000 - 306);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushed_after_300_sales_spin() {
    flushed_after_300_sales(S::RedisSpin).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushed_after_300_sales_pubsub() {
    flushed_after_300_sales(S::RedisPubsub).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushed_after_300_sales_redlock() {
    flushed_after_300_sales(S::RedisRedlock).await;
}

/// Orders of `option` by `user`: the statuses of `n` in a row.
async fn statuses(app: &TestApp, user: i64, option: i64, n: usize) -> Vec<u16> {
    let mut statuses = Vec::new();
    for _ in 0..n {
        let body = json!({"userId": user, "items": [{"productOptionId": option, "quantity": 1}]});
        statuses.push(app.post_as(user, "/api/v1/orders", body).await.status);
    }
    statuses
}

/// A fresh database pointed at a Redis that still holds another database's mirror under the same key prefix
/// (a recreated database): its options, numbered from 1 again, sell at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_database_under_an_old_mirror_sells_at_once() {
    if !redis_up().await {
        return;
    }
    let shared = prefix();
    let settings = |s: &mut Settings| {
        s.stock_strategy = S::RedisOptimistic;
        s.redis_url = Some(REDIS.into());
        s.redis_key_prefix = shared.clone();
    };
    let Some(old) = TestApp::spawn_with(Store::Postgres, settings).await else { return };
    let sold_out = old.product("old", &[("one", 1, 3)]).await["options"][0]["id"].as_i64().unwrap();
    let user = old.users(1, 0).await[0];
    assert_eq!(statuses(&old, user, sold_out, 4).await, [201, 201, 201, 409]);

    let fresh = TestApp::spawn_with(Store::Postgres, settings).await.expect("postgres");
    let option = fresh.product("new", &[("one", 1, 3)]).await["options"][0]["id"].as_i64().unwrap();
    assert_eq!(option, sold_out, "both databases number their options alike");
    let user = fresh.users(1, 0).await[0];
    assert_eq!(statuses(&fresh, user, option, 4).await, [201, 201, 201, 409]);
    assert_ne!(fresh.stock_prefix, old.stock_prefix);
}

/// The database restored from an older backup under a Redis that kept its mirror: the mirror is of a newer
/// state (fewer units), and the instance that starts on the restored database drops it instead of refusing
/// buyers the database can serve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restored_from_an_older_backup_drops_the_newer_mirror() {
    if !redis_up().await {
        return;
    }
    let Some(app) = TestApp::spawn_with(Store::Postgres, |s| {
        s.stock_strategy = S::RedisOptimistic;
        s.redis_url = Some(REDIS.into());
        s.redis_key_prefix = prefix();
        s.stock_reconcile_interval = Duration::from_secs(3600);
    })
    .await
    else {
        return;
    };
    let option = app.product("restored", &[("one", 1, 5)]).await["options"][0]["id"].as_i64().unwrap();
    let user = app.users(1, 0).await[0];
    assert_eq!(statuses(&app, user, option, 2).await, [201, 201]);
    // An instance that starts (as the periodic reconciliation does) notes in Redis the newest order it saw.
    let second = app.second_instance().await;
    // The backup: taken before those two orders.
    for sql in [
        "DELETE FROM payments".to_owned(),
        "DELETE FROM order_items".to_owned(),
        "DELETE FROM orders".to_owned(),
        format!("UPDATE product_options SET stock = 5 WHERE id = {option}"),
    ] {
        app.db.execute_unprepared(&sql).await.unwrap();
    }
    drop(second);
    let restarted = app.second_instance().await;
    assert_eq!(statuses(&restarted, user, option, 6).await, [201, 201, 201, 201, 201, 409]);
}

/// Control characters (NUL included) are refused at the edge with the same 400 on both stores: PostgreSQL
/// cannot store NUL in text, and none of them belongs in a name.
async fn control_characters_are_400(app: TestApp) {
    for name in ["a\u{0}b", "tab\there", "bell\u{7}"] {
        app.post("/api/v1/users", json!({"name": name, "password": "long enough password"})).await.invalid("name");
        let r = app
            .admin_post(
                "/api/v1/admin/products",
                json!({"name": name, "options": [{"name": "S", "price": 1, "stock": 1}]}),
            )
            .await;
        r.invalid("name");
        let r = app
            .admin_post(
                "/api/v1/admin/products",
                json!({"name": "shirt", "options": [{"name": name, "price": 1, "stock": 1}]}),
            )
            .await;
        r.invalid("options[].name");
    }
    assert_eq!(app.scalar("SELECT COUNT(*) FROM users").await, 0);
    assert_eq!(app.scalar("SELECT COUNT(*) FROM products").await, 0);
}

crate::on_both_stores!(control_characters_are_400);

/// Every connection of the pool busy past its wait: 503 with Retry-After, while readiness, on a connection of
/// its own, still answers at once; a statement stuck on a row lock gives up at the lock timeout, also 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_pool_is_503_with_retry_after_and_readiness_still_answers() {
    let Some(app) = TestApp::spawn_with(Store::Postgres, |s| {
        s.stock_strategy = S::Pessimistic;
        s.db_max_connections = 1;
        s.db_acquire_timeout_secs = 1;
        s.db_lock_timeout = Duration::from_secs(3);
        s.order_batch_max = 1;
    })
    .await
    else {
        return;
    };
    let app = Arc::new(app);
    assert_eq!(
        app.scalar(
            "SELECT CAST(EXTRACT(EPOCH FROM CAST(current_setting('lock_timeout') AS interval)) * 1000 AS BIGINT)"
        )
        .await,
        3_000,
        "every session carries the lock timeout"
    );
    let p = app.product("locked", &[("a", 1, 10), ("b", 1, 10)]).await;
    let [a, b] = [0, 1].map(|i| p["options"][i]["id"].as_i64().unwrap());
    let user = app.users(1, 0).await[0];
    // Another session holds option a's row: the order of a takes the only pooled connection and waits on it.
    let admin = Database::connect(app.settings.database_url.as_str()).await.unwrap();
    let holder = {
        use sea_orm::TransactionTrait;
        let tx = admin.begin().await.unwrap();
        tx.execute_unprepared(&format!("SELECT stock FROM product_options WHERE id = {a} FOR UPDATE")).await.unwrap();
        tx
    };
    let waiting = {
        let app = app.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let body = json!({"userId": user, "items": [{"productOptionId": a, "quantity": 1}]});
            (app.post_as(user, "/api/v1/orders", body).await, started.elapsed())
        })
    };
    crate::helpers::eventually("the order of a waits on the row", || async {
        admin
            .query_one_raw(sea_orm::Statement::from_string(
                sea_orm::DbBackend::Postgres,
                "SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()",
            ))
            .await
            .unwrap()
            .and_then(|row| row.try_get_by_index::<i64>(0).ok())
            == Some(1)
    })
    .await;
    let started = Instant::now();
    let body = json!({"userId": user, "items": [{"productOptionId": b, "quantity": 1}]});
    let (other, me, ready) =
        tokio::join!(app.post_as(user, "/api/v1/orders", body), app.get_as(user, "/api/v1/me"), async {
            let asked = Instant::now();
            (app.get("/health/ready").await, asked.elapsed())
        });
    for r in [&other, &me] {
        r.problem(503, "SERVICE_UNAVAILABLE");
        assert!(r.headers.contains_key("retry-after"), "{r:?}");
    }
    assert!(started.elapsed() < Duration::from_millis(2_500), "the pool wait is bounded: {:?}", started.elapsed());
    assert_eq!(ready.0.status, 200, "{:?}", ready.0);
    assert!(ready.1 < Duration::from_millis(500), "readiness took {:?}", ready.1);

    let (waited, took) = waiting.await.unwrap();
    waited.problem(503, "SERVICE_UNAVAILABLE");
    assert!(took >= Duration::from_millis(2_900) && took < Duration::from_secs(6), "gave up after {took:?}");
    holder.rollback().await.unwrap();
    assert_eq!(statuses(&app, user, a, 1).await, [201]);
    assert_eq!((app.stock_of(a).await, app.stock_of(b).await), (9, 10));
}

/// Orders of options that do not exist are 404 and leave nothing behind in Redis: no lock, no fence counter,
/// no mirror key (nor, in process, a lane or a lock entry: both exist only while they have work).
async fn unknown_options_leave_no_keys(strategy: S) {
    if !redis_up().await {
        return;
    }
    let Some(app) = TestApp::spawn_with(Store::Postgres, |s| {
        s.stock_strategy = strategy;
        s.redis_url = Some(REDIS.into());
        s.redis_key_prefix = prefix();
    })
    .await
    else {
        return;
    };
    let user = app.users(1, 0).await[0];
    for id in 900_001..900_041 {
        let body = json!({"userId": user, "items": [{"productOptionId": id, "quantity": 1}]});
        app.post_as(user, "/api/v1/orders", body).await.problem(404, "PRODUCT_OPTION_NOT_FOUND");
    }
    let redis = Builder::from_config(Config::from_url(REDIS).unwrap()).build().unwrap();
    redis.init().await.unwrap();
    let keys: Vec<String> = {
        use futures::TryStreamExt;
        redis
            .scan_buffered(format!("*{}*", app.stock_prefix), Some(100), None)
            .map_ok(|k| k.into_string().unwrap_or_default())
            .try_collect()
            .await
            .unwrap()
    };
    assert!(keys.is_empty() || keys.iter().all(|k| k.ends_with("newest-order")), "{strategy:?} left {keys:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_options_leave_no_keys_spin() {
    unknown_options_leave_no_keys(S::RedisSpin).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_options_leave_no_keys_redis_optimistic() {
    unknown_options_leave_no_keys(S::RedisOptimistic).await;
}

/// Stock and balance have upper bounds that reads accept: an admin count that, with the units unpaid orders
/// hold, would pass the stock bound is refused and changes nothing; the stores refuse a row past either bound.
async fn stock_and_balance_are_bounded(app: TestApp) {
    let option = app.product("bounded", &[("one", 1, 5)]).await["options"][0]["id"].as_i64().unwrap();
    let user = app.users(1, 0).await[0];
    assert_eq!(statuses(&app, user, option, 2).await, [201, 201]);
    let path = format!("/api/v1/admin/product-options/{option}/stock");
    app.admin_put(&path, json!({"stock": 1_000_000_000})).await.invalid("stock");
    assert_eq!(app.stock_of(option).await, 3, "a refused count changes nothing");
    assert_eq!(app.admin_put(&path, json!({"stock": 999_999_998})).await.status, 200);
    for sql in [
        format!("UPDATE product_options SET stock = 1000000001 WHERE id = {option}"),
        format!("UPDATE users SET balance = 1000000000001 WHERE id = {user}"),
    ] {
        assert!(app.db.execute_unprepared(&sql).await.is_err(), "{sql} was accepted");
    }
    // The two unpaid orders expire: their units come back, to exactly the bound.
    app.clock.advance(app.settings.order_payment_timeout + Duration::from_secs(1));
    assert_eq!(app.orders.expire_overdue(app.settings.order_payment_timeout, 100).await.unwrap(), 2);
    assert_eq!(app.stock_of(option).await, 1_000_000_000);
    let r = app
        .get(&format!(
            "/api/v1/products/{}",
            app.scalar(&format!("SELECT product_id FROM product_options WHERE id = {option}")).await
        ))
        .await;
    assert_eq!(r.status, 200, "the row still reads: {r:?}");
}

crate::on_both_stores!(stock_and_balance_are_bounded);
