//! Failed sign-ins counted per key (a name, a client address) with governor's GCRA, on the domain's clock.
//!
//! Each key may fail `failures` times in a burst, then earns one more attempt every `window / failures`. A
//! failure past the burst locks the key until its next attempt is due, and while it is locked every attempt is
//! refused before its password is checked, right or wrong. governor counts; the lock-out is the moment it said
//! the key may try again. Keys are pruned as they cool down, so a flood of invented names costs bounded memory.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use governor::clock::Clock as GovernorClock;
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use shop_domain::DomainError;
use shop_domain::auth::ThrottleQuota;
use shop_domain::ports::{Clock, SignInThrottle};

/// governor's quota of a [`ThrottleQuota`]: a burst of `failures`, one more every `window / failures`.
fn quota(q: ThrottleQuota) -> Result<Quota, String> {
    let burst = NonZeroU32::new(q.failures).ok_or("failures must be at least 1")?;
    let period = q.window.checked_div(q.failures).filter(|p| !p.is_zero()).ok_or("the window is too short")?;
    Ok(Quota::with_period(period).ok_or("the window is too short")?.allow_burst(burst))
}

/// The domain's clock as governor reads time: the time since the epoch. Tests that move the service's clock
/// forward move the throttle's with it.
#[derive(Clone)]
struct DomainClock(Arc<dyn Clock>);

impl GovernorClock for DomainClock {
    type Instant = Duration;

    fn now(&self) -> Duration {
        epoch(self.0.now())
    }
}

fn epoch(at: DateTime<Utc>) -> Duration {
    Duration::from_nanos(u64::try_from(at.timestamp_nanos_opt().unwrap_or(0)).unwrap_or(0))
}

type Limiter = RateLimiter<String, DefaultKeyedStateStore<String>, DomainClock, NoOpMiddleware<Duration>>;

/// The in-process throttle: right for one instance (an embedded shop, or a test); with Redis configured, the
/// service uses the one in `shop-redis`, which every instance shares.
pub struct GovernorThrottle {
    /// (limiter, quota) per kind of key, picked by the key's prefix (`name:`, `client:`).
    names: Limiter,
    clients: Limiter,
    clock: DomainClock,
    /// When each locked key may try again.
    locked: Mutex<HashMap<String, Duration>>,
    failures: AtomicU64,
}

impl std::fmt::Debug for GovernorThrottle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GovernorThrottle").finish_non_exhaustive()
    }
}

/// Failures between two prunings of cooled-down keys.
const PRUNE_EVERY: u64 = 1024;

impl GovernorThrottle {
    /// `names` bounds the failures of one name, `clients` those of one client address (several users may
    /// share an address, so it is the larger).
    ///
    /// # Errors
    /// A message when a quota is empty or its window too short.
    pub fn new(names: ThrottleQuota, clients: ThrottleQuota, clock: Arc<dyn Clock>) -> Result<Self, String> {
        let clock = DomainClock(clock);
        Ok(Self {
            names: RateLimiter::new(quota(names)?, DefaultKeyedStateStore::default(), clock.clone()),
            clients: RateLimiter::new(quota(clients)?, DefaultKeyedStateStore::default(), clock.clone()),
            clock,
            locked: Mutex::default(),
            failures: AtomicU64::new(0),
        })
    }

    fn limiter(&self, key: &str) -> &Limiter {
        if key.starts_with("client:") { &self.clients } else { &self.names }
    }
}

fn retry_after(wait: Duration) -> DomainError {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    DomainError::TooManyAttempts { retry_after_secs: u32::try_from(secs.max(1)).unwrap_or(u32::MAX) }
}

#[async_trait]
impl SignInThrottle for GovernorThrottle {
    async fn check(&self, keys: &[String], now: DateTime<Utc>) -> Result<(), DomainError> {
        let now = epoch(now);
        let locked = self.locked.lock().unwrap_or_else(PoisonError::into_inner);
        let wait = keys.iter().filter_map(|k| locked.get(k)).filter(|until| **until > now).max();
        match wait {
            Some(until) => Err(retry_after(*until - now)),
            None => Ok(()),
        }
    }

    async fn failed(&self, keys: &[String], now: DateTime<Utc>) -> Result<(), DomainError> {
        let now = epoch(now);
        let mut refused = None;
        for key in keys {
            if let Err(not_until) = self.limiter(key).check_key(key) {
                let wait = not_until.wait_time_from(self.clock.now());
                self.locked.lock().unwrap_or_else(PoisonError::into_inner).insert(key.clone(), now + wait);
                refused = refused.max(Some(wait));
            }
        }
        if self.failures.fetch_add(1, Ordering::Relaxed) % PRUNE_EVERY == PRUNE_EVERY - 1 {
            self.names.retain_recent();
            self.clients.retain_recent();
            self.locked.lock().unwrap_or_else(PoisonError::into_inner).retain(|_, until| *until > now);
        }
        refused.map_or(Ok(()), |wait| Err(retry_after(wait)))
    }
}

#[cfg(test)]
mod tests {
    use shop_domain::ports::ShiftedClock;

    use super::*;

    fn throttle(clock: Arc<ShiftedClock>) -> GovernorThrottle {
        let names = ThrottleQuota { failures: 5, window: Duration::from_secs(60) };
        let clients = ThrottleQuota { failures: 50, window: Duration::from_secs(60) };
        GovernorThrottle::new(names, clients, clock).unwrap()
    }

    #[tokio::test]
    async fn a_name_that_fails_past_its_burst_is_locked_until_it_cools_down() {
        let clock = Arc::new(ShiftedClock::default());
        let t = throttle(clock.clone());
        let kim = vec!["name:kim".to_owned()];
        for _ in 0..5 {
            t.check(&kim, clock.now()).await.unwrap();
            t.failed(&kim, clock.now()).await.unwrap();
        }
        let Err(DomainError::TooManyAttempts { retry_after_secs }) = t.failed(&kim, clock.now()).await else {
            panic!("the sixth failure is one too many")
        };
        assert!((1..=12).contains(&retry_after_secs), "one attempt per 12 s: {retry_after_secs}");
        assert!(t.check(&kim, clock.now()).await.is_err(), "locked, right password or not");
        assert!(t.check(&["name:lee".to_owned()], clock.now()).await.is_ok(), "other names are not");
        clock.advance(Duration::from_secs(u64::from(retry_after_secs)));
        assert!(t.check(&kim, clock.now()).await.is_ok(), "cooled down");
    }

    #[tokio::test]
    async fn an_address_is_throttled_across_names() {
        let clock = Arc::new(ShiftedClock::default());
        let t = throttle(clock.clone());
        let mut refused = 0;
        for n in 0..60 {
            let keys = vec![format!("name:user{n}"), "client:10.0.0.9".to_owned()];
            refused += usize::from(t.failed(&keys, clock.now()).await.is_err());
        }
        assert_eq!(refused, 10, "fifty failures from one address, then refused");
        assert!(t.check(&["name:new".to_owned(), "client:10.0.0.9".to_owned()], clock.now()).await.is_err());
    }
}
