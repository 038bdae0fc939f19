//! One lock acquire + release per Redis strategy, apart from any database: uncontended, and as the per-handover
//! cost when 100 contenders want the same key at once. Needs Redis at 127.0.0.1:6379; Redlock's three nodes are
//! redis-server processes started here.
//!
//! `cargo bench -p shop-bench --bench locks`

#![allow(clippy::unwrap_used, clippy::expect_used, missing_debug_implementations)]

#[path = "../src/instances.rs"]
#[allow(dead_code)]
mod instances;

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use shop_redis::{DistributedLock, PubSubLock, Redlock, SpinLock};
use tokio::runtime::Runtime;

const LEASE: Duration = Duration::from_secs(10);
const CONTENDERS: usize = 100;

fn deadline() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(30)
}

/// One acquire and release of a key nobody else wants.
fn uncontended(c: &mut Criterion, rt: &Runtime, name: &str, lock: Arc<dyn DistributedLock>) {
    let key = format!("bench:uncontended:{name}:{}", uuid::Uuid::new_v4().simple());
    c.bench_function(&format!("{name}/uncontended"), |b| {
        b.to_async(rt).iter(|| {
            let (lock, key) = (lock.clone(), key.clone());
            async move {
                let mut guard = lock.lock(&key, deadline()).await.unwrap();
                guard.release().await.unwrap();
            }
        });
    });
}

/// 100 contenders released at once on one key, each holding it for no work: the time per acquisition is the
/// cost of handing the lock from one holder to the next.
fn contended(c: &mut Criterion, rt: &Runtime, name: &str, lock: Arc<dyn DistributedLock>) {
    let mut group = c.benchmark_group(format!("{name}/{CONTENDERS}-contenders"));
    group.sample_size(10);
    group.bench_function("per-acquisition", |b| {
        b.to_async(rt).iter_custom(|rounds| {
            let lock = lock.clone();
            async move {
                let mut total = Duration::ZERO;
                for _ in 0..rounds {
                    let key = format!("bench:contended:{}", uuid::Uuid::new_v4().simple());
                    let barrier = Arc::new(tokio::sync::Barrier::new(CONTENDERS + 1));
                    let tasks: Vec<_> = (0..CONTENDERS)
                        .map(|_| {
                            let (lock, key, barrier) = (lock.clone(), key.clone(), barrier.clone());
                            tokio::spawn(async move {
                                barrier.wait().await;
                                let mut guard = lock.lock(&key, deadline()).await.unwrap();
                                guard.release().await.unwrap();
                            })
                        })
                        .collect();
                    barrier.wait().await;
                    let started = Instant::now();
                    for t in tasks {
                        t.await.unwrap();
                    }
                    total += started.elapsed() / u32::try_from(CONTENDERS).unwrap();
                }
                total
            }
        });
    });
    group.finish();
}

fn locks(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let nodes = rt.block_on(instances::RedisNodes::start(3)).expect("redis-server nodes for Redlock");
    let spin: Arc<dyn DistributedLock> =
        Arc::new(rt.block_on(SpinLock::connect("redis://127.0.0.1:6379", LEASE)).unwrap());
    let pubsub: Arc<dyn DistributedLock> =
        Arc::new(rt.block_on(PubSubLock::connect("redis://127.0.0.1:6379", LEASE)).unwrap());
    let redlock: Arc<dyn DistributedLock> = Arc::new(rt.block_on(Redlock::connect(&nodes.urls, LEASE)).unwrap());
    for (name, lock) in [("redis-spin", spin), ("redis-pubsub", pubsub), ("redis-redlock", redlock)] {
        uncontended(c, &rt, name, lock.clone());
        contended(c, &rt, name, lock);
    }
    drop(nodes);
}

criterion_group!(benches, locks);
criterion_main!(benches);
