//! Idempotency keys: a retried request replays the first one's response instead of acting again.
//!
//! A key is claimed in a short transaction of its own; the use case then writes the response it produced into
//! the claim *inside its own transaction*, so the effect and the record commit together: a crash between them
//! can neither apply twice nor lose the record.

use std::fmt;
use std::sync::Arc;

use crate::error::{DomainError, InvalidValue};
use crate::ids::UserId;
use crate::ports::IdempotencyTx;

/// A client's `Idempotency-Key`: 1..=255 printable ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// # Errors
    /// [`InvalidValue`] when empty, longer than 255, or not printable ASCII.
    pub fn new(raw: &str) -> Result<Self, InvalidValue> {
        if raw.is_empty() || raw.len() > 255 || !raw.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
            return Err(InvalidValue::new("Idempotency-Key", "must be 1 to 255 printable ASCII characters"));
        }
        Ok(Self(raw.to_owned()))
    }

    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The response a request produced, as the client saw it: replayed byte for byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    pub status: u16,
    pub body: String,
}

impl StoredResponse {
    /// A 5xx is the server's failure, not the request's outcome: it is never stored, so the client may retry
    /// with the same key.
    #[must_use]
    pub const fn is_storable(&self) -> bool {
        self.status < 500
    }
}

/// A key this request holds: `token` changes with every claim, so a holder whose claim expired and was taken
/// over cannot complete it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyClaim {
    pub id: i64,
    pub user_id: UserId,
    pub key: IdempotencyKey,
    pub token: i64,
}

/// What claiming a key found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// The key is this request's to run.
    Claimed(IdempotencyClaim),
    /// The same request already ran: replay this.
    Completed(StoredResponse),
    /// The key was used with a different request.
    Mismatch,
    /// The key's first request is still running.
    InUse,
}

/// Turns a use case's outcome into the response the client gets.
pub type Render<T> = Arc<dyn Fn(&Result<T, DomainError>) -> StoredResponse + Send + Sync>;

/// Handed to a use case so that it records its response inside its own transaction, just before the commit.
/// It owns what it needs, so that a use case may hand it on to the task that commits a batch.
pub struct Recorder<T> {
    claim: IdempotencyClaim,
    render: Render<T>,
}

impl<T> Clone for Recorder<T> {
    fn clone(&self) -> Self {
        Self { claim: self.claim.clone(), render: Arc::clone(&self.render) }
    }
}

impl<T> fmt::Debug for Recorder<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Recorder").field("claim", &self.claim).finish_non_exhaustive()
    }
}

impl<T> Recorder<T> {
    #[must_use]
    pub fn new(claim: IdempotencyClaim, render: Render<T>) -> Self {
        Self { claim, render }
    }

    /// Records `outcome`'s response in `tx`.
    ///
    /// # Errors
    /// [`DomainError::IdempotencyKeyInUse`] when the claim is no longer this request's (it outlived its lease
    /// and another request took the key over): the caller's transaction must then roll back.
    pub async fn record_in(
        &self,
        tx: &mut dyn IdempotencyTx,
        outcome: &Result<T, DomainError>,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), DomainError> {
        let response = (self.render)(outcome);
        if response.is_storable() && !tx.record_response(&self.claim, &response, now).await? {
            return Err(DomainError::IdempotencyKeyInUse);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_printable_ascii_up_to_255() {
        assert!(IdempotencyKey::new("a").is_ok());
        assert!(IdempotencyKey::new(&"k".repeat(255)).is_ok());
        assert!(IdempotencyKey::new(&"k".repeat(256)).is_err());
        assert!(IdempotencyKey::new("").is_err());
        assert!(IdempotencyKey::new("tab\there").is_err());
        assert!(IdempotencyKey::new("ключ").is_err());
        assert_eq!(IdempotencyKey::new("order 42 / try").unwrap().as_str(), "order 42 / try");
    }

    #[test]
    fn server_failures_are_not_stored() {
        assert!(StoredResponse { status: 409, body: String::new() }.is_storable());
        assert!(!StoredResponse { status: 503, body: String::new() }.is_storable());
    }
}
