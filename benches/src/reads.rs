//! `--reads`: the catalogue's read routes against the HTTP floor, alone and during a sale, and deep pages of a
//! 100,000-product catalogue. One server instance over a fresh database per run.
//!
//! - **Alone**: 1,000 requests released at once over pre-opened connections, per route: `GET /health/live`
//!   (the floor: no database, no cache), a product's detail, page 1 of the list, the popular ranking: first the
//!   route's first read after the products were added (one cache miss that the burst waits for), then cached.
//! - **During a sale**: 5,000 buyers of one option released at once (over connections opened before) while 200
//!   readers read that product's detail in a loop until the sale is over; the reads' latencies, at the client
//!   and in the server's handler.
//! - **Deep pages**: 100,000 products inserted behind the API (SQL, then `VACUUM ANALYZE`, as a catalogue that has
//!   lived a while); the first read (a cache miss) of pages 1-10 and 4,991-5,000 of 20 products.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::Barrier;

use crate::api::create_product;
use crate::instances::{self, ADMIN_TOKEN, FreshDatabase};
use crate::scenario::Setup;

/// What one run measured.
#[derive(Debug, Clone, Default)]
pub struct ReadRun {
    /// (route, requests/s) of the bursts, the floor first: the first burst after the products were added (its
    /// first request a cache miss), then one against a filled entry.
    pub alone: Vec<(&'static str, f64)>,
    pub cached: Vec<(&'static str, f64)>,
    /// The sale's makespan, and the detail reads' latencies meanwhile.
    pub during_sale: (Duration, Vec<Duration>),
    /// The server's own p50 and p99 of those reads (from its request histogram, bucket bounds): how much of the
    /// readers' latency the handler took, the rest being queues in front of it and the load generator.
    pub server_side: (f64, f64),
    /// Cache misses of shallow and of deep pages.
    pub shallow: Vec<Duration>,
    pub deep: Vec<Duration>,
}

/// Every URL requested at once, each over a connection opened before the clock starts: the makespan and each
/// request's latency. A request that fails is an error.
async fn burst(client: &reqwest::Client, warm: &str, urls: Vec<String>) -> Result<(Duration, Vec<Duration>), String> {
    let n = urls.len();
    let (warmed, barrier) = (Arc::new(Barrier::new(n)), Arc::new(Barrier::new(n + 1)));
    let tasks: Vec<_> = urls
        .into_iter()
        .map(|url| {
            let (client, warmed, barrier, warm) = (client.clone(), warmed.clone(), barrier.clone(), warm.to_owned());
            tokio::spawn(async move {
                // Each task holds its warm-up response until every task has one: one idle connection each.
                let response = client.get(&warm).send().await;
                warmed.wait().await;
                if let Ok(r) = response {
                    let _ = r.bytes().await;
                }
                barrier.wait().await;
                let sent = Instant::now();
                let r = client.get(&url).send().await.map_err(|e| e.to_string())?;
                let ok = r.status().is_success();
                let _ = r.bytes().await;
                if !ok {
                    return Err(format!("{url} failed"));
                }
                Ok::<_, String>((sent.elapsed(), Instant::now()))
            })
        })
        .collect();
    barrier.wait().await;
    let started = Instant::now();
    let mut latencies = Vec::with_capacity(n);
    let mut last = started;
    for t in tasks {
        let (latency, done) = t.await.map_err(|e| e.to_string())??;
        latencies.push(latency);
        last = last.max(done);
    }
    Ok((last.duration_since(started), latencies))
}

pub async fn run(setup: &Setup) -> Result<ReadRun, String> {
    let database = FreshDatabase::create(&setup.postgres).await?;
    let outcome = run_on(setup, &database.url).await;
    database.drop_now().await;
    outcome
}

async fn run_on(setup: &Setup, database_url: &str) -> Result<ReadRun, String> {
    let env = vec![
        ("SHOP_DATABASE_URL".to_owned(), database_url.to_owned()),
        ("SHOP_STOCK_STRATEGY".to_owned(), setup.strategy.clone()),
        ("SHOP_REDIS_URL".to_owned(), setup.redis.clone()),
        ("SHOP_REDIS_KEY_PREFIX".to_owned(), format!("bench-{}", uuid::Uuid::new_v4().simple())),
        ("SHOP_DB_MAX_CONNECTIONS".to_owned(), setup.pool.to_string()),
        ("SHOP_AUTH_SECRET".to_owned(), format!("bench-{}", uuid::Uuid::new_v4().simple())),
        ("SHOP_PASSWORD_HASH_MEMORY_KIB".to_owned(), "8".to_owned()),
        ("SHOP_PASSWORD_HASH_ITERATIONS".to_owned(), "1".to_owned()),
    ];
    let servers = instances::start(&setup.binary, 1, &env).await?;
    let base = servers.bases[0].clone();
    let client = crate::api::client(5_000, Duration::from_secs(120))?;
    let live = format!("{base}/health/live");
    let mut products = Vec::new();
    for i in 0..20 {
        products.push(create_product(&client, &base, ADMIN_TOKEN, &format!("shelf {i}"), 5000).await?);
    }
    let product = products[0]["id"].as_i64().ok_or("no product id")?;
    let option = products[0]["options"][0]["id"].as_i64().ok_or("no option id")?;

    // The sale's buyers sign up first, 32 at a time: the server's pool of database connections is then open, as
    // in a server that has been serving, and the bursts below measure the cache, not connection start-ups.
    let signed: Vec<Result<(i64, String), String>> = futures::stream::iter(0..5000)
        .map(|i| crate::api::sign_up(&client, &base, i, false))
        .buffered(32)
        .collect()
        .await;
    let tokens: Vec<String> = signed.into_iter().map(|r| r.map(|(_, t)| t)).collect::<Result<_, _>>()?;

    let mut run = ReadRun::default();
    let routes: [(&'static str, String); 4] = [
        ("GET /health/live (floor)", live.clone()),
        ("GET /api/v1/products/{id}", format!("{base}/api/v1/products/{product}")),
        ("GET /api/v1/products?page=1&size=20", format!("{base}/api/v1/products?page=1&size=20")),
        ("GET /api/v1/products/popular", format!("{base}/api/v1/products/popular")),
    ];
    for (name, url) in &routes {
        // Cold: nobody has read the route since the products were added, so the burst's first request misses
        // and the others wait for its read, which competes with the burst for the two cores.
        let (makespan, _) = burst(&client, &live, vec![url.clone(); 1000]).await?;
        run.alone.push((name, 1000.0 / makespan.as_secs_f64()));
        // Cached: one read just before fills the entry (its bound is 1 s, longer than a burst).
        client.get(url).send().await.map_err(|e| e.to_string())?.bytes().await.map_err(|e| e.to_string())?;
        let (makespan, _) = burst(&client, &live, vec![url.clone(); 1000]).await?;
        run.cached.push((name, 1000.0 / makespan.as_secs_f64()));
    }

    // The sale, with readers of its product.
    let selling = Arc::new(AtomicBool::new(true));
    let barrier = Arc::new(Barrier::new(tokens.len() + 200 + 1));
    // Each buyer holds its warm-up response until every buyer has one, as in the order scenarios: the sale is
    // 5,000 requests over open connections, not a storm of 5,000 TCP handshakes beside the readers.
    let warmed = Arc::new(Barrier::new(tokens.len()));
    let buyers: Vec<_> = tokens
        .iter()
        .map(|token| {
            let request = client
                .post(format!("{base}/api/v1/orders"))
                .bearer_auth(token)
                .json(&json!({"items": [{"productOptionId": option, "quantity": 1}]}));
            let (barrier, warmed, warm) = (barrier.clone(), warmed.clone(), client.get(&live));
            tokio::spawn(async move {
                let response = warm.send().await;
                warmed.wait().await;
                if let Ok(r) = response {
                    let _ = r.bytes().await;
                }
                barrier.wait().await;
                let r = request.send().await;
                (r.map(|r| r.status().as_u16()).unwrap_or(0), Instant::now())
            })
        })
        .collect();
    let readers: Vec<_> = (0..200)
        .map(|_| {
            let (client, barrier, selling) = (client.clone(), barrier.clone(), selling.clone());
            let url = format!("{base}/api/v1/products/{product}");
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                barrier.wait().await;
                while selling.load(Ordering::Relaxed) {
                    let sent = Instant::now();
                    match client.get(&url).send().await {
                        Ok(r) if r.status().is_success() => {
                            let _ = r.bytes().await;
                            latencies.push(sent.elapsed());
                        }
                        _ => return Err("a read failed during the sale".to_owned()),
                    }
                }
                Ok(latencies)
            })
        })
        .collect();
    let before = detail_buckets(&client, &base).await?;
    barrier.wait().await;
    let started = Instant::now();
    let mut last = started;
    for b in buyers {
        let (status, done) = b.await.map_err(|e| e.to_string())?;
        if status != 201 {
            return Err(format!("a buyer got {status}"));
        }
        last = last.max(done);
    }
    selling.store(false, Ordering::Relaxed);
    let mut reads = Vec::new();
    for r in readers {
        reads.extend(r.await.map_err(|e| e.to_string())??);
    }
    run.during_sale = (last.duration_since(started), reads);
    let after = detail_buckets(&client, &base).await?;
    let during: Vec<(u64, f64)> = after.iter().map(|(le, n)| (*le, n - before.get(le).unwrap_or(&0.0))).collect();
    run.server_side = (bucket_quantile(&during, 0.5), bucket_quantile(&during, 0.99));

    // Deep pages of a catalogue of 100,000.
    {
        use sea_orm::{ConnectionTrait, Database};
        let db = Database::connect(database_url).await.map_err(|e| e.to_string())?;
        for sql in [
            "INSERT INTO products (name, status, created_at, updated_at) \
             SELECT 'catalogue ' || g, 'ACTIVE', now(), now() FROM generate_series(1, 100000) g",
            "INSERT INTO product_options (product_id, name, price, stock, version, fence_token, created_at, updated_at) \
             SELECT id, 'one size', 1000, 10, 0, 0, now(), now() FROM products WHERE name LIKE 'catalogue %'",
            "VACUUM ANALYZE products",
            "VACUUM ANALYZE product_options",
        ] {
            db.execute_unprepared(sql).await.map_err(|e| format!("{sql}: {e}"))?;
        }
        db.close().await.ok();
    }
    // A product added through the API: the count the cache holds is dropped.
    create_product(&client, &base, ADMIN_TOKEN, "one more", 1).await?;
    for (pages, into) in [(1..=10, &mut run.shallow), (4991..=5000, &mut run.deep)] {
        for page in pages {
            let sent = Instant::now();
            let r = client
                .get(format!("{base}/api/v1/products?page={page}&size=20"))
                .send()
                .await
                .map_err(|e| e.to_string())?;
            let body: Value = r.json().await.map_err(|e| e.to_string())?;
            into.push(sent.elapsed());
            if body["items"].as_array().is_none_or(|a| a.len() != 20) || body["total"] != 100_021 {
                return Err(format!("page {page}: {body}"));
            }
        }
    }
    Ok(run)
}

/// The cumulative buckets (upper bound in µs, `u64::MAX` for `+Inf`; count) of the server's 2xx product-detail
/// requests, summed over their labels, from its `/metrics`.
async fn detail_buckets(client: &reqwest::Client, base: &str) -> Result<BTreeMap<u64, f64>, String> {
    let text = client.get(format!("{base}/metrics")).send().await.map_err(|e| e.to_string())?;
    let text = text.text().await.map_err(|e| e.to_string())?;
    let mut buckets = BTreeMap::new();
    for line in text.lines().filter(|l| {
        l.starts_with("shop_http_request_duration_seconds_bucket{")
            && l.contains(r#"route="/api/v1/products/{productId}""#)
            && l.contains(r#"status="2xx""#)
    }) {
        let le = line.split("le=\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or("+Inf");
        let count: f64 = line.rsplit(' ').next().and_then(|c| c.parse().ok()).unwrap_or(0.0);
        let micros = match le {
            "+Inf" => u64::MAX,
            seconds => (seconds.parse::<f64>().map_err(|_| format!("bucket {line}"))? * 1e6).round() as u64,
        };
        *buckets.entry(micros).or_insert(0.0) += count;
    }
    Ok(buckets)
}

/// The upper bound, in ms, of the bucket that holds quantile `q` of cumulative `buckets` (ascending bounds).
fn bucket_quantile(buckets: &[(u64, f64)], q: f64) -> f64 {
    let total = buckets.last().map_or(0.0, |b| b.1);
    buckets.iter().find(|(_, n)| *n >= total * q).map_or(f64::NAN, |(le, _)| *le as f64 / 1000.0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or_default()
}

/// The Markdown table of `runs` (median of the runs for each figure).
#[must_use]
pub fn report(runs: &[ReadRun]) -> String {
    let mut out = String::from(
        "| route, 1,000 requests at once | first read after a change, requests/s | against the floor | cached, \
         requests/s | against the floor |\n|---|---:|---:|---:|---:|\n",
    );
    let (floor, floor_again) =
        (median(runs.iter().map(|r| r.alone[0].1).collect()), median(runs.iter().map(|r| r.cached[0].1).collect()));
    for (i, (name, _)) in runs[0].alone.iter().enumerate() {
        let cold = median(runs.iter().map(|r| r.alone[i].1).collect());
        let warm = median(runs.iter().map(|r| r.cached[i].1).collect());
        out.push_str(&format!(
            "| `{name}` | {cold:.0} | {:.2}x | {warm:.0} | {:.2}x |\n",
            cold / floor,
            warm / floor_again
        ));
    }
    let sale = median(runs.iter().map(|r| ms(r.during_sale.0)).collect());
    let stat = |f: fn(&ReadRun) -> Vec<Duration>, p: f64| {
        median(
            runs.iter()
                .map(|r| {
                    let mut v = f(r);
                    v.sort();
                    ms(percentile(&v, p))
                })
                .collect(),
        )
    };
    let reads = median(runs.iter().map(|r| r.during_sale.1.len() as f64).collect());
    out.push_str(&format!(
        "\nDuring a sale of 5,000 orders ({sale:.0} ms): {reads:.0} product reads by 200 readers, p50 {:.1} ms, p99 \
         {:.1} ms, max {:.1} ms; in the server's handler p50 ≤ {:.1} ms, p99 ≤ {:.1} ms (its histogram's buckets).\n",
        stat(|r| r.during_sale.1.clone(), 0.5),
        stat(|r| r.during_sale.1.clone(), 0.99),
        stat(|r| r.during_sale.1.clone(), 1.0),
        median(runs.iter().map(|r| r.server_side.0).collect()),
        median(runs.iter().map(|r| r.server_side.1).collect()),
    ));
    out.push_str(&format!(
        "\n100,000 products, first read of a page of 20 (a cache miss): pages 1-10 p50 {:.1} ms (max {:.1}); pages \
         4,991-5,000 p50 {:.1} ms (max {:.1}).\n",
        stat(|r| r.shallow.clone(), 0.5),
        stat(|r| r.shallow.clone(), 1.0),
        stat(|r| r.deep.clone(), 0.5),
        stat(|r| r.deep.clone(), 1.0),
    ));
    out
}
