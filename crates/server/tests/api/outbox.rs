//! Events: recorded in the outbox in the transaction of their effect, handed by the relay to the log, a Redis
//! stream and signed webhooks, at least once; the admin API over them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fred::prelude::{Builder, Client, ClientLike, Config, StreamsInterface};
use serde_json::{Value, json};
use shop_server::StockStrategyName;

use crate::helpers::{ADMIN_TOKEN, Resp, Store, TestApp, race};
use crate::redis_locks::{REDIS, prefix, redis_up};

async fn order(app: &TestApp, user: i64, option: i64, quantity: i64) -> Resp {
    let body = json!({"userId": user, "items": [{"productOptionId": option, "quantity": quantity}]});
    app.post_as(user, "/api/v1/orders", body).await
}

async fn pay(app: &TestApp, user: i64, order: i64) -> Resp {
    app.post_as(user, &format!("/api/v1/orders/{order}/payment"), json!({"userId": user})).await
}

/// Every event the admin API lists (all pages), oldest first.
async fn events(app: &TestApp, status: Option<&str>) -> Vec<Value> {
    let mut all = Vec::new();
    for page in 1.. {
        let filter = status.map_or(String::new(), |s| format!("&status={s}"));
        let r = app
            .send(
                app.client
                    .get(app.url(&format!("/api/v1/admin/events?size=100&page={page}{filter}")))
                    .bearer_auth(ADMIN_TOKEN),
            )
            .await;
        assert_eq!(r.status, 200, "{r:?}");
        let items = r.body["items"].as_array().unwrap().clone();
        let done = items.len() < 100;
        all.extend(items);
        if done {
            break;
        }
    }
    all.reverse();
    all
}

/// Fetches with `fetch` for at most `limit` until `done` holds of what it fetched, and returns that.
async fn fetch_until<T, F: std::future::Future<Output = T>>(
    limit: Duration,
    what: &str,
    mut fetch: impl FnMut() -> F,
    done: impl Fn(&T) -> bool,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        let got = fetch().await;
        if done(&got) {
            return got;
        }
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls for at most `limit` until `check` holds.
async fn within<F: std::future::Future<Output = bool>>(limit: Duration, what: &str, mut check: impl FnMut() -> F) {
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Orders, a payment, a payment refused for its balance and an expiry each record their event, and nothing
/// refused or rolled back records any; the log sink has them all (no Redis, no webhook configured). The
/// event's data is the order as the API shows it.
async fn every_state_change_records_its_event(app: TestApp) {
    let option = app.product("evented", &[("one", 1000, 3)]).await["options"][0]["id"].as_i64().unwrap();
    let [rich, poor] = [app.users(1, 10_000).await[0], app.users(1, 0).await[0]];
    let paid = order(&app, rich, option, 1).await;
    assert_eq!(paid.status, 201);
    let unpaid = order(&app, poor, option, 1).await;
    let expires = order(&app, rich, option, 1).await;
    assert_eq!((unpaid.status, expires.status), (201, 201));
    assert_eq!(order(&app, rich, option, 1).await.status, 409, "sold out: no event");
    let id = |r: &Resp| r.body["id"].as_i64().unwrap();
    assert_eq!(pay(&app, rich, id(&paid)).await.status, 200);
    assert_eq!(pay(&app, poor, id(&unpaid)).await.status, 402);
    app.clock.advance(app.settings.order_payment_timeout + Duration::from_secs(1));
    assert_eq!(app.orders.expire_overdue(app.settings.order_payment_timeout, 100).await.unwrap(), 1);

    let listed = fetch_until(
        Duration::from_secs(10),
        "every event delivered to the log",
        || events(&app, None),
        |listed| listed.len() == 6 && listed.iter().all(|e| e["status"] == "delivered"),
    )
    .await;
    let seen: Vec<(String, i64, Option<String>)> = listed
        .iter()
        .map(|e| {
            let reason = e["envelope"]["data"]["reason"].as_str().map(str::to_owned);
            (e["type"].as_str().unwrap().to_owned(), e["orderId"].as_i64().unwrap(), reason)
        })
        .collect();
    let cancelled = |reason: &str| Some(reason.to_owned());
    assert_eq!(
        seen,
        vec![
            ("order.created".to_owned(), id(&paid), None),
            ("order.created".to_owned(), id(&unpaid), None),
            ("order.created".to_owned(), id(&expires), None),
            ("payment.completed".to_owned(), id(&paid), None),
            ("order.cancelled".to_owned(), id(&unpaid), cancelled("INSUFFICIENT_BALANCE")),
            ("order.cancelled".to_owned(), id(&expires), cancelled("PAYMENT_TIMEOUT")),
        ]
    );
    for e in &listed {
        assert_eq!(e["deliveries"].as_array().unwrap().len(), 1, "{e}");
        assert_eq!((&e["deliveries"][0]["sink"], &e["deliveries"][0]["status"]), (&json!("log"), &json!("delivered")));
        assert_eq!(e["envelope"]["id"], e["id"], "the envelope carries its id");
        assert_eq!(e["envelope"]["type"], e["type"]);
    }
    // order.created carries the order exactly as its 201 answered it.
    assert_eq!(listed[0]["envelope"]["data"], paid.body);
    let completed = &listed[3]["envelope"]["data"];
    assert_eq!((&completed["status"], &completed["payment"]["status"]), (&json!("PAID"), &json!("COMPLETED")));
    let fetched = app.get_as(rich, &format!("/api/v1/orders/{}", id(&paid))).await;
    assert_eq!(completed, &fetched.body, "payment.completed carries the order as it now reads");
    let expired = &listed[5]["envelope"]["data"];
    assert_eq!((&expired["status"], &expired["payment"]["status"]), (&json!("CANCELLED"), &json!("FAILED")));

    let failed = app.send(app.client.get(app.url("/api/v1/admin/events?status=failed")).bearer_auth(ADMIN_TOKEN)).await;
    assert_eq!(failed.body["total"], 0);
    let bad = app.send(app.client.get(app.url("/api/v1/admin/events?status=lost")).bearer_auth(ADMIN_TOKEN)).await;
    bad.invalid("status");
    let anonymous = app.send(app.client.get(app.url("/api/v1/admin/events"))).await;
    anonymous.problem(401, "UNAUTHORIZED");
    let retry = app
        .send(
            app.client
                .post(app.url(&format!("/api/v1/admin/events/{}/retry", listed[0]["id"].as_str().unwrap())))
                .bearer_auth(ADMIN_TOKEN),
        )
        .await;
    retry.problem(409, "EVENT_NOT_FAILED");
    let unknown = app.send(app.client.post(app.url("/api/v1/admin/events/nope/retry")).bearer_auth(ADMIN_TOKEN)).await;
    unknown.problem(404, "EVENT_NOT_FOUND");
}

crate::on_both_stores!(every_state_change_records_its_event);

/// A raw client of the Redis at `url`.
pub(crate) async fn raw(url: &str) -> Client {
    let client = Builder::from_config(Config::from_url(url).unwrap()).build().unwrap();
    client.init().await.unwrap();
    client
}

/// The events stream of `prefix`, deduplicated by event id: (type, order id) of each event, in stream order.
async fn stream(redis: &Client, prefix: &str) -> (Vec<(String, i64)>, usize) {
    let entries: Vec<(String, HashMap<String, String>)> =
        redis.xrange(shop_redis::events_stream_key(prefix), "-", "+", None).await.unwrap();
    let raw = entries.len();
    let mut seen = BTreeSet::new();
    let mut events = Vec::new();
    for (_, fields) in entries {
        if !seen.insert(fields["id"].clone()) {
            continue;
        }
        let envelope: Value = serde_json::from_str(&fields["envelope"]).unwrap();
        assert_eq!(envelope["type"].as_str(), Some(fields["type"].as_str()));
        events.push((fields["type"].clone(), envelope["data"]["id"].as_i64().unwrap()));
    }
    (events, raw)
}

/// 1,000 buyers on 300 units over two instances, then the winners pay: the stream holds exactly one
/// `order.created` and one `payment.completed` per committed order after deduplication, none for a refused
/// order, and each order's events in their order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_holds_each_committed_orders_events_once_over_two_instances() {
    if !redis_up().await {
        return;
    }
    let prefix = prefix();
    let Some(apps) = TestApp::spawn_cluster(Store::Postgres, 2, |s| {
        s.stock_strategy = StockStrategyName::Conditional;
        s.redis_url = Some(REDIS.into());
        s.redis_key_prefix = prefix.clone();
        s.db_max_connections = 16;
    })
    .await
    else {
        return;
    };
    let apps: Vec<Arc<TestApp>> = apps.into_iter().map(Arc::new).collect();
    let app = &apps[0];
    let option = app.product("streamed", &[("one", 10, 300)]).await["options"][0]["id"].as_i64().unwrap();
    let buyers = app.users(1000, 1_000).await;
    let (answers, _) = race(&apps, &buyers, |_| json!([{"productOptionId": option, "quantity": 1}])).await;
    let won: Vec<(i64, i64)> = buyers
        .iter()
        .zip(&answers)
        .filter(|(_, r)| r.status == 201)
        .map(|(user, r)| (*user, r.body["id"].as_i64().unwrap()))
        .collect();
    assert_eq!(won.len(), 300);
    assert!(answers.iter().all(|r| r.status == 201 || r.status == 409));
    let payments: Vec<_> = won
        .iter()
        .enumerate()
        .map(|(i, (user, id))| {
            let (app, user, id) = (apps[i % 2].clone(), *user, *id);
            tokio::spawn(async move { pay(&app, user, id).await.status })
        })
        .collect();
    for p in payments {
        assert_eq!(p.await.unwrap(), 200);
    }
    let redis = raw(REDIS).await;
    let (events, raw_entries) = fetch_until(
        Duration::from_secs(30),
        "600 events in the stream",
        || stream(&redis, &prefix),
        |s| s.0.len() >= 600,
    )
    .await;
    let committed: BTreeSet<i64> = won.iter().map(|(_, id)| *id).collect();
    let of = |kind: &str| events.iter().filter(|(k, _)| k == kind).map(|(_, id)| *id).collect::<Vec<_>>();
    let created = of("order.created");
    let completed = of("payment.completed");
    assert_eq!(created.len(), 300, "one order.created per committed order");
    assert_eq!(created.iter().copied().collect::<BTreeSet<_>>(), committed);
    assert_eq!(completed.iter().copied().collect::<BTreeSet<_>>(), committed);
    assert_eq!(completed.len(), 300);
    assert_eq!(events.len(), 600, "nothing else: no event for a refused order");
    let mut first: BTreeMap<i64, &str> = BTreeMap::new();
    for (kind, id) in &events {
        first.entry(*id).or_insert(kind.as_str());
    }
    assert!(first.values().all(|k| *k == "order.created"), "an order's creation comes before its payment");
    eprintln!("[outbox] 300 orders and 300 payments over two instances: {raw_entries} stream entries, 600 events");
}

/// A webhook receiver: answers with what `answer` says for each delivery, recording the body and whether its
/// signature verified.
struct Receiver {
    addr: SocketAddr,
    deliveries: Arc<Mutex<Vec<(Value, bool)>>>,
    handle: actix_web::dev::ServerHandle,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        drop(self.handle.stop(false));
    }
}

impl Receiver {
    fn start(secret: &'static str, answer: impl Fn(usize) -> u16 + Send + Sync + 'static) -> Self {
        use actix_web::{App, HttpRequest, HttpResponse, web};
        let deliveries = Arc::new(Mutex::new(Vec::new()));
        let (seen, calls, answer) = (deliveries.clone(), Arc::new(AtomicUsize::new(0)), Arc::new(answer));
        let server = actix_web::HttpServer::new(move || {
            let (seen, calls, answer) = (seen.clone(), calls.clone(), answer.clone());
            App::new().default_service(web::to(move |req: HttpRequest, body: String| {
                let (seen, calls, answer) = (seen.clone(), calls.clone(), answer.clone());
                async move {
                    let header = req.headers().get("shop-signature").and_then(|v| v.to_str().ok()).unwrap_or("");
                    let t: i64 =
                        header.split(',').find_map(|p| p.strip_prefix("t=")).and_then(|t| t.parse().ok()).unwrap_or(0);
                    let valid = header == shop_server::events::signature(secret.as_bytes(), t, &body)
                        && (chrono::Utc::now().timestamp() - t).abs() < 300;
                    let n = calls.fetch_add(1, Ordering::SeqCst);
                    let status = answer(n);
                    if status < 300 {
                        seen.lock().unwrap().push((serde_json::from_str(&body).unwrap_or(Value::Null), valid));
                    }
                    HttpResponse::build(actix_web::http::StatusCode::from_u16(status).unwrap()).finish()
                }
            }))
        })
        .workers(1)
        .bind("127.0.0.1:0")
        .unwrap();
        let addr = server.addrs()[0];
        let server = server.run();
        let handle = server.handle();
        tokio::spawn(server);
        Self { addr, deliveries, handle }
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn ids(&self) -> BTreeSet<String> {
        self.deliveries.lock().unwrap().iter().map(|(e, _)| e["id"].as_str().unwrap_or_default().to_owned()).collect()
    }
}

/// One receiver answers 500 to its first three deliveries and is then unreachable for a while: afterwards it
/// has every event, each signature verifies. Another never answers 2xx: its events end dead-lettered, the admin
/// API lists them as failed, and once it answers again the admin retry re-delivers them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_signed_retried_dead_lettered_and_retried_by_an_admin() {
    let flaky = Receiver::start("flaky-secret", |n| if n < 3 { 500 } else { 200 });
    let healthy = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let refusing = {
        let healthy = healthy.clone();
        Receiver::start("refusing-secret", move |_| if healthy.load(Ordering::SeqCst) { 200 } else { 500 })
    };
    let proxy = crate::proxy::FaultProxy::start(&flaky.addr.to_string()).await;
    let flaky_url = format!("http://{}/hook", proxy.addr);
    let refusing_url = refusing.url();
    let app = TestApp::spawn_with(Store::Sqlite, |s| {
        s.webhooks = vec![
            shop_server::events::Webhook { url: flaky_url.clone(), secret: "flaky-secret".into() },
            shop_server::events::Webhook { url: refusing_url.clone(), secret: "refusing-secret".into() },
        ];
        // Full jitter: thirty attempts of up to 20-100 ms each outlast the 300 ms cut below beyond doubt.
        s.webhook_max_attempts = 30;
        s.webhook_retry_base = Duration::from_millis(20);
        s.webhook_retry_max = Duration::from_millis(100);
        s.webhook_timeout = Duration::from_millis(500);
        s.relay_poll_interval = Duration::from_millis(50);
    })
    .await
    .expect("sqlite");
    let option = app.product("hooked", &[("one", 10, 100)]).await["options"][0]["id"].as_i64().unwrap();
    let users = app.users(5, 0).await;
    // The flaky receiver goes away for 300 ms after its first refusals.
    let mut ids = Vec::new();
    for (i, user) in users.iter().enumerate() {
        if i == 2 {
            proxy.cut();
        }
        let r = order(&app, *user, option, 1).await;
        assert_eq!(r.status, 201);
        ids.push(r.body["id"].as_i64().unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.restore();
    let recorded: BTreeSet<String> =
        events(&app, None).await.iter().map(|e| e["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(recorded.len(), 5);
    within(Duration::from_secs(20), "the flaky receiver has every event", || async { flaky.ids() == recorded }).await;
    assert!(flaky.deliveries.lock().unwrap().iter().all(|(_, valid)| *valid), "every signature verifies");

    within(Duration::from_secs(20), "the refusing receiver's events dead-lettered", || async {
        events(&app, Some("failed")).await.len() == 5
    })
    .await;
    let failed = events(&app, Some("failed")).await;
    let delivery = |e: &Value| {
        e["deliveries"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["sink"] == format!("webhook:{refusing_url}"))
            .cloned()
            .unwrap()
    };
    for e in &failed {
        let d = delivery(e);
        assert_eq!((&d["status"], &d["attempts"]), (&json!("failed"), &json!(30)), "{e}");
        assert!(d["lastError"].as_str().unwrap().contains("500"), "{e}");
    }
    assert!(refusing.ids().is_empty());
    healthy.store(true, Ordering::SeqCst);
    for e in &failed {
        let r = app
            .send(
                app.client
                    .post(app.url(&format!("/api/v1/admin/events/{}/retry", e["id"].as_str().unwrap())))
                    .bearer_auth(ADMIN_TOKEN),
            )
            .await;
        assert_eq!(r.status, 202, "{r:?}");
        assert_eq!(delivery(&r.body)["status"], "pending");
    }
    within(Duration::from_secs(20), "the retried events reach the receiver", || async { refusing.ids() == recorded })
        .await;
    assert!(refusing.deliveries.lock().unwrap().iter().all(|(_, valid)| *valid));
    within(Duration::from_secs(10), "every event delivered everywhere", || async {
        events(&app, Some("delivered")).await.len() == 5
    })
    .await;
}

/// A `shop-server` process over `app`'s database whose stream sink writes to `redis_url`, ready to serve.
async fn server_process(app: &TestApp, redis_url: &str, prefix: &str) -> (std::process::Child, String) {
    let env = [
        ("SHOP_STOCK_STRATEGY", "pessimistic"),
        ("SHOP_REDIS_URL", redis_url),
        ("SHOP_REDIS_KEY_PREFIX", prefix),
        ("SHOP_RELAY_POLL_INTERVAL", "50ms"),
    ];
    let (child, base) = crate::helpers::server_process(app, &env);
    let probe = reqwest::Client::new();
    within(Duration::from_secs(30), "the server process is ready", || async {
        probe.get(format!("{base}/health/ready")).send().await.is_ok_and(|r| r.status() == 200)
    })
    .await;
    (child, base)
}

/// An instance whose stream is unreachable takes orders of 300 buyers for 300 units and is killed -9 in the middle
/// of them, its events
/// undelivered: the instance started after it delivers an `order.created` for every order the database holds
/// (each 201 among them), and none for anything else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_committed_before_a_kill_9_are_delivered_after_the_restart() {
    if !redis_up().await {
        return;
    }
    let prefix = prefix();
    // This in-process instance only seeds the database: no events, no relay.
    let Some(app) = TestApp::spawn_with(Store::Postgres, |s| s.outbox = false).await else { return };
    let option = app.product("crashed", &[("one", 10, 300)]).await["options"][0]["id"].as_i64().unwrap();
    let buyers = app.users(300, 0).await;
    let upstream = REDIS.trim_start_matches("redis://").trim_end_matches('/');
    let proxy = crate::proxy::FaultProxy::start(upstream).await;
    let (mut first, base) = server_process(&app, &proxy.route(REDIS, upstream), &prefix).await;
    proxy.cut();

    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let answered = Arc::new(AtomicUsize::new(0));
    let orders: Vec<_> = buyers
        .iter()
        .map(|&user| {
            let (client, url, token, answered) =
                (client.clone(), format!("{base}/api/v1/orders"), app.token(user), answered.clone());
            let body = json!({"items": [{"productOptionId": option, "quantity": 1}]});
            tokio::spawn(async move {
                let r = client.post(url).bearer_auth(token).json(&body).send().await.ok()?;
                answered.fetch_add(1, Ordering::SeqCst);
                let status = r.status().as_u16();
                let body: Value = r.json().await.ok()?;
                (status == 201).then(|| body["id"].as_i64()).flatten()
            })
        })
        .collect();
    within(Duration::from_secs(30), "fifty orders answered", || async { answered.load(Ordering::SeqCst) >= 50 }).await;
    first.kill().unwrap();
    first.wait().unwrap();
    let mut confirmed = BTreeSet::new();
    for o in orders {
        confirmed.extend(o.await.unwrap());
    }
    let redis = raw(REDIS).await;
    assert!(stream(&redis, &prefix).await.0.is_empty(), "nothing reached the stream before the crash");
    let committed: BTreeSet<i64> = app.scalars("SELECT id FROM orders").await.into_iter().collect();
    assert!(confirmed.is_subset(&committed), "every 201 is a committed order");
    assert!(confirmed.len() >= 50 && committed.len() < 300, "killed in mid-sale: {}", committed.len());
    let waiting = app.scalar("SELECT count(*) FROM outbox_events WHERE handed_over_at IS NULL").await;
    assert_eq!(usize::try_from(waiting).unwrap(), committed.len(), "every committed order's event waits");

    proxy.restore();
    let (mut second, _) = server_process(&app, REDIS, &prefix).await;
    let (events, raw_entries) = fetch_until(
        Duration::from_secs(30),
        "the restarted instance delivers every event",
        || stream(&redis, &prefix),
        |s| s.0.len() >= committed.len(),
    )
    .await;
    second.kill().unwrap();
    second.wait().unwrap();
    assert!(events.iter().all(|(kind, _)| kind == "order.created"));
    let delivered: BTreeSet<i64> = events.iter().map(|(_, id)| *id).collect();
    assert_eq!(delivered, committed, "one order.created for each committed order, nothing else");
    assert_eq!(events.len(), committed.len());
    eprintln!(
        "[outbox] killed after {} answers: {} committed ({} confirmed 201), {raw_entries} stream entries after the \
         restart",
        answered.load(Ordering::SeqCst),
        committed.len(),
        confirmed.len()
    );
}
