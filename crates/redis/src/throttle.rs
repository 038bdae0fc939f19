//! The sign-in throttle every instance shares: failed sign-ins counted per key in Redis, in fixed windows of
//! the quota's length (INCR, and an expiry at the window's end, in one script). A key that reached its failures
//! in the current window is refused until the window ends, whichever instance it tries.
//!
//! Windows are numbered from the domain's clock (the instances' wall clocks), not Redis's, so that they agree
//! with every other time the service keeps. A fixed window lets a key fail up to twice its quota across a
//! window boundary; the in-process throttle of `shop-auth` (GCRA) has no such edge, but counts per instance.
//! Keys are stored as digests: names are the clients' input, and must not shape the keyspace.

use std::sync::LazyLock;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use fred::prelude::{Client, ClientLike, KeysInterface};
use fred::types::scripts::Script;
use sha2::{Digest, Sha256};
use shop_domain::DomainError;
use shop_domain::auth::ThrottleQuota;
use shop_domain::ports::SignInThrottle;

use crate::lock::LockError;
use crate::node;

/// `KEYS[1]` the window's counter; `ARGV[1]` the window's end (ms since the epoch). The failures so far.
static FAILED: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        r"
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIREAT', KEYS[1], ARGV[1]) end
return n
",
    )
});

/// Failed sign-ins per name and per client address, in Redis. Not `Clone`: dropping it closes its connection.
#[derive(Debug)]
pub struct RedisThrottle {
    client: Client,
    prefix: String,
    names: ThrottleQuota,
    clients: ThrottleQuota,
}

impl RedisThrottle {
    /// Connects to `url`; keys live under `prefix` (`SHOP_REDIS_KEY_PREFIX`).
    ///
    /// # Errors
    /// [`LockError::Redis`] when the server cannot be reached.
    pub async fn connect(
        url: &str,
        prefix: impl Into<String>,
        names: ThrottleQuota,
        clients: ThrottleQuota,
    ) -> Result<Self, LockError> {
        let client = node::builder(url, Duration::from_secs(1))?.build()?;
        node::init(&client).await?;
        FAILED.load(&client).await?;
        Ok(Self { client, prefix: prefix.into(), names, clients })
    }

    fn quota(&self, key: &str) -> ThrottleQuota {
        if key.starts_with("client:") { self.clients } else { self.names }
    }

    /// The counter of `key`'s window at `now`, and when that window ends.
    fn window(&self, key: &str, now: DateTime<Utc>) -> (String, i64) {
        let length = i64::try_from(self.quota(key).window.as_millis()).unwrap_or(i64::MAX).max(1);
        let at = now.timestamp_millis();
        let index = at.div_euclid(length);
        let digest: String = Sha256::digest(key.as_bytes()).iter().take(16).map(|b| format!("{b:02x}")).collect();
        (format!("{}:signin:{digest}:{index}", self.prefix), (index + 1) * length)
    }
}

fn too_many(ends_ms: i64, now: DateTime<Utc>) -> DomainError {
    let secs = ((ends_ms - now.timestamp_millis()).max(1) + 999) / 1000;
    DomainError::TooManyAttempts { retry_after_secs: u32::try_from(secs).unwrap_or(u32::MAX) }
}

fn unavailable(e: impl Into<LockError>) -> DomainError {
    DomainError::unavailable(e.into())
}

#[async_trait]
impl SignInThrottle for RedisThrottle {
    async fn check(&self, keys: &[String], now: DateTime<Utc>) -> Result<(), DomainError> {
        for key in keys {
            let (counter, ends) = self.window(key, now);
            let failures: Option<u32> = self.client.get(&counter).await.map_err(unavailable)?;
            if failures.unwrap_or(0) >= self.quota(key).failures {
                return Err(too_many(ends, now));
            }
        }
        Ok(())
    }

    async fn failed(&self, keys: &[String], now: DateTime<Utc>) -> Result<(), DomainError> {
        let mut refused = None;
        for key in keys {
            let (counter, ends) = self.window(key, now);
            let failures: u32 = FAILED
                .evalsha_with_reload(&self.client, vec![counter], vec![ends.to_string()])
                .await
                .map_err(unavailable)?;
            if failures > self.quota(key).failures {
                refused = refused.max(Some(ends));
            }
        }
        refused.map_or(Ok(()), |ends| Err(too_many(ends, now)))
    }
}

impl Drop for RedisThrottle {
    fn drop(&mut self) {
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let client = self.client.clone();
            runtime.spawn(async move {
                let _ = client.quit().await;
            });
        }
    }
}
