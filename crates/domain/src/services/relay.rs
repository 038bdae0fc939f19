//! The relay: takes recorded events out of the outbox and hands them to every sink, at least once.
//!
//! Every instance runs one. Its hand-over loop claims events no relay has handed over yet, oldest first (other
//! instances' relays skip the claimed rows), delivers each claimed batch whole to the sinks that take batches (a
//! Redis stream, the log: if one fails, the batch goes back and is claimed again after a backoff), queues a
//! delivery per event for the sinks that retry each event on its own (webhooks), and commits. It wakes at once
//! when this instance records events ([`OutboxSignal`]), and polls for the other instances' events.
//!
//! Each per-event sink has a loop of its own: it claims the deliveries that are due (only the oldest pending one
//! of each order, so an order's events arrive in the order they were recorded), delivers them, and records what
//! each attempt came to: delivered; retry after an exponential backoff with jitter; or, after the last attempt
//! allowed, dead-lettered until an admin retries it.
//!
//! Delivery is at least once: a relay that dies after delivering and before committing leaves the events to be
//! delivered again. The event's id is the consumers' deduplication key.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::Notify;

use crate::error::DomainError;
use crate::events::{Attempt, DeliveryStatus, EventRecord, OutboxEvent};
use crate::page::{Page, PageRequest};
use crate::ports::{Clock, EventSink, Outbox, OutboxSignal, RetryPolicy};

/// How the relay works.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayPolicy {
    /// Events one claim takes at most.
    pub batch: u64,
    /// How often the loops look for work nobody told them about (the other instances' events, retries due).
    pub poll: Duration,
    /// Attempts of one event at one per-event sink before it is dead-lettered.
    pub max_attempts: u32,
    /// The backoff between them (its `base` and `cap`; full jitter).
    pub retry: RetryPolicy,
    /// How long events every sink has had are kept.
    pub retention: Duration,
}

/// The relay of this instance; cloning shares it.
#[derive(Clone)]
pub struct Relay {
    inner: Arc<Inner>,
}

struct Inner {
    outbox: Arc<dyn Outbox>,
    sinks: Vec<Arc<dyn EventSink>>,
    clock: Arc<dyn Clock>,
    policy: RelayPolicy,
    /// Wakes the hand-over loop.
    recorded: Notify,
    /// Wakes the per-event sinks' loops (after a hand-over queued deliveries, or an admin retry).
    queued: Notify,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("sinks", &self.inner.sinks.iter().map(|s| s.name().to_owned()).collect::<Vec<_>>())
            .field("policy", &self.inner.policy)
            .finish_non_exhaustive()
    }
}

impl OutboxSignal for Relay {
    fn recorded(&self) {
        self.inner.recorded.notify_one();
    }
}

/// The longest a loop waits after a failure before it tries again.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

impl Relay {
    #[must_use]
    pub fn new(
        outbox: Arc<dyn Outbox>,
        sinks: Vec<Arc<dyn EventSink>>,
        clock: Arc<dyn Clock>,
        policy: RelayPolicy,
    ) -> Self {
        Self { inner: Arc::new(Inner { outbox, sinks, clock, policy, recorded: Notify::new(), queued: Notify::new() }) }
    }

    /// The names of the sinks events go to.
    #[must_use]
    pub fn sinks(&self) -> Vec<String> {
        self.inner.sinks.iter().map(|s| s.name().to_owned()).collect()
    }

    /// One hand-over: claims up to a batch of new events, delivers them to every batch sink, queues them for
    /// every per-event sink, and commits. How many events it handed over.
    ///
    /// # Errors
    /// The outbox's errors; [`DomainError::Unavailable`] when a batch sink failed (the events go back).
    pub async fn hand_over(&self) -> Result<usize, DomainError> {
        let inner = &self.inner;
        let claim = inner.outbox.claim_new(inner.policy.batch).await?;
        let events = claim.events();
        if events.is_empty() {
            return Ok(0);
        }
        let handed = events.len();
        let mut delivered = Vec::new();
        let mut queued = Vec::new();
        for sink in &inner.sinks {
            if sink.per_event() {
                queued.push(sink.name());
                continue;
            }
            if let Some(error) = sink.deliver(events).await.into_iter().find_map(Result::err) {
                metrics::counter!("shop_event_delivery_failures_total", "sink" => sink.name().to_owned()).increment(1);
                // Dropping the claim gives every event back: the sinks that had them get them again.
                return Err(DomainError::unavailable(format!("event sink {} failed: {error}", sink.name())));
            }
            observe_lag(sink.name(), events, inner.clock.now());
            delivered.push(sink.name());
        }
        claim.hand_over(&delivered, &queued, inner.clock.now()).await?;
        if !queued.is_empty() {
            inner.queued.notify_waiters();
        }
        Ok(handed)
    }

    /// One round of a per-event sink: claims its due deliveries, delivers them, records each outcome. How many
    /// it settled.
    ///
    /// # Errors
    /// The outbox's errors.
    pub async fn deliver_due(&self, sink: &dyn EventSink) -> Result<usize, DomainError> {
        let inner = &self.inner;
        let claim = inner.outbox.claim_due(sink.name(), inner.policy.batch, inner.clock.now()).await?;
        if claim.deliveries().is_empty() {
            return Ok(0);
        }
        let events: Vec<OutboxEvent> = claim.deliveries().iter().map(|(event, _)| event.clone()).collect();
        let outcomes = sink.deliver(&events).await;
        let now = inner.clock.now();
        let retry = inner.policy.retry;
        let mut attempts = Vec::with_capacity(events.len());
        for ((event, before), outcome) in claim.deliveries().iter().zip(outcomes) {
            let attempt = match outcome {
                Ok(()) => {
                    observe_lag(sink.name(), std::slice::from_ref(event), now);
                    Attempt::Delivered
                }
                Err(error) => {
                    metrics::counter!("shop_event_delivery_failures_total", "sink" => sink.name().to_owned())
                        .increment(1);
                    let made = before + 1;
                    if made >= inner.policy.max_attempts {
                        tracing::warn!(sink = sink.name(), event = %event.id, attempts = made, %error, "event dead-lettered");
                        Attempt::GaveUp { error }
                    } else {
                        let wait = chrono::Duration::from_std(retry.delay(made)).unwrap_or(chrono::Duration::MAX);
                        Attempt::Retry { error, retry_at: now + wait }
                    }
                }
            };
            attempts.push((event.seq, attempt));
        }
        let settled = attempts.len();
        claim.settle(&attempts, now).await?;
        Ok(settled)
    }

    /// Runs the hand-over loop and one loop per per-event sink, for as long as the server runs.
    pub async fn run(self) {
        let mut loops = vec![tokio::spawn(self.clone().hand_over_loop())];
        for sink in self.inner.sinks.iter().filter(|s| s.per_event()) {
            loops.push(tokio::spawn(self.clone().sink_loop(sink.clone())));
        }
        loops.push(tokio::spawn(self.clone().backlog_loop()));
        for task in loops {
            let _ = task.await;
        }
    }

    async fn hand_over_loop(self) {
        let mut failures = 0;
        loop {
            match self.hand_over().await {
                // A full batch: more are probably waiting.
                Ok(n) if n as u64 >= self.inner.policy.batch => failures = 0,
                Ok(_) => {
                    failures = 0;
                    let _ = tokio::time::timeout(self.inner.policy.poll, self.inner.recorded.notified()).await;
                }
                Err(e) => {
                    failures += 1;
                    let wait = backoff(failures);
                    tracing::warn!(error = %e, retry_in_ms = wait.as_millis(), "handing events over failed");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    async fn sink_loop(self, sink: Arc<dyn EventSink>) {
        let mut failures = 0;
        loop {
            match self.deliver_due(sink.as_ref()).await {
                Ok(0) => {
                    failures = 0;
                    let _ = tokio::time::timeout(self.inner.policy.poll, self.inner.queued.notified()).await;
                }
                Ok(_) => failures = 0,
                Err(e) => {
                    failures += 1;
                    let wait = backoff(failures);
                    tracing::warn!(sink = sink.name(), error = %e, retry_in_ms = wait.as_millis(), "delivering events failed");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    async fn backlog_loop(self) {
        loop {
            if let Ok(backlog) = self.inner.outbox.backlog().await {
                #[allow(clippy::cast_precision_loss)] // a count of rows
                metrics::gauge!("shop_outbox_backlog").set(backlog as f64);
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    }

    /// Deletes the events every sink has had, once they are older than the retention.
    ///
    /// # Errors
    /// The outbox's errors.
    pub async fn prune(&self) -> Result<u64, DomainError> {
        let retention = chrono::Duration::from_std(self.inner.policy.retention).unwrap_or(chrono::Duration::MAX);
        self.inner.outbox.prune(self.inner.clock.now() - retention).await
    }

    /// Events with where they stand, for the admin API.
    ///
    /// # Errors
    /// The outbox's errors.
    pub async fn list(
        &self,
        status: Option<DeliveryStatus>,
        page: PageRequest,
    ) -> Result<Page<EventRecord>, DomainError> {
        self.inner.outbox.list(status, page).await
    }

    /// Puts a dead-lettered event back to be delivered again at once.
    ///
    /// # Errors
    /// [`DomainError::EventNotFound`]; [`DomainError::EventNotFailed`] when no sink dead-lettered it.
    pub async fn retry(&self, id: &str) -> Result<EventRecord, DomainError> {
        let outbox = &self.inner.outbox;
        if outbox.find(id).await?.is_none() {
            return Err(DomainError::EventNotFound(id.to_owned()));
        }
        if !outbox.retry_failed(id, self.inner.clock.now()).await? {
            return Err(DomainError::EventNotFailed(id.to_owned()));
        }
        // Read before the relay is woken: the answer is the event as the retry left it (pending), not whatever
        // the relay made of it a moment later.
        let requeued = outbox.find(id).await?.ok_or_else(|| DomainError::EventNotFound(id.to_owned()))?;
        self.inner.queued.notify_waiters();
        Ok(requeued)
    }
}

/// From recording to delivery, per sink.
fn observe_lag(sink: &str, events: &[OutboxEvent], now: DateTime<Utc>) {
    let lag = metrics::histogram!("shop_event_delivery_lag_seconds", "sink" => sink.to_owned());
    for event in events {
        lag.record((now - event.occurred_at).to_std().unwrap_or_default());
    }
}

/// 100 ms doubling per failure, at most [`MAX_BACKOFF`].
fn backoff(failures: u32) -> Duration {
    Duration::from_millis(100).saturating_mul(2u32.saturating_pow(failures.min(10))).min(MAX_BACKOFF)
}
