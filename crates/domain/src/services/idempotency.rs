//! Claiming Idempotency-Keys before a request runs, and settling them after.

use std::sync::Arc;
use std::time::Duration;

use crate::error::DomainError;
use crate::idempotency::{ClaimOutcome, IdempotencyClaim, IdempotencyKey, StoredResponse};
use crate::ids::UserId;
use crate::ports::{Clock, IdempotencyStore, UnitOfWork};

/// What the caller does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claimed {
    /// Run the request, handing the use case a recorder of this claim.
    Run(IdempotencyClaim),
    /// Answer this without running anything.
    Replay(StoredResponse),
}

#[derive(Clone)]
pub struct IdempotencyService {
    store: Arc<dyn IdempotencyStore>,
    uow: Arc<dyn UnitOfWork>,
    clock: Arc<dyn Clock>,
    /// How long a key is kept: 24 hours by the contract.
    ttl: Duration,
    /// How long a claim is held for a running request; past it, the holder is presumed dead and a retry may
    /// take the key over. Longer than any request may run.
    lease: Duration,
}

impl std::fmt::Debug for IdempotencyService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyService").field("ttl", &self.ttl).field("lease", &self.lease).finish_non_exhaustive()
    }
}

fn chrono_of(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

impl IdempotencyService {
    pub fn new(
        store: Arc<dyn IdempotencyStore>,
        uow: Arc<dyn UnitOfWork>,
        clock: Arc<dyn Clock>,
        ttl: Duration,
        lease: Duration,
    ) -> Self {
        Self { store, uow, clock, ttl, lease }
    }

    /// # Errors
    /// [`DomainError::IdempotencyKeyReused`] (422) when the key came with a different request;
    /// [`DomainError::IdempotencyKeyInUse`] (409) while its first request runs.
    pub async fn claim(
        &self,
        user_id: UserId,
        key: &IdempotencyKey,
        request_hash: &str,
    ) -> Result<Claimed, DomainError> {
        let now = self.clock.now();
        let outcome = self
            .store
            .claim(user_id, key, request_hash, now, now + chrono_of(self.lease), now + chrono_of(self.ttl))
            .await?;
        match outcome {
            ClaimOutcome::Claimed(claim) => Ok(Claimed::Run(claim)),
            ClaimOutcome::Completed(response) => Ok(Claimed::Replay(response)),
            ClaimOutcome::Mismatch => Err(DomainError::IdempotencyKeyReused),
            ClaimOutcome::InUse => Err(DomainError::IdempotencyKeyInUse),
        }
    }

    /// After the use case returned: a response it could not record in its own transaction (an outcome that
    /// committed nothing, such as `OUT_OF_STOCK`) is recorded now; a 5xx releases the key for a retry. A
    /// response the use case already recorded is left as it is.
    ///
    /// # Errors
    /// [`DomainError::Unexpected`] when the store fails.
    pub async fn settle(&self, claim: &IdempotencyClaim, response: &StoredResponse) -> Result<(), DomainError> {
        if !response.is_storable() {
            return self.store.release(claim).await;
        }
        let mut tx = self.uow.begin().await?;
        // `false` means it is already recorded (by the use case, with its effect): nothing to do.
        tx.record_response(claim, response, self.clock.now()).await?;
        tx.commit().await
    }

    /// Deletes expired keys; how many.
    ///
    /// # Errors
    /// [`DomainError::Unexpected`] when the store fails.
    pub async fn purge_expired(&self) -> Result<u64, DomainError> {
        self.store.purge_expired(self.clock.now()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::{MockClock, MockIdempotencyStore, MockTransaction, MockUnitOfWork, Transaction};
    use chrono::Utc;

    fn claim() -> IdempotencyClaim {
        IdempotencyClaim { id: 1, user_id: UserId::new(1).unwrap(), key: IdempotencyKey::new("k").unwrap(), token: 9 }
    }

    fn service(store: MockIdempotencyStore, uow: MockUnitOfWork) -> IdempotencyService {
        let mut clock = MockClock::new();
        clock.expect_now().returning(Utc::now);
        IdempotencyService::new(
            Arc::new(store),
            Arc::new(uow),
            Arc::new(clock),
            Duration::from_secs(86_400),
            Duration::from_secs(60),
        )
    }

    async fn claiming(outcome: ClaimOutcome) -> Result<Claimed, DomainError> {
        let mut store = MockIdempotencyStore::new();
        store
            .expect_claim()
            .withf(|_, _, _, now, lease, expires| {
                *lease - *now == chrono::Duration::seconds(60) && *expires - *now == chrono::Duration::hours(24)
            })
            .returning(move |_, _, _, _, _, _| Ok(outcome.clone()));
        service(store, MockUnitOfWork::new())
            .claim(UserId::new(1).unwrap(), &IdempotencyKey::new("k").unwrap(), "h")
            .await
    }

    #[tokio::test]
    async fn claim_outcomes_map_to_run_replay_or_the_two_errors() {
        assert!(matches!(claiming(ClaimOutcome::Claimed(claim())).await, Ok(Claimed::Run(_))));
        let stored = StoredResponse { status: 201, body: "{}".into() };
        assert_eq!(claiming(ClaimOutcome::Completed(stored.clone())).await.unwrap(), Claimed::Replay(stored));
        assert!(matches!(claiming(ClaimOutcome::Mismatch).await, Err(DomainError::IdempotencyKeyReused)));
        assert!(matches!(claiming(ClaimOutcome::InUse).await, Err(DomainError::IdempotencyKeyInUse)));
    }

    #[tokio::test]
    async fn a_server_failure_releases_the_key() {
        let mut store = MockIdempotencyStore::new();
        store.expect_release().times(1).returning(|_| Ok(()));
        let mut uow = MockUnitOfWork::new();
        uow.expect_begin().never();
        service(store, uow).settle(&claim(), &StoredResponse { status: 503, body: String::new() }).await.unwrap();
    }

    #[tokio::test]
    async fn a_client_error_is_recorded_in_its_own_transaction() {
        let mut store = MockIdempotencyStore::new();
        store.expect_release().never();
        let mut tx = MockTransaction::new();
        tx.expect_record_response().withf(|_, r, _| r.status == 409).times(1).returning(|_, _, _| Ok(true));
        tx.expect_commit().times(1).returning(|| Ok(()));
        let mut tx = Some(tx);
        let mut uow = MockUnitOfWork::new();
        uow.expect_begin().times(1).returning(move || {
            let tx: Box<dyn Transaction> = Box::new(tx.take().unwrap());
            Ok(tx)
        });
        service(store, uow).settle(&claim(), &StoredResponse { status: 409, body: "{}".into() }).await.unwrap();
    }
}
