//! `--reads`: the catalogue's read routes against the HTTP floor, alone and during a sale, and deep pages of a
//! 100,000-product catalogue. One server instance over a fresh database per run.
//!
//! - **Alone**: 1,000 requests released at once over pre-opened connections, per route: `GET /health/live`
//!   (the floor: no database, no cache), a product's detail, page 1 of the list, the popular ranking.
//! - **During a sale**: 5,000 buyers of one option released at once while 200 readers read that product's detail
//!   in a loop until the sale is over; the reads' latencies.
//! - **Deep pages**: 100,000 products inserted behind the API (SQL, then `VACUUM ANALYZE`, as a catalogue that has
//!   lived a while); the first read (a cache miss) of pages 1-10 and 4,991-5,000 of 20 products.

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
    /// (route, requests/s) of the bursts, the floor first.
    pub alone: Vec<(&'static str, f64)>,
    /// The sale's makespan, and the detail reads' latencies meanwhile.
    pub during_sale: (Duration, Vec<Duration>),
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
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(5_000)
        .timeout(Duration::from_secs(120))
        .build()
        .map_err(|e| e.to_string())?;
    let live = format!("{base}/health/live");
    let mut products = Vec::new();
    for i in 0..20 {
        products.push(create_product(&client, &base, ADMIN_TOKEN, &format!("shelf {i}"), 5000).await?);
    }
    let product = products[0]["id"].as_i64().ok_or("no product id")?;
    let option = products[0]["options"][0]["id"].as_i64().ok_or("no option id")?;

    let mut run = ReadRun::default();
    let routes: [(&'static str, String); 4] = [
        ("GET /health/live (floor)", live.clone()),
        ("GET /api/v1/products/{id}", format!("{base}/api/v1/products/{product}")),
        ("GET /api/v1/products?page=1&size=20", format!("{base}/api/v1/products?page=1&size=20")),
        ("GET /api/v1/products/popular", format!("{base}/api/v1/products/popular")),
    ];
    for (name, url) in &routes {
        let (makespan, _) = burst(&client, &live, vec![url.clone(); 1000]).await?;
        run.alone.push((name, 1000.0 / makespan.as_secs_f64()));
    }

    // The sale, with readers of its product.
    let signed: Vec<Result<(i64, String), String>> = futures::stream::iter(0..5000)
        .map(|i| crate::api::sign_up(&client, &base, i, false))
        .buffered(32)
        .collect()
        .await;
    let tokens: Vec<String> = signed.into_iter().map(|r| r.map(|(_, t)| t)).collect::<Result<_, _>>()?;
    let selling = Arc::new(AtomicBool::new(true));
    let barrier = Arc::new(Barrier::new(tokens.len() + 200 + 1));
    let buyers: Vec<_> = tokens
        .iter()
        .map(|token| {
            let request = client
                .post(format!("{base}/api/v1/orders"))
                .bearer_auth(token)
                .json(&json!({"items": [{"productOptionId": option, "quantity": 1}]}));
            let barrier = barrier.clone();
            tokio::spawn(async move {
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
    let mut out = String::from("| route, 1,000 requests at once | requests/s | against the floor |\n|---|---:|---:|\n");
    let floor = median(runs.iter().map(|r| r.alone[0].1).collect());
    for (i, (name, _)) in runs[0].alone.iter().enumerate() {
        let rate = median(runs.iter().map(|r| r.alone[i].1).collect());
        out.push_str(&format!("| `{name}` | {rate:.0} | {:.2}x |\n", rate / floor));
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
         {:.1} ms, max {:.1} ms.\n",
        stat(|r| r.during_sale.1.clone(), 0.5),
        stat(|r| r.during_sale.1.clone(), 0.99),
        stat(|r| r.during_sale.1.clone(), 1.0),
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
