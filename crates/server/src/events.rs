//! The sinks of the outbox that live in the server: signed webhooks, and the log (the embedded mode's sink).
//! The Redis stream sink is `shop_redis::RedisStreamSink`.

use std::time::Duration;

use async_trait::async_trait;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use shop_domain::events::OutboxEvent;
use shop_domain::ports::EventSink;

/// Logs every event at `info` (target `shop::events`): where events go when nothing else is configured.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogSink;

#[async_trait]
impl EventSink for LogSink {
    fn name(&self) -> &str {
        "log"
    }

    fn per_event(&self) -> bool {
        false
    }

    async fn deliver(&self, events: &[OutboxEvent]) -> Vec<Result<(), String>> {
        for e in events {
            tracing::info!(target: "shop::events", id = %e.id, kind = %e.kind, order_id = e.order_id.get(), "event");
        }
        events.iter().map(|_| Ok(())).collect()
    }
}

/// Makes ring the process's TLS provider, which reqwest (built without one of its own) needs before any client is
/// built: ring is the provider the tree already has (sqlx, jsonwebtoken). A second call is a no-op.
pub fn install_crypto_provider() {
    // Refused only when a provider is installed already, which is what was asked.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// An endpoint events are POSTed to, as `SHOP_WEBHOOKS` configures it.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Webhook {
    pub url: String,
    pub secret: String,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook").field("url", &crate::config::redact_url(&self.url)).field("secret", &"<set>").finish()
    }
}

/// POSTs each event's envelope to one endpoint, signed (`Shop-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256
/// of "<t>.<body>">`); any answer but a 2xx within the timeout is a failed attempt, which the relay retries with
/// backoff and dead-letters after the configured attempts.
#[derive(Debug, Clone)]
pub struct WebhookSink {
    name: String,
    webhook: Webhook,
    client: reqwest::Client,
}

/// The signature header's name.
pub const SIGNATURE_HEADER: &str = "Shop-Signature";

/// `t=<t>,v1=<hex HMAC-SHA256 of "<t>.<body>" with `secret`>`.
#[must_use]
pub fn signature(secret: &[u8], t: i64, body: &str) -> String {
    // HMAC takes a key of any length.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap_or_else(|_| unreachable!("HMAC accepts any key"));
    mac.update(format!("{t}.{body}").as_bytes());
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

impl WebhookSink {
    /// # Errors
    /// The HTTP client's error when it cannot be built (no TLS provider).
    pub fn new(webhook: Webhook, timeout: Duration) -> Result<Self, reqwest::Error> {
        install_crypto_provider();
        let client = reqwest::Client::builder().timeout(timeout).build()?;
        Ok(Self { name: format!("webhook:{}", webhook.url), webhook, client })
    }

    async fn post(&self, event: &OutboxEvent) -> Result<(), String> {
        let t = chrono::Utc::now().timestamp();
        let signed = signature(self.webhook.secret.as_bytes(), t, &event.envelope);
        let answer = self
            .client
            .post(&self.webhook.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(SIGNATURE_HEADER, signed)
            .header("Shop-Event-Id", event.id.as_str())
            .body(event.envelope.clone())
            .send()
            .await
            .map_err(|e| crate::config::redact_urls(&e.to_string()))?;
        let status = answer.status();
        if status.is_success() { Ok(()) } else { Err(format!("answered {status}")) }
    }
}

#[async_trait]
impl EventSink for WebhookSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn per_event(&self) -> bool {
        true
    }

    /// At once for every event claimed: the claim holds at most one event per order, so no order's events
    /// overtake each other.
    async fn deliver(&self, events: &[OutboxEvent]) -> Vec<Result<(), String>> {
        futures::future::join_all(events.iter().map(|e| self.post(e))).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_the_hmac_of_the_timestamp_and_the_body() {
        // RFC 4231-style check against an independent computation of HMAC-SHA256.
        let signed = signature(b"key", 1_700_000_000, "{}");
        let mut mac = Hmac::<Sha256>::new_from_slice(b"key").unwrap();
        mac.update(b"1700000000.{}");
        assert_eq!(signed, format!("t=1700000000,v1={}", hex::encode(mac.finalize().into_bytes())));
        assert_ne!(signature(b"other", 1_700_000_000, "{}"), signed);
        assert_ne!(signature(b"key", 1_700_000_001, "{}"), signed);
        // The well-known RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
