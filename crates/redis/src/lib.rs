//! Redis distributed locks, the stock strategies built on them and on a Redis mirror of the stock, and the
//! readiness probe.
//!
//! This crate owns everything the shop keeps in Redis: the lock keys (`{prefix}:lock:option:{id}`), their fence
//! counters and release channels, the fair modes' waiter queues beside them (`{key}:queue`, `{key}:waiters`, and
//! Redlock's `{key}:turn`) with each lock client's wake-up channel (`shop-lock:wake:{random}`), the stock mirror
//! of `redis-optimistic` (`{prefix}:stock:option:{id}` and its holds), and the Lua scripts that touch them. It
//! depends on `shop-domain` (whose [`shop_domain::stock::StockStrategy`] and [`shop_domain::ports::Probe`] ports
//! it implements) and on fred, never on the database, HTTP or the server crate.
//!
//! Every lock stores a random owner token under the key with a lease, renews the lease from a watchdog while held,
//! and deletes the key only if it still holds the token; every grant comes with a fencing token that strictly
//! increases per key, so the stock row can refuse a write from a holder whose lease ran out.
//!
//! Each lock races or is fair ([`LockOptions`]). Racing waiters try again on their own schedule, and under
//! contention the releaser usually wins its lock back; fair waiters queue in Redis, and a release hands the lock to
//! the longest live waiter and wakes only it. `redis-pubsub` is fair by default, `redis-spin` and `redis-redlock`
//! race unless connected with `connect_with(.., LockOptions { fair: true })`.
//!
//! - [`lock`]: the [`DistributedLock`] port, [`LockError`], [`LockOptions`], and the [`LockGuard`] (watchdog,
//!   release on drop).
//! - [`spin`]: `redis-spin`, SET NX polled with a jittered sleep; fair, a queue each waiter polls by its place.
//! - [`pubsub`]: `redis-pubsub`, fair: a queue whose head alone is woken, by a message to its client; racing:
//!   waiters sleep until a release message or the holder's TTL.
//! - [`redlock`]: `redis-redlock`, a majority of independent nodes, with fences that survive a change of majority;
//!   fair, waiters take turns from a queue on the first node.
//! - [`strategy`]: [`RedisLockStock`], the stock strategy over any of them.
//! - [`optimistic`]: [`RedisOptimisticStock`], `redis-optimistic`: reservations in a Redis mirror of the stock
//!   with WATCH/MULTI/EXEC, its give-back, loading and reconciliation.
//! - [`throttle`]: [`RedisThrottle`], failed sign-ins counted per key across every instance.
//! - [`stream`]: [`RedisStreamSink`], the outbox's events appended to a Redis stream.
//! - [`catalogue`]: [`CatalogueChannel`], what a commit changed in the catalogue, told to every instance's cache
//!   (`{prefix}:catalogue`).
//! - [`probe`]: [`RedisProbe`], PING for `/health/ready`.
//! - `scripts`: the Lua scripts (acquire, unlock, extend, raise-fence; the fair queue's acquire, release and leave)
//!   and the keys they derive.
//! - `node`: connecting a client with bounded timeouts; the single-node lease; waiting in a node's fair queue.
//!
//! # Bound to one database
//! The stock keys (locks, fence counters, the mirror) live under [`stock_prefix`]: the deployment's prefix and
//! the id of the database they describe (made once and kept in that database). A recreated database, or another
//! one pointed at the same Redis and prefix, gets keys of its own instead of trusting what Redis holds for the
//! old one; a database restored from an older backup keeps its id, and the mirror then notices that it is of a
//! newer state ([`RedisOptimisticStock::check_against_database`]) and drops itself.

pub mod catalogue;
pub mod lock;
mod node;
pub mod optimistic;
pub mod probe;
pub mod pubsub;
pub mod redlock;
mod scripts;
pub mod spin;
pub mod strategy;
pub mod stream;
pub mod throttle;

pub use catalogue::{CatalogueChange, CatalogueChannel, catalogue_channel};
pub use lock::{DistributedLock, LockError, LockGuard, LockOptions};
pub use optimistic::{OptimisticSettings, ReconcileReport, RedisOptimisticStock};
pub use probe::RedisProbe;
pub use pubsub::PubSubLock;
pub use redlock::Redlock;
pub use spin::SpinLock;
pub use strategy::{RedisLockStock, option_lock_key};
pub use stream::{RedisStreamSink, events_stream_key};
pub use throttle::RedisThrottle;

/// The prefix of the stock keys of the database `deployment` (an id kept in that database) under the
/// deployment's `prefix` (`SHOP_REDIS_KEY_PREFIX`).
#[must_use]
pub fn stock_prefix(prefix: &str, deployment: &str) -> String {
    format!("{prefix}:{deployment}")
}
