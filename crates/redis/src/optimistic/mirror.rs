//! The mirror's keys and the Lua scripts that change it outside a reservation's WATCH/MULTI/EXEC.
//!
//! Per option, under the deployment's prefix:
//! - `{prefix}:stock:option:{id}`: the units orders may still reserve (an integer; no TTL).
//! - `{prefix}:stock:option:{id}:holds`: a hash of the reservations in flight, field `{deadline_ms}:{token}`,
//!   value the units. A reservation writes its hold in the same MULTI as its DECRBY and deletes it when it
//!   settles; the deadline lets reconciliation tell a reservation in flight from one whose holder died.
//!
//! The prefix is each key's hash tag, so every key of one deployment hashes to one Redis Cluster slot: a
//! transaction or script over several options stays legal on a cluster.
//!
//! Each change that must read and then write (load only if absent, give back only if the hold is still there)
//! is one script, because Redis runs a script atomically and a script's write also aborts every WATCH on the
//! keys it touches.

use std::collections::{BTreeMap, HashMap};
use std::sync::LazyLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fred::prelude::Client;
use fred::types::scripts::Script;
use shop_domain::ids::ProductOptionId;

use crate::lock::LockError;

/// The Redis key of an option's mirrored stock.
#[must_use]
pub fn stock_mirror_key(prefix: &str, option_id: ProductOptionId) -> String {
    format!("{{{prefix}}}:stock:option:{option_id}")
}

/// The Redis hash of an option's reservations in flight.
#[must_use]
pub fn stock_holds_key(prefix: &str, option_id: ProductOptionId) -> String {
    format!("{}:holds", stock_mirror_key(prefix, option_id))
}

/// The Redis key of the newest order id the mirror has known its database to hold: a copy of the database
/// restored from an older backup has a smaller one, and its mirror (of a newer state) is then dropped.
pub(crate) fn newest_order_key(prefix: &str) -> String {
    format!("{{{prefix}}}:stock:newest-order")
}

/// The `SCAN MATCH` pattern of every mirror and holds key of `prefix` (glob characters in it escaped).
pub(crate) fn scan_pattern(prefix: &str) -> String {
    let mut escaped = String::with_capacity(prefix.len());
    for c in prefix.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    format!("{{{escaped}}}:stock:option:*")
}

/// The option a mirror or holds key of `prefix` belongs to.
pub(crate) fn option_of_key(prefix: &str, key: &str) -> Option<ProductOptionId> {
    let rest = key.strip_prefix(&format!("{{{prefix}}}:stock:option:"))?;
    let id = rest.strip_suffix(":holds").unwrap_or(rest);
    ProductOptionId::new(id.parse().ok()?).ok()
}

/// Milliseconds since the Unix epoch: the clock hold deadlines are written and judged with.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A hold's field: its deadline first, so anyone can tell a dead hold by its name alone.
pub(crate) fn hold_field(ttl: Duration) -> String {
    let deadline = now_ms().saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
    format!("{deadline}:{}", crate::lock::new_token())
}

/// The deadline a hold field carries; `None` for a field that is not ours (treated as dead).
pub(crate) fn hold_deadline(field: &str) -> Option<u64> {
    field.split_once(':')?.0.parse().ok()
}

/// The holds of one option split into the units of those still in flight and the fields of those past their
/// deadline.
pub(crate) fn split_holds(holds: &HashMap<String, i64>, now_ms: u64) -> (i64, Vec<String>) {
    let mut live = 0;
    let mut dead = Vec::new();
    for (field, units) in holds {
        match hold_deadline(field) {
            Some(deadline) if deadline > now_ms => live += units,
            _ => dead.push(field.clone()),
        }
    }
    dead.sort();
    (live, dead)
}

/// Lua: the units of `KEYS[2]`'s holds whose deadline (the digits before the first `:` of the field) is after
/// `now` (ms). Shared by the scripts that derive the mirror from the database.
const LIVE_HOLDS: &str = r"
local function live_holds(holds_key, now)
  local held = 0
  local holds = redis.call('HGETALL', holds_key)
  for i = 1, #holds, 2 do
    local deadline = tonumber(string.match(holds[i], '^(%d+):'))
    if deadline and deadline > now then held = held + tonumber(holds[i + 1]) end
  end
  return held
end
";

/// `KEYS[1]` mirror, `KEYS[2]` holds; `ARGV[1]` the database's stock, `ARGV[2]` now (ms). Sets the mirror to
/// the database's stock minus the reservations in flight, only if it is absent (first use, or Redis lost it):
/// of concurrent loaders the first one wins and the others change nothing. Returns the mirror.
pub(crate) static LOAD: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(format!(
        "{LIVE_HOLDS}
local current = redis.call('GET', KEYS[1])
if current then return tonumber(current) end
local units = tonumber(ARGV[1]) - live_holds(KEYS[2], tonumber(ARGV[2]))
redis.call('SET', KEYS[1], units)
return units
"
    ))
});

/// `KEYS[1]` mirror, `KEYS[2]` holds; `ARGV[1]` the stock an admin counted, `ARGV[2]` now (ms). Sets the mirror
/// to the count minus the reservations in flight, whether or not it was loaded (so that a loader that read the
/// database before the count finds it present and leaves it). Returns the mirror.
pub(crate) static SET_COUNT: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(format!(
        "{LIVE_HOLDS}
local units = tonumber(ARGV[1]) - live_holds(KEYS[2], tonumber(ARGV[2]))
redis.call('SET', KEYS[1], units)
return units
"
    ))
});

/// `KEYS` pairs of (mirror, holds) per option; `ARGV[1]` the hold's field, `ARGV[1 + i]` the units to give back
/// to the i-th option. For each option, deletes the hold and, only if it was still there, adds the units back
/// (to a mirror that exists). A hold that is gone was lost with the mirror (a flush) or reaped by
/// reconciliation, and the mirror then no longer counts its units as reserved: giving them back would count
/// them twice. Idempotent: a second call finds no hold. Returns the units given back.
pub(crate) static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        r"
local given = 0
for i = 1, #KEYS, 2 do
  if redis.call('HDEL', KEYS[i + 1], ARGV[1]) == 1 then
    local units = tonumber(ARGV[(i + 1) / 2 + 1])
    if units > 0 and redis.call('EXISTS', KEYS[i]) == 1 then
      redis.call('INCRBY', KEYS[i], units)
      given = given + units
    end
  end
end
return given
",
    )
});

/// `KEYS` mirrors; `ARGV[i]` the units that came back to the i-th option's stock (a cancelled order). Adds them
/// to each mirror that exists; an absent mirror is loaded from the database, which has them, on first use.
pub(crate) static RETURNED: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        r"
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('INCRBY', KEYS[i], ARGV[i]) end
end
return 0
",
    )
});

/// `KEYS[1]` the newest-order mark; `ARGV[1]` an order id the database holds: raises the mark to it, never
/// lowers it (instances that read the database at different moments agree on the largest).
static RAISE_MARK: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        r"
if tonumber(redis.call('GET', KEYS[1]) or '0') < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1])
end
return 0
",
    )
});

/// Runs [`RAISE_MARK`].
pub(crate) async fn raise_mark(client: &Client, prefix: &str, newest: i64) -> Result<(), LockError> {
    let _: i64 =
        RAISE_MARK.evalsha_with_reload(client, vec![newest_order_key(prefix)], vec![newest.to_string()]).await?;
    Ok(())
}

/// Loads every script, so that the first use does not pay a NOSCRIPT round trip.
pub(crate) async fn load_all(client: &Client) -> Result<(), fred::error::Error> {
    for script in [&*LOAD, &*SET_COUNT, &*RELEASE, &*RETURNED, &*RAISE_MARK] {
        script.load(client).await?;
    }
    Ok(())
}

/// Runs [`LOAD`] for one option: the mirror after it.
pub(crate) async fn load(client: &Client, prefix: &str, option: ProductOptionId, stock: i64) -> Result<i64, LockError> {
    Ok(LOAD
        .evalsha_with_reload(
            client,
            vec![stock_mirror_key(prefix, option), stock_holds_key(prefix, option)],
            vec![stock.to_string(), now_ms().to_string()],
        )
        .await?)
}

/// Runs [`SET_COUNT`] for one option: the mirror after it.
pub(crate) async fn set_count(
    client: &Client,
    prefix: &str,
    option: ProductOptionId,
    stock: i64,
) -> Result<i64, LockError> {
    Ok(SET_COUNT
        .evalsha_with_reload(
            client,
            vec![stock_mirror_key(prefix, option), stock_holds_key(prefix, option)],
            vec![stock.to_string(), now_ms().to_string()],
        )
        .await?)
}

/// Runs [`RELEASE`] for the hold `field` over every option it reserved, giving back `give` (zero where the
/// transaction took everything): the units given back.
pub(crate) async fn release(
    client: &Client,
    prefix: &str,
    field: &str,
    give: &BTreeMap<ProductOptionId, i64>,
) -> Result<i64, LockError> {
    let mut keys = Vec::with_capacity(give.len() * 2);
    let mut args = Vec::with_capacity(give.len() + 1);
    args.push(field.to_owned());
    for (option, units) in give {
        keys.push(stock_mirror_key(prefix, *option));
        keys.push(stock_holds_key(prefix, *option));
        args.push(units.max(&0).to_string());
    }
    Ok(RELEASE.evalsha_with_reload(client, keys, args).await?)
}

/// Runs [`RETURNED`] for these units per option.
pub(crate) async fn returned(
    client: &Client,
    prefix: &str,
    units: &BTreeMap<ProductOptionId, i64>,
) -> Result<(), LockError> {
    let keys = units.keys().map(|option| stock_mirror_key(prefix, *option)).collect::<Vec<_>>();
    let args = units.values().map(i64::to_string).collect::<Vec<_>>();
    let _: i64 = RETURNED.evalsha_with_reload(client, keys, args).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: i64) -> ProductOptionId {
        ProductOptionId::new(n).unwrap()
    }

    #[test]
    fn every_key_of_a_deployment_shares_one_cluster_slot_and_maps_back_to_its_option() {
        let (mirror, holds) = (stock_mirror_key("shop", id(7)), stock_holds_key("shop", id(12)));
        assert_eq!(mirror, "{shop}:stock:option:7");
        assert_eq!(holds, "{shop}:stock:option:12:holds");
        assert_eq!(fred::util::redis_keyslot(mirror.as_bytes()), fred::util::redis_keyslot(holds.as_bytes()));
        assert_eq!(option_of_key("shop", &mirror), Some(id(7)));
        assert_eq!(option_of_key("shop", &holds), Some(id(12)));
        assert_eq!(option_of_key("shop", "{shop}:lock:option:7"), None);
        assert_eq!(option_of_key("shop", "{other}:stock:option:7"), None);
    }

    #[test]
    fn glob_characters_of_the_prefix_are_escaped_in_the_scan_pattern() {
        assert_eq!(scan_pattern("shop"), "{shop}:stock:option:*");
        assert_eq!(scan_pattern("a*b[1]"), r"{a\*b\[1\]}:stock:option:*");
    }

    #[test]
    fn holds_past_their_deadline_are_dead_and_foreign_fields_too() {
        let now = now_ms();
        let holds = HashMap::from([
            (format!("{}:a", now + 60_000), 3),
            (format!("{}:b", now + 1), 2),
            (format!("{}:c", now - 1), 5),
            ("garbage".to_owned(), 7),
        ]);
        let (live, dead) = split_holds(&holds, now);
        assert_eq!(live, 5);
        assert_eq!(dead, vec![format!("{}:c", now - 1), "garbage".to_owned()]);
        let field = hold_field(Duration::from_secs(10));
        assert!(hold_deadline(&field).is_some_and(|d| d >= now + 10_000), "{field}");
    }
}
