//! Graceful shutdown of the real binary: SIGTERM in the middle of a burst of orders.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sea_orm::{ConnectionTrait, Statement, TransactionTrait};
use serde_json::{Value, json};
use tokio::sync::Barrier;

use crate::helpers::{Store, TestApp, eventually, lock_waiters, server_process};

const START: i64 = 400;
const BUYERS: usize = 600;
/// The server's `SHOP_SHUTDOWN_GRACE`: the drain of 600 orders takes about 1.4 s alone, but a CI run of the whole
/// suite (debug build, every other race beside it) once took it past the default 10 s, and the grace's end closes
/// the connections still waiting.
const GRACE: Duration = Duration::from_secs(30);

/// How a buyer's request ended.
#[derive(Debug)]
enum Outcome {
    /// Answered with this status (and the order id of a 201).
    Answered(u16, Option<i64>),
    /// Refused at connect: the server had stopped accepting, nothing was sent.
    NotAccepted,
    /// Sent and never answered: what a graceful shutdown must not do.
    Lost(String),
}

/// 600 buyers of 400 units released at once on a server process with four HTTP workers while another session
/// holds the option's row, so that every request is read and waits in the option's lane; SIGTERM then, the row
/// released a second later. Every request is answered 201, 409 or 503 (none lost in a worker that stopped
/// first), every 201 is a committed order, stock plus the units live orders hold is the start, nothing is
/// accepted after the signal, and the process exits 0 within its grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_in_mid_sale_answers_every_accepted_request_and_exits_0() {
    let Some(app) = TestApp::spawn(Store::Postgres).await else { return };
    let option = app.product("drained", &[("one", 10, START)]).await["options"][0]["id"].as_i64().unwrap();
    let buyers = app.users(BUYERS, 0).await;
    let grace = format!("{}s", GRACE.as_secs());
    let (mut child, base) = server_process(
        &app,
        &[
            ("SHOP_STOCK_STRATEGY", "pessimistic"),
            ("SHOP_HTTP_WORKERS", "4"),
            ("SHOP_ORDER_BATCH_MAX", "16"),
            ("SHOP_SHUTDOWN_GRACE", grace.as_str()),
        ],
    );
    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let ready = format!("{base}/health/ready");
    eventually("the server process is ready", || async {
        client.get(&ready).send().await.is_ok_and(|r| r.status() == 200)
    })
    .await;

    let row = app.db.begin().await.unwrap();
    let lock = format!("SELECT stock FROM product_options WHERE id = {option} FOR UPDATE");
    row.execute_raw(Statement::from_string(row.get_database_backend(), lock)).await.unwrap();

    let (answered, barrier) = (Arc::new(AtomicUsize::new(0)), Arc::new(Barrier::new(BUYERS + 1)));
    let tasks: Vec<_> = buyers
        .iter()
        .map(|&user| {
            let body = json!({"items": [{"productOptionId": option, "quantity": 1}]});
            let request = client.post(format!("{base}/api/v1/orders")).bearer_auth(app.token(user)).json(&body);
            let (answered, barrier) = (answered.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                match request.send().await {
                    Ok(r) => {
                        answered.fetch_add(1, Ordering::SeqCst);
                        let status = r.status().as_u16();
                        let body: Value = r.json().await.unwrap_or_default();
                        Outcome::Answered(status, body["id"].as_i64())
                    }
                    Err(e) if e.is_connect() => Outcome::NotAccepted,
                    Err(e) => Outcome::Lost(format!("{e:?}")),
                }
            })
        })
        .collect();
    barrier.wait().await;
    // Every request is in: the first batch waits for the row, the rest queue behind it.
    let metrics = format!("{base}/metrics");
    eventually("every order waits in its lane", || async {
        let text = client.get(&metrics).send().await.unwrap().text().await.unwrap();
        let queued = text
            .lines()
            .find(|l| l.starts_with("shop_lane_queued_requests{kind=\"order\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0);
        lock_waiters(&app).await > 0 && queued >= (BUYERS - 16) as f64
    })
    .await;
    let at_signal = answered.load(Ordering::SeqCst);
    let pid = child.id().to_string();
    let signalled = Instant::now();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let late = reqwest::Client::new().get(format!("{base}/health/live")).send().await;
    assert!(late.as_ref().is_err_and(reqwest::Error::is_connect), "accepted after SIGTERM: {late:?}");
    row.commit().await.unwrap();

    let mut outcomes = Vec::with_capacity(BUYERS);
    for task in tasks {
        outcomes.push(task.await.unwrap());
    }
    let exit = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(signalled.elapsed() < GRACE + Duration::from_secs(2), "still running 2 s past the grace after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let exited_after = signalled.elapsed();
    assert!(exit.success(), "exit status {exit:?}");

    let lost: Vec<&String> =
        outcomes.iter().filter_map(|o| if let Outcome::Lost(e) = o { Some(e) } else { None }).collect();
    assert!(
        lost.is_empty(),
        "{} accepted requests never answered (exit {} ms after SIGTERM), e.g. {:?}",
        lost.len(),
        exited_after.as_millis(),
        lost.first()
    );
    let mut by_status = std::collections::BTreeMap::<u16, usize>::new();
    let mut confirmed = HashSet::new();
    for o in &outcomes {
        if let Outcome::Answered(status, id) = o {
            *by_status.entry(*status).or_default() += 1;
            if *status == 201 {
                confirmed.insert(id.expect("a 201 carries its order id"));
            }
        }
    }
    assert!(
        by_status.keys().all(|s| [201, 409, 503].contains(s)),
        "only 201, 409 and 503 answer an order: {by_status:?}"
    );
    let committed: HashSet<i64> = app.scalars("SELECT id FROM orders").await.into_iter().collect();
    assert!(confirmed.is_subset(&committed), "every 201 is a committed order");
    let held = app.held_units(option).await;
    let stock = app.stock_of(option).await;
    assert!(stock >= 0);
    assert_eq!(stock + held, START, "stock {stock} + held {held}");
    let not_accepted = outcomes.iter().filter(|o| matches!(o, Outcome::NotAccepted)).count();
    eprintln!(
        "[shutdown] SIGTERM with {} answered and every other order in its lane: {by_status:?} answered, {not_accepted} not accepted, {} committed \
         ({} confirmed 201), exit 0 after {} ms",
        at_signal,
        committed.len(),
        confirmed.len(),
        exited_after.as_millis()
    );
}
