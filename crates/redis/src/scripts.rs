//! The Lua scripts every lock runs, and the keys they touch.
//!
//! Each step that must read and then write (set-if-absent then bump the fence, compare-then-delete,
//! compare-then-expire) is one script because Redis runs a script atomically: between a client's GET and its DEL
//! another client's lock could otherwise expire and be re-taken, and the DEL would remove someone else's lock.
//!
//! Scripts are loaded once at connect time and run with EVALSHA; [`Script::evalsha_with_reload`] loads them again
//! when the server answers NOSCRIPT (after a restart or a SCRIPT FLUSH), so the lock keeps working.
//!
//! # The fair queue
//! The fair modes keep, next to the lock, a list of waiter tokens in arrival order (`{key}:queue`) and a hash from
//! each waiter's token to its liveness deadline and wake channel (`{key}:waiters`). Three scripts manage them:
//! [`FAIR_ACQUIRE`] (take a free lock if nobody live is ahead, else join or stay in the queue, and accept a lock
//! handed over), [`FAIR_RELEASE`] (pass the lock to the first live waiter) and [`FAIR_LEAVE`] (a waiter that
//! gives up). A release never leaves the lock free while someone live waits: it sets the lock to the head's token
//! for a short acceptance lease, bumps the fence for it in the same script and publishes the token on the head's
//! channel only, so one release wakes one waiter. The head accepts by running [`FAIR_ACQUIRE`] again, which
//! extends the lock to the full lease. Waiters refresh their deadline by running [`FAIR_ACQUIRE`] on a timer; a
//! waiter whose deadline passed is dropped when it reaches the head, and one that died after its last refresh is
//! handed the lock and lets it lapse after the acceptance lease, when the next waiter's refresh finds it free and
//! passes it on. The deadlines are Redis' own clock (`TIME`), so the clients' clocks do not matter. Needs Redis 7
//! (a script that writes after `TIME`; `LPOS`).

use std::sync::LazyLock;
use std::time::Duration;

use fred::prelude::{Client, ListInterface};
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

/// `KEYS[1]` lock, `KEYS[2]` fence counter; `ARGV[1]` owner token, `ARGV[2]` a floor (the stock row's newest
/// fence). For a holder whose fence the row refused because the counter fell behind it (Redis lost the counter:
/// a restart without persistence, a FLUSHALL): raises the counter to the floor and takes the next fence, only
/// while the caller still owns the lock. The new fence, or 0 when the lock is no longer the caller's.
pub(crate) static REFENCE: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
local floor = tonumber(ARGV[2])
if tonumber(redis.call('GET', KEYS[2]) or '0') < floor then
  redis.call('SET', KEYS[2], ARGV[2])
end
return redis.call('INCR', KEYS[2])
",
    )
});

/// Functions the fair scripts share. `KEYS[1]` lock, `KEYS[2]` fence counter, `KEYS[3]` queue (a list of waiter
/// tokens, oldest first), `KEYS[4]` waiters (a hash from token to `"{liveness deadline ms}:{wake channel}"`).
const FAIR_PRELUDE: &str = r"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The first waiter in line that is still alive, and its wake channel; dead ones in front of it are dropped.
local function first_live(now)
  while true do
    local head = redis.call('LINDEX', KEYS[3], 0)
    if not head then return nil, nil end
    local entry = redis.call('HGET', KEYS[4], head)
    if entry then
      local sep = string.find(entry, ':', 1, true)
      if sep and tonumber(string.sub(entry, 1, sep - 1)) >= now then
        return head, string.sub(entry, sep + 1)
      end
    end
    redis.call('LPOP', KEYS[3])
    redis.call('HDEL', KEYS[4], head)
  end
end

-- Hands the lock to the head of the queue for the acceptance lease, with the next fence, and wakes only it.
local function hand_to(head, channel, accept_ms)
  redis.call('LPOP', KEYS[3])
  redis.call('HDEL', KEYS[4], head)
  redis.call('SET', KEYS[1], head, 'PX', accept_ms)
  redis.call('INCR', KEYS[2])
  if channel ~= '' then redis.call('PUBLISH', channel, head) end
end

-- Passes the caller's lock on to the first live waiter; with nobody waiting, deletes it and announces the
-- release on the key's release channel (for waiters of the racing pub/sub mode during a rolling change).
local function pass_on(accept_ms, release_channel)
  local head, channel = first_live(now_ms())
  if head then
    hand_to(head, channel, accept_ms)
  else
    redis.call('DEL', KEYS[1])
    redis.call('PUBLISH', release_channel, ARGV[1])
  end
end
";

fn fair_script(body: &str) -> Script {
    Script::from_lua(format!("{FAIR_PRELUDE}{body}"))
}

/// `ARGV[1]` token, `ARGV[2]` lease ms, `ARGV[3]` wake channel (empty for a waiter that polls), `ARGV[4]` liveness
/// ms, `ARGV[5]` acceptance lease ms, `ARGV[6]` how long an idle queue is kept, ms.
///
/// A lock handed to the caller is accepted (extended to the full lease): `{1, fence}`. A free lock is taken when
/// nobody live is queued in front of the caller: `{1, fence}`; if someone is, it is handed to them. Otherwise the
/// caller joins the queue at the tail (or, already queued, refreshes its liveness deadline):
/// `{0, position or -1, pttl}` (the 0-based place in the queue, computed only for a waiter that polls).
pub(crate) static FAIR_ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    fair_script(
        r"
local token = ARGV[1]
local holder = redis.call('GET', KEYS[1])
if holder == token then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  -- Only a grant bumps the counter, and nobody is granted while we hold the lock: it is our fence.
  return {1, tonumber(redis.call('GET', KEYS[2]) or '0')}
end
local now = now_ms()
if not holder then
  local head, channel = first_live(now)
  if head == nil or head == token then
    if head then
      redis.call('LPOP', KEYS[3])
      redis.call('HDEL', KEYS[4], token)
    end
    redis.call('SET', KEYS[1], token, 'PX', ARGV[2])
    return {1, redis.call('INCR', KEYS[2])}
  end
  -- Its holder died (or its handover lapsed): pass it to the one whose turn it is.
  hand_to(head, channel, ARGV[5])
end
local entry = string.format('%d:%s', now + tonumber(ARGV[4]), ARGV[3])
if redis.call('HSET', KEYS[4], token, entry) == 1 then
  redis.call('RPUSH', KEYS[3], token)
end
-- Every live waiter refreshes these, so they vanish only once every waiter is gone.
redis.call('PEXPIRE', KEYS[3], ARGV[6])
redis.call('PEXPIRE', KEYS[4], ARGV[6])
local position = -1
if ARGV[3] == '' then
  position = redis.call('LPOS', KEYS[3], token) or -1
end
return {0, position, redis.call('PTTL', KEYS[1])}
",
    )
});

/// `ARGV[1]` token, `ARGV[2]` acceptance lease ms, `ARGV[3]` release channel. Only for the owner: passes the lock
/// to the first live waiter, or deletes it when nobody waits: 1; else 0 (a late or foreign release is a no-op).
pub(crate) static FAIR_RELEASE: LazyLock<Script> = LazyLock::new(|| {
    fair_script(
        r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
pass_on(ARGV[2], ARGV[3])
return 1
",
    )
});

/// `ARGV[1]` token, `ARGV[2]` acceptance lease ms, `ARGV[3]` release channel. A waiter gives up: it leaves the
/// queue, and a lock handed to it meanwhile is passed on at once instead of lapsing: 1 if it was, else 0.
pub(crate) static FAIR_LEAVE: LazyLock<Script> = LazyLock::new(|| {
    fair_script(
        r"
redis.call('LREM', KEYS[3], 1, ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1])
if redis.call('GET', KEYS[1]) == ARGV[1] then
  pass_on(ARGV[2], ARGV[3])
  return 1
end
return 0
",
    )
});

/// Loads every script, so that the first EVALSHA of a lock does not pay a NOSCRIPT round trip.
pub(crate) async fn load_all(client: &Client) -> Result<(), fred::error::Error> {
    for script in
        [&*ACQUIRE, &*UNLOCK, &*EXTEND, &*RAISE_FENCE, &*REFENCE, &*FAIR_ACQUIRE, &*FAIR_RELEASE, &*FAIR_LEAVE]
    {
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

/// The keys of one lock's fair queue, all in the lock key's hash slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct QueueKeys {
    pub(crate) lock: String,
    pub(crate) fence: String,
    pub(crate) queue: String,
    pub(crate) waiters: String,
    pub(crate) released: String,
}

impl QueueKeys {
    /// The queue of the lock stored under `lock`.
    pub(crate) fn of(lock: &str) -> Self {
        Self {
            lock: lock.to_owned(),
            fence: fence_key(lock),
            queue: derived_key(lock, "queue"),
            waiters: derived_key(lock, "waiters"),
            released: release_channel(lock),
        }
    }

    fn all(&self) -> Vec<String> {
        vec![self.lock.clone(), self.fence.clone(), self.queue.clone(), self.waiters.clone()]
    }
}

/// The timings of a fair queue, derived from the lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FairTiming {
    /// How long a waiter handed the lock has to accept it: what a waiter that died just before its turn costs the
    /// ones behind it. Long enough for a loaded client to hear the message and answer, at most half a second.
    pub(crate) accept: Duration,
    /// How often a waiter refreshes its place (and finds a lock handed to it whose message was lost, or a lapsed
    /// handover to pass on): what a lost message costs, and, added to `accept`, what a dead waiter costs.
    pub(crate) heartbeat: Duration,
    /// How long after its last refresh a waiter counts as alive: four refreshes, so that one or two late ones do
    /// not cost a live waiter its place.
    pub(crate) liveness: Duration,
    /// How long a queue nobody refreshes is kept: long after its last live waiter's deadline.
    pub(crate) idle: Duration,
}

impl FairTiming {
    pub(crate) fn for_lease(lease: Duration) -> Self {
        let accept = lease.min(Duration::from_millis(500));
        let heartbeat = accept / 2;
        Self { accept, heartbeat, liveness: heartbeat * 4, idle: (heartbeat * 40).max(Duration::from_secs(10)) }
    }
}

/// What one fair acquire answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FairAttempt {
    /// Ours (taken, or handed over and now accepted for the full lease), with this fence.
    Granted { fence: u64 },
    /// Queued, at this 0-based place when asked for (polling waiters), while the holder's lease runs this long.
    Queued { position: Option<usize>, ttl: Duration },
}

/// Runs the fair acquire script: takes, accepts, or joins / stays in the queue. `channel` is where a handover is
/// announced to this waiter; empty for a waiter that polls (and is then told its place).
pub(crate) async fn fair_acquire(
    client: &Client,
    keys: &QueueKeys,
    token: &str,
    lease: Duration,
    channel: &str,
    timing: &FairTiming,
) -> Result<FairAttempt, LockError> {
    let args = vec![
        token.to_owned(),
        millis(lease).to_string(),
        channel.to_owned(),
        millis(timing.liveness).to_string(),
        millis(timing.accept).to_string(),
        millis(timing.idle).to_string(),
    ];
    let reply: Vec<i64> = FAIR_ACQUIRE.evalsha_with_reload(client, keys.all(), args).await?;
    match reply.as_slice() {
        [1, fence] => Ok(FairAttempt::Granted { fence: u64::try_from(*fence).unwrap_or(0) }),
        [0, position, pttl] => Ok(FairAttempt::Queued {
            position: usize::try_from(*position).ok(),
            ttl: Duration::from_millis(u64::try_from(*pttl).unwrap_or(0)),
        }),
        other => Err(LockError::Protocol(format!("fair acquire script answered {other:?}"))),
    }
}

/// Runs the fair release script: whether this token still owned the lock (which is now passed on or deleted).
pub(crate) async fn fair_release(
    client: &Client,
    keys: &QueueKeys,
    token: &str,
    timing: &FairTiming,
) -> Result<bool, LockError> {
    let args = vec![token.to_owned(), millis(timing.accept).to_string(), keys.released.clone()];
    let released: i64 = FAIR_RELEASE.evalsha_with_reload(client, keys.all(), args).await?;
    Ok(released == 1)
}

/// Runs the leave script: whether a lock handed to this token had to be passed on.
pub(crate) async fn fair_leave(
    client: &Client,
    keys: &QueueKeys,
    token: &str,
    timing: &FairTiming,
) -> Result<bool, LockError> {
    let args = vec![token.to_owned(), millis(timing.accept).to_string(), keys.released.clone()];
    let passed: i64 = FAIR_LEAVE.evalsha_with_reload(client, keys.all(), args).await?;
    Ok(passed == 1)
}

/// How many waiters the queue holds (live or not yet found dead).
pub(crate) async fn queue_len(client: &Client, keys: &QueueKeys) -> Result<usize, LockError> {
    Ok(client.llen(&keys.queue).await?)
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

/// Runs the refence script on one node: the holder's new fence, above `floor`; `None` when it no longer owns
/// the lock there.
pub(crate) async fn refence(client: &Client, key: &str, token: &str, floor: u64) -> Result<Option<u64>, LockError> {
    let fence: i64 = REFENCE
        .evalsha_with_reload(client, vec![key.to_owned(), fence_key(key)], vec![token.to_owned(), floor.to_string()])
        .await?;
    Ok(u64::try_from(fence).ok().filter(|f| *f > 0))
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
        let queue = QueueKeys::of(key);
        assert_eq!(queue.queue, "{shop:lock:option:7}:queue");
        for k in queue.all() {
            assert_eq!(fred::util::redis_keyslot(key.as_bytes()), fred::util::redis_keyslot(k.as_bytes()), "{k}");
        }
        for k in [key, "{tagged}:lock"] {
            assert_eq!(fred::util::redis_keyslot(k.as_bytes()), fred::util::redis_keyslot(fence_key(k).as_bytes()));
        }
    }

    #[test]
    fn fair_timings_keep_a_dead_waiter_under_a_second_and_scale_down_with_short_leases() {
        let t = FairTiming::for_lease(Duration::from_secs(10));
        assert_eq!(
            (t.accept, t.heartbeat, t.liveness),
            (Duration::from_millis(500), Duration::from_millis(250), Duration::from_secs(1))
        );
        assert!(t.accept + t.heartbeat < Duration::from_secs(1));
        let t = FairTiming::for_lease(Duration::from_millis(100));
        assert!(t.accept <= Duration::from_millis(100) && t.heartbeat < t.accept && t.liveness > t.heartbeat);
    }
}
