//! `shop-smoke`: the deployment's end-to-end check, run by `deploy/smoke.sh` through nginx in front of two
//! instances. Buyers sign up, then all order one option at once; once `--kill-after` answers have arrived, the
//! instance `--kill-pid` is killed -9. Then it checks what a shop needs: every request answered 201, 409 or 503
//! (every 503 with `Retry-After`), every 201 a committed order, stock plus the units of the orders equal to the
//! start, and, for the buyers that sent an `Idempotency-Key` (every other one), an order in the database exactly
//! when the buyer was answered 201.

#[path = "../api.rs"]
mod api;

use std::collections::{BTreeMap, HashSet};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use futures::StreamExt;
use sea_orm::{ConnectionTrait, Database, DbBackend, Statement};
use serde_json::{Value, json};
use tokio::sync::Barrier;

#[derive(Debug, Parser)]
#[command(about = "End-to-end check of a deployment: a race through the balancer with an instance killed in it")]
struct Cli {
    /// The balancer.
    #[arg(long)]
    base: String,
    #[arg(long)]
    admin_token: String,
    /// The deployment's database, to compare the answers with what committed.
    #[arg(long)]
    database_url: String,
    #[arg(long, default_value_t = 1000)]
    buyers: usize,
    #[arg(long, default_value_t = 600)]
    stock: i64,
    /// The instance to kill -9 in mid-run.
    #[arg(long)]
    kill_pid: Option<u32>,
    /// Kill it once this many orders are answered.
    #[arg(long, default_value_t = 200)]
    kill_after: usize,
}

/// One buyer's request: whether it carried a key, its status (0: no answer) and `Retry-After`, its order.
#[derive(Debug)]
struct Answer {
    keyed: bool,
    status: u16,
    retry_after: bool,
    order: Option<i64>,
    /// The problem's code of a 4xx or 5xx.
    code: Option<String>,
    error: Option<String>,
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    match run(&cli).await {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("shop-smoke: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: &Cli) -> Result<String, String> {
    let base = cli.base.trim_end_matches('/');
    let client = api::client(cli.buyers, Duration::from_secs(60))?;
    // The balancer passes the request id both ways.
    let echoed = client
        .get(format!("{base}/health/live"))
        .header("x-request-id", "smoke-request-id-1")
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let id = echoed.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or_default();
    if id != "smoke-request-id-1" {
        return Err(format!("x-request-id not passed through: {id:?}"));
    }
    let product = api::create_product(&client, base, &cli.admin_token, "smoke drop", cli.stock).await?;
    let option = product["options"][0]["id"].as_i64().ok_or_else(|| format!("no option: {product}"))?;
    let product_id = product["id"].as_i64().ok_or("no product id")?;
    let signed: Vec<Result<(i64, String), String>> = futures::stream::iter(0..cli.buyers)
        .map(|i| api::sign_up(&client, base, i, false))
        .buffered(32)
        .collect()
        .await;
    let (users, tokens): (Vec<i64>, Vec<String>) =
        signed.into_iter().collect::<Result<Vec<_>, _>>()?.into_iter().unzip();

    let answered = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(Barrier::new(cli.buyers + 1));
    let tasks: Vec<_> = tokens
        .iter()
        .enumerate()
        .map(|(i, token)| {
            let keyed = i % 2 == 0;
            let mut request = client
                .post(format!("{base}/api/v1/orders"))
                .bearer_auth(token)
                .json(&json!({"items": [{"productOptionId": option, "quantity": 1}]}));
            if keyed {
                request = request.header("Idempotency-Key", format!("smoke-{i}"));
            }
            let (answered, barrier) = (answered.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                let mut answer = Answer { keyed, status: 0, retry_after: false, order: None, code: None, error: None };
                match request.send().await {
                    Ok(r) => {
                        answered.fetch_add(1, Ordering::SeqCst);
                        answer.status = r.status().as_u16();
                        answer.retry_after = r.headers().contains_key("retry-after");
                        let body: Value = r.json().await.unwrap_or_default();
                        answer.order = body["id"].as_i64().filter(|_| answer.status == 201);
                        answer.code = body["code"].as_str().map(str::to_owned);
                    }
                    Err(e) => answer.error = Some(e.to_string()),
                }
                answer
            })
        })
        .collect();
    let killer = cli.kill_pid.map(|pid| {
        let (answered, after) = (answered.clone(), cli.kill_after);
        tokio::spawn(async move {
            while answered.load(Ordering::SeqCst) < after {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let killed = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            (answered.load(Ordering::SeqCst), killed.is_ok_and(|s| s.success()))
        })
    });
    barrier.wait().await;
    let started = Instant::now();
    let mut answers = Vec::with_capacity(cli.buyers);
    for task in tasks {
        answers.push(task.await.map_err(|e| e.to_string())?);
    }
    let took = started.elapsed();
    let killed_at = match killer {
        Some(k) => {
            let (at, ok) = k.await.map_err(|e| e.to_string())?;
            if !ok {
                return Err(format!("could not kill instance {:?}", cli.kill_pid));
            }
            Some(at)
        }
        None => None,
    };

    let mut problems = Vec::new();
    let mut statuses = BTreeMap::<(bool, u16), usize>::new();
    for a in &answers {
        *statuses.entry((a.keyed, a.status)).or_default() += 1;
        if let Some(e) = &a.error {
            problems.push(format!("a request got no answer: {e}"));
        } else if ![201, 409, 503].contains(&a.status) {
            problems.push(format!("status {} answered an order", a.status));
        } else if a.status == 503 && !a.retry_after {
            problems.push("a 503 without Retry-After".to_owned());
        }
    }
    let db = Database::connect(cli.database_url.as_str()).await.map_err(|e| e.to_string())?;
    let sql = |s: String| Statement::from_string(DbBackend::Postgres, s);
    let rows = db
        .query_all_raw(sql(format!(
            "SELECT o.id, o.user_id, CAST(i.quantity AS BIGINT) AS q FROM orders o JOIN order_items i ON i.order_id = o.id \
             WHERE i.product_option_id = {option} AND o.status <> 'CANCELLED'"
        )))
        .await
        .map_err(|e| e.to_string())?;
    let (mut committed, mut buyers_with_order) = (HashSet::new(), HashSet::new());
    let mut held = 0_i64;
    for row in rows {
        committed.insert(row.try_get::<i64>("", "id").map_err(|e| e.to_string())?);
        buyers_with_order.insert(row.try_get::<i64>("", "user_id").map_err(|e| e.to_string())?);
        held += row.try_get::<i64>("", "q").map_err(|e| e.to_string())?;
    }
    let stock = api::option_stock(&client, base, product_id).await?;
    let confirmed: HashSet<i64> = answers.iter().filter_map(|a| a.order).collect();
    if !confirmed.is_subset(&committed) {
        problems.push(format!("{} orders answered 201 are not committed", confirmed.difference(&committed).count()));
    }
    if stock < 0 || stock + held != cli.stock {
        problems.push(format!("stock {stock} + held {held} != {}", cli.stock));
    }
    // A keyed buyer has an order exactly when it was told 201 (a retry on the other instance replays it); an
    // unkeyed one whose instance died under its request may have one behind a 503.
    for (a, user) in answers.iter().zip(&users) {
        if buyers_with_order.contains(user) && a.status != 201 && (a.keyed || a.status != 503) {
            problems.push(format!("buyer {user} has an order but was answered {} (keyed: {})", a.status, a.keyed));
        }
    }
    let keyed_201 = answers.iter().filter(|a| a.keyed && a.status == 201).count();
    let unconfirmed = committed.len() - confirmed.len();
    if !problems.is_empty() {
        problems.sort();
        problems.dedup();
        return Err(problems.join("; "));
    }
    let count = |keyed: bool, status: u16| statuses.get(&(keyed, status)).copied().unwrap_or(0);
    let mut codes = BTreeMap::<&str, usize>::new();
    for a in &answers {
        if let Some(code) = &a.code {
            *codes.entry(code.as_str()).or_default() += 1;
        }
    }
    Ok(format!(
        "smoke: {} buyers of {} units through the balancer in {} ms{}\n\
         smoke: with Idempotency-Key: {} x 201, {} x 409, {} x 503; without: {} x 201, {} x 409, {} x 503\n\
         smoke: {} orders committed ({} answered 201, {keyed_201} of them keyed; {unconfirmed} committed but \
         answered 503, all unkeyed), stock {stock} + held {held} = {}\n\
         smoke: problems by code: {codes:?}",
        cli.buyers,
        cli.stock,
        took.as_millis(),
        killed_at.map_or(String::new(), |at| format!(", one instance killed -9 after {at} answers")),
        count(true, 201),
        count(true, 409),
        count(true, 503),
        count(false, 201),
        count(false, 409),
        count(false, 503),
        committed.len(),
        confirmed.len(),
        cli.stock
    ))
}
