//! Catalogue changes between instances: each instance publishes on `<prefix>:catalogue` what a commit changed
//! (the options whose stock moved, or "the catalogue" when a product was added), and every instance drops those
//! entries from its read cache when it hears of them. Pub/sub delivers at most once: a message lost while Redis
//! or a subscriber was away only lets an entry live out its staleness bound, which is the guarantee; the
//! messages only make it sooner.

use std::time::Duration;

use fred::clients::SubscriberClient;
use fred::prelude::{Client, ClientLike, EventInterface, PubsubInterface};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::lock::{self, LockError};
use crate::node;

/// A publish waits at most this long: a Redis that is away must not hold up anything behind it.
const COMMAND_TIMEOUT: Duration = Duration::from_millis(500);

/// Changes waiting to be published; past this many (Redis slow or away) new ones are dropped, which the
/// staleness bound covers.
const BACKLOG: usize = 4096;

/// What one commit changed in the catalogue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CatalogueChange {
    /// These options' stock moved.
    Stock(Vec<i64>),
    /// A product was added: pages, totals and rankings.
    Products,
}

impl CatalogueChange {
    /// `<origin> s 1,2,3` or `<origin> p`.
    fn encode(&self, origin: &str) -> String {
        match self {
            Self::Stock(options) => {
                let ids: Vec<String> = options.iter().map(i64::to_string).collect();
                format!("{origin} s {}", ids.join(","))
            }
            Self::Products => format!("{origin} p"),
        }
    }

    /// The change and its origin; `None` for a message this module did not write.
    fn decode(message: &str) -> Option<(&str, Self)> {
        let mut parts = message.splitn(3, ' ');
        let origin = parts.next()?;
        match (parts.next()?, parts.next()) {
            ("p", None) => Some((origin, Self::Products)),
            ("s", Some(ids)) => {
                let options = ids.split(',').map(str::parse).collect::<Result<Vec<i64>, _>>().ok()?;
                Some((origin, Self::Stock(options)))
            }
            _ => None,
        }
    }
}

/// The channel's name for a key prefix (the deployment's, with its database id).
#[must_use]
pub fn catalogue_channel(prefix: &str) -> String {
    format!("{prefix}:catalogue")
}

/// This instance's end of the channel: [`CatalogueChannel::publish`] sends, and what the other instances
/// publish arrives on the receiver [`CatalogueChannel::connect`] returns.
#[derive(Debug)]
pub struct CatalogueChannel {
    outgoing: mpsc::Sender<CatalogueChange>,
    tasks: Vec<JoinHandle<()>>,
    subscriber: SubscriberClient,
}

impl CatalogueChannel {
    /// Connects a publisher and a subscriber to `url`. A server that is down is retried in the background, so
    /// start-up does not wait for it: meanwhile changes are not shared, and caches rely on their bound.
    ///
    /// # Errors
    /// [`LockError::Redis`] for a URL fred cannot use.
    pub fn connect(url: &str, prefix: &str) -> Result<(Self, mpsc::UnboundedReceiver<CatalogueChange>), LockError> {
        let channel = catalogue_channel(prefix);
        let origin = lock::new_token();
        // Neither fails fast: while Redis is away, a publish waits out its command timeout in the background, and
        // the subscriber reconnects and subscribes again.
        let publisher: Client = node::builder(url, COMMAND_TIMEOUT)?.with_config(|c| c.fail_fast = false).build()?;
        let subscriber = node::builder(url, COMMAND_TIMEOUT)?
            .with_config(|c| c.fail_fast = false)
            .with_performance_config(|p| p.broadcast_channel_capacity = BACKLOG)
            .build_subscriber_client()?;
        let (outgoing, mut queued) = mpsc::channel::<CatalogueChange>(BACKLOG);
        let (heard, incoming) = mpsc::unbounded_channel();
        let mut messages = subscriber.message_rx();
        let mut tasks = Vec::new();
        let (publishing, name, me) = (publisher.clone(), channel.clone(), origin.clone());
        tasks.push(tokio::spawn(async move {
            // Connects in the background and reconnects after losing the server (fred's policy).
            let _ = publishing.init().await;
            while let Some(change) = queued.recv().await {
                let sent: Result<i64, _> = publishing.publish(name.as_str(), change.encode(&me)).await;
                if let Err(e) = sent {
                    tracing::debug!(error = %e, "a catalogue change was not published; other instances' caches expire it");
                }
            }
        }));
        tasks.push(tokio::spawn(async move {
            loop {
                match messages.recv().await {
                    Ok(message) => {
                        let Some(text) = message.value.as_str() else { continue };
                        match CatalogueChange::decode(&text) {
                            Some((from, change)) if from != origin => {
                                if heard.send(change).is_err() {
                                    return;
                                }
                            }
                            Some(_) => {}
                            None => tracing::warn!(text = %text, "an unreadable catalogue message"),
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::warn!(missed, "catalogue messages missed; caches expire what they named");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        }));
        let subscribing = subscriber.clone();
        tasks.push(tokio::spawn(async move {
            let _ = subscribing.init().await;
            // Subscribed once, fred's subscription manager keeps the channel across reconnections.
            let _resubscriber = subscribing.manage_subscriptions();
            while subscribing.subscribe(channel.clone()).await.is_err() {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }));
        Ok((Self { outgoing, tasks, subscriber }, incoming))
    }

    /// Queues `change` for the other instances; never waits (a full backlog drops it).
    pub fn publish(&self, change: CatalogueChange) {
        if self.outgoing.try_send(change).is_err() {
            tracing::debug!("catalogue changes back up; one dropped (caches expire it)");
        }
    }
}

impl Drop for CatalogueChannel {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let subscriber = self.subscriber.clone();
            runtime.spawn(async move {
                let _ = subscriber.quit().await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_read_back_as_written() {
        for change in [CatalogueChange::Stock(vec![1, 22, 333]), CatalogueChange::Products] {
            let text = change.encode("me");
            assert_eq!(CatalogueChange::decode(&text), Some(("me", change)));
        }
        assert_eq!(CatalogueChange::decode("me s 1,x"), None);
        assert_eq!(CatalogueChange::decode("garbage"), None);
    }
}
