//! One run of one scenario: fresh database, servers, users and a hot option set up through the API, every buyer
//! released at once, then the invariants checked.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::{Barrier, Semaphore};

use crate::instances::{self, ADMIN_TOKEN, FreshDatabase};

/// Buyers, units of stock, and instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scenario {
    /// Buyers of the hot option.
    pub buyers: usize,
    /// The hot options' stock, split evenly over them.
    pub stock: i64,
    /// Hot options the buyers spread over in turn (`BUYERSxSTOCKhOPTIONS`; 1 without the suffix).
    pub hot: usize,
    pub instances: usize,
    /// One buyer at a time (`100seq`): what a lone order costs, with combining on or off.
    pub sequential: bool,
    /// Buyers of other options released together with the hot option's (`catalogue`).
    pub cold: Option<Cold>,
}

/// The rest of the catalogue during a flash sale: `buyers` spread evenly over `options` options of `stock`
/// units each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cold {
    pub buyers: usize,
    pub options: usize,
    pub stock: i64,
}

impl FromStr for Scenario {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "unknown scenario `{s}`: use BUYERSxSTOCK, BUYERSonSTOCK, BUYERSxSTOCKxINSTANCES, BUYERSxSTOCKhOPTIONS, \
                 BUYERSseq or catalogue"
            )
        };
        if s == "catalogue" {
            // A flash sale of 1,000 on one option while 1,000 other buyers order 100 other options.
            let cold = Cold { buyers: 1000, options: 100, stock: 20 };
            return Ok(Self { buyers: 1000, stock: 1000, hot: 1, instances: 1, sequential: false, cold: Some(cold) });
        }
        if let Some(buyers) = s.strip_suffix("seq") {
            let buyers: usize = buyers.parse().map_err(|_| bad())?;
            let stock = i64::try_from(buyers).map_err(|_| bad())?;
            return Ok(Self { buyers, stock, hot: 1, instances: 1, sequential: true, cold: None });
        }
        let (s, hot) = match s.split_once('h') {
            Some((rest, hot)) => (rest, hot.parse::<usize>().ok().filter(|h| *h > 0).ok_or_else(bad)?),
            None => (s, 1),
        };
        let parts: Vec<&str> = s.split(['x', 'o', 'n']).filter(|p| !p.is_empty()).collect();
        let num = |i: usize| parts.get(i).and_then(|p| p.parse::<usize>().ok()).ok_or_else(bad);
        let buyers = num(0)?;
        let stock = i64::try_from(num(1)?).map_err(|_| bad())?;
        let instances = if parts.len() > 2 { num(2)? } else { 1 };
        if stock % i64::try_from(hot).map_err(|_| bad())? != 0 {
            return Err(format!("scenario `{s}`: the stock must split evenly over {hot} options"));
        }
        Ok(Self { buyers, stock, hot, instances, sequential: false, cold: None })
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.sequential {
            return write!(f, "{} buyers one at a time", self.buyers);
        }
        write!(f, "{} buyers / {} units", self.buyers, self.stock)?;
        if self.hot > 1 {
            write!(f, " / {} options", self.hot)?;
        }
        if self.instances > 1 {
            write!(f, " / {} instances", self.instances)?;
        }
        if let Some(cold) = self.cold {
            write!(f, " + {} buyers of {} other options", cold.buyers, cold.options)?;
        }
        Ok(())
    }
}

pub struct Setup {
    pub binary: PathBuf,
    pub postgres: String,
    pub redis: String,
    /// Redlock's nodes, when the strategy is redis-redlock.
    pub redlock: Vec<String>,
    pub strategy: String,
    pub batch_max: Option<u32>,
    pub pool: u32,
    pub pay: bool,
    /// Scrape every instance's `/metrics` this often during the order phase (what Prometheus does in a sale).
    pub scrape: Option<Duration>,
    /// Where the last scrape of the order phase is written.
    pub scrape_out: Option<std::path::PathBuf>,
}

/// What one run measured.
#[derive(Debug, Clone)]
pub struct RunResult {
    /// First order sent to last order answered.
    pub makespan: Duration,
    /// The same buyers' `GET /health/live`, released at once over the same connections just before: the HTTP
    /// floor of this run (none for one buyer at a time).
    pub floor: Option<Duration>,
    /// Every order's latency.
    pub latencies: Vec<Duration>,
    pub created: usize,
    pub out_of_stock: usize,
    pub unavailable: usize,
    pub other: usize,
    pub final_stock: i64,
    /// stock + sold == initial, no oversell, every 201 has its order.
    pub correct: bool,
    /// The payment phase's makespan and latencies, when buyers pay.
    pub payment: Option<(Duration, Vec<Duration>, usize)>,
    /// What the servers' `/metrics` counted during the order phase, summed over the instances.
    pub counters: Counters,
    /// The other options' buyers (`catalogue`): their latencies and how many got an order.
    pub cold: Option<(Vec<Duration>, usize)>,
    /// How the outbox's relay kept up (none with `SHOP_OUTBOX=false`).
    pub events: Option<EventFigures>,
}

/// The relay's deliveries of the run's events, read from the outbox once it is empty.
#[derive(Debug, Clone, Copy, Default)]
pub struct EventFigures {
    pub delivered: i64,
    /// From an event's recording (in its order's transaction) to its delivery.
    pub lag_p50_ms: f64,
    pub lag_p99_ms: f64,
    /// Delivered events over the time from the first recorded to the last delivered.
    pub per_second: f64,
}

/// Seconds since the Unix epoch, as `perf record -k realtime` stamps its samples.
fn unix_seconds() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// Waits (at most 60 s) until every event of the run is delivered, then reads the lags from the outbox.
async fn event_figures(database_url: &str) -> Option<EventFigures> {
    use sea_orm::{ConnectionTrait, Database, DbBackend, Statement};
    let db = Database::connect(database_url).await.ok()?;
    let one = |sql: &str| Statement::from_string(DbBackend::Postgres, sql.to_owned());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let waiting = db
            .query_one_raw(one("SELECT (SELECT count(*) FROM outbox_events WHERE handed_over_at IS NULL) \
                 + (SELECT count(*) FROM outbox_deliveries WHERE status = 'pending') AS n"))
            .await
            .ok()??
            .try_get::<i64>("", "n")
            .ok()?;
        if waiting == 0 {
            break;
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let row = db
        .query_one_raw(one(
            // A batch sink's delivery is the event's hand-over; a per-event sink's is its delivery row.
            "WITH lags AS (\
               SELECT e.occurred_at AS recorded, e.handed_over_at AS delivered FROM outbox_events e \
                 WHERE e.delivered_to IS NOT NULL \
               UNION ALL SELECT e.occurred_at, d.delivered_at FROM outbox_deliveries d \
                 JOIN outbox_events e ON e.id = d.event_seq WHERE d.status = 'delivered') \
             SELECT count(*) AS n, \
             (percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM delivered - recorded)::float8)) \
               * 1000 AS p50, \
             (percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM delivered - recorded)::float8)) \
               * 1000 AS p99, \
             extract(epoch FROM max(delivered) - min(recorded))::float8 AS span FROM lags",
        ))
        .await
        .ok()??;
    let delivered: i64 = row.try_get("", "n").ok()?;
    if delivered == 0 {
        return None;
    }
    let span: f64 = row.try_get("", "span").ok()?;
    db.close().await.ok();
    Some(EventFigures {
        delivered,
        lag_p50_ms: row.try_get("", "p50").ok()?,
        lag_p99_ms: row.try_get("", "p99").ok()?,
        per_second: delivered as f64 / span.max(1e-6),
    })
}

/// The order-phase deltas of the servers' `/metrics` counters.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counters {
    pub retries: u64,
    pub refused_early: u64,
    pub lock_acquisitions: u64,
    pub lock_wait_micros: u64,
    /// Order batches committed (combining on): created orders / batches is the mean batch size.
    pub order_batches: u64,
}

/// The counters of every instance, summed.
async fn read_counters(client: &reqwest::Client, bases: &[String]) -> Counters {
    let mut total = Counters::default();
    for base in bases {
        let Ok(response) = client.get(format!("{base}/metrics")).send().await else { continue };
        let Ok(text) = response.text().await else { continue };
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) =
                match (line.split('{').next(), line.rsplit(' ').next().and_then(|v| v.parse::<u64>().ok())) {
                    (Some(name), Some(value)) => (name, value),
                    _ => continue,
                };
            match name {
                "shop_order_retries_total" => total.retries += value,
                "shop_orders_refused_early_total" => total.refused_early += value,
                "shop_stock_lock_acquisitions_total" => total.lock_acquisitions += value,
                "shop_stock_lock_wait_microseconds_total" => total.lock_wait_micros += value,
                "shop_order_batches_total" => total.order_batches += value,
                _ => {}
            }
        }
    }
    total
}

pub async fn run(setup: &Setup, scenario: &Scenario) -> Result<RunResult, String> {
    let database = FreshDatabase::create(&setup.postgres).await?;
    let outcome = run_on(setup, scenario, &database.url).await;
    database.drop_now().await;
    outcome
}

async fn run_on(setup: &Setup, scenario: &Scenario, database_url: &str) -> Result<RunResult, String> {
    let mut env = vec![
        ("SHOP_DATABASE_URL".to_owned(), database_url.to_owned()),
        ("SHOP_STOCK_STRATEGY".to_owned(), setup.strategy.clone()),
        ("SHOP_REDIS_URL".to_owned(), setup.redis.clone()),
        ("SHOP_REDLOCK_URLS".to_owned(), setup.redlock.join(",")),
        // Each run has a fresh database numbering options from 1: its locks and fences must be its own too.
        ("SHOP_REDIS_KEY_PREFIX".to_owned(), format!("bench-{}", uuid::Uuid::new_v4().simple())),
        ("SHOP_LOCK_WAIT_MS".to_owned(), "60000".to_owned()),
        ("SHOP_DB_MAX_CONNECTIONS".to_owned(), setup.pool.to_string()),
        ("SHOP_AUTH_SECRET".to_owned(), format!("bench-{}", uuid::Uuid::new_v4().simple())),
        // Buyers sign up and in before the clock starts; their password hashing is not what is measured.
        ("SHOP_PASSWORD_HASH_MEMORY_KIB".to_owned(), "8".to_owned()),
        ("SHOP_PASSWORD_HASH_ITERATIONS".to_owned(), "1".to_owned()),
    ];
    if let Some(batch) = setup.batch_max {
        env.push(("SHOP_ORDER_BATCH_MAX".to_owned(), batch.to_string()));
    }
    let servers = instances::start(&setup.binary, scenario.instances, &env).await?;
    let client = crate::api::client(scenario.buyers, Duration::from_secs(120))?;
    let base = &servers.bases[0];
    // (product, option) of each hot option.
    let mut hot_options: Vec<(i64, i64)> = Vec::new();
    let per_option = scenario.stock / i64::try_from(scenario.hot).map_err(|e| e.to_string())?;
    for i in 0..scenario.hot {
        let name = if scenario.hot == 1 { "limited drop".to_owned() } else { format!("limited drop {i}") };
        let p = crate::api::create_product(&client, base, ADMIN_TOKEN, &name, per_option).await?;
        let (pid, oid) = (p["id"].as_i64(), p["options"][0]["id"].as_i64());
        hot_options.push((pid.ok_or("no product id")?, oid.ok_or("no option id")?));
    }
    // (product, option) of each other option of the catalogue.
    let mut cold_options: Vec<(i64, i64)> = Vec::new();
    if let Some(cold) = scenario.cold {
        for i in 0..cold.options {
            let p =
                crate::api::create_product(&client, base, ADMIN_TOKEN, &format!("catalogue {i}"), cold.stock).await?;
            let (pid, oid) = (p["id"].as_i64(), p["options"][0]["id"].as_i64());
            cold_options.push((pid.ok_or("no product id")?, oid.ok_or("no option id")?));
        }
    }
    let everyone = scenario.buyers + scenario.cold.map_or(0, |c| c.buyers);
    // Each buyer signs up, signs in and (to pay) charges its balance, a few dozen at a time, before the clock.
    let signed: Vec<Result<(i64, String), String>> = futures::stream::iter(0..everyone)
        .map(|i| crate::api::sign_up(&client, base, i, setup.pay))
        .buffered(32)
        .collect()
        .await;
    let (buyers, tokens): (Vec<i64>, Vec<String>) =
        signed.into_iter().collect::<Result<Vec<_>, _>>()?.into_iter().unzip();
    // Buyer i orders a hot option in turn, or (past the hot options' buyers) one of the other options in turn.
    let wants = |i: usize| {
        if i < scenario.buyers {
            hot_options[i % hot_options.len()].1
        } else {
            cold_options[(i - scenario.buyers) % cold_options.len()].1
        }
    };

    let before = read_counters(&client, &servers.bases).await;
    // Every buyer waits at the barrier on an open keep-alive connection of its own, then all send at once: the
    // clock measures the server's orders, not a storm of 1,000 TCP handshakes. Each buyer holds its warm-up
    // response until every buyer has one, so the client's pool ends up with one idle connection per buyer.
    let warmed = Arc::new(Barrier::new(buyers.len()));
    // Then, on those connections, the floor: every buyer's `GET /health/live` at once, the same client and
    // the same number of requests as the orders, in the same run.
    let floor_barrier = Arc::new(Barrier::new(buyers.len() + 1));
    let barrier = Arc::new(Barrier::new(buyers.len() + 1));
    let turns = Arc::new(Semaphore::new(if scenario.sequential { 1 } else { buyers.len() }));
    let tasks: Vec<_> = buyers
        .iter()
        .enumerate()
        .map(|(i, user)| {
            let (client, warmed, barrier, turns) = (client.clone(), warmed.clone(), barrier.clone(), turns.clone());
            let floor_barrier = floor_barrier.clone();
            let instance = &servers.bases[i % servers.bases.len()];
            let (url, live) = (format!("{instance}/api/v1/orders"), format!("{instance}/health/live"));
            let body = json!({"userId": user, "items": [{"productOptionId": wants(i), "quantity": 1}]});
            let token = tokens[i].clone();
            tokio::spawn(async move {
                let warm = client.get(&live).send().await;
                warmed.wait().await;
                if let Ok(response) = warm {
                    let _ = response.bytes().await;
                }
                floor_barrier.wait().await;
                let floored = match client.get(&live).send().await {
                    Ok(response) if response.status().is_success() => {
                        response.bytes().await.ok().map(|_| Instant::now())
                    }
                    _ => None,
                };
                barrier.wait().await;
                let _turn = turns.acquire().await;
                let sent = Instant::now();
                let response = client.post(url).bearer_auth(token).json(&body).send().await;
                let status = response.as_ref().map_or(0, |r| r.status().as_u16());
                let order: Option<i64> = match response {
                    Ok(r) if status == 201 => r.json::<Value>().await.ok().and_then(|v| v["id"].as_i64()),
                    _ => None,
                };
                (status, sent.elapsed(), Instant::now(), order, floored)
            })
        })
        .collect();
    let scraping = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let scraper = setup.scrape.map(|every| {
        let (client, bases, scraping) = (client.clone(), servers.bases.clone(), scraping.clone());
        tokio::spawn(async move {
            let (mut scrapes, mut last) = (0_usize, String::new());
            let mut tick = tokio::time::interval(every);
            while scraping.load(std::sync::atomic::Ordering::Relaxed) {
                tick.tick().await;
                for base in &bases {
                    if let Ok(r) = client.get(format!("{base}/metrics")).send().await {
                        last = r.text().await.unwrap_or_default();
                        scrapes += 1;
                    }
                }
            }
            (scrapes, last)
        })
    });
    floor_barrier.wait().await;
    let floor_started = Instant::now();
    barrier.wait().await;
    let started = Instant::now();
    let wall_started = unix_seconds();
    let mut answers = Vec::with_capacity(tasks.len());
    for task in tasks {
        answers.push(task.await.map_err(|e| e.to_string())?);
    }
    // Wall-clock bounds of the order phase, to cut a profile recorded with `perf record -k realtime` to it.
    eprintln!("order phase (unix s): {wall_started:.6} {:.6}", unix_seconds());
    scraping.store(false, std::sync::atomic::Ordering::Relaxed);
    if let Some(scraper) = scraper {
        let (scrapes, last) = scraper.await.map_err(|e| e.to_string())?;
        eprintln!("scraped /metrics {scrapes} times during the order phase");
        if let Some(path) = &setup.scrape_out {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
            }
            std::fs::write(path, last).map_err(|e| e.to_string())?;
        }
    }
    // The hot option's buyers come first; the figures of the table are theirs, the rest's are `cold`.
    let hot = &answers[..scenario.buyers];
    let makespan = hot.iter().map(|a| a.2.duration_since(started)).max().unwrap_or_default();
    // Every live answer of the hot buyers, or no floor (a failed request would make it meaningless).
    let floor = hot
        .iter()
        .map(|a| a.4.map(|done| done.duration_since(floor_started)))
        .collect::<Option<Vec<_>>>()
        .and_then(|done| done.into_iter().max())
        .filter(|_| !scenario.sequential);
    let count = |s: u16| hot.iter().filter(|a| a.0 == s).count();
    let (created, out_of_stock, unavailable) = (count(201), count(409), count(503));
    let other = hot.len() - created - out_of_stock - unavailable;
    let orders: Vec<(usize, i64)> = answers.iter().enumerate().filter_map(|(i, a)| a.3.map(|id| (i, id))).collect();
    let after = read_counters(&client, &servers.bases).await;
    let counters = Counters {
        retries: after.retries - before.retries,
        refused_early: after.refused_early - before.refused_early,
        lock_acquisitions: after.lock_acquisitions - before.lock_acquisitions,
        lock_wait_micros: after.lock_wait_micros - before.lock_wait_micros,
        order_batches: after.order_batches - before.order_batches,
    };

    let payment = if setup.pay { Some(pay_all(&client, &servers.bases, &tokens, &orders).await) } else { None };

    // Verification, after the clock stopped.
    let mut final_stock = 0;
    let mut none_below_zero = true;
    for (product, _) in &hot_options {
        let left = crate::api::option_stock(&client, base, *product).await?;
        none_below_zero &= left >= 0;
        final_stock += left;
    }
    let mut every_order_exists = true;
    for (buyer, id) in &orders {
        let found = client
            .get(format!("{base}/api/v1/orders/{id}"))
            .bearer_auth(&tokens[*buyer])
            .send()
            .await
            .is_ok_and(|r| r.status().as_u16() == 200);
        every_order_exists &= found;
    }
    let sold = i64::try_from(created).unwrap_or(i64::MAX);
    let hot_orders = orders.iter().filter(|(i, _)| *i < scenario.buyers).count();
    let mut correct =
        final_stock + sold == scenario.stock && none_below_zero && every_order_exists && hot_orders == created;
    let cold = match scenario.cold {
        None => None,
        Some(c) => {
            let mine = |i: usize, o: i64| i >= scenario.buyers && wants(i) == o;
            for (product, o) in &cold_options {
                let sold = answers.iter().enumerate().filter(|(i, a)| mine(*i, *o) && a.0 == 201).count();
                let left = crate::api::option_stock(&client, base, *product).await?;
                correct &= left >= 0 && left + i64::try_from(sold).unwrap_or(i64::MAX) == c.stock;
            }
            let rest = &answers[scenario.buyers..];
            Some((rest.iter().map(|a| a.1).collect(), rest.iter().filter(|a| a.0 == 201).count()))
        }
    };
    Ok(RunResult {
        makespan,
        floor,
        latencies: hot.iter().map(|a| a.1).collect(),
        created,
        out_of_stock,
        unavailable,
        other,
        final_stock,
        correct,
        payment,
        counters,
        cold,
        events: event_figures(database_url).await,
    })
}

/// Every buyer with an order pays it, all at once; the payment phase's makespan, latencies and successes.
async fn pay_all(
    client: &reqwest::Client,
    bases: &[String],
    tokens: &[String],
    orders: &[(usize, i64)],
) -> (Duration, Vec<Duration>, usize) {
    let barrier = Arc::new(Barrier::new(orders.len() + 1));
    let tasks: Vec<_> = orders
        .iter()
        .map(|(buyer, order)| {
            let (client, barrier) = (client.clone(), barrier.clone());
            let url = format!("{}/api/v1/orders/{order}/payment", bases[buyer % bases.len()]);
            let token = tokens[*buyer].clone();
            tokio::spawn(async move {
                barrier.wait().await;
                let sent = Instant::now();
                let ok = client.post(url).bearer_auth(token).send().await.is_ok_and(|r| r.status().as_u16() == 200);
                (ok, sent.elapsed(), Instant::now())
            })
        })
        .collect();
    barrier.wait().await;
    let started = Instant::now();
    let mut results = Vec::with_capacity(tasks.len());
    for t in tasks {
        if let Ok(r) = t.await {
            results.push(r);
        }
    }
    let makespan = results.iter().map(|r| r.2.duration_since(started)).max().unwrap_or_default();
    let paid = results.iter().filter(|r| r.0).count();
    (makespan, results.into_iter().map(|r| r.1).collect(), paid)
}
