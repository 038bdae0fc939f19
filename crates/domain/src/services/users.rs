//! Creating users, reading and charging their balance.

use std::sync::Arc;

use crate::auth::Password;
use crate::error::DomainError;
use crate::idempotency::Recorder;
use crate::ids::UserId;
use crate::money::Money;
use crate::ports::{Clock, PasswordHasher, UnitOfWork, UserRepository};
use crate::user::{ChargeAmount, User, UserName};

#[derive(Clone)]
pub struct UserService {
    users: Arc<dyn UserRepository>,
    hasher: Arc<dyn PasswordHasher>,
    uow: Arc<dyn UnitOfWork>,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for UserService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserService").finish_non_exhaustive()
    }
}

impl UserService {
    pub fn new(
        users: Arc<dyn UserRepository>,
        hasher: Arc<dyn PasswordHasher>,
        uow: Arc<dyn UnitOfWork>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self { users, hasher, uow, clock }
    }

    /// Creates a user who signs in with `password` (stored only as its hash).
    ///
    /// # Errors
    /// [`DomainError::UserNameTaken`] when a live user has this name.
    pub async fn create(&self, name: UserName, password: &Password) -> Result<User, DomainError> {
        let hash = self.hasher.hash(password).await?;
        self.users.create(&name, &hash, self.clock.now()).await
    }

    /// A live user.
    ///
    /// # Errors
    /// [`DomainError::UserNotFound`].
    pub async fn find(&self, id: UserId) -> Result<User, DomainError> {
        self.users.find(id).await?.ok_or(DomainError::UserNotFound(id))
    }

    /// # Errors
    /// [`DomainError::UserNotFound`].
    pub async fn balance(&self, id: UserId) -> Result<Money, DomainError> {
        self.users.find(id).await?.map(|u| u.balance).ok_or(DomainError::UserNotFound(id))
    }

    /// Charges the balance: [`User::charge`] decides on the balance as read (a charge past
    /// [`User::BALANCE_LIMIT`] is refused before any write), and one relative UPDATE guarded by the same limit
    /// writes it, so concurrent charges never lose one another and one that lands in between is still caught.
    ///
    /// # Errors
    /// [`DomainError::UserNotFound`], [`DomainError::BalanceLimitExceeded`].
    /// With a `recorder`, the charge and its response are committed in one transaction.
    pub async fn charge(
        &self,
        id: UserId,
        amount: ChargeAmount,
        recorder: Option<&Recorder<Money>>,
    ) -> Result<Money, DomainError> {
        let mut user = self.users.find(id).await?.ok_or(DomainError::UserNotFound(id))?;
        user.charge(amount)?;
        let now = self.clock.now();
        let Some(recorder) = recorder else {
            return self.users.charge(id, amount, User::BALANCE_LIMIT, now).await;
        };
        let mut tx = self.uow.begin().await?;
        let balance = Ok(tx.charge_balance(id, amount, User::BALANCE_LIMIT, now).await?);
        recorder.record_in(tx.as_mut(), &balance, now).await?;
        tx.commit().await?;
        balance
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::PasswordHash;
    use crate::ports::{
        MockClock, MockPasswordHasher, MockTransaction, MockUnitOfWork, MockUserRepository, Transaction,
    };
    use chrono::{TimeZone, Utc};
    use mockall::predicate::eq;

    fn clock() -> Arc<MockClock> {
        let mut clock = MockClock::new();
        clock.expect_now().returning(|| Utc.with_ymd_and_hms(2026, 11, 25, 9, 0, 0).unwrap());
        Arc::new(clock)
    }

    fn uid(n: i64) -> UserId {
        UserId::new(n).unwrap()
    }

    /// A hasher that "hashes" by prefixing, so tests can see what was stored.
    fn hasher() -> Arc<MockPasswordHasher> {
        let mut hasher = MockPasswordHasher::new();
        hasher.expect_hash().returning(|p| Ok(PasswordHash::new(format!("hashed:{}", p.expose()))));
        Arc::new(hasher)
    }

    #[tokio::test]
    async fn create_stores_the_parsed_name_and_only_the_hash_at_the_clock_time() {
        let mut repo = MockUserRepository::new();
        repo.expect_create()
            .withf(|name, hash, now| {
                name.as_str() == "kim"
                    && hash.as_str() == "hashed:correct horse"
                    && now.to_rfc3339() == "2026-11-25T09:00:00+00:00"
            })
            .returning(|name, _, _| Ok(User { id: uid(1), name: name.as_str().into(), balance: Money::ZERO }));
        let user = UserService::new(Arc::new(repo), hasher(), Arc::new(MockUnitOfWork::new()), clock())
            .create(UserName::new(" kim ").unwrap(), &Password::new("correct horse").unwrap())
            .await
            .unwrap();
        assert_eq!((user.id, user.name.as_str(), user.balance), (uid(1), "kim", Money::ZERO));
    }

    #[tokio::test]
    async fn balance_of_an_unknown_user_is_not_found() {
        let mut repo = MockUserRepository::new();
        repo.expect_find().with(eq(uid(9))).returning(|_| Ok(None));
        let err = UserService::new(Arc::new(repo), hasher(), Arc::new(MockUnitOfWork::new()), clock())
            .balance(uid(9))
            .await
            .unwrap_err();
        assert!(matches!(err, DomainError::UserNotFound(id) if id == uid(9)));
    }

    #[tokio::test]
    async fn balance_reads_the_user() {
        let mut repo = MockUserRepository::new();
        repo.expect_find().returning(|id| Ok(Some(User { id, name: "kim".into(), balance: Money::new(500).unwrap() })));
        let balance = UserService::new(Arc::new(repo), hasher(), Arc::new(MockUnitOfWork::new()), clock())
            .balance(uid(1))
            .await
            .unwrap();
        assert_eq!(balance.won(), 500);
    }

    /// A repository whose user has `balance`.
    fn with_balance(balance: i64) -> MockUserRepository {
        let mut repo = MockUserRepository::new();
        repo.expect_find()
            .returning(move |id| Ok(Some(User { id, name: "kim".into(), balance: Money::new(balance).unwrap() })));
        repo
    }

    #[tokio::test]
    async fn a_charge_past_the_limit_is_refused_by_the_rule_before_any_write() {
        let mut repo = with_balance(User::BALANCE_LIMIT.won() - 5);
        repo.expect_charge().never();
        let err = UserService::new(Arc::new(repo), hasher(), Arc::new(MockUnitOfWork::new()), clock())
            .charge(uid(1), ChargeAmount::new(6).unwrap(), None)
            .await
            .unwrap_err();
        assert!(matches!(err, DomainError::BalanceLimitExceeded { .. }));
    }

    #[tokio::test]
    async fn charging_an_unknown_user_is_not_found() {
        let mut repo = MockUserRepository::new();
        repo.expect_find().returning(|_| Ok(None));
        repo.expect_charge().never();
        let err = UserService::new(Arc::new(repo), hasher(), Arc::new(MockUnitOfWork::new()), clock())
            .charge(uid(1), ChargeAmount::new(6).unwrap(), None)
            .await
            .unwrap_err();
        assert!(matches!(err, DomainError::UserNotFound(_)));
    }

    #[tokio::test]
    async fn charge_passes_the_balance_limit_to_the_atomic_update() {
        let mut repo = with_balance(0);
        repo.expect_charge()
            .withf(|id, amount, limit, _| {
                *id == uid(1) && amount.money().won() == 1000 && *limit == User::BALANCE_LIMIT
            })
            .returning(|_, _, _, _| Ok(Money::new(1000).unwrap()));
        let svc = UserService::new(Arc::new(repo), hasher(), Arc::new(MockUnitOfWork::new()), clock());
        assert_eq!(svc.charge(uid(1), ChargeAmount::new(1000).unwrap(), None).await.unwrap().won(), 1000);
    }

    #[tokio::test]
    async fn a_recorded_charge_commits_with_its_response() {
        use crate::idempotency::{IdempotencyClaim, IdempotencyKey, StoredResponse};
        let mut tx = MockTransaction::new();
        let mut seq = mockall::Sequence::new();
        tx.expect_charge_balance().times(1).in_sequence(&mut seq).returning(|_, _, _, _| Ok(Money::new(700).unwrap()));
        tx.expect_record_response()
            .withf(|_, r, _| r.status == 200 && r.body == "700")
            .times(1)
            .in_sequence(&mut seq)
            .returning(|_, _, _| Ok(true));
        tx.expect_commit().times(1).in_sequence(&mut seq).returning(|| Ok(()));
        let mut tx = Some(tx);
        let mut uow = MockUnitOfWork::new();
        uow.expect_begin().returning(move || {
            let tx: Box<dyn Transaction> = Box::new(tx.take().unwrap());
            Ok(tx)
        });
        let mut repo = with_balance(0);
        repo.expect_charge().never();
        let svc = UserService::new(Arc::new(repo), hasher(), Arc::new(uow), clock());
        let claim = IdempotencyClaim { id: 1, user_id: uid(1), key: IdempotencyKey::new("k").unwrap(), token: 1 };
        let recorder = Recorder::new(
            claim,
            Arc::new(|o: &Result<Money, DomainError>| StoredResponse {
                status: if o.is_ok() { 200 } else { 422 },
                body: o.as_ref().map_or_else(|_| String::new(), |m| m.won().to_string()),
            }),
        );
        assert_eq!(svc.charge(uid(1), ChargeAmount::new(700).unwrap(), Some(&recorder)).await.unwrap().won(), 700);
    }

    #[tokio::test]
    async fn a_concurrent_charge_caught_by_the_guard_passes_through() {
        let mut repo = with_balance(0);
        repo.expect_charge().returning(|_, _, limit, _| Err(DomainError::BalanceLimitExceeded { limit }));
        let err = UserService::new(Arc::new(repo), hasher(), Arc::new(MockUnitOfWork::new()), clock())
            .charge(uid(1), ChargeAmount::new(1).unwrap(), None)
            .await
            .unwrap_err();
        assert!(matches!(err, DomainError::BalanceLimitExceeded { .. }));
    }
}
