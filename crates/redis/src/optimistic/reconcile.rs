//! Reconciliation: the mirror against the database's stock minus the reservations in flight.
//!
//! A first pass reads every mirrored option in bulk (one SCAN, one database query, one MGET, the holds) and
//! picks the ones that look wrong. Each of those is then looked at alone on a dedicated connection: WATCH its
//! two keys, read them, read the database, wait [`QUIET`], read the database again, and write the repair in a
//! MULTI/EXEC only if the database did not move and the EXEC is not aborted (Redis did not move). An option
//! busy with orders is left for the next run: a commit whose settle is still on its way looks exactly like
//! drift for a moment, and must not be "repaired".

use std::collections::{BTreeSet, HashMap};
use std::fmt;

use fred::prelude::{Client, HashesInterface, KeysInterface, TransactionInterface};
use fred::types::Value;
use futures::TryStreamExt;
use futures::future::try_join_all;
use shop_domain::DomainError;
use shop_domain::ids::ProductOptionId;

use super::mirror::{now_ms, option_of_key, scan_pattern, split_holds};
use super::{Inner, QUIET, redis_error};

/// What one reconciliation found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Options with a mirror or holds in Redis.
    pub checked: usize,
    /// The options it changed, and how.
    pub repairs: Vec<Repair>,
    /// Options that looked drifted but kept moving (orders in flight): left for the next run.
    pub busy: Vec<ProductOptionId>,
}

/// One option's repair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repair {
    pub option_id: ProductOptionId,
    /// The mirror before (`None`: not loaded).
    pub mirror_before: Option<i64>,
    /// The database's stock (`None`: the option has no row, and its keys were deleted).
    pub database: Option<i64>,
    /// Units of the holds still in flight, which the mirror must not offer.
    pub in_flight: i64,
    /// The mirror after.
    pub mirror_after: Option<i64>,
    /// Holds past their deadline (their holder died) that were deleted.
    pub reaped_holds: usize,
}

impl fmt::Display for Repair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |v: Option<i64>| v.map_or_else(|| "absent".to_owned(), |v| v.to_string());
        write!(
            f,
            "option {}: mirror {} -> {} (database {}, in flight {}, dead holds reaped {})",
            self.option_id,
            show(self.mirror_before),
            show(self.mirror_after),
            show(self.database),
            self.in_flight,
            self.reaped_holds
        )
    }
}

impl fmt::Display for ReconcileReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "checked {} mirrored options: {} repaired, {} busy (left for the next run)",
            self.checked,
            self.repairs.len(),
            self.busy.len()
        )?;
        for repair in &self.repairs {
            write!(f, "\n{repair}")?;
        }
        for option in &self.busy {
            write!(f, "\noption {option}: busy")?;
        }
        Ok(())
    }
}

/// What an option's keys should become.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Fix {
    /// Right as it is.
    Nothing,
    /// Set the mirror (`Some`) or leave an absent one to the next loader (`None`), and delete these dead holds.
    Update { mirror: Option<i64>, reap: Vec<String> },
    /// The option has no row: delete its mirror and holds.
    Delete,
}

/// Decides an option's repair from one reading of both stores.
fn decide(mirror: Option<i64>, database: Option<i64>, holds: &HashMap<String, i64>, now: u64) -> (Fix, i64) {
    let (live, reap) = split_holds(holds, now);
    let Some(stock) = database else {
        let fix = if mirror.is_some() || !holds.is_empty() { Fix::Delete } else { Fix::Nothing };
        return (fix, live);
    };
    let target = mirror.map(|_| stock - live);
    if target == mirror && reap.is_empty() {
        return (Fix::Nothing, live);
    }
    (Fix::Update { mirror: target, reap }, live)
}

pub(super) async fn run(inner: &Inner) -> Result<ReconcileReport, DomainError> {
    let ids: BTreeSet<ProductOptionId> = inner
        .client
        .scan_buffered(scan_pattern(&inner.prefix), Some(500), None)
        .try_collect::<Vec<_>>()
        .await
        .map_err(redis_error)?
        .iter()
        .filter_map(|key| option_of_key(&inner.prefix, key.as_str()?))
        .collect();
    let ids: Vec<ProductOptionId> = ids.into_iter().collect();
    let mut report = ReconcileReport { checked: ids.len(), ..ReconcileReport::default() };
    if ids.is_empty() {
        return Ok(report);
    }
    let rows = inner.levels.stock_levels(&ids).await?;
    let mirrors: Vec<Option<i64>> =
        inner.client.mget(ids.iter().map(|id| inner.mirror_key(*id)).collect::<Vec<_>>()).await.map_err(redis_error)?;
    let holds: Vec<HashMap<String, i64>> =
        try_join_all(ids.iter().map(|id| inner.client.hgetall(inner.holds_key(*id)))).await.map_err(redis_error)?;
    let now = now_ms();
    for ((id, mirror), holds) in ids.iter().zip(mirrors).zip(&holds) {
        let database = rows.iter().find(|r| r.option_id == *id).map(|r| r.stock.get());
        if decide(mirror, database, holds, now).0 == Fix::Nothing {
            continue;
        }
        match repair(inner, *id).await? {
            Outcome::Consistent => {}
            Outcome::Repaired(repair) => {
                tracing::warn!(
                    option = %repair.option_id,
                    mirror_before = ?repair.mirror_before,
                    database = ?repair.database,
                    in_flight = repair.in_flight,
                    mirror_after = ?repair.mirror_after,
                    reaped_holds = repair.reaped_holds,
                    "the stock mirror had drifted from the database; repaired"
                );
                report.repairs.push(repair);
            }
            Outcome::Busy => report.busy.push(*id),
        }
    }
    Ok(report)
}

enum Outcome {
    Consistent,
    Repaired(Repair),
    Busy,
}

/// Tries a few times to repair one option while nothing else touches it.
async fn repair(inner: &Inner, id: ProductOptionId) -> Result<Outcome, DomainError> {
    const TRIES: usize = 3;
    for _ in 0..TRIES {
        let client = inner.pool.acquire().await;
        let outcome = repair_once(inner, &client, id).await;
        if outcome.is_err() {
            // Whatever failed, the next user of this connection must not inherit the WATCH.
            let _ = client.unwatch().await;
        }
        if let Some(outcome) = outcome? {
            return Ok(outcome);
        }
    }
    Ok(Outcome::Busy)
}

/// One watched look at the option: `None` when something moved meanwhile.
async fn repair_once(inner: &Inner, client: &Client, id: ProductOptionId) -> Result<Option<Outcome>, DomainError> {
    let (mirror_key, holds_key) = (inner.mirror_key(id), inner.holds_key(id));
    client.watch(vec![mirror_key.clone(), holds_key.clone()]).await.map_err(redis_error)?;
    let mirror: Option<i64> = client.get(&mirror_key).await.map_err(redis_error)?;
    let holds: HashMap<String, i64> = client.hgetall(&holds_key).await.map_err(redis_error)?;
    let database = database_stock(inner, id).await?;
    let (fix, in_flight) = decide(mirror, database, &holds, now_ms());
    if fix == Fix::Nothing {
        client.unwatch().await.map_err(redis_error)?;
        return Ok(Some(Outcome::Consistent));
    }
    // A commit is followed by its settle within moments: if the database still reads the same after this,
    // and the EXEC below is not aborted, no order was between its commit and its settle.
    tokio::time::sleep(QUIET).await;
    if database_stock(inner, id).await? != database {
        client.unwatch().await.map_err(redis_error)?;
        return Ok(None);
    }
    let trx = client.multi();
    let (mirror_after, reaped_holds) = match &fix {
        Fix::Nothing => (mirror, 0),
        Fix::Delete => {
            let () = trx.del(vec![mirror_key, holds_key]).await.map_err(redis_error)?;
            (None, holds.len())
        }
        Fix::Update { mirror: target, reap } => {
            if let Some(target) = target {
                let () = trx.set(mirror_key, *target, None, None, false).await.map_err(redis_error)?;
            }
            if !reap.is_empty() {
                let () = trx.hdel(holds_key, reap.clone()).await.map_err(redis_error)?;
            }
            (*target, reap.len())
        }
    };
    match trx.exec::<Value>(true).await.map_err(redis_error)? {
        Value::Null => Ok(None),
        _ => Ok(Some(Outcome::Repaired(Repair {
            option_id: id,
            mirror_before: mirror,
            database,
            in_flight,
            mirror_after,
            reaped_holds,
        }))),
    }
}

async fn database_stock(inner: &Inner, id: ProductOptionId) -> Result<Option<i64>, DomainError> {
    Ok(inner.levels.stock_levels(&[id]).await?.first().map(|row| row.stock.get()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holds(now: u64, entries: &[(i64, i64)]) -> HashMap<String, i64> {
        // (offset from now in ms, units)
        entries
            .iter()
            .enumerate()
            .map(|(i, (offset, units))| (format!("{}:{i}", now.saturating_add_signed(*offset)), *units))
            .collect()
    }

    #[test]
    fn a_mirror_equal_to_the_database_minus_holds_in_flight_is_left_alone() {
        let now = now_ms();
        assert_eq!(decide(Some(7), Some(10), &holds(now, &[(60_000, 3)]), now), (Fix::Nothing, 3));
    }

    #[test]
    fn a_drifted_mirror_is_set_to_the_database_minus_holds_in_flight() {
        let now = now_ms();
        assert_eq!(
            decide(Some(12), Some(10), &holds(now, &[(60_000, 1)]), now),
            (Fix::Update { mirror: Some(9), reap: vec![] }, 1)
        );
    }

    #[test]
    fn dead_holds_are_reaped_and_no_longer_count() {
        let now = now_ms();
        let h = holds(now, &[(-1, 2), (60_000, 1)]);
        let dead = format!("{}:0", now - 1);
        assert_eq!(decide(Some(7), Some(10), &h, now), (Fix::Update { mirror: Some(9), reap: vec![dead] }, 1));
    }

    #[test]
    fn an_absent_mirror_is_left_to_the_next_loader() {
        let now = now_ms();
        assert_eq!(decide(None, Some(10), &HashMap::new(), now), (Fix::Nothing, 0));
    }

    #[test]
    fn keys_of_an_option_without_a_row_are_deleted() {
        let now = now_ms();
        assert_eq!(decide(Some(3), None, &HashMap::new(), now), (Fix::Delete, 0));
        assert_eq!(decide(None, None, &HashMap::new(), now), (Fix::Nothing, 0));
    }
}
