//! The locks against real Redis: 127.0.0.1:6379 for the single-node locks, and `redis-server` processes started
//! per test for Redlock. Without Redis the tests print a skip line and pass, unless `CI` is set.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use fred::prelude::{Client, ClientLike, Config, KeysInterface, LuaInterface, PubsubInterface, Value};
use rand::Rng;
use shop_domain::DomainError;
use shop_domain::ids::ProductOptionId;
use shop_domain::money::Quantity;
use shop_domain::money::Stock;
use shop_domain::order::OrderLine;
use shop_domain::ports::{FencedWrite, MockStockTx, Probe, StockRow, StockStrategy, StockTake};
use shop_redis::{
    DistributedLock, LockError, LockOptions, PubSubLock, RedisLockStock, Redlock, SpinLock, option_lock_key,
};

/// The key namespace of these tests' stock locks.
const PREFIX: &str = "shop-redis-test";
use tokio::time::Instant;

const URL: &str = "redis://127.0.0.1:6379";

fn skip_or_fail(why: &str) -> bool {
    assert!(std::env::var_os("CI").is_none(), "{why}, and CI requires it");
    eprintln!("skipping: {why}");
    false
}

/// Whether the shared Redis answers; fails under CI when it does not.
fn redis_up() -> bool {
    match TcpStream::connect_timeout(&"127.0.0.1:6379".parse().unwrap(), Duration::from_secs(1)) {
        Ok(_) => true,
        Err(_) => skip_or_fail("no Redis at 127.0.0.1:6379"),
    }
}

/// A key of this test only.
fn key(name: &str) -> String {
    format!("test:{:016x}:{name}", rand::rng().random::<u64>())
}

fn within(d: Duration) -> Instant {
    Instant::now() + d
}

async fn raw(url: &str) -> Client {
    let client = Client::new(Config::from_url(url).unwrap(), None, None, None);
    client.init().await.unwrap();
    client
}

async fn spin(lease: Duration) -> Arc<dyn DistributedLock> {
    Arc::new(SpinLock::connect(URL, lease).await.unwrap())
}

async fn pubsub(lease: Duration) -> Arc<dyn DistributedLock> {
    Arc::new(PubSubLock::connect(URL, lease).await.unwrap())
}

/// A free port below the ephemeral range (32768 up, where `bind(0)` picks): a server killed by a test keeps its
/// port unused, instead of another test's (or process's) `bind(0)` handing it to a new server that would then
/// answer in its place. There is a small window before redis-server binds it.
fn free_port() -> u16 {
    loop {
        let port = rand::rng().random_range(20_000..32_000);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// `redis-server` processes on free ports, killed when dropped.
struct Servers {
    ports: Vec<u16>,
    children: Vec<Option<Child>>,
}

impl Servers {
    /// `n` fresh servers without persistence, or `None` (skip) when `redis-server` is not installed.
    fn start(n: usize) -> Option<Self> {
        if Command::new("redis-server").arg("--version").stdout(Stdio::null()).status().is_err() {
            skip_or_fail("redis-server is not installed");
            return None;
        }
        let mut servers = Self { ports: Vec::new(), children: Vec::new() };
        for _ in 0..n {
            let port = free_port();
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .args(["--daemonize", "no", "--loglevel", "warning"])
                .stdout(Stdio::null())
                .spawn()
                .unwrap();
            servers.ports.push(port);
            servers.children.push(Some(child));
        }
        for &port in &servers.ports {
            let started = std::time::Instant::now();
            while TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(started.elapsed() < Duration::from_secs(5), "redis-server on {port} did not start");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Some(servers)
    }

    fn urls(&self) -> Vec<String> {
        self.ports.iter().map(|p| format!("redis://127.0.0.1:{p}")).collect()
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.children[i].take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        for i in 0..self.children.len() {
            if let Some(mut child) = self.children[i].take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

async fn redlock(servers: &Servers, lease: Duration) -> Arc<dyn DistributedLock> {
    Arc::new(Redlock::connect(&servers.urls(), lease).await.unwrap())
}

/// What the contenders saw.
struct Contention {
    count: u64,
    most_inside: usize,
    fences: Vec<u64>,
}

/// `tasks` tasks released at once, taking turns over the lock instances, each incrementing a counter outside
/// Redis with a read, a yield and a write (lost updates show as a count below `tasks`) under the lock on `key`.
async fn contend(locks: &[Arc<dyn DistributedLock>], key: &str, tasks: usize, done: Arc<AtomicUsize>) -> Contention {
    let counter = Arc::new(Mutex::new(0u64));
    let inside = Arc::new(AtomicUsize::new(0));
    let most_inside = Arc::new(AtomicUsize::new(0));
    let fences = Arc::new(Mutex::new(Vec::with_capacity(tasks)));
    let barrier = Arc::new(tokio::sync::Barrier::new(tasks));
    let handles: Vec<_> = (0..tasks)
        .map(|i| {
            let lock = locks[i % locks.len()].clone();
            let (key, counter, inside, most_inside) =
                (key.to_owned(), counter.clone(), inside.clone(), most_inside.clone());
            let (fences, barrier, done) = (fences.clone(), barrier.clone(), done.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                let mut guard = lock.lock(&key, within(Duration::from_secs(40))).await.unwrap();
                let now_inside = inside.fetch_add(1, Ordering::SeqCst) + 1;
                most_inside.fetch_max(now_inside, Ordering::SeqCst);
                fences.lock().unwrap().push(guard.fence());
                let read = *counter.lock().unwrap();
                tokio::task::yield_now().await;
                *counter.lock().unwrap() = read + 1;
                inside.fetch_sub(1, Ordering::SeqCst);
                guard.release().await.unwrap();
                done.fetch_add(1, Ordering::SeqCst);
            })
        })
        .collect();
    for handle in handles {
        handle.await.unwrap();
    }
    let count = *counter.lock().unwrap();
    let fences = std::mem::take(&mut *fences.lock().unwrap());
    Contention { count, most_inside: most_inside.load(Ordering::SeqCst), fences }
}

fn assert_exclusive(seen: &Contention, tasks: usize) {
    assert_eq!(seen.count, tasks as u64, "no increment was lost");
    assert_eq!(seen.most_inside, 1, "never two holders at once");
    assert!(seen.fences.windows(2).all(|w| w[0] < w[1]), "fences increase in lock order: {:?}", seen.fences);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn spin_lock_excludes_200_tasks_across_two_instances() {
    if !redis_up() {
        return;
    }
    let lease = Duration::from_secs(5);
    let started = Instant::now();
    let seen = contend(&[spin(lease).await, spin(lease).await], &key("spin"), 200, Arc::default()).await;
    assert_exclusive(&seen, 200);
    eprintln!("spin: 200 acquisitions in {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pubsub_lock_excludes_200_tasks_across_two_instances() {
    if !redis_up() {
        return;
    }
    let lease = Duration::from_secs(5);
    let started = Instant::now();
    let seen = contend(&[pubsub(lease).await, pubsub(lease).await], &key("pubsub"), 200, Arc::default()).await;
    assert_exclusive(&seen, 200);
    eprintln!("pubsub: 200 acquisitions in {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redlock_excludes_200_tasks_across_two_instances() {
    let Some(servers) = Servers::start(3) else { return };
    let lease = Duration::from_secs(5);
    let started = Instant::now();
    let locks = [redlock(&servers, lease).await, redlock(&servers, lease).await];
    let seen = contend(&locks, &key("redlock"), 200, Arc::default()).await;
    assert_exclusive(&seen, 200);
    eprintln!("redlock: 200 acquisitions in {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redlock_stays_exclusive_when_one_of_three_nodes_dies_mid_run() {
    let Some(servers) = Servers::start(3) else { return };
    let lease = Duration::from_secs(5);
    let locks = [redlock(&servers, lease).await, redlock(&servers, lease).await];
    let servers = Arc::new(Mutex::new(servers));
    let done = Arc::new(AtomicUsize::new(0));
    let killer = {
        let (servers, done) = (servers.clone(), done.clone());
        tokio::spawn(async move {
            while done.load(Ordering::SeqCst) < 50 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            servers.lock().unwrap().kill(1);
            done.load(Ordering::SeqCst)
        })
    };
    let started = Instant::now();
    let seen = contend(&locks, &key("redlock-kill"), 200, done).await;
    let killed_after = killer.await.unwrap();
    assert!(killed_after < 200, "the node died mid-run (after {killed_after} acquisitions)");
    assert_exclusive(&seen, 200);
    eprintln!("redlock, node killed after {killed_after}: 200 acquisitions in {:?}", started.elapsed());
}

#[tokio::test]
async fn redlock_refuses_to_lock_with_two_of_three_nodes_down() {
    let Some(mut servers) = Servers::start(3) else { return };
    let lock = Redlock::connect(&servers.urls(), Duration::from_secs(2)).await.unwrap();
    assert!(lock.probe().ping().await.is_ok());
    servers.kill(0);
    servers.kill(2);
    let started = Instant::now();
    let err = lock.lock(&key("minority"), within(Duration::from_millis(500))).await.unwrap_err();
    assert!(matches!(err, LockError::NoQuorum { needed: 2, nodes: 3, .. } | LockError::Timeout), "{err:?}");
    assert!(started.elapsed() < Duration::from_millis(1500), "gave up near the deadline: {:?}", started.elapsed());
    assert!(lock.probe().ping().await.is_err(), "one of three is not ready");
    // And connecting needs a majority up front.
    let err = Redlock::connect(&servers.urls(), Duration::from_secs(2)).await.unwrap_err();
    assert!(matches!(err, LockError::NoQuorum { answered: 1, needed: 2, nodes: 3 }), "{err:?}");
}

/// A holder that dies without unlocking keeps the lock for its lease, no longer.
async fn dead_holder_blocks_for_at_most_the_lease(locks: [Arc<dyn DistributedLock>; 2], lease: Duration) {
    let key = key("dead-holder");
    let holder = locks[0].lock(&key, within(Duration::from_secs(1))).await.unwrap();
    let started = Instant::now();
    holder.abandon();
    let mut next = locks[1].lock(&key, within(lease * 4)).await.unwrap();
    let waited = started.elapsed();
    assert!(waited >= lease.mul_f64(0.8), "{}: took over a live lease after {waited:?}", locks[0].name());
    assert!(waited < lease + Duration::from_secs(1), "{}: waited {waited:?} for a {lease:?} lease", locks[0].name());
    next.release().await.unwrap();
}

#[tokio::test]
async fn a_dead_holder_blocks_others_for_at_most_the_lease() {
    if !redis_up() {
        return;
    }
    let lease = Duration::from_secs(1);
    tokio::join!(
        async { dead_holder_blocks_for_at_most_the_lease([spin(lease).await, spin(lease).await], lease).await },
        async { dead_holder_blocks_for_at_most_the_lease([pubsub(lease).await, pubsub(lease).await], lease).await },
    );
}

#[tokio::test]
async fn a_dead_redlock_holder_blocks_others_for_at_most_the_lease() {
    let Some(servers) = Servers::start(3) else { return };
    let lease = Duration::from_secs(1);
    dead_holder_blocks_for_at_most_the_lease([redlock(&servers, lease).await, redlock(&servers, lease).await], lease)
        .await;
}

#[tokio::test]
async fn an_unlock_by_a_non_owner_is_a_no_op() {
    if !redis_up() {
        return;
    }
    let Some(servers) = Servers::start(3) else { return };
    let lease = Duration::from_secs(5);
    let (spin, pubsub) = (SpinLock::connect(URL, lease).await.unwrap(), PubSubLock::connect(URL, lease).await.unwrap());
    let redlock = Redlock::connect(&servers.urls(), lease).await.unwrap();
    let shared = raw(URL).await;

    let k = key("foreign-spin");
    let mut guard = spin.lock(&k, within(Duration::from_secs(1))).await.unwrap();
    assert!(!spin.force_unlock_as(&k, "not-the-owner").await.unwrap());
    assert_eq!(shared.get::<Option<String>, _>(&k).await.unwrap().as_deref(), Some(guard.token()));
    guard.release().await.unwrap();
    assert_eq!(shared.get::<Option<String>, _>(&k).await.unwrap(), None, "the owner's release deletes it");
    guard.release().await.unwrap(); // idempotent

    let k = key("foreign-pubsub");
    let guard = pubsub.lock(&k, within(Duration::from_secs(1))).await.unwrap();
    assert!(!pubsub.force_unlock_as(&k, "not-the-owner").await.unwrap());
    assert_eq!(shared.get::<Option<String>, _>(&k).await.unwrap().as_deref(), Some(guard.token()));
    drop(guard);

    let k = key("foreign-redlock");
    let guard = redlock.lock(&k, within(Duration::from_secs(1))).await.unwrap();
    assert!(!redlock.force_unlock_as(&k, "not-the-owner").await.unwrap());
    for url in servers.urls() {
        let node = raw(&url).await;
        assert_eq!(node.get::<Option<String>, _>(&k).await.unwrap().as_deref(), Some(guard.token()));
    }
    let err = redlock.lock(&k, within(Duration::from_millis(100))).await.unwrap_err();
    assert!(matches!(err, LockError::Timeout), "still held: {err:?}");
}

/// The watchdog renews a held lock: after three leases it is still held and another locker times out.
async fn watchdog_keeps_the_lock(locks: [Arc<dyn DistributedLock>; 2], raw: Client, lease: Duration) {
    let key = key("watchdog");
    let mut guard = locks[0].lock(&key, within(Duration::from_secs(1))).await.unwrap();
    tokio::time::sleep(lease * 3 + lease / 5).await;
    let err = locks[1].lock(&key, within(Duration::from_millis(150))).await.unwrap_err();
    assert!(matches!(err, LockError::Timeout), "{}: {err:?}", locks[0].name());
    assert_eq!(raw.get::<Option<String>, _>(&key).await.unwrap().as_deref(), Some(guard.token()));
    let first = guard.fence();
    guard.release().await.unwrap();
    let next = locks[1].lock(&key, within(Duration::from_millis(500))).await.unwrap();
    assert!(next.fence() > first, "{}: {} after {first}", locks[0].name(), next.fence());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watchdog_keeps_a_held_lock_past_its_lease() {
    if !redis_up() {
        return;
    }
    let Some(servers) = Servers::start(1) else { return };
    let lease = Duration::from_millis(600);
    let one_node = servers.urls();
    tokio::join!(
        async { watchdog_keeps_the_lock([spin(lease).await, spin(lease).await], raw(URL).await, lease).await },
        async { watchdog_keeps_the_lock([pubsub(lease).await, pubsub(lease).await], raw(URL).await, lease).await },
        async {
            // A one-node Redlock, so that the raw client sees the same key.
            let locks: [Arc<dyn DistributedLock>; 2] = [
                Arc::new(Redlock::connect(&one_node, lease).await.unwrap()),
                Arc::new(Redlock::connect(&one_node, lease).await.unwrap()),
            ];
            watchdog_keeps_the_lock(locks, raw(&one_node[0]).await, lease).await;
        },
    );
}

/// Successive holders, alternating between two instances, get strictly increasing fences.
async fn fences_increase(locks: [Arc<dyn DistributedLock>; 2]) {
    let key = key("fence");
    let mut last = 0;
    for i in 0..10 {
        let mut guard = locks[i % 2].lock(&key, within(Duration::from_secs(1))).await.unwrap();
        assert!(guard.fence() > last, "{}: fence {} after {last}", locks[0].name(), guard.fence());
        last = guard.fence();
        guard.release().await.unwrap();
    }
}

#[tokio::test]
async fn fencing_tokens_strictly_increase_across_instances() {
    if !redis_up() {
        return;
    }
    let Some(servers) = Servers::start(3) else { return };
    let lease = Duration::from_secs(5);
    fences_increase([spin(lease).await, spin(lease).await]).await;
    fences_increase([pubsub(lease).await, pubsub(lease).await]).await;
    fences_increase([redlock(&servers, lease).await, redlock(&servers, lease).await]).await;
}

#[tokio::test]
async fn redlock_fences_keep_increasing_when_the_majority_changes() {
    let Some(mut servers) = Servers::start(3) else { return };
    let lease = Duration::from_secs(2);
    let (a, b) = (redlock(&servers, lease).await, redlock(&servers, lease).await);
    let key = key("fence-majority");
    // Nodes 0 and 1 have seen many grants, so their counters run ahead of node 2's. Every majority of three
    // includes one of them (a round ends as soon as any majority answers, so which one is not fixed).
    for url in &servers.urls()[..2] {
        let node = raw(url).await;
        let _: () = node.set(format!("{{{key}}}:fence"), 1000, None, None, false).await.unwrap();
    }
    let mut guard = a.lock(&key, within(Duration::from_secs(1))).await.unwrap();
    let before = guard.fence();
    assert!(before > 1000, "the fence is the largest counter of the majority: {before}");
    guard.release().await.unwrap();
    // Without node 0 the remaining majority must already know a fence at least as large.
    servers.kill(0);
    let mut guard = b.lock(&key, within(Duration::from_secs(2))).await.unwrap();
    assert!(guard.fence() > before, "fence {} after {before} with another majority", guard.fence());
    guard.release().await.unwrap();
}

#[tokio::test]
async fn a_pubsub_waiter_whose_release_message_is_lost_wakes_at_the_ttl() {
    if !redis_up() {
        return;
    }
    let lease = Duration::from_secs(1);
    let (holder_lock, waiter_lock) =
        (PubSubLock::connect(URL, lease).await.unwrap(), PubSubLock::connect(URL, lease).await.unwrap());
    let key = key("lost-message");
    let holder = holder_lock.lock(&key, within(Duration::from_secs(1))).await.unwrap();
    // The holder dies silently: its key expires with the lease, and expiry publishes nothing.
    holder.abandon();
    let started = Instant::now();
    let waiter = tokio::spawn({
        let key = key.clone();
        async move { waiter_lock.lock(&key, within(Duration::from_secs(10))).await }
    });
    let mut guard = waiter.await.unwrap().unwrap();
    let waited = started.elapsed();
    assert!(waited < lease + Duration::from_millis(500), "woke at the holder's TTL, not later: {waited:?}");
    guard.release().await.unwrap();

    // Same with the key deleted behind the lock's back (no release message): the waiter wakes at the TTL.
    let holder = holder_lock.lock(&key, within(Duration::from_secs(1))).await.unwrap();
    let waiter_lock = PubSubLock::connect(URL, lease).await.unwrap();
    let started = Instant::now();
    let waiter = tokio::spawn({
        let key = key.clone();
        async move { waiter_lock.lock(&key, within(Duration::from_secs(10))).await.map(|g| (g, started.elapsed())) }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _: i64 = raw(URL).await.del(&key).await.unwrap();
    let (mut guard, waited) = waiter.await.unwrap().unwrap();
    assert!(waited < lease + Duration::from_millis(500), "{waited:?}");
    guard.release().await.unwrap();
    holder.abandon();
}

#[tokio::test]
async fn racing_pubsub_waiters_share_one_subscription_and_a_release_wakes_one() {
    if !redis_up() {
        return;
    }
    let lease = Duration::from_secs(10);
    let lock = Arc::new(PubSubLock::connect_with(URL, lease, LockOptions::RACING).await.unwrap());
    let key = key("shared-subscription");
    let channel = format!("{{{key}}}:released");
    let mut holder = lock.lock(&key, within(Duration::from_secs(1))).await.unwrap();
    let acquired = Arc::new(AtomicUsize::new(0));
    let waiters: Vec<_> = (0..50)
        .map(|_| {
            let (lock, key, acquired) = (lock.clone(), key.clone(), acquired.clone());
            tokio::spawn(async move {
                let mut guard = lock.lock(&key, within(Duration::from_secs(20))).await.unwrap();
                acquired.fetch_add(1, Ordering::SeqCst);
                guard.release().await.unwrap();
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let numsub: Vec<Value> = raw(URL).await.pubsub_numsub(&channel).await.unwrap();
    assert_eq!(numsub.get(1).and_then(Value::as_i64), Some(1), "50 waiters, one subscription: {numsub:?}");
    let started = Instant::now();
    holder.release().await.unwrap();
    for waiter in waiters {
        waiter.await.unwrap();
    }
    // Each release hands over to the next waiter by message, far inside the 10 s TTL.
    assert_eq!(acquired.load(Ordering::SeqCst), 50);
    assert!(started.elapsed() < Duration::from_secs(3), "handed over by message: {:?}", started.elapsed());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(lock.subscribed_channels(), 0, "the last waiter unsubscribed");
}

#[tokio::test]
async fn a_script_flush_mid_run_is_survived() {
    if !redis_up() {
        return;
    }
    let Some(servers) = Servers::start(3) else { return };
    let lease = Duration::from_secs(5);
    let raw = raw(URL).await;
    let nodes: Vec<Client> = futures::future::join_all(servers.urls().iter().map(|u| raw_owned(u.clone()))).await;
    for lock in [spin(lease).await, pubsub(lease).await, redlock(&servers, lease).await] {
        let key = key("flush");
        let mut guard = lock.lock(&key, within(Duration::from_secs(1))).await.unwrap();
        raw.script_flush(false).await.unwrap();
        for node in &nodes {
            node.script_flush(false).await.unwrap();
        }
        guard.release().await.unwrap();
        let mut again = lock.lock(&key, within(Duration::from_millis(200))).await.unwrap();
        assert!(again.fence() > guard.fence(), "{}", lock.name());
        raw.script_flush(false).await.unwrap();
        again.release().await.unwrap();
    }
}

async fn raw_owned(url: String) -> Client {
    raw(&url).await
}

fn line(id: i64) -> OrderLine {
    OrderLine { option_id: ProductOptionId::new(id).unwrap(), quantity: Quantity::new(1).unwrap() }
}

/// Option ids of this test only (the stock keys are not prefixed).
fn options(n: usize) -> Vec<i64> {
    let base = rand::rng().random_range(1_000_000_000..2_000_000_000i64) * 1000;
    (0..n as i64).map(|i| base + i).collect()
}

#[tokio::test]
async fn the_stock_strategy_locks_every_option_and_writes_with_its_fence() {
    if !redis_up() {
        return;
    }
    let stock = RedisLockStock::new(
        SpinLock::connect(URL, Duration::from_secs(5)).await.unwrap(),
        Duration::from_secs(1),
        PREFIX,
    );
    assert_eq!(stock.name(), "redis-spin");
    let ids = options(2);
    let (first, second) = ([line(ids[0])], [line(ids[1]), line(ids[0])]);
    let orders: [&[OrderLine]; 2] = [&first, &second];
    let permit = stock.admit(&orders).await.unwrap().permit;
    let raw = raw(URL).await;
    for &id in &ids {
        let key = option_lock_key(PREFIX, ProductOptionId::new(id).unwrap());
        assert!(raw.get::<Option<String>, _>(&key).await.unwrap().is_some(), "{key} is locked");
    }
    let fences: BTreeMap<i64, u64> =
        ids.iter().map(|&id| (id, permit.fence(ProductOptionId::new(id).unwrap()).unwrap().unwrap())).collect();
    let mut tx = MockStockTx::new();
    let expected = fences.clone();
    tx.expect_decrement_stock()
        .times(2)
        .withf(move |id, _, fence, _| fence.is_some() && expected.get(&id.get()).copied() == *fence)
        .returning(|_, _, _, _| Ok(FencedWrite::Written));
    let takes: Vec<StockTake> = ids
        .iter()
        .map(|&id| StockTake {
            row: StockRow { option_id: ProductOptionId::new(id).unwrap(), stock: Stock::new(5).unwrap(), version: 0 },
            units: 1,
        })
        .collect();
    stock.take(&mut tx, &takes, &permit, Utc::now()).await.unwrap();
    drop(permit);
    // The dropped permit releases in the background.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let again = stock.admit(&orders).await.unwrap().permit;
    for &id in &ids {
        let option = ProductOptionId::new(id).unwrap();
        assert!(again.fence(option).unwrap().unwrap() > fences[&id], "a newer holder has a newer fence");
    }
}

#[tokio::test]
async fn the_stock_strategy_times_out_as_lock_timeout_and_releases_what_it_held() {
    if !redis_up() {
        return;
    }
    let lease = Duration::from_secs(5);
    let stock = RedisLockStock::new(pubsub(lease).await, Duration::from_millis(300), PREFIX);
    assert_eq!(stock.name(), "redis-pubsub");
    let other = SpinLock::connect(URL, lease).await.unwrap();
    let ids = options(2);
    let _held = other
        .lock(&option_lock_key(PREFIX, ProductOptionId::new(ids[1]).unwrap()), within(Duration::from_secs(1)))
        .await
        .unwrap();
    let started = Instant::now();
    let err = stock.admit(&[&[line(ids[0]), line(ids[1])]]).await.unwrap_err();
    assert!(matches!(err, DomainError::LockTimeout { retry_after_secs: 1 }), "{err:?}");
    assert!(started.elapsed() < Duration::from_millis(800), "{:?}", started.elapsed());
    let first = option_lock_key(PREFIX, ProductOptionId::new(ids[0]).unwrap());
    assert_eq!(raw(URL).await.get::<Option<String>, _>(&first).await.unwrap(), None, "the first option was released");
}

#[tokio::test]
async fn the_probe_answers_while_redis_does() {
    if !redis_up() {
        return;
    }
    let probe = SpinLock::connect(URL, Duration::from_secs(5)).await.unwrap().probe();
    assert_eq!(probe.name(), "redis");
    probe.ping().await.unwrap();
    let err = SpinLock::connect("redis://127.0.0.1:1", Duration::from_secs(5)).await.unwrap_err();
    assert!(matches!(err, LockError::Redis(_)), "{err:?}");
}

// ---------------------------------------------------------------------------------------------------------------
// Fair modes: a queue per key in Redis, a release hands the lock to the longest live waiter.
// ---------------------------------------------------------------------------------------------------------------

/// Which lock a fair client is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Spin,
    PubSub,
    Redlock,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Self::Spin => "spin",
            Self::PubSub => "pubsub",
            Self::Redlock => "redlock",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "spin" => Self::Spin,
            "pubsub" => Self::PubSub,
            "redlock" => Self::Redlock,
            other => panic!("unknown kind {other}"),
        }
    }
}

/// A fair lock client, concrete so that tests can see its queue.
#[derive(Debug)]
enum Fair {
    Spin(SpinLock),
    PubSub(PubSubLock),
    Redlock(Redlock),
}

impl Fair {
    /// A fair client of `kind`: the single-node ones on the shared Redis, Redlock over `nodes`.
    async fn connect(kind: Kind, nodes: &[String], lease: Duration) -> Self {
        let fair = LockOptions { fair: true };
        match kind {
            Kind::Spin => Self::Spin(SpinLock::connect_with(URL, lease, fair).await.unwrap()),
            Kind::PubSub => Self::PubSub(PubSubLock::connect_with(URL, lease, fair).await.unwrap()),
            Kind::Redlock => Self::Redlock(Redlock::connect_with(nodes, lease, fair).await.unwrap()),
        }
    }

    fn lock(&self) -> &dyn DistributedLock {
        match self {
            Self::Spin(l) => l,
            Self::PubSub(l) => l,
            Self::Redlock(l) => l,
        }
    }

    async fn queued(&self, key: &str) -> usize {
        match self {
            Self::Spin(l) => l.queued(key).await.unwrap(),
            Self::PubSub(l) => l.queued(key).await.unwrap(),
            Self::Redlock(l) => l.queued(key).await.unwrap(),
        }
    }

    /// Waits until `n` waiters are queued for `key`.
    async fn until_queued(&self, key: &str, n: usize) {
        let started = Instant::now();
        loop {
            let queued = self.queued(key).await;
            if queued == n {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{:?}: {queued} queued, never {n}",
                self.lock().name()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// The fair locks this machine can run: all three, Redlock over `servers`.
fn fair_kinds() -> [Kind; 3] {
    [Kind::Spin, Kind::PubSub, Kind::Redlock]
}

async fn fair_dyn(kind: Kind, nodes: &[String], lease: Duration) -> Arc<dyn DistributedLock> {
    match Fair::connect(kind, nodes, lease).await {
        Fair::Spin(l) => Arc::new(l),
        Fair::PubSub(l) => Arc::new(l),
        Fair::Redlock(l) => Arc::new(l),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fair_locks_exclude_200_tasks_across_four_clients() {
    if !redis_up() {
        return;
    }
    let Some(servers) = Servers::start(3) else { return };
    let lease = Duration::from_secs(5);
    for kind in fair_kinds() {
        let mut locks = Vec::new();
        for _ in 0..4 {
            locks.push(fair_dyn(kind, &servers.urls(), lease).await);
        }
        let started = Instant::now();
        let seen = contend(&locks, &key("fair-exclusion"), 200, Arc::default()).await;
        assert_exclusive(&seen, 200);
        eprintln!("fair {}: 200 acquisitions over 4 clients in {:?}", kind.name(), started.elapsed());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fair_and_racing_clients_of_one_key_still_exclude_each_other() {
    if !redis_up() {
        return;
    }
    // As during a rolling change of the setting: both modes on one key, one fence counter.
    let lease = Duration::from_secs(5);
    let racing = LockOptions { fair: false };
    let locks: Vec<Arc<dyn DistributedLock>> = vec![
        Arc::new(PubSubLock::connect(URL, lease).await.unwrap()),
        Arc::new(SpinLock::connect(URL, lease).await.unwrap()),
        Arc::new(SpinLock::connect_with(URL, lease, LockOptions { fair: true }).await.unwrap()),
        Arc::new(PubSubLock::connect_with(URL, lease, racing).await.unwrap()),
    ];
    let seen = contend(&locks, &key("mixed-modes"), 200, Arc::default()).await;
    assert_exclusive(&seen, 200);
}

/// `contenders` clients of `kind`, each locking and releasing at once in a loop until `total` grants: the
/// contender of each grant, in grant (fence) order, and every wait.
async fn hot_key(kind: Kind, nodes: &[String], contenders: usize, total: usize) -> (Vec<usize>, Vec<Duration>) {
    let lease = Duration::from_secs(10);
    let mut clients = Vec::new();
    for _ in 0..contenders {
        clients.push(fair_dyn(kind, nodes, lease).await);
    }
    let key = key("hot");
    let granted = Arc::new(AtomicUsize::new(0));
    let order = Arc::new(Mutex::new(Vec::new()));
    let barrier = Arc::new(tokio::sync::Barrier::new(contenders));
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(id, lock)| {
            let (key, granted, order, barrier) = (key.clone(), granted.clone(), order.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                let mut waits = Vec::new();
                while granted.load(Ordering::SeqCst) < total {
                    let asked = Instant::now();
                    let mut guard = lock.lock(&key, within(Duration::from_secs(30))).await.unwrap();
                    waits.push(asked.elapsed());
                    if granted.fetch_add(1, Ordering::SeqCst) < total {
                        // Pushed under the lock: the fences must come out strictly increasing.
                        order.lock().unwrap().push((guard.fence(), id));
                    }
                    guard.release().await.unwrap();
                }
                waits
            })
        })
        .collect();
    let mut waits = Vec::new();
    for task in tasks {
        waits.extend(task.await.unwrap());
    }
    let order = std::mem::take(&mut *order.lock().unwrap());
    assert!(order.windows(2).all(|w| w[0].0 < w[1].0), "{}: fences increase across handovers", kind.name());
    waits.sort();
    (order.into_iter().map(|(_, id)| id).collect(), waits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fair_locks_hand_nine_grants_in_ten_to_another_contender() {
    if !redis_up() {
        return;
    }
    let Some(servers) = Servers::start(3) else { return };
    for kind in fair_kinds() {
        let (holders, waits) = hot_key(kind, &servers.urls(), 10, 300).await;
        let changes = holders.windows(2).filter(|w| w[0] != w[1]).count();
        let worst = waits.last().copied().unwrap_or_default();
        eprintln!("fair {}: {changes} holder changes of {}, longest wait {worst:?}", kind.name(), holders.len() - 1);
        assert!(changes * 10 >= (holders.len() - 1) * 9, "{}: {changes} changes of {}", kind.name(), holders.len() - 1);
        for id in 0..10 {
            assert!(holders.contains(&id), "{}: contender {id} was never granted", kind.name());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fair_waiters_are_granted_in_arrival_order() {
    if !redis_up() {
        return;
    }
    let Some(servers) = Servers::start(3) else { return };
    let lease = Duration::from_secs(10);
    for kind in fair_kinds() {
        let key = key("arrival-order");
        let holder = Fair::connect(kind, &servers.urls(), lease).await;
        let mut held = holder.lock().lock(&key, within(Duration::from_secs(1))).await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut waiters = Vec::new();
        for i in 0..5 {
            let waiter = Fair::connect(kind, &servers.urls(), lease).await;
            let (mine, order) = (key.clone(), order.clone());
            waiters.push(tokio::spawn(async move {
                let mut guard = waiter.lock().lock(&mine, within(Duration::from_secs(20))).await.unwrap();
                order.lock().unwrap().push((i, guard.fence()));
                guard.release().await.unwrap();
            }));
            // Each one queued before the next asks.
            holder.until_queued(&key, i + 1).await;
        }
        held.release().await.unwrap();
        for waiter in waiters {
            waiter.await.unwrap();
        }
        let order = order.lock().unwrap().clone();
        let ids: Vec<usize> = order.iter().map(|&(i, _)| i).collect();
        assert_eq!(ids, vec![0, 1, 2, 3, 4], "{}: granted in arrival order", kind.name());
        assert!(order.windows(2).all(|w| w[0].1 < w[1].1) && order[0].1 > held.fence(), "{}: {order:?}", kind.name());
    }
}

/// Runs the helper test below in a process of its own, as a lock client of `kind` that queues for `key` and
/// prints `granted {fence}` once it holds it.
fn child(kind: Kind, nodes: &[String], key: &str) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "helper_a_lock_client_in_a_process_of_its_own", "--nocapture", "--test-threads", "1"])
        .env("SHOP_LOCK_TEST_CHILD", kind.name())
        .env("SHOP_LOCK_TEST_NODES", nodes.join(","))
        .env("SHOP_LOCK_TEST_KEY", key)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Not a test on its own: the body of [`child`], which the test binary runs in another process that the tests
/// kill or freeze. Does nothing unless `SHOP_LOCK_TEST_CHILD` is set.
#[tokio::test]
async fn helper_a_lock_client_in_a_process_of_its_own() {
    let Ok(kind) = std::env::var("SHOP_LOCK_TEST_CHILD") else { return };
    let nodes: Vec<String> = std::env::var("SHOP_LOCK_TEST_NODES").unwrap().split(',').map(str::to_owned).collect();
    let key = std::env::var("SHOP_LOCK_TEST_KEY").unwrap();
    let lock = Fair::connect(Kind::parse(&kind), &nodes, Duration::from_secs(10)).await;
    let mut guard = lock.lock().lock(&key, within(Duration::from_secs(60))).await.unwrap();
    println!("granted {}", guard.fence());
    guard.release().await.unwrap();
}

fn signal(child: &Child, signal: &str) {
    let status = Command::new("kill").args([signal, &child.id().to_string()]).status().unwrap();
    assert!(status.success(), "kill {signal}");
}

/// A holder, then a waiter in another process, then a waiter here; the process dies (SIGKILL, no cleanup) and the
/// holder releases at once, while the dead waiter still counts as alive: it is handed the lock, lets it lapse,
/// and the waiter here gets it after the acceptance lease. How long after the release.
async fn dead_waiter_delay(kind: Kind, nodes: &[String], linger: Duration) -> Duration {
    let lease = Duration::from_secs(10);
    let key = key("dead-waiter");
    let holder = Fair::connect(kind, nodes, lease).await;
    let mut held = holder.lock().lock(&key, within(Duration::from_secs(1))).await.unwrap();
    let mut process = child(kind, nodes, &key);
    holder.until_queued(&key, 1).await;
    let waiter = Fair::connect(kind, nodes, lease).await;
    let next = tokio::spawn({
        let key = key.clone();
        async move { waiter.lock().lock(&key, within(Duration::from_secs(30))).await.map(|g| (g, Instant::now())) }
    });
    holder.until_queued(&key, 2).await;
    process.kill().unwrap();
    process.wait().unwrap();
    tokio::time::sleep(linger).await;
    held.release().await.unwrap();
    let released = Instant::now();
    let (mut guard, granted) = next.await.unwrap().unwrap();
    assert!(guard.fence() > held.fence());
    guard.release().await.unwrap();
    granted - released
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_killed_while_queued_delays_the_next_by_at_most_a_second() {
    if !redis_up() {
        return;
    }
    let Some(servers) = Servers::start(3) else { return };
    for kind in fair_kinds() {
        let delay = dead_waiter_delay(kind, &servers.urls(), Duration::ZERO).await;
        eprintln!("fair {}: a waiter killed just before its turn delayed the next by {delay:?}", kind.name());
        // The acceptance lease (500 ms) plus at most one refresh of the next waiter (250 ms), with slack.
        assert!(delay < Duration::from_millis(1_250), "{}: {delay:?}", kind.name());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_dead_longer_than_its_liveness_is_skipped_at_once() {
    if !redis_up() {
        return;
    }
    let Some(servers) = Servers::start(3) else { return };
    for kind in fair_kinds() {
        // Its liveness deadline (1 s after its last refresh) has passed when its turn comes.
        let delay = dead_waiter_delay(kind, &servers.urls(), Duration::from_millis(1_500)).await;
        eprintln!("fair {}: a waiter dead for 1.5 s delayed the next by {delay:?}", kind.name());
        assert!(delay < Duration::from_millis(400), "{}: skipped, not handed the lock: {delay:?}", kind.name());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_waiter_handed_the_lock_stalls_the_queue_for_the_acceptance_lease_only() {
    if !redis_up() {
        return;
    }
    let Some(servers) = Servers::start(3) else { return };
    let lease = Duration::from_secs(10);
    for kind in fair_kinds() {
        let key = key("frozen-waiter");
        let nodes = servers.urls();
        let holder = Fair::connect(kind, &nodes, lease).await;
        let mut held = holder.lock().lock(&key, within(Duration::from_secs(1))).await.unwrap();
        let mut process = child(kind, &nodes, &key);
        holder.until_queued(&key, 1).await;
        let waiter = Fair::connect(kind, &nodes, lease).await;
        let next = tokio::spawn({
            let key = key.clone();
            async move { waiter.lock().lock(&key, within(Duration::from_secs(30))).await.map(|g| (g, Instant::now())) }
        });
        holder.until_queued(&key, 2).await;
        // Frozen at the head of the queue, still counted alive: it is handed the lock and cannot accept it.
        signal(&process, "-STOP");
        held.release().await.unwrap();
        let released = Instant::now();
        let (mut guard, granted) = next.await.unwrap().unwrap();
        let stall = granted - released;
        eprintln!("fair {}: a frozen waiter handed the lock stalled the next for {stall:?}", kind.name());
        assert!(
            stall >= Duration::from_millis(400),
            "{}: the frozen waiter was handed it first: {stall:?}",
            kind.name()
        );
        assert!(stall < Duration::from_millis(1_250), "{}: {stall:?}", kind.name());
        // Thawed while the next one holds it: it finds its handover gone, queues again, and gets the lock after.
        signal(&process, "-CONT");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let fence = guard.fence();
        guard.release().await.unwrap();
        let output = tokio::task::spawn_blocking(move || {
            let status = process.wait().unwrap();
            let mut out = String::new();
            std::io::Read::read_to_string(process.stdout.as_mut().unwrap(), &mut out).unwrap();
            (status, out)
        })
        .await
        .unwrap();
        assert!(output.0.success(), "{}: the thawed client got the lock in the end", kind.name());
        // The helper's line follows libtest's "test helper_... ... " on the same line.
        let theirs: u64 = output
            .1
            .split("granted ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .expect(&output.1)
            .parse()
            .unwrap();
        assert!(theirs > fence, "{}: the thawed client's fence {theirs} follows {fence}", kind.name());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_handover_message_delays_a_waiter_by_a_refresh_but_never_strands_it() {
    if !redis_up() {
        return;
    }
    let Some(servers) = Servers::start(3) else { return };
    let lease = Duration::from_secs(10);
    for kind in [Kind::PubSub, Kind::Redlock] {
        let key = key("lost-handover");
        let holder = Fair::connect(kind, &servers.urls(), lease).await;
        let waiter = Fair::connect(kind, &servers.urls(), lease).await;
        match &waiter {
            Fair::PubSub(l) => l.lose_wakeups().await.unwrap(),
            Fair::Redlock(l) => l.lose_wakeups().await.unwrap(),
            Fair::Spin(_) => unreachable!(),
        }
        for _ in 0..3 {
            let mut held = holder.lock().lock(&key, within(Duration::from_secs(2))).await.unwrap();
            // Queue the waiter (on its own client, which hears no messages), then release.
            let wait = async {
                let guard = waiter.lock().lock(&key, within(Duration::from_secs(30))).await;
                (guard, Instant::now())
            };
            let release = async {
                holder.until_queued(&key, 1).await;
                held.release().await.unwrap();
                Instant::now()
            };
            let ((got, granted), released) = tokio::join!(wait, release);
            let mut got = got.unwrap();
            let delay = granted - released;
            eprintln!("fair {}: with its handover message lost, the waiter held the lock {delay:?} later", kind.name());
            // Found by its next refresh (every 190-250 ms), far inside the 10 s lease the message would save.
            assert!(delay < Duration::from_millis(1_000), "{}: {delay:?}", kind.name());
            assert!(got.fence() > held.fence());
            got.release().await.unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_fair_guard_hands_the_lock_to_the_next_waiter() {
    if !redis_up() {
        return;
    }
    let Some(servers) = Servers::start(3) else { return };
    let lease = Duration::from_secs(10);
    for kind in fair_kinds() {
        let key = key("drop-hands-over");
        let (holder, waiter) =
            (Fair::connect(kind, &servers.urls(), lease).await, Fair::connect(kind, &servers.urls(), lease).await);
        let held = holder.lock().lock(&key, within(Duration::from_secs(1))).await.unwrap();
        let first = held.fence();
        let wait =
            async { waiter.lock().lock(&key, within(Duration::from_secs(30))).await.map(|g| (g, Instant::now())) };
        let drop_it = async {
            holder.until_queued(&key, 1).await;
            drop(held);
            Instant::now()
        };
        let (got, dropped) = tokio::join!(wait, drop_it);
        let (mut guard, granted) = got.unwrap();
        // Far inside the 10 s lease: the drop released, and the release handed over.
        assert!(granted - dropped < Duration::from_secs(2), "{}: {:?}", kind.name(), granted - dropped);
        assert!(guard.fence() > first);
        guard.release().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_that_gives_up_leaves_the_queue_and_costs_the_others_nothing() {
    if !redis_up() {
        return;
    }
    let Some(servers) = Servers::start(3) else { return };
    let lease = Duration::from_secs(10);
    for kind in fair_kinds() {
        let key = key("gives-up");
        let nodes = servers.urls();
        let holder = Fair::connect(kind, &nodes, lease).await;
        let mut held = holder.lock().lock(&key, within(Duration::from_secs(1))).await.unwrap();
        // One times out, one has its lock future dropped (a cancelled request); both leave the queue.
        // The clients outlive the waits: a client dropped with its waiter may not get the leave out (the waiter's
        // entry then lapses with its liveness, as a dead waiter's does).
        let timing_out = Arc::new(Fair::connect(kind, &nodes, lease).await);
        let cancelled = Arc::new(Fair::connect(kind, &nodes, lease).await);
        let patient = Fair::connect(kind, &nodes, lease).await;
        let short = tokio::spawn({
            let (key, lock) = (key.clone(), timing_out.clone());
            async move { lock.lock().lock(&key, within(Duration::from_millis(800))).await.map(|_| ()) }
        });
        holder.until_queued(&key, 1).await;
        let dropped = tokio::spawn({
            let (key, lock) = (key.clone(), cancelled.clone());
            async move { lock.lock().lock(&key, within(Duration::from_secs(30))).await.map(|_| ()) }
        });
        holder.until_queued(&key, 2).await;
        let next = tokio::spawn({
            let key = key.clone();
            async move { patient.lock().lock(&key, within(Duration::from_secs(30))).await.map(|g| (g, Instant::now())) }
        });
        holder.until_queued(&key, 3).await;
        assert!(matches!(short.await.unwrap(), Err(LockError::Timeout)), "{}", kind.name());
        dropped.abort();
        assert!(dropped.await.unwrap_err().is_cancelled());
        holder.until_queued(&key, 1).await;
        // Both are still within their liveness: had they stayed queued, each would be handed the lock and stall
        // the patient one for an acceptance lease.
        held.release().await.unwrap();
        let released = Instant::now();
        let (mut guard, granted) = next.await.unwrap().unwrap();
        assert!(granted - released < Duration::from_millis(300), "{}: {:?}", kind.name(), granted - released);
        guard.release().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_fair_holder_blocks_others_for_at_most_the_lease() {
    if !redis_up() {
        return;
    }
    let Some(servers) = Servers::start(3) else { return };
    let lease = Duration::from_secs(1);
    for kind in fair_kinds() {
        let locks = [fair_dyn(kind, &servers.urls(), lease).await, fair_dyn(kind, &servers.urls(), lease).await];
        dead_holder_blocks_for_at_most_the_lease(locks, lease).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watchdog_keeps_a_held_fair_lock_past_its_lease() {
    if !redis_up() {
        return;
    }
    let Some(servers) = Servers::start(1) else { return };
    let lease = Duration::from_millis(600);
    let one_node = servers.urls();
    tokio::join!(
        async {
            let locks = [fair_dyn(Kind::Spin, &[], lease).await, fair_dyn(Kind::Spin, &[], lease).await];
            watchdog_keeps_the_lock(locks, raw(URL).await, lease).await;
        },
        async {
            let locks = [fair_dyn(Kind::PubSub, &[], lease).await, fair_dyn(Kind::PubSub, &[], lease).await];
            watchdog_keeps_the_lock(locks, raw(URL).await, lease).await;
        },
        async {
            let locks =
                [fair_dyn(Kind::Redlock, &one_node, lease).await, fair_dyn(Kind::Redlock, &one_node, lease).await];
            watchdog_keeps_the_lock(locks, raw(&one_node[0]).await, lease).await;
        },
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fair_redlock_races_and_stays_exclusive_while_its_queue_node_is_down() {
    let Some(mut servers) = Servers::start(3) else { return };
    let lease = Duration::from_secs(5);
    let urls = servers.urls();
    let up = fair_dyn(Kind::Redlock, &urls, lease).await;
    servers.kill(0);
    // Connecting with the queue node already down works too.
    let locks = vec![up, fair_dyn(Kind::Redlock, &urls, lease).await];
    let seen = contend(&locks, &key("queue-node-down"), 100, Arc::default()).await;
    assert_exclusive(&seen, 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_stock_strategy_over_fair_locks_serves_overlapping_orders_of_two_instances() {
    if !redis_up() {
        return;
    }
    let Some(servers) = Servers::start(3) else { return };
    let lease = Duration::from_secs(5);
    for kind in fair_kinds() {
        // Two instances, as the service runs them, each with its own fair lock client.
        let stocks = [
            Arc::new(RedisLockStock::new(
                fair_dyn(kind, &servers.urls(), lease).await,
                Duration::from_secs(30),
                PREFIX,
            )),
            Arc::new(RedisLockStock::new(
                fair_dyn(kind, &servers.urls(), lease).await,
                Duration::from_secs(30),
                PREFIX,
            )),
        ];
        let ids = options(3);
        let inside: Arc<Vec<AtomicUsize>> = Arc::new((0..3).map(|_| AtomicUsize::new(0)).collect());
        let orders: Vec<_> = (0..120)
            .map(|i| {
                let (stock, inside) = (stocks[i % 2].clone(), inside.clone());
                // Orders of one, two or three options, overlapping: every pair of options is contended.
                let picked: Vec<usize> = (0..3).filter(|o| (i + o) % 3 != 0 || i % 4 == 0).collect();
                let lines: Vec<OrderLine> = picked.iter().map(|&o| line(ids[o])).collect();
                tokio::spawn(async move {
                    let permit = stock.admit(&[&lines]).await.unwrap().permit;
                    for &o in &picked {
                        assert_eq!(inside[o].fetch_add(1, Ordering::SeqCst), 0, "option {o} had two holders");
                    }
                    tokio::task::yield_now().await;
                    for &o in &picked {
                        inside[o].fetch_sub(1, Ordering::SeqCst);
                    }
                    drop(permit);
                })
            })
            .collect();
        let started = Instant::now();
        for order in orders {
            order.await.unwrap();
        }
        eprintln!("fair {}: 120 overlapping orders over two instances in {:?}", kind.name(), started.elapsed());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fair_redlock_waiter_frozen_between_its_turn_and_the_lock_stalls_the_queue_for_the_acceptance_lease_only() {
    let Some(servers) = Servers::start(3) else { return };
    let (nodes, lease) = (servers.urls(), Duration::from_secs(10));
    let key = key("frozen-with-turn");
    // A racing client holds the lock, so the turn is free: the waiter in the other process takes it at once and
    // then keeps asking the majority, turn in hand.
    let racing = Redlock::connect(&nodes, lease).await.unwrap();
    let mut held = racing.lock(&key, within(Duration::from_secs(1))).await.unwrap();
    let mut process = child(Kind::Redlock, &nodes, &key);
    let queue_node = raw(&nodes[0]).await;
    let turn = format!("{{{key}}}:turn");
    let started = Instant::now();
    while queue_node.get::<Option<String>, _>(&turn).await.unwrap().is_none() {
        assert!(started.elapsed() < Duration::from_secs(10), "the other process never took its turn");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let waiter = Fair::connect(Kind::Redlock, &nodes, lease).await;
    let next = tokio::spawn({
        let key = key.clone();
        async move { waiter.lock().lock(&key, within(Duration::from_secs(30))).await.map(|g| (g, Instant::now())) }
    });
    let probe = Fair::connect(Kind::Redlock, &nodes, lease).await;
    probe.until_queued(&key, 1).await;
    signal(&process, "-STOP");
    held.release().await.unwrap();
    let released = Instant::now();
    let (mut guard, granted) = next.await.unwrap().unwrap();
    let stall = granted - released;
    eprintln!("fair redlock: a waiter frozen with its turn stalled the next for {stall:?}");
    // Its turn lapses after the acceptance lease (500 ms), not the lock's lease (10 s).
    assert!(stall < Duration::from_millis(1_250), "{stall:?}");
    signal(&process, "-CONT");
    guard.release().await.unwrap();
    let status = tokio::task::spawn_blocking(move || process.wait().unwrap()).await.unwrap();
    assert!(status.success(), "the thawed client got the lock in the end");
}
