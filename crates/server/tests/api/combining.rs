//! Orders and payments combined into batches (`SHOP_ORDER_BATCH_MAX`): mixed batches keep every order whole,
//! the database strategies hold over two instances with combining on and off, one failing order never fails
//! its batch, and a thousand concurrent payments add up.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use sea_orm::{ConnectionTrait, Statement, TransactionTrait};
use serde_json::{Value, json};
use shop_server::StockStrategyName;
use tokio::sync::Barrier;

use crate::helpers::{Resp, Store, TestApp, eventually, lock_waiters, races_over_instances};
use crate::on_every_strategy;

on_every_strategy!(mixed_orders_keep_every_order_whole);

/// One request of a mixed race: who, what, and an optional Idempotency-Key.
struct Ask {
    user: i64,
    items: Value,
    key: Option<String>,
}

/// Sends every ask at once (a barrier releases them together); the answers in the same order.
async fn release(app: &Arc<TestApp>, asks: Vec<Ask>) -> Vec<Resp> {
    let barrier = Arc::new(Barrier::new(asks.len()));
    let tasks: Vec<_> = asks
        .into_iter()
        .map(|ask| {
            let (app, barrier) = (app.clone(), barrier.clone());
            tokio::spawn(async move {
                let mut req = app
                    .client
                    .post(app.url("/api/v1/orders"))
                    .bearer_auth(app.token(ask.user))
                    .json(&json!({"userId": ask.user, "items": ask.items}));
                if let Some(key) = ask.key {
                    req = req.header("Idempotency-Key", key);
                }
                barrier.wait().await;
                app.send(req).await
            })
        })
        .collect();
    let mut answers = Vec::with_capacity(tasks.len());
    for task in tasks {
        answers.push(task.await.expect("a buyer task"));
    }
    answers
}

fn line(option: i64, quantity: i64) -> Value {
    json!({"productOptionId": option, "quantity": quantity})
}

/// 270 orders at once: some of one option and some of two, some with a sold-out line, some from unknown users,
/// and twenty sent twice under one Idempotency-Key. Each order gets all of its lines or none, each key makes
/// at most one order, and for each option the stock left plus the units sold is the stock it started with.
async fn mixed_orders_keep_every_order_whole(app: TestApp) {
    let app = Arc::new(app);
    let product = app.product("mixed", &[("a", 1000, 60), ("b", 2000, 40), ("gone", 500, 0)]).await;
    let option = |i: usize| product["options"][i]["id"].as_i64().unwrap();
    let (a, b, gone) = (option(0), option(1), option(2));
    let buyers = app.users(220, 0).await;
    let mut asks: Vec<Ask> = (0..200)
        .map(|i| Ask {
            user: buyers[i],
            items: match i % 4 {
                0 => json!([line(a, 2)]),
                1 => json!([line(a, 1), line(b, 1)]),
                2 => json!([line(b, 3)]),
                _ => json!([line(a, 1), line(gone, 1)]),
            },
            key: None,
        })
        .collect();
    asks.extend((0..30).map(|i| Ask { user: 9_000_000 + i, items: json!([line(a, 1)]), key: None }));
    for i in 0..20 {
        for _ in 0..2 {
            asks.push(Ask {
                user: buyers[200 + i],
                items: json!([line(b, 1), line(a, 1)]),
                key: Some(format!("k{i}")),
            });
        }
    }
    let requested: Vec<Value> = asks.iter().map(|a| a.items.clone()).collect();
    let answers = release(&app, asks).await;

    let unexpected: Vec<&Resp> = answers.iter().filter(|r| ![201, 404, 409].contains(&r.status)).collect();
    assert!(unexpected.is_empty(), "only 201, 404 and 409: {unexpected:?}");
    // An unknown user is refused: 404, or 409 when the stock had already run out for the line it asked for
    // (one by one, the stock is read before anything else; in a batch, users are checked first).
    for r in &answers[200..230] {
        if r.status == 404 {
            r.problem(404, "USER_NOT_FOUND");
        } else {
            r.problem(409, "OUT_OF_STOCK");
        }
    }
    assert_eq!(app.scalar("SELECT COUNT(*) FROM orders WHERE user_id >= 9000000").await, 0);
    for r in answers[..200].iter().skip(3).step_by(4) {
        r.problem(409, "OUT_OF_STOCK");
    }
    // Every 201 holds exactly the lines it asked for.
    let mut created: BTreeSet<i64> = BTreeSet::new();
    for (r, asked) in answers.iter().zip(&requested).filter(|(r, _)| r.status == 201) {
        let got: BTreeMap<i64, i64> = r.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| (i["productOptionId"].as_i64().unwrap(), i["quantity"].as_i64().unwrap()))
            .collect();
        let want: BTreeMap<i64, i64> = asked
            .as_array()
            .unwrap()
            .iter()
            .map(|l| (l["productOptionId"].as_i64().unwrap(), l["quantity"].as_i64().unwrap()))
            .collect();
        assert_eq!(got, want, "an order holds all of its lines");
        created.insert(r.body["id"].as_i64().unwrap());
    }
    // A key's two requests made one order at most; a second 201 is the replay of the first.
    for pair in answers[230..].chunks(2) {
        let ids: Vec<i64> = pair.iter().filter(|r| r.status == 201).map(|r| r.body["id"].as_i64().unwrap()).collect();
        assert!(ids.windows(2).all(|w| w[0] == w[1]), "one key, one order: {ids:?}");
        for r in pair.iter().filter(|r| r.status == 409) {
            let code = r.body["code"].as_str().unwrap();
            assert!(["IDEMPOTENCY_KEY_IN_USE", "OUT_OF_STOCK"].contains(&code), "{code}");
        }
    }
    for (i, user) in buyers[200..].iter().enumerate() {
        let orders = app.scalar(&format!("SELECT COUNT(*) FROM orders WHERE user_id = {user}")).await;
        assert!(orders <= 1, "key k{i} made {orders} orders");
    }
    let rows = app.scalars("SELECT id FROM orders ORDER BY id").await;
    assert_eq!(rows, created.iter().copied().collect::<Vec<_>>(), "the orders stored are the ones answered 201");
    assert_eq!(app.scalar("SELECT COUNT(*) FROM payments").await, created.len() as i64);
    for (opt, start) in [(a, 60), (b, 40), (gone, 0)] {
        let sold = app
            .scalar(&format!(
                "SELECT CAST(COALESCE(SUM(quantity), 0) AS BIGINT) FROM order_items WHERE product_option_id = {opt}"
            ))
            .await;
        let left = app.stock_of(opt).await;
        assert!(left >= 0);
        assert_eq!(left + sold, start, "option {opt}: {left} left + {sold} sold");
    }
    assert!(!created.is_empty());
}

/// Two instances over one fresh PostgreSQL database with a database-level strategy.
async fn db_cluster(strategy: StockStrategyName, batch: u32) -> Option<Vec<Arc<TestApp>>> {
    let apps = TestApp::spawn_cluster(Store::Postgres, 2, |s| {
        s.stock_strategy = strategy;
        s.order_batch_max = batch;
        s.db_max_connections = 16;
        s.lock_wait_ms = 60_000;
    })
    .await?;
    Some(apps.into_iter().map(Arc::new).collect())
}

macro_rules! over_two_instances {
    ($($name:ident: $strategy:ident, $batch:expr;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let Some(apps) = db_cluster(StockStrategyName::$strategy, $batch).await else { return };
            races_over_instances(&apps, &format!("{} batch {}", stringify!($strategy), $batch)).await;
        }
    )*};
}

over_two_instances!(
    conditional_races_over_two_instances: Conditional, 128;
    conditional_races_over_two_instances_one_by_one: Conditional, 1;
    optimistic_races_over_two_instances: Optimistic, 128;
    optimistic_races_over_two_instances_one_by_one: Optimistic, 1;
    pessimistic_races_over_two_instances: Pessimistic, 128;
    pessimistic_races_over_two_instances_one_by_one: Pessimistic, 1;
);

/// A real database failure of one order (a trigger refuses its user's insert) in a batch of fifty: that order
/// answers 500, the batch is retried one order at a time, and the other 49 are placed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_failing_order_never_fails_its_batch() {
    let Some(app) = TestApp::spawn_with(Store::Postgres, |s| s.order_batch_max = 128).await else { return };
    let app = Arc::new(app);
    let option = app.product("drop", &[("one", 1000, 100)]).await["options"][0]["id"].as_i64().unwrap();
    let buyers = app.users(50, 0).await;
    let doomed = buyers[49];
    for sql in [
        format!(
            "CREATE FUNCTION refuse_doomed() RETURNS trigger AS $$ BEGIN IF NEW.user_id = {doomed} THEN \
             RAISE EXCEPTION 'injected failure'; END IF; RETURN NEW; END $$ LANGUAGE plpgsql"
        ),
        "CREATE TRIGGER refuse_doomed BEFORE INSERT ON orders FOR EACH ROW EXECUTE FUNCTION refuse_doomed()".into(),
    ] {
        app.db.execute_raw(Statement::from_string(app.db.get_database_backend(), sql)).await.unwrap();
    }
    // Hold the option's row so the first order's batch waits on it; the other 49 queue behind it meanwhile and
    // so are combined into one batch with the doomed order.
    let holder = app.db.begin().await.unwrap();
    holder
        .execute_raw(Statement::from_string(
            holder.get_database_backend(),
            format!("SELECT stock FROM product_options WHERE id = {option} FOR UPDATE"),
        ))
        .await
        .unwrap();
    let first = {
        let (app, user) = (app.clone(), buyers[0]);
        tokio::spawn(async move {
            app.post_as(user, "/api/v1/orders", json!({"userId": user, "items": [line(option, 1)]})).await
        })
    };
    eventually("the first batch waits for the row", || async { lock_waiters(&app).await > 0 }).await;
    let rest: Vec<_> = buyers[1..]
        .iter()
        .map(|user| {
            let (app, user) = (app.clone(), *user);
            tokio::spawn(async move {
                app.post_as(user, "/api/v1/orders", json!({"userId": user, "items": [line(option, 1)]})).await
            })
        })
        .collect();
    eventually("the other 49 queue behind it", || async { app.orders.placing_load().queued == 49 }).await;
    holder.commit().await.unwrap();

    assert_eq!(first.await.unwrap().status, 201);
    let mut answers = Vec::new();
    for task in rest {
        answers.push(task.await.unwrap());
    }
    let doomed_answer = answers.pop().unwrap();
    assert_eq!(doomed_answer.status, 500, "{:?}", doomed_answer.body);
    assert!(answers.iter().all(|r| r.status == 201), "{:?}", answers.iter().find(|r| r.status != 201));
    assert_eq!(app.stock_of(option).await, 51);
    assert_eq!(app.scalar("SELECT COUNT(*) FROM orders").await, 49);
    assert_eq!(app.scalar(&format!("SELECT COUNT(*) FROM orders WHERE user_id = {doomed}")).await, 0);
    assert_eq!(app.orders.stats().batch_splits.load(Ordering::Relaxed), 1, "the failed batch was split once");
}

/// 1,000 buyers of one option then pay at once; 100 of them cannot afford it. Exactly 900 payments complete,
/// the balances fall by exactly what was paid, the day's sales count the 900 units once, and the 100 cancelled
/// orders give their stock back.
async fn thousand_payments_add_up(store: Store, batch: u32) {
    let Some(app) = TestApp::spawn_with(store, |s| {
        s.order_batch_max = batch;
        s.db_max_connections = 16;
        // One by one, a thousand orders queue in one lane for longer than the default 5 s on a loaded machine:
        // this race proves the sums, not the latency.
        s.lock_wait_ms = 60_000;
    })
    .await
    else {
        return;
    };
    let app = Arc::new(app);
    let option = app.product("hot", &[("one", 1000, 1000)]).await["options"][0]["id"].as_i64().unwrap();
    let mut buyers = app.users(900, 5000).await;
    buyers.extend(app.users(100, 500).await);
    let (answers, _) = crate::helpers::race(std::slice::from_ref(&app), &buyers, |_| json!([line(option, 1)])).await;
    assert!(answers.iter().all(|r| r.status == 201), "{:?}", answers.iter().find(|r| r.status != 201));
    let orders: Vec<(i64, i64)> =
        answers.iter().zip(&buyers).map(|(r, u)| (r.body["id"].as_i64().unwrap(), *u)).collect();

    let barrier = Arc::new(Barrier::new(orders.len()));
    let tasks: Vec<_> = orders
        .iter()
        .map(|(order, user)| {
            let (app, barrier, order, user) = (app.clone(), barrier.clone(), *order, *user);
            tokio::spawn(async move {
                barrier.wait().await;
                app.post_as(user, &format!("/api/v1/orders/{order}/payment"), json!({"userId": user})).await
            })
        })
        .collect();
    let mut paid = Vec::new();
    for task in tasks {
        paid.push(task.await.unwrap());
    }
    assert!(paid[..900].iter().all(|r| r.status == 200), "{:?}", paid.iter().find(|r| r.status != 200));
    for r in &paid[900..] {
        r.problem(402, "INSUFFICIENT_BALANCE");
    }
    assert_eq!(app.scalar("SELECT COUNT(*) FROM payments WHERE status = 'COMPLETED'").await, 900);
    assert_eq!(app.scalar("SELECT COUNT(*) FROM payments WHERE status = 'FAILED'").await, 100);
    assert_eq!(app.scalar("SELECT CAST(SUM(balance) AS BIGINT) FROM users").await, 900 * 4000 + 100 * 500);
    assert_eq!(
        app.scalar(&format!(
            "SELECT CAST(SUM(total_sold) AS BIGINT) FROM daily_popular_products WHERE product_option_id = {option}"
        ))
        .await,
        900
    );
    assert_eq!(app.stock_of(option).await, 100, "the cancelled orders gave their units back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_payments_add_up_postgres() {
    thousand_payments_add_up(Store::Postgres, 128).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_payments_add_up_postgres_one_by_one() {
    thousand_payments_add_up(Store::Postgres, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_payments_add_up_sqlite() {
    thousand_payments_add_up(Store::Sqlite, 128).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_payments_add_up_sqlite_one_by_one() {
    thousand_payments_add_up(Store::Sqlite, 1).await;
}
