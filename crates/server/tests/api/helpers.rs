//! Spawns the real application on a random port over a fresh database, and talks to it over real HTTP.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Barrier;

use actix_web::dev::ServerHandle;
use reqwest::header::HeaderMap;
use sea_orm::{ConnectionTrait, Database, DatabaseConnection};
use serde_json::Value;
use shop_domain::services::{IdempotencyService, OrderService};
use shop_server::{Application, Settings, StockStrategyName};

pub const ADMIN_TOKEN: &str = "test-admin-token";

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
    pub strategy: StockStrategyName,
    /// The settings it was built with (its database URL, strategy ...).
    pub settings: Settings,
    handle: ServerHandle,
    _backing: Backing,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        // Sends the stop command at once; nothing needs to await it.
        drop(self.handle.stop(false));
    }
}

fn postgres_admin_url() -> String {
    std::env::var("SHOP_TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// Settings every test starts from: few workers and connections, the admin API on, no demo data.
pub fn base_settings(database_url: String) -> Settings {
    Settings {
        http_addr: "127.0.0.1:0".parse().expect("address"),
        database_url,
        admin_token: Some(ADMIN_TOKEN.into()),
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
        Some(Self::start(settings, store, backing).await)
    }

    /// `n` instances over one fresh database, started at the same time (they race to migrate it).
    pub async fn spawn_cluster(store: Store, n: usize, tweak: impl FnOnce(&mut Settings)) -> Option<Vec<Self>> {
        let (settings, backing) = Self::prepare(store, tweak).await?;
        let mut backings = vec![backing];
        backings.extend((1..n).map(|_| Backing::Borrowed));
        let starts = backings.into_iter().map(|b| Self::start(settings.clone(), store, b));
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
                let (base, _) = admin_url.rsplit_once('/').expect("database url has a path");
                let url = format!("{base}/{name}");
                (url, Backing::Postgres(PgDatabase { admin_url, name }))
            }
        };
        let mut settings = base_settings(url);
        tweak(&mut settings);
        Some((settings, backing))
    }

    /// Another instance of the application over this one's database, as a scaled-out deployment runs it.
    pub async fn second_instance(&self) -> Self {
        Self::start(self.settings.clone(), self.store, Backing::Borrowed).await
    }

    async fn start(settings: Settings, store: Store, backing: Backing) -> Self {
        let strategy = settings.stock_strategy;
        let app = Application::build(settings.clone()).await.expect("the application starts");
        let base = format!("http://127.0.0.1:{}", app.port());
        let db = app.database();
        let orders = app.orders();
        let idempotency = app.idempotency();
        let handle = app.handle();
        tokio::spawn(app.run_until_stopped());
        let client = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().expect("client");
        Self { base, client, db, store, orders, idempotency, strategy, settings, handle, _backing: backing }
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

    /// Creates a user through the API and returns its id.
    pub async fn user(&self, name: &str) -> i64 {
        let r = self.post("/api/v1/users", serde_json::json!({ "name": name })).await;
        assert_eq!(r.status, 201, "{r:?}");
        r.body["id"].as_i64().expect("id")
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
            tokio::spawn(async move {
                barrier.wait().await;
                app.post("/api/v1/orders", body).await
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

/// Runs each listed `async fn(TestApp)` with every stock strategy on every store that can serve it:
/// PostgreSQL with all five, SQLite with all but `pessimistic` (which SQLite cannot serve). `redis-optimistic`
/// uses the Redis at 6379 (skipped without it, outside CI) under a key prefix of the test's own.
#[macro_export]
macro_rules! on_every_strategy {
    ($($case:ident),* $(,)?) => {$(
        mod $case {
            use $crate::helpers::{Store, TestApp};
            use shop_server::StockStrategyName as S;

            async fn run(store: Store, strategy: S) {
                if strategy == S::RedisOptimistic && !$crate::redis_locks::redis_up().await {
                    return;
                }
                if let Some(app) = TestApp::spawn_with(store, |s| {
                    s.stock_strategy = strategy;
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

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres_conditional() { run(Store::Postgres, S::Conditional).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres_optimistic() { run(Store::Postgres, S::Optimistic).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres_pessimistic() { run(Store::Postgres, S::Pessimistic).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres_local() { run(Store::Postgres, S::Local).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres_redis_optimistic() { run(Store::Postgres, S::RedisOptimistic).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite_conditional() { run(Store::Sqlite, S::Conditional).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite_optimistic() { run(Store::Sqlite, S::Optimistic).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite_local() { run(Store::Sqlite, S::Local).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite_redis_optimistic() { run(Store::Sqlite, S::RedisOptimistic).await }
        }
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
