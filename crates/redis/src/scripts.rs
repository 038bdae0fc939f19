//! The Lua scripts every lock runs, and the keys they touch.
//!
//! Each step that must read and then write (set-if-absent then bump the fence, compare-then-delete,
//! compare-then-expire) is one script because Redis runs a script atomically: between a client's GET and its DEL
//! another client's lock could otherwise expire and be re-taken, and the DEL would remove someone else's lock.
//!
//! Scripts are loaded once at connect time and run with EVALSHA; [`Script::evalsha_with_reload`] loads them again
//! when the server answers NOSCRIPT (after a restart or a SCRIPT FLUSH), so the lock keeps working.

use std::sync::LazyLock;
use std::time::Duration;

use fred::prelude::Client;
use fred::types::scripts::Script;

use crate::lock::LockError;

/// `KEYS[1]` lock, `KEYS[2]` fence counter; `ARGV[1]` owner token, `ARGV[2]` lease in ms.
/// Returns `{1, fence}` when granted (the fence counter after INCR) or `{0, pttl}` when held by someone else.
pub(crate) static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {1, redis.call('INCR', KEYS[2])}
end
return {0, redis.call('PTTL', KEYS[1])}
",
    )
});

/// `KEYS[1]` lock; `ARGV[1]` owner token, `ARGV[2]` release channel. Deletes and announces the release only
/// when the caller still owns the lock: 1, else 0 (a late or foreign unlock is a no-op).
pub(crate) static UNLOCK: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], ARGV[1])
  return 1
end
return 0
",
    )
});

/// `KEYS[1]` lock; `ARGV[1]` owner token, `ARGV[2]` lease in ms. Renews the lease only for the owner: 1, else 0.
pub(crate) static EXTEND: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
",
    )
});

/// `KEYS[1]` lock, `KEYS[2]` fence counter; `ARGV[1]` owner token, `ARGV[2]` the new fence. Raises the counter
/// to the new fence (never lowers it), and only while the caller still owns the lock on this node, so that the
/// next owner of this node reads it: 1, else 0. Used by Redlock.
pub(crate) static RAISE_FENCE: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
local new = tonumber(ARGV[2])
if tonumber(redis.call('GET', KEYS[2]) or '0') < new then
  redis.call('SET', KEYS[2], ARGV[2])
end
return 1
",
    )
});

/// Loads every script, so that the first EVALSHA of a lock does not pay a NOSCRIPT round trip.
pub(crate) async fn load_all(client: &Client) -> Result<(), fred::error::Error> {
    for script in [&*ACQUIRE, &*UNLOCK, &*EXTEND, &*RAISE_FENCE] {
        script.load(client).await?;
    }
    Ok(())
}

/// A key derived from the lock key that hashes to the same Redis Cluster slot, so one script may touch both:
/// `{key}:suffix`, or `key:suffix` when the key already carries its own hash tag.
pub(crate) fn derived_key(key: &str, suffix: &str) -> String {
    if key.contains('{') { format!("{key}:{suffix}") } else { format!("{{{key}}}:{suffix}") }
}

/// The fence counter of `key`: never expires, so tokens keep increasing across holders.
pub(crate) fn fence_key(key: &str) -> String {
    derived_key(key, "fence")
}

/// The channel the unlock script announces a release of `key` on.
pub(crate) fn release_channel(key: &str) -> String {
    derived_key(key, "released")
}

/// What one acquire attempt on one node answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Attempt {
    /// Granted, with this node's fence counter after the increment.
    Granted { fence: u64 },
    /// Held by someone else for this much longer (zero when the key has no TTL, which no lock of ours leaves).
    Held { ttl: Duration },
}

pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// Runs the acquire script on one node.
pub(crate) async fn acquire(client: &Client, key: &str, token: &str, lease: Duration) -> Result<Attempt, LockError> {
    let reply: Vec<i64> = ACQUIRE
        .evalsha_with_reload(
            client,
            vec![key.to_owned(), fence_key(key)],
            vec![token.to_owned(), millis(lease).to_string()],
        )
        .await?;
    match reply.as_slice() {
        [1, fence] => Ok(Attempt::Granted { fence: u64::try_from(*fence).unwrap_or(0) }),
        [0, pttl] => Ok(Attempt::Held { ttl: Duration::from_millis(u64::try_from(*pttl).unwrap_or(0)) }),
        other => Err(LockError::Protocol(format!("acquire script answered {other:?}"))),
    }
}

/// Runs the unlock script on one node: whether this token still owned the lock there.
pub(crate) async fn unlock(client: &Client, key: &str, token: &str) -> Result<bool, LockError> {
    let deleted: i64 =
        UNLOCK.evalsha_with_reload(client, vec![key.to_owned()], vec![token.to_owned(), release_channel(key)]).await?;
    Ok(deleted == 1)
}

/// Runs the extend script on one node: whether this token still owned the lock there.
pub(crate) async fn extend(client: &Client, key: &str, token: &str, lease: Duration) -> Result<bool, LockError> {
    let extended: i64 = EXTEND
        .evalsha_with_reload(client, vec![key.to_owned()], vec![token.to_owned(), millis(lease).to_string()])
        .await?;
    Ok(extended == 1)
}

/// Runs the raise-fence script on one node: whether this token still owned the lock there (and the counter is
/// now at least `fence`).
pub(crate) async fn raise_fence(client: &Client, key: &str, token: &str, fence: u64) -> Result<bool, LockError> {
    let owned: i64 = RAISE_FENCE
        .evalsha_with_reload(client, vec![key.to_owned(), fence_key(key)], vec![token.to_owned(), fence.to_string()])
        .await?;
    Ok(owned == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_keys_share_the_lock_keys_hash_slot() {
        let key = "shop:lock:option:7";
        assert_eq!(fence_key(key), "{shop:lock:option:7}:fence");
        assert_eq!(release_channel(key), "{shop:lock:option:7}:released");
        for k in [key, "{tagged}:lock"] {
            assert_eq!(fred::util::redis_keyslot(k.as_bytes()), fred::util::redis_keyslot(fence_key(k).as_bytes()));
        }
    }
}
