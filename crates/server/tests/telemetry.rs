#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The process's telemetry seen from outside, on the real binary: `/metrics` (a process of its own, so the
//! global recorder sees this server only), the access log on stdout, and secrets kept out of every log line.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const ADMIN_TOKEN: &str = "telemetry-admin-token";
const AUTH_SECRET: &str = "telemetry-auth-secret-of-at-least-32-bytes";
const SECRET: &str = "s3cret-pw-never-logged";

/// A `shop-server` subprocess over a fresh SQLite file, its stdout collected line by line.
struct Server {
    child: Child,
    base: String,
    lines: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn command(envs: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shop-server"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("SHOP_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("SHOP_AUTH_SECRET", AUTH_SECRET)
        .env("SHOP_PASSWORD_HASH_MEMORY_KIB", "8")
        .env("SHOP_PASSWORD_HASH_ITERATIONS", "1")
        .env("SHOP_SEED_DEMO", "false")
        .envs(envs.iter().copied());
    cmd
}

async fn start(envs: &[(&str, &str)]) -> Server {
    // Before any client is built, here and in the tests: reqwest's rustls has no provider of its own.
    shop_server::events::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("shop.db").display());
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut child = command(envs)
        .env("SHOP_DATABASE_URL", &url)
        .env("SHOP_HTTP_ADDR", &addr)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let lines = Arc::new(Mutex::new(Vec::new()));
    let (stdout, sink) = (child.stdout.take().unwrap(), lines.clone());
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    let base = format!("http://{addr}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while reqwest::get(format!("{base}/health/live")).await.is_err() {
        assert!(Instant::now() < deadline, "the server did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Server { child, base, lines, _dir: dir }
}

/// The lines of the access log (JSON) that satisfy `pick`, waiting a little for them to be written.
async fn access_lines(server: &Server, at_least: usize, pick: impl Fn(&Value) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found: Vec<Value> = server
            .lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["message"] == "request" && pick(v))
            .collect();
        if found.len() >= at_least || Instant::now() > deadline {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of the series `name{labels}` in a Prometheus text exposition (labels in any order).
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (metric, rest) = series.split_once('{').unwrap_or((series, "}"));
        let has_all = labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
        (metric == name && has_all).then(|| value.parse().ok()).flatten()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_the_access_log_describe_every_request() {
    let server = start(&[("SHOP_LOG_FORMAT", "json"), ("RUST_LOG", "info")]).await;
    let http = reqwest::Client::new();
    let url = |path: &str| format!("{}{path}", server.base);
    let created: Value = http
        .post(url("/api/v1/users"))
        .json(&json!({"name": "kim", "password": "kim's password"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let user = created["id"].as_i64().unwrap();
    let session: Value = http
        .post(url("/api/v1/auth/token"))
        .json(&json!({"name": "kim", "password": "kim's password"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = session["accessToken"].as_str().unwrap().to_owned();
    let product: Value = http
        .post(url("/api/v1/admin/products"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"name": "tee", "options": [{"name": "S", "price": 10, "stock": 2}]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let option = product["options"][0]["id"].as_i64().unwrap();
    let mut statuses = Vec::new();
    let mut last_id = None;
    for _ in 0..3 {
        let r = http
            .post(url("/api/v1/orders"))
            .bearer_auth(&token)
            .json(&json!({"userId": user, "items": [{"productOptionId": option, "quantity": 1}]}))
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
        last_id = r.headers().get("x-request-id").map(|v| v.to_str().unwrap().to_owned());
        if r.status() == 201 {
            let order: Value = r.json().await.unwrap();
            let get = http.get(url(&format!("/api/v1/orders/{}", order["id"]))).bearer_auth(&token).send().await;
            assert_eq!(get.unwrap().status(), 200);
        }
    }
    assert_eq!(statuses, [201, 201, 409]);

    let text = http.get(url("/metrics")).send().await.unwrap().text().await.unwrap();
    let orders = [("method", "POST"), ("route", "/api/v1/orders"), ("status", "2xx")];
    assert_eq!(sample(&text, "shop_http_request_duration_seconds_count", &orders), Some(2.0), "{text}");
    let refused = [("method", "POST"), ("route", "/api/v1/orders"), ("status", "4xx")];
    assert_eq!(sample(&text, "shop_http_request_duration_seconds_count", &refused), Some(1.0), "{text}");
    let by_template = [("route", "/api/v1/orders/{orderId}"), ("status", "2xx")];
    assert_eq!(sample(&text, "shop_http_request_duration_seconds_count", &by_template), Some(2.0), "{text}");
    assert!(
        sample(&text, "shop_http_request_duration_seconds_bucket", &[("route", "/api/v1/orders"), ("le", "0.0001")])
            .is_some(),
        "histogram buckets down to 100 µs: {text}"
    );
    let conditional = [("strategy", "conditional")];
    assert_eq!(sample(&text, "shop_orders_placed_total", &conditional), Some(2.0), "{text}");
    assert_eq!(sample(&text, "shop_orders_refused_early_total", &conditional), Some(1.0), "{text}");
    let batches = [("strategy", "conditional"), ("kind", "order")];
    assert_eq!(sample(&text, "shop_batch_size_count", &batches), Some(2.0), "{text}");
    assert_eq!(sample(&text, "shop_batch_size_sum", &batches), Some(2.0), "{text}");
    assert_eq!(sample(&text, "shop_batch_commit_seconds_count", &batches), Some(2.0), "{text}");
    assert_eq!(sample(&text, "shop_db_pool_connections", &[("state", "max")]), Some(16.0), "{text}");
    assert!(sample(&text, "shop_lanes_active", &[("kind", "order")]).is_some(), "{text}");
    assert!(text.contains("# HELP shop_orders_placed_total Orders committed."), "{text}");
    assert!(!text.contains(&format!("/api/v1/orders/{user}")), "paths never become labels");

    let refused_line = access_lines(&server, 1, |v| v["status"] == 409).await;
    let line = refused_line.first().expect("the 409 is logged at info");
    assert_eq!((&line["method"], &line["route"]), (&json!("POST"), &json!("/api/v1/orders")), "{line}");
    assert_eq!(line["request_id"].as_str(), last_id.as_deref(), "{line}");
    assert!(line["latency_ms"].as_f64().is_some_and(|ms| ms >= 0.0), "{line}");
    assert_eq!(line["level"], "INFO", "{line}");
    let ok = access_lines(&server, 2, |v| v["status"] == 201 && v["route"] == "/api/v1/orders").await;
    assert_eq!(ok.len(), 2);
}

/// A password in the database or Redis URL appears in no log line, whatever the level, when start-up fails on
/// it; the redacted URL still names the host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_in_urls_never_reach_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = format!("sqlite://{}?mode=rwc", dir.path().join("shop.db").display());
    let database = format!("postgres://postgres:{SECRET}@127.0.0.1:1/shop");
    let redis = format!("redis://:{SECRET}@127.0.0.1:1");
    for envs in [
        vec![("SHOP_DATABASE_URL", database.as_str())],
        vec![("SHOP_DATABASE_URL", sqlite.as_str()), ("SHOP_STOCK_STRATEGY", "redis-spin"), ("SHOP_REDIS_URL", &redis)],
    ] {
        for format in ["text", "json"] {
            let out = command(&envs)
                .env("RUST_LOG", "trace")
                .env("SHOP_LOG_FORMAT", format)
                .env("SHOP_HTTP_ADDR", format!("127.0.0.1:{}", free_port()))
                .output()
                .unwrap();
            let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            assert!(!out.status.success(), "start-up fails: {all}");
            assert!(all.contains("127.0.0.1:1"), "the failure names the host: {all}");
            assert!(!all.contains(SECRET), "a password reached the log: {all}");
        }
    }
}
