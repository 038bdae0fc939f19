//! The Redis stream sink of the outbox: every event appended to `{prefix}:events` (`XADD ... MAXLEN ~`), so that
//! consumers read it with consumer groups. Each entry has the fields `id` (the event's id, the deduplication
//! key), `type` and `envelope` (the JSON every sink delivers).

use std::time::Duration;

use async_trait::async_trait;
use fred::prelude::{Client, StreamsInterface};
use shop_domain::events::OutboxEvent;
use shop_domain::ports::EventSink;

use crate::lock::LockError;
use crate::node;

/// Every append fails after this instead of holding up the relay.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// The Redis key of the events stream under `prefix` (`SHOP_REDIS_KEY_PREFIX`).
#[must_use]
pub fn events_stream_key(prefix: &str) -> String {
    format!("{prefix}:events")
}

#[derive(Debug, Clone)]
pub struct RedisStreamSink {
    client: Client,
    key: String,
    max_len: u64,
}

impl RedisStreamSink {
    /// Connects to `url`; the stream keeps about `max_len` entries (older ones are trimmed).
    ///
    /// # Errors
    /// [`LockError::Redis`] when the server cannot be reached within about a second.
    pub async fn connect(url: &str, prefix: &str, max_len: u64) -> Result<Self, LockError> {
        let client = node::builder(url, COMMAND_TIMEOUT)?.build()?;
        node::init(&client).await?;
        Ok(Self { client, key: events_stream_key(prefix), max_len })
    }
}

#[async_trait]
impl EventSink for RedisStreamSink {
    fn name(&self) -> &str {
        "redis-stream"
    }

    fn per_event(&self) -> bool {
        false
    }

    /// One pipeline of appends for the whole batch: all delivered, or all failed (the relay then gives the batch
    /// back, and appends what Redis already had again; consumers drop the duplicates by id).
    async fn deliver(&self, events: &[OutboxEvent]) -> Vec<Result<(), String>> {
        let pipeline = self.client.pipeline();
        for event in events {
            let fields =
                vec![("id", event.id.as_str()), ("type", event.kind.as_str()), ("envelope", event.envelope.as_str())];
            let queued: Result<(), _> =
                pipeline.xadd(self.key.as_str(), false, ("MAXLEN", "~", self.max_len), "*", fields).await;
            if let Err(e) = queued {
                return events.iter().map(|_| Err(e.to_string())).collect();
            }
        }
        match pipeline.all::<fred::types::Value>().await {
            Ok(_) => events.iter().map(|_| Ok(())).collect(),
            Err(e) => events.iter().map(|_| Err(e.to_string())).collect(),
        }
    }
}
