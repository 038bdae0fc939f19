//! `redis-optimistic` in the application, against real Redis and PostgreSQL: the flash sale over two instances
//! with both stores checked, Redis flushed in the middle of a race, a database failure after a reservation, the
//! mirror following admin counts, expiry and failed payments, reconciliation (the `shop-server reconcile`
//! command), aborted EXECs running out as 503, and reservations dropped or cancelled half-way.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use fred::prelude::{Builder, Client, ClientLike, Config, HashesInterface, KeysInterface};
use sea_orm::ConnectionTrait;
use serde_json::json;
use shop_domain::DomainError;
use shop_domain::ids::ProductOptionId;
use shop_domain::money::Quantity;
use shop_domain::order::OrderLine;
use shop_domain::ports::{Admission, StockPermit, StockStrategy};
use shop_persistence::SeaOrderRepository;
use shop_redis::optimistic::{stock_holds_key, stock_mirror_key};
use shop_redis::{OptimisticSettings, RedisOptimisticStock};
use shop_server::StockStrategyName;
use tokio::sync::Barrier;

use crate::helpers::{Resp, Store, TestApp, eventually, race};
use crate::redis_locks::{REDIS, RedisNodes, prefix, redis_up};

/// One order's reservation: its permit, or why the mirror refused it.
async fn reserve(stock: &RedisOptimisticStock, lines: &[OrderLine]) -> Result<StockPermit, DomainError> {
    let Admission { permit, mut verdicts } = stock.admit(&[lines]).await?;
    verdicts.pop().unwrap_or(Ok(()))?;
    Ok(permit)
}

/// A plain client of `url`, for what the tests do behind the application's back.
async fn raw(url: &str) -> Client {
    let client = Builder::from_config(Config::from_url(url).unwrap()).build().unwrap();
    client.init().await.unwrap();
    client
}

fn option_id(id: i64) -> ProductOptionId {
    ProductOptionId::new(id).unwrap()
}

fn one(option: i64, quantity: i64) -> OrderLine {
    OrderLine { option_id: option_id(option), quantity: Quantity::new(quantity).unwrap() }
}

/// The application's mirror of an option (`None`: not loaded).
async fn mirror(redis: &Client, app: &TestApp, option: i64) -> Option<i64> {
    redis.get(stock_mirror_key(&app.stock_prefix, option_id(option))).await.unwrap()
}

/// The option's reservations in flight.
async fn holds(redis: &Client, app: &TestApp, option: i64) -> HashMap<String, i64> {
    redis.hgetall(stock_holds_key(&app.stock_prefix, option_id(option))).await.unwrap()
}

async fn stock(app: &TestApp, option: i64) -> i64 {
    app.scalar(&format!("SELECT stock FROM product_options WHERE id = {option}")).await
}

/// The option's stock in both stores: (mirror, database).
async fn both(redis: &Client, app: &TestApp, option: i64) -> (Option<i64>, i64) {
    (mirror(redis, app, option).await, stock(app, option).await)
}

async fn order(app: &TestApp, user: i64, option: i64, quantity: i64) -> Resp {
    app.post_as(
        user,
        "/api/v1/orders",
        json!({"userId": user, "items": [{"productOptionId": option, "quantity": quantity}]}),
    )
    .await
}

fn count(answers: &[Resp], status: u16) -> usize {
    answers.iter().filter(|r| r.status == status).count()
}

/// `n` instances of `redis-optimistic` over one fresh PostgreSQL database and the Redis at `url`.
async fn instances(n: usize, url: &str, tweak: impl FnOnce(&mut shop_server::Settings)) -> Option<Vec<TestApp>> {
    if !redis_up().await {
        return None;
    }
    let url = url.to_owned();
    TestApp::spawn_cluster(Store::Postgres, n, move |s| {
        s.stock_strategy = StockStrategyName::RedisOptimistic;
        s.redis_url = Some(url);
        s.redis_key_prefix = prefix();
        s.db_max_connections = 16;
        s.lock_wait_ms = 60_000;
        // Reconciliation runs when a test says so.
        s.stock_reconcile_interval = Duration::from_secs(3600);
        tweak(s);
    })
    .await
}

/// The strategy itself over `app`'s database and Redis, as the application wires it.
async fn strategy(app: &TestApp, max_retries: u32) -> RedisOptimisticStock {
    RedisOptimisticStock::connect(
        app.settings.redis_url.as_deref().unwrap(),
        Arc::new(SeaOrderRepository::new(app.db.clone())),
        OptimisticSettings { prefix: app.stock_prefix.clone(), max_retries, wait: Duration::from_secs(30) },
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_buyers_on_a_hundred_units_over_two_instances_sell_exactly_the_stock_in_both_stores() {
    let Some(apps) = instances(2, REDIS, |_| {}).await else { return };
    let apps: Vec<Arc<TestApp>> = apps.into_iter().map(Arc::new).collect();
    let app = &apps[0];
    let redis = raw(REDIS).await;
    let option = app.product("drop", &[("one", 1000, 100)]).await["options"][0]["id"].as_i64().unwrap();
    let buyers = app.users(1000, 0).await;
    let (answers, took) = race(&apps, &buyers, |_| json!([{"productOptionId": option, "quantity": 1}])).await;
    eprintln!(
        "[race] RedisOptimistic x2 instances: 1000 buyers on 100 units, last answer after {} ms",
        took.as_millis()
    );
    assert_eq!(count(&answers, 201), 100, "{:?}", answers.iter().find(|r| r.status != 201 && r.status != 409));
    let refused: Vec<&Resp> = answers.iter().filter(|r| r.status == 409).collect();
    assert_eq!(refused.len(), 900);
    assert!(refused.iter().all(|r| r.body["code"] == "OUT_OF_STOCK" && r.body["productOptionId"] == option));
    assert_eq!(stock(app, option).await, 0, "database");
    assert_eq!(mirror(&redis, app, option).await, Some(0), "mirror");
    assert!(holds(&redis, app, option).await.is_empty(), "every reservation settled");
    assert_eq!(app.scalar("SELECT COUNT(*) FROM orders").await, 100);
    assert_eq!(app.scalar("SELECT CAST(COALESCE(SUM(quantity), 0) AS BIGINT) FROM order_items").await, 100);
}

/// Redis loses everything twice while 1,000 buyers race over two instances: nothing is oversold, no stock goes
/// negative, every unit is either in stock or sold, and reconciliation brings the mirror back to the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_in_the_middle_of_the_race_never_oversells_and_reconcile_restores_the_mirror() {
    if !redis_up().await {
        return;
    }
    // A server of this test's own: FLUSHALL on the shared one would wipe other tests' keys.
    let server = RedisNodes::start(1).await;
    let url = server.urls[0].clone();
    // Small batches: with up to 128 orders each, the hundred units would go in a commit or two, and a flush
    // could not land between them.
    let Some(apps) = instances(2, &url, |s| s.order_batch_max = 4).await else { return };
    let apps: Vec<Arc<TestApp>> = apps.into_iter().map(Arc::new).collect();
    let app = apps[0].clone();
    let redis = raw(&url).await;
    let option = app.product("drop", &[("one", 1000, 100)]).await["options"][0]["id"].as_i64().unwrap();
    let buyers = app.users(1000, 0).await;

    // Flushes when 10 and then 50 orders have committed, and records how many there were at each flush.
    let done = Arc::new(AtomicBool::new(false));
    let flusher = {
        let (app, redis, done) = (app.clone(), redis.clone(), done.clone());
        tokio::spawn(async move {
            let mut flushed_at = Vec::new();
            for threshold in [10, 50] {
                loop {
                    let placed = app.scalar("SELECT COUNT(*) FROM orders").await;
                    if placed >= threshold {
                        let () = redis.flushall(false).await.unwrap();
                        flushed_at.push(placed);
                        break;
                    }
                    if done.load(Ordering::SeqCst) {
                        return flushed_at;
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            flushed_at
        })
    };
    let (answers, took) = race(&apps, &buyers, |_| json!([{"productOptionId": option, "quantity": 1}])).await;
    done.store(true, Ordering::SeqCst);
    let flushed_at = flusher.await.unwrap();
    eprintln!("[race] flushed with {flushed_at:?} orders placed; last answer after {} ms", took.as_millis());
    assert_eq!(flushed_at.len(), 2, "both flushes happened during the race");
    assert!(flushed_at.iter().all(|placed| *placed < 100), "the flushes came before the last unit: {flushed_at:?}");

    assert_eq!(
        count(&answers, 201) + count(&answers, 409),
        1000,
        "every buyer got an order or OUT_OF_STOCK: {:?}",
        answers.iter().find(|r| r.status != 201 && r.status != 409)
    );
    let placed = app.scalar("SELECT COUNT(*) FROM orders").await;
    let sold = app.scalar("SELECT CAST(COALESCE(SUM(quantity), 0) AS BIGINT) FROM order_items").await;
    let left = stock(&app, option).await;
    assert_eq!(placed, count(&answers, 201) as i64, "an order row behind every 201, and no other");
    assert!(sold <= 100, "never more sold than the stock: {sold}");
    assert!(left >= 0, "no negative stock: {left}");
    assert_eq!(left + sold, 100, "every unit is in stock or sold");

    let report = shop_server::commands::reconcile(&app.settings).await.unwrap();
    eprintln!("{report}");
    assert!(report.busy.is_empty(), "{report}");
    assert_eq!(mirror(&redis, &app, option).await, Some(left), "the mirror is the database's stock again");
    assert!(holds(&redis, &app, option).await.is_empty());
}

/// The order's transaction fails for real (a trigger raises on its INSERT, after a pause during which the
/// reservation is visible): the buyer gets a 500 that says nothing internal, and the reservation is given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_failure_after_a_reservation_gives_the_units_back() {
    let Some(mut apps) = instances(1, REDIS, |_| {}).await else { return };
    let app = Arc::new(apps.remove(0));
    let redis = raw(REDIS).await;
    let option = app.product("drop", &[("one", 1000, 10)]).await["options"][0]["id"].as_i64().unwrap();
    let users = app.users(2, 0).await;
    let (doomed, fine) = (users[0], users[1]);
    app.db
        .execute_unprepared(&format!(
            "CREATE FUNCTION fail_for_doomed() RETURNS trigger AS $$ BEGIN
               IF NEW.user_id = {doomed} THEN PERFORM pg_sleep(0.5); RAISE EXCEPTION 'injected failure'; END IF;
               RETURN NEW;
             END $$ LANGUAGE plpgsql;
             CREATE TRIGGER fail_for_doomed BEFORE INSERT ON orders FOR EACH ROW EXECUTE FUNCTION fail_for_doomed();"
        ))
        .await
        .unwrap();

    let pending = {
        let app = app.clone();
        tokio::spawn(async move { order(&app, doomed, option, 3).await })
    };
    // While the transaction sleeps in the trigger, the three units are reserved.
    eventually("the reservation shows in the mirror", || async {
        mirror(&redis, &app, option).await == Some(7) && holds(&redis, &app, option).await.len() == 1
    })
    .await;
    let failed = pending.await.unwrap();
    let problem = failed.problem(500, "INTERNAL_ERROR");
    assert!(!problem.to_string().contains("injected"), "{problem}");
    assert_eq!(mirror(&redis, &app, option).await, Some(10), "given back");
    assert!(holds(&redis, &app, option).await.is_empty());
    assert_eq!(stock(&app, option).await, 10, "the database is unchanged");
    assert_eq!(app.scalar("SELECT COUNT(*) FROM orders").await, 0);

    let placed = order(&app, fine, option, 3).await;
    assert_eq!(placed.status, 201, "{placed:?}");
    assert_eq!((mirror(&redis, &app, option).await, stock(&app, option).await), (Some(7), 7));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_counts_expiry_and_failed_payments_move_the_mirror() {
    let Some(mut apps) = instances(1, REDIS, |_| {}).await else { return };
    let app = apps.remove(0);
    let redis = raw(REDIS).await;
    let option = app.product("drop", &[("one", 1000, 10)]).await["options"][0]["id"].as_i64().unwrap();
    let user = app.users(1, 0).await[0];

    // A payment without the balance cancels the order: its units come back to both stores.
    let placed = order(&app, user, option, 2).await;
    assert_eq!(placed.status, 201, "{placed:?}");
    assert_eq!(both(&redis, &app, option).await, (Some(8), 8));
    let id = placed.body["id"].as_i64().unwrap();
    app.post_as(user, &format!("/api/v1/orders/{id}/payment"), json!({"userId": user}))
        .await
        .problem(402, "INSUFFICIENT_BALANCE");
    assert_eq!(both(&redis, &app, option).await, (Some(10), 10));

    // An order past the payment timeout is cancelled by the sweeper: same.
    let placed = order(&app, user, option, 3).await;
    assert_eq!(placed.status, 201, "{placed:?}");
    assert_eq!(both(&redis, &app, option).await, (Some(7), 7));
    assert_eq!(app.orders.expire_overdue(Duration::ZERO, 100).await.unwrap(), 1);
    assert_eq!(both(&redis, &app, option).await, (Some(10), 10));

    // An admin's count replaces the mirror, up or down.
    for count in [25, 4] {
        let r = app.admin_put(&format!("/api/v1/admin/product-options/{option}/stock"), json!({"stock": count})).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(both(&redis, &app, option).await, (Some(count), count));
    }
    let placed = order(&app, user, option, 4).await;
    assert_eq!(placed.status, 201, "{placed:?}");
    order(&app, user, option, 1).await.problem(409, "OUT_OF_STOCK");
    assert_eq!(both(&redis, &app, option).await, (Some(0), 0));
}

/// Three mirrored options: one skewed by hand, one with the hold of an instance that died (past its deadline),
/// one with a reservation in flight. `shop-server reconcile` repairs the first two, says so, and leaves the third.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_repairs_a_hand_made_drift_and_reports_it() {
    let Some(mut apps) = instances(1, REDIS, |_| {}).await else { return };
    let app = apps.remove(0);
    let redis = raw(REDIS).await;
    let p = app.product("drop", &[("a", 1, 10), ("b", 1, 10), ("c", 1, 5)]).await;
    let [a, b, c] = [0, 1, 2].map(|i| p["options"][i]["id"].as_i64().unwrap());
    let user = app.users(1, 0).await[0];
    for option in [a, b, c] {
        assert_eq!(order(&app, user, option, 1).await.status, 201);
    }
    let prefix = app.stock_prefix.clone();
    let now_ms = i64::try_from(std::time::SystemTime::UNIX_EPOCH.elapsed().unwrap().as_millis()).unwrap();
    // a: skewed by hand.
    let () = redis.set(stock_mirror_key(&prefix, option_id(a)), 3, None, None, false).await.unwrap();
    // b: two units reserved by an instance that died an hour ago and never settled.
    let () =
        redis.hset(stock_holds_key(&prefix, option_id(b)), (format!("{}:dead", now_ms - 3_600_000), 2)).await.unwrap();
    let _: i64 = redis.decr_by(stock_mirror_key(&prefix, option_id(b)), 2).await.unwrap();
    // c: one unit of an order in flight right now.
    let live = format!("{}:live", now_ms + 60_000);
    let () = redis.hset(stock_holds_key(&prefix, option_id(c)), (live.as_str(), 1)).await.unwrap();
    let _: i64 = redis.decr_by(stock_mirror_key(&prefix, option_id(c)), 1).await.unwrap();

    let run = |strategy: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_shop-server"))
            .arg("reconcile")
            .env("SHOP_DATABASE_URL", &app.settings.database_url)
            .env("SHOP_STOCK_STRATEGY", strategy)
            .env("SHOP_REDIS_URL", REDIS)
            .env("SHOP_REDIS_KEY_PREFIX", &app.settings.redis_key_prefix)
            .env("RUST_LOG", "error")
            .output()
            .unwrap()
    };
    let out = run("redis-optimistic");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("checked 3 mirrored options: 2 repaired, 0 busy"), "{stdout}");
    assert!(
        stdout.contains(&format!("option {a}: mirror 3 -> 9 (database 9, in flight 0, dead holds reaped 0)")),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("option {b}: mirror 7 -> 9 (database 9, in flight 0, dead holds reaped 1)")),
        "{stdout}"
    );
    assert!(!stdout.contains(&format!("option {c}:")), "the option in flight is consistent: {stdout}");
    assert_eq!(mirror(&redis, &app, a).await, Some(9));
    assert_eq!(mirror(&redis, &app, b).await, Some(9));
    assert!(holds(&redis, &app, b).await.is_empty(), "the dead hold is reaped");
    assert_eq!(mirror(&redis, &app, c).await, Some(3), "4 in the database, 1 of them in flight");
    assert_eq!(holds(&redis, &app, c).await, HashMap::from([(live, 1)]));

    let again = run("redis-optimistic");
    let stdout = String::from_utf8_lossy(&again.stdout);
    assert!(again.status.success() && stdout.contains("checked 3 mirrored options: 0 repaired"), "{stdout}");

    let refused = run("redis-spin");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "only redis-optimistic keeps a mirror");
    assert!(stderr.contains("SHOP_STOCK_STRATEGY") && stderr.contains("redis-optimistic"), "{stderr}");
}

/// Another client keeps rewriting the mirror key, so every EXEC of the order is aborted: after
/// `SHOP_OPTIMISTIC_MAX_RETRIES` retries it is a 503 `LOCK_TIMEOUT` with `Retry-After`, and nothing is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_aborted_past_the_retries_is_503_with_retry_after() {
    let Some(mut apps) = instances(1, REDIS, |s| s.optimistic_max_retries = 3).await else { return };
    let app = apps.remove(0);
    let option = app.product("drop", &[("one", 1, 10)]).await["options"][0]["id"].as_i64().unwrap();
    let user = app.users(1, 0).await[0];
    assert_eq!(order(&app, user, option, 1).await.status, 201, "the mirror is loaded");
    let key = stock_mirror_key(&app.stock_prefix, option_id(option));

    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for _ in 0..8 {
        let (client, key, stop) = (raw(REDIS).await, key.clone(), stop.clone());
        // Writes the same value over and over: the count stays right, but every write aborts a WATCH on it.
        writers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let () = client.set(&key, 9, None, None, false).await.unwrap();
            }
        }));
    }
    let r = order(&app, user, option, 1).await;
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.await.unwrap();
    }
    r.problem(503, "LOCK_TIMEOUT");
    assert_eq!(r.headers.get("retry-after").unwrap(), "1");
    let redis = raw(REDIS).await;
    assert_eq!((mirror(&redis, &app, option).await, stock(&app, option).await), (Some(9), 9));
    assert!(holds(&redis, &app, option).await.is_empty());
    assert_eq!(order(&app, user, option, 1).await.status, 201, "it goes through once the writes stop");
}

/// A reservation is given back exactly once: by `settle` for what the transaction did not take, or by the
/// guard's drop when `settle` never ran (a cancelled request); and 300 acquisitions cancelled at random points
/// (some before, some during, some after their EXEC) leave nothing reserved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_are_given_back_once_whether_settled_dropped_or_cancelled() {
    let Some(mut apps) = instances(1, REDIS, |_| {}).await else { return };
    let app = Arc::new(apps.remove(0));
    let redis = raw(REDIS).await;
    let option = app.product("drop", &[("one", 1, 1000)]).await["options"][0]["id"].as_i64().unwrap();
    let stock = Arc::new(strategy(&app, 50).await);
    let lines = [one(option, 4)];
    let settled_hold = |n: usize| {
        let (redis, app) = (redis.clone(), app.clone());
        async move { holds(&redis, &app, option).await.len() == n }
    };

    let permit = reserve(&stock, &lines).await.unwrap();
    assert_eq!(mirror(&redis, &app, option).await, Some(996));
    stock.settle(permit, &[]).await;
    assert_eq!(mirror(&redis, &app, option).await, Some(1000), "rolled back: all given back");
    assert!(settled_hold(0).await);

    let permit = reserve(&stock, &lines).await.unwrap();
    stock.settle(permit, &[one(option, 3)]).await;
    assert_eq!(mirror(&redis, &app, option).await, Some(997), "committed 3 of the 4 reserved: 1 given back");
    assert!(settled_hold(0).await);

    let permit = reserve(&stock, &lines).await.unwrap();
    assert_eq!(mirror(&redis, &app, option).await, Some(993));
    drop(permit);
    eventually("a dropped reservation is given back", || async { mirror(&redis, &app, option).await == Some(997) })
        .await;
    // Nothing more comes back later: the give-back ran once.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(mirror(&redis, &app, option).await, Some(997));

    let barrier = Arc::new(Barrier::new(300));
    let tasks: Vec<_> = (0..300_u64)
        .map(|i| {
            let (stock, barrier) = (stock.clone(), barrier.clone());
            let lines = [one(option, 1)];
            let task = tokio::spawn(async move {
                barrier.wait().await;
                let permit = reserve(&stock, &lines).await;
                // Held a moment, then dropped without settling, unless aborted first.
                tokio::time::sleep(Duration::from_millis(5)).await;
                drop(permit);
            });
            async move {
                tokio::time::sleep(Duration::from_micros(i * 37 % 3000)).await;
                task.abort();
                let _ = task.await;
            }
        })
        .collect();
    futures::future::join_all(tasks).await;
    eventually("every cancelled reservation is given back", || async {
        mirror(&redis, &app, option).await == Some(997) && holds(&redis, &app, option).await.is_empty()
    })
    .await;
}

/// The mirror decides: with the last unit reserved (and not yet written to the database), the next buyer is
/// refused OUT_OF_STOCK by Redis although the database still shows the unit, and no order is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_mirror_refuses_while_the_database_still_shows_the_unit() {
    let Some(mut apps) = instances(1, REDIS, |_| {}).await else { return };
    let app = apps.remove(0);
    let option = app.product("drop", &[("one", 1, 1)]).await["options"][0]["id"].as_i64().unwrap();
    let users = app.users(2, 0).await;
    let stock_strategy = strategy(&app, 50).await;
    // Takes the last unit in Redis and holds the reservation without writing the database.
    let permit = reserve(&stock_strategy, &[one(option, 1)]).await.unwrap();
    let err = reserve(&stock_strategy, &[one(option, 1)]).await.unwrap_err();
    assert!(matches!(err, DomainError::OutOfStock { option_id: id } if id.get() == option), "{err:?}");
    // Over HTTP too, with the database still showing the unit.
    assert_eq!(stock(&app, option).await, 1);
    let started = Instant::now();
    order(&app, users[0], option, 1).await.problem(409, "OUT_OF_STOCK");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(app.scalar("SELECT COUNT(*) FROM orders").await, 0);
    stock_strategy.settle(permit, &[]).await;
    assert_eq!(order(&app, users[1], option, 1).await.status, 201, "given back, it sells");
}

/// A batch of orders in arrival order, in one WATCH/MULTI/EXEC: each order all its lines or none, the later
/// ones getting what an earlier refused one left; settle gives back what the batch's transaction did not take
/// (an admitted order that failed in it), summing the lines of one option over the committed orders.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_admitted_in_arrival_order_and_settled_by_what_it_committed() {
    let Some(mut apps) = instances(1, REDIS, |_| {}).await else { return };
    let app = apps.remove(0);
    let redis = raw(REDIS).await;
    let p = app.product("drop", &[("a", 1, 3), ("b", 1, 2)]).await;
    let [a, b] = [0, 1].map(|i| p["options"][i]["id"].as_i64().unwrap());
    let unknown = 999_999;
    let stock_strategy = strategy(&app, 50).await;
    let orders = [
        vec![one(a, 1), one(b, 1)],
        vec![one(a, 1), one(b, 2)], // b: 1 left, wants 2: refused whole, a's unit stays for later orders
        vec![one(a, 2)],
        vec![one(a, 1)], // a is gone by now
        // An option the database does not have refuses its order whole (validation refuses it first in the
        // application): b's unit stays.
        vec![one(b, 1), one(unknown, 1)],
    ];
    let refs: Vec<&[OrderLine]> = orders.iter().map(Vec::as_slice).collect();
    let admission = stock_strategy.admit(&refs).await.unwrap();
    let verdicts: Vec<Option<i64>> = admission
        .verdicts
        .iter()
        .map(|v| match v {
            Ok(()) => None,
            Err(DomainError::OutOfStock { option_id } | DomainError::ProductOptionNotFound(option_id)) => {
                Some(option_id.get())
            }
            Err(other) => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(verdicts, vec![None, Some(b), None, Some(a), Some(unknown)]);
    assert_eq!((mirror(&redis, &app, a).await, mirror(&redis, &app, b).await), (Some(0), Some(1)));
    assert_eq!(mirror(&redis, &app, unknown).await, None, "no mirror for an option the database does not have");
    assert_eq!(holds(&redis, &app, a).await.len(), 1, "one hold per option for the whole batch");

    // The batch's transaction committed order 1; order 3 failed in it: its two units of a come back.
    let taken: Vec<OrderLine> = orders[0].clone();
    stock_strategy.settle(admission.permit, &taken).await;
    assert_eq!((mirror(&redis, &app, a).await, mirror(&redis, &app, b).await), (Some(2), Some(1)));
    assert!(holds(&redis, &app, a).await.is_empty() && holds(&redis, &app, b).await.is_empty());
}
