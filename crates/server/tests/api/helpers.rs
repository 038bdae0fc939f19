//! Spawns the real application on a random port over a fresh database, and talks to it over real HTTP.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Barrier;

use actix_web::dev::ServerHandle;
use reqwest::header::HeaderMap;
use sea_orm::{ConnectionTrait, Database, DatabaseConnection};
use serde_json::{Value, json};
use shop_auth::{AuthSecret, JwtTokens};
use shop_domain::ports::{Clock, ShiftedClock, Tokens};
use shop_domain::services::{IdempotencyService, OrderService};
use shop_server::{Application, Settings, StockStrategyName};

pub const ADMIN_TOKEN: &str = "test-admin-token";
/// What every test deployment signs its access tokens with.
pub const AUTH_SECRET: &str = "test-auth-secret-of-at-least-thirty-two-bytes";

/// The password of every user a test signs up through the API.
pub fn password_of(name: &str) -> String {
    format!("password of {name}")
}

/// Which store a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    Sqlite,
    Postgres,
}

/// A fresh PostgreSQL database, dropped (connections and all) when the test ends, even when it fails.
struct PgDatabase {
    admin_url: String,
    name: String,
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        // Drop may run inside the test's runtime: a thread of its own with a runtime of its own can block.
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async {
                let admin = Database::connect(admin_url.as_str()).await?;
                admin.execute_unprepared(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).await?;
                admin.close().await
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop test database {}", self.name);
        }
    }
}

enum Backing {
    Sqlite(#[allow(dead_code)] tempfile::TempDir),
    Postgres(#[allow(dead_code)] PgDatabase),
    /// A second instance over another instance's database: the first one owns it.
    Borrowed,
}

pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    /// The pool the application uses: tests read and arrange rows behind the API with it.
    pub db: DatabaseConnection,
    pub store: Store,
    /// The order use case as wired, to run the sweeper on demand.
    pub orders: OrderService,
    /// The idempotency use case as wired, to run the purge on demand.
    pub idempotency: IdempotencyService,
    /// The prefix of the stock keys in Redis (locks, fences, the mirror): the configured one and the database's id.
    pub stock_prefix: String,
    pub strategy: StockStrategyName,
    /// The settings it was built with (its database URL, strategy ...).
    pub settings: Settings,
    /// The application's clock (shared by every instance of one test): tests move it forward instead of
    /// ageing rows behind the application.
    pub clock: Arc<ShiftedClock>,
    handle: ServerHandle,
    _backing: Backing,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        // Sends the stop command at once; nothing needs to await it.
        drop(self.handle.stop(false));
    }
}

/// The server's database to create the tests' databases from. Without TLS unless the URL asks for it: on
/// loopback a TLS handshake buys nothing, and in a debug build it costs a new pool connection ~100 ms.
fn postgres_admin_url() -> String {
    std::env::var("SHOP_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable".into())
}

/// Settings every test starts from: few workers and connections, the admin API on, no demo data, and the
/// cheapest password hashing Argon2 allows (production keeps OWASP's minimum; hashing cost is not under test).
pub fn base_settings(database_url: String) -> Settings {
    Settings {
        http_addr: "127.0.0.1:0".parse().expect("address"),
        database_url,
        admin_token: Some(ADMIN_TOKEN.into()),
        auth_secret: Some(AUTH_SECRET.into()),
        password_hash_memory_kib: 8,
        password_hash_iterations: 1,
        http_workers: Some(2),
        db_max_connections: 8,
        seed_demo: false,
        ..Settings::default()
    }
}

impl TestApp {
    pub async fn spawn(store: Store) -> Option<Self> {
        Self::spawn_with(store, |_| {}).await
    }

    /// `None` when the test must be skipped: PostgreSQL unreachable outside CI. In CI it panics instead.
    pub async fn spawn_with(store: Store, tweak: impl FnOnce(&mut Settings)) -> Option<Self> {
        let (settings, backing) = Self::prepare(store, tweak).await?;
        Some(Self::start(settings, store, backing, Arc::default()).await)
    }

    /// `n` instances over one fresh database, started at the same time (they race to migrate it).
    pub async fn spawn_cluster(store: Store, n: usize, tweak: impl FnOnce(&mut Settings)) -> Option<Vec<Self>> {
        let (settings, backing) = Self::prepare(store, tweak).await?;
        let mut backings = vec![backing];
        backings.extend((1..n).map(|_| Backing::Borrowed));
        let clock: Arc<ShiftedClock> = Arc::default();
        let starts = backings.into_iter().map(|b| Self::start(settings.clone(), store, b, clock.clone()));
        Some(futures::future::join_all(starts).await)
    }

    /// A fresh database and the settings that point at it.
    async fn prepare(store: Store, tweak: impl FnOnce(&mut Settings)) -> Option<(Settings, Backing)> {
        let (url, backing) = match store {
            Store::Sqlite => {
                let dir = tempfile::tempdir().expect("tempdir");
                let url = format!("sqlite://{}?mode=rwc", dir.path().join("shop.db").display());
                (url, Backing::Sqlite(dir))
            }
            Store::Postgres => {
                let admin_url = postgres_admin_url();
                let admin = match Database::connect(admin_url.as_str()).await {
                    Ok(admin) => admin,
                    Err(e) if std::env::var_os("CI").is_none() => {
                        eprintln!("skipping: PostgreSQL is not reachable at {admin_url}: {e}");
                        return None;
                    }
                    Err(e) => panic!("PostgreSQL is required in CI and is not reachable at {admin_url}: {e}"),
                };
                let name = format!("shop_test_{}", uuid::Uuid::new_v4().simple());
                admin.execute_unprepared(&format!("CREATE DATABASE \"{name}\"")).await.expect("create database");
                admin.close().await.ok();
                let (base, rest) = admin_url.rsplit_once('/').expect("database url has a path");
                let query = rest.split_once('?').map_or(String::new(), |(_, q)| format!("?{q}"));
                let url = format!("{base}/{name}{query}");
                (url, Backing::Postgres(PgDatabase { admin_url, name }))
            }
        };
        let mut settings = base_settings(url);
        tweak(&mut settings);
        Some((settings, backing))
    }

    /// Another instance of the application over this one's database, as a scaled-out deployment runs it.
    pub async fn second_instance(&self) -> Self {
        self.second_instance_with(|_| {}).await
    }

    /// Another instance over this one's database with its settings changed by `tweak` (its Redis behind a
    /// fault proxy, say).
    pub async fn second_instance_with(&self, tweak: impl FnOnce(&mut Settings)) -> Self {
        let mut settings = self.settings.clone();
        tweak(&mut settings);
        Self::start(settings, self.store, Backing::Borrowed, self.clock.clone()).await
    }

    async fn start(settings: Settings, store: Store, backing: Backing, clock: Arc<ShiftedClock>) -> Self {
        let strategy = settings.stock_strategy;
        let app = Application::build(settings.clone(), clock.clone()).await.expect("the application starts");
        let base = format!("http://127.0.0.1:{}", app.port());
        let db = app.database();
        let orders = app.orders();
        let idempotency = app.idempotency();
        let stock_prefix = app.stock_key_prefix().to_owned();
        let handle = app.handle();
        tokio::spawn(app.run_until_stopped());
        // The server closes a keep-alive connection after 5 s idle (actix's default); a client that reuses one
        // just then gets `IncompleteMessage`. Races leave hundreds of connections idle between their phases,
        // so the client lets go of its idle connections well before the server does.
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .pool_idle_timeout(Duration::from_secs(2))
            .build()
            .expect("client");
        Self {
            base,
            client,
            db,
            store,
            orders,
            idempotency,
            stock_prefix,
            strategy,
            settings,
            clock,
            handle,
            _backing: backing,
        }
    }

    pub async fn send(&self, req: reqwest::RequestBuilder) -> Resp {
        let res = req.send().await.expect("the request is answered");
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let text = res.text().await.expect("a body");
        let body =
            if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) };
        Resp { status, headers, body }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn get(&self, path: &str) -> Resp {
        self.send(self.client.get(self.url(path))).await
    }

    /// A valid access token of `user`, signed as the application signs them, valid from the application's now.
    pub fn token(&self, user: i64) -> String {
        let tokens = JwtTokens::new(
            &AuthSecret::new(AUTH_SECRET.as_bytes().to_vec()).expect("secret"),
            self.settings.access_token_ttl,
        );
        let user = shop_domain::ids::UserId::new(user).expect("a user id");
        tokens.access_token(user, self.clock.now()).expect("a token").token
    }

    /// Sends `req` as `user` (with their bearer token).
    pub async fn send_as(&self, user: i64, req: reqwest::RequestBuilder) -> Resp {
        self.send(req.bearer_auth(self.token(user))).await
    }

    pub async fn get_as(&self, user: i64, path: &str) -> Resp {
        self.send_as(user, self.client.get(self.url(path))).await
    }

    pub async fn post_as(&self, user: i64, path: &str, body: Value) -> Resp {
        self.send_as(user, self.client.post(self.url(path)).json(&body)).await
    }

    pub async fn delete_as(&self, user: i64, path: &str) -> Resp {
        self.send_as(user, self.client.delete(self.url(path))).await
    }

    /// Signs `name` in through the API: the session's body.
    pub async fn sign_in(&self, name: &str) -> Resp {
        self.post("/api/v1/auth/token", serde_json::json!({ "name": name, "password": password_of(name) })).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Resp {
        self.send(self.client.post(self.url(path)).json(&body)).await
    }

    pub async fn post_raw(&self, path: &str, body: &'static str) -> Resp {
        self.send(self.client.post(self.url(path)).header("content-type", "application/json").body(body)).await
    }

    pub async fn delete(&self, path: &str) -> Resp {
        self.send(self.client.delete(self.url(path))).await
    }

    pub async fn admin_post(&self, path: &str, body: Value) -> Resp {
        self.send(self.client.post(self.url(path)).bearer_auth(ADMIN_TOKEN).json(&body)).await
    }

    pub async fn admin_put(&self, path: &str, body: Value) -> Resp {
        self.send(self.client.put(self.url(path)).bearer_auth(ADMIN_TOKEN).json(&body)).await
    }

    /// Signs a user up through the API (password [`password_of`] its name), signs it in, and returns its id.
    pub async fn user(&self, name: &str) -> i64 {
        let r = self.post("/api/v1/users", serde_json::json!({ "name": name, "password": password_of(name) })).await;
        assert_eq!(r.status, 201, "{r:?}");
        let id = r.body["id"].as_i64().expect("id");
        let session = self.sign_in(name).await;
        assert_eq!((session.status, session.body["userId"].as_i64()), (200, Some(id)), "{session:?}");
        id
    }

    /// Creates `n` users with `balance` each in one statement (a race needs many buyers fast); their ids.
    pub async fn users(&self, n: usize, balance: i64) -> Vec<i64> {
        use sea_orm::ConnectionTrait;
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let rows: Vec<String> =
            (0..n).map(|i| format!("('{tag}-{i}', {balance}, 0, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)")).collect();
        let sql =
            format!("INSERT INTO users (name, balance, version, created_at, updated_at) VALUES {}", rows.join(", "));
        self.db.execute_unprepared(&sql).await.expect("insert users");
        self.scalars(&format!("SELECT id FROM users WHERE name LIKE '{tag}-%' ORDER BY id")).await
    }

    /// The first column of every row of `sql`, as integers.
    pub async fn scalars(&self, sql: &str) -> Vec<i64> {
        use sea_orm::{ConnectionTrait, Statement};
        let rows = self
            .db
            .query_all_raw(Statement::from_string(self.db.get_database_backend(), sql.to_owned()))
            .await
            .expect("query");
        rows.iter().map(|r| r.try_get_by_index::<i64>(0).expect("an integer column")).collect()
    }

    /// One integer from `sql`.
    pub async fn scalar(&self, sql: &str) -> i64 {
        self.scalars(sql).await.first().copied().expect("one row")
    }

    /// The units of `option` that live orders (unpaid or paid, not cancelled) hold: with the stock, the start.
    pub async fn held_units(&self, option: i64) -> i64 {
        self.scalar(&format!(
            "SELECT CAST(COALESCE(SUM(i.quantity), 0) AS BIGINT) FROM order_items i JOIN orders o ON o.id = i.order_id \
             WHERE i.product_option_id = {option} AND o.status <> 'CANCELLED'"
        ))
        .await
    }

    /// An option's stock, read behind the API.
    pub async fn stock_of(&self, option: i64) -> i64 {
        self.scalar(&format!("SELECT stock FROM product_options WHERE id = {option}")).await
    }

    /// Creates a product through the admin API and returns it.
    pub async fn product(&self, name: &str, options: &[(&str, i64, i64)]) -> Value {
        let options: Vec<Value> = options
            .iter()
            .map(|(n, price, stock)| serde_json::json!({"name": n, "price": price, "stock": stock}))
            .collect();
        let r =
            self.admin_post("/api/v1/admin/products", serde_json::json!({ "name": name, "options": options })).await;
        assert_eq!(r.status, 201, "{r:?}");
        r.body
    }
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Resp {
    /// Asserts an RFC 9457 problem with this status and code, and returns it.
    #[track_caller]
    pub fn problem(&self, status: u16, code: &str) -> &Value {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(self.body["code"], code, "{self:?}");
        assert_eq!(self.body["status"], status, "{self:?}");
        assert_eq!(
            self.headers.get("content-type").and_then(|v| v.to_str().ok()),
            Some("application/problem+json"),
            "{self:?}"
        );
        assert!(self.body["title"].is_string() && self.body["detail"].is_string() && self.body["type"].is_string());
        &self.body
    }

    /// Asserts a 400 `VALIDATION_FAILED` naming `field`.
    #[track_caller]
    pub fn invalid(&self, field: &str) {
        let p = self.problem(400, "VALIDATION_FAILED");
        assert_eq!(p["field"], field, "{self:?}");
    }
}

/// Polls until `check` holds, for at most ten seconds: for what the application does on tasks of its own (a
/// spawned give-back, a batch waiting for a row lock, requests queueing in a lane).
pub async fn eventually<F: std::future::Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Sessions of this test's database waiting for a lock another session holds (PostgreSQL).
pub async fn lock_waiters(app: &TestApp) -> i64 {
    app.scalar("SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'")
        .await
}

/// Releases every buyer at once (a barrier), buyer `i` ordering `items(i)` from instance `i % apps.len()`;
/// every answer, and how long the last one took.
pub async fn race(apps: &[Arc<TestApp>], buyers: &[i64], items: impl Fn(usize) -> Value) -> (Vec<Resp>, Duration) {
    let barrier = Arc::new(Barrier::new(buyers.len() + 1));
    let tasks: Vec<_> = buyers
        .iter()
        .enumerate()
        .map(|(i, user)| {
            let (app, barrier) = (apps[i % apps.len()].clone(), barrier.clone());
            let body = serde_json::json!({"userId": user, "items": items(i)});
            let request = app.client.post(app.url("/api/v1/orders")).bearer_auth(app.token(*user)).json(&body);
            tokio::spawn(async move {
                barrier.wait().await;
                app.send(request).await
            })
        })
        .collect();
    barrier.wait().await;
    let started = Instant::now();
    let mut answers = Vec::with_capacity(tasks.len());
    for task in tasks {
        answers.push(task.await.expect("a buyer task"));
    }
    (answers, started.elapsed())
}

/// 1,000 buyers on 100 units, then 100 on 100, then two options ordered in opposite line order, with requests
/// alternating over `apps` (instances of one database): never oversold, every 201 an order, no deadlock.
/// Returns the options it raced on.
pub async fn races_over_instances(apps: &[Arc<TestApp>], label: &str) -> Vec<i64> {
    let app = &apps[0];
    let count = |answers: &[Resp], s: u16| answers.iter().filter(|r| r.status == s).count();

    let scarce = app.product("scarce", &[("one", 1000, 100)]).await["options"][0]["id"].as_i64().unwrap();
    let buyers = app.users(1000, 0).await;
    let (answers, took) = race(apps, &buyers, |_| json!([{"productOptionId": scarce, "quantity": 1}])).await;
    eprintln!(
        "[race] {label} x{} instances: 1000 buyers on 100 units, last answer after {} ms",
        apps.len(),
        took.as_millis()
    );
    assert_eq!(count(&answers, 201), 100, "{:?}", answers.iter().find(|r| r.status != 201 && r.status != 409));
    assert_eq!(count(&answers, 409), 900);
    assert_eq!(app.stock_of(scarce).await, 0);
    assert_eq!(app.scalar("SELECT COUNT(*) FROM orders").await, 100);
    assert_eq!(app.scalar("SELECT COUNT(*) FROM payments").await, 100);

    let plenty = app.product("plenty", &[("one", 1000, 100)]).await["options"][0]["id"].as_i64().unwrap();
    let (answers, took) = race(apps, &buyers[..100], |_| json!([{"productOptionId": plenty, "quantity": 1}])).await;
    eprintln!(
        "[race] {label} x{} instances: 100 buyers on 100 units, last answer after {} ms",
        apps.len(),
        took.as_millis()
    );
    assert_eq!(count(&answers, 201), 100, "{:?}", answers.iter().find(|r| r.status != 201));
    assert_eq!(app.stock_of(plenty).await, 0);
    assert_eq!(app.scalar("SELECT COUNT(*) FROM orders").await, 200);

    let pair = app.product("pair", &[("left", 1, 100), ("right", 1, 100)]).await;
    let (a, b) = (pair["options"][0]["id"].as_i64().unwrap(), pair["options"][1]["id"].as_i64().unwrap());
    let (answers, _) = race(apps, &buyers[..200], |i| {
        let (x, y) = if i % 2 == 0 { (a, b) } else { (b, a) };
        json!([{"productOptionId": x, "quantity": 1}, {"productOptionId": y, "quantity": 1}])
    })
    .await;
    assert_eq!(
        (count(&answers, 201), count(&answers, 409)),
        (100, 100),
        "{:?}",
        answers.iter().find(|r| r.status >= 500)
    );
    assert_eq!((app.stock_of(a).await, app.stock_of(b).await), (0, 0));
    vec![scarce, plenty, a, b]
}

/// Runs each listed `async fn(TestApp)` with every stock strategy on every store that can serve it
/// (PostgreSQL with all five, SQLite with all but `pessimistic`, which SQLite cannot serve), once with orders
/// combined into batches (the default) and once one by one (`SHOP_ORDER_BATCH_MAX=1`, the `_one_by_one` tests).
/// `redis-optimistic` uses the Redis at 6379 (skipped without it, outside CI) under a key prefix of the test's own.
#[macro_export]
macro_rules! on_every_strategy {
    ($($case:ident),* $(,)?) => {$(
        mod $case {
            use $crate::helpers::{Store, TestApp};
            use shop_server::StockStrategyName as S;

            async fn run(store: Store, strategy: S, batch: u32) {
                if strategy == S::RedisOptimistic && !$crate::redis_locks::redis_up().await {
                    return;
                }
                if let Some(app) = TestApp::spawn_with(store, |s| {
                    s.stock_strategy = strategy;
                    s.order_batch_max = batch;
                    s.redis_url = Some($crate::redis_locks::REDIS.into());
                    s.redis_key_prefix = $crate::redis_locks::prefix();
                    s.db_max_connections = 16;
                    // These races prove correctness; a loaded CI machine must not turn a slow lock into a 503.
                    s.lock_wait_ms = 60_000;
                })
                .await
                {
                    super::$case(app).await;
                }
            }

            $crate::strategy_tests!(
                postgres_conditional, postgres_conditional_one_by_one: Postgres, Conditional;
                postgres_optimistic, postgres_optimistic_one_by_one: Postgres, Optimistic;
                postgres_pessimistic, postgres_pessimistic_one_by_one: Postgres, Pessimistic;
                postgres_local, postgres_local_one_by_one: Postgres, Local;
                postgres_redis_optimistic, postgres_redis_optimistic_one_by_one: Postgres, RedisOptimistic;
                sqlite_conditional, sqlite_conditional_one_by_one: Sqlite, Conditional;
                sqlite_optimistic, sqlite_optimistic_one_by_one: Sqlite, Optimistic;
                sqlite_local, sqlite_local_one_by_one: Sqlite, Local;
                sqlite_redis_optimistic, sqlite_redis_optimistic_one_by_one: Sqlite, RedisOptimistic;
            );
        }
    )*};
}

/// The two tests (combined, one by one) of each store and strategy, for [`on_every_strategy!`].
#[macro_export]
macro_rules! strategy_tests {
    ($($combined:ident, $single:ident: $store:ident, $strategy:ident;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $combined() { run(Store::$store, S::$strategy, 128).await }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $single() { run(Store::$store, S::$strategy, 1).await }
    )*};
}

/// Runs each listed `async fn(TestApp)` once on SQLite and once on PostgreSQL.
#[macro_export]
macro_rules! on_both_stores {
    ($($case:ident),* $(,)?) => {$(
        mod $case {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let app = $crate::helpers::TestApp::spawn($crate::helpers::Store::Sqlite).await.expect("sqlite");
                super::$case(app).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                if let Some(app) = $crate::helpers::TestApp::spawn($crate::helpers::Store::Postgres).await {
                    super::$case(app).await;
                }
            }
        }
    )*};
}

/// A `shop-server` process (the binary, not in-process) over `app`'s database with these extra settings, on a
/// free port: its child and base URL. It may not be ready yet.
pub fn server_process(app: &TestApp, env: &[(&str, &str)]) -> (std::process::Child, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("port").port();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_shop-server"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("SHOP_DATABASE_URL", &app.settings.database_url)
        .env("SHOP_HTTP_ADDR", format!("127.0.0.1:{port}"))
        .env("SHOP_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("SHOP_AUTH_SECRET", AUTH_SECRET)
        .env("SHOP_SEED_DEMO", "false")
        .env("RUST_LOG", "error")
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("shop-server starts");
    (child, format!("http://127.0.0.1:{port}"))
}
