//! Signing in, refreshing a session and signing out.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::OnceCell;

use crate::auth::{Password, PasswordHash, RefreshToken, Rotation, Session};
use crate::error::DomainError;
use crate::ports::{Clock, PasswordHasher, SessionStore, SignInThrottle, Tokens, UserRepository};
use crate::user::UserName;

#[derive(Clone)]
pub struct AuthService {
    users: Arc<dyn UserRepository>,
    hasher: Arc<dyn PasswordHasher>,
    tokens: Arc<dyn Tokens>,
    sessions: Arc<dyn SessionStore>,
    throttle: Arc<dyn SignInThrottle>,
    clock: Arc<dyn Clock>,
    refresh_ttl: Duration,
    /// A hash to check a password against when the name is unknown, so that a wrong name costs as long as a
    /// wrong password and names cannot be probed by timing.
    decoy: Arc<OnceCell<PasswordHash>>,
}

impl std::fmt::Debug for AuthService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthService").field("refresh_ttl", &self.refresh_ttl).finish_non_exhaustive()
    }
}

fn chrono_of(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

impl AuthService {
    pub fn new(
        users: Arc<dyn UserRepository>,
        hasher: Arc<dyn PasswordHasher>,
        tokens: Arc<dyn Tokens>,
        sessions: Arc<dyn SessionStore>,
        throttle: Arc<dyn SignInThrottle>,
        clock: Arc<dyn Clock>,
        refresh_ttl: Duration,
    ) -> Self {
        Self { users, hasher, tokens, sessions, throttle, clock, refresh_ttl, decoy: Arc::default() }
    }

    /// Signs in with a name and a password: a new session (an access token and the first refresh token of a
    /// new family). Failures count against the name and against `client` (the caller's address, when known);
    /// a name or an address that failed too often is refused until it cools down, right password or not.
    ///
    /// # Errors
    /// [`DomainError::InvalidCredentials`] for a wrong name or password (the same answer for both);
    /// [`DomainError::TooManyAttempts`].
    pub async fn sign_in(&self, name: &str, password: &str, client: Option<&str>) -> Result<Session, DomainError> {
        let now = self.clock.now();
        let mut keys = vec![format!("name:{}", name.trim().to_lowercase())];
        keys.extend(client.map(|c| format!("client:{c}")));
        self.throttle.check(&keys, now).await?;
        let found = match UserName::new(name) {
            Ok(name) => self.users.find_by_name(&name).await?,
            Err(_) => None,
        };
        // A password outside the rules cannot be anyone's: a failure like any wrong one, without hashing it.
        let password = Password::new(password).ok();
        let verified = match (&found, &password) {
            (Some((user, Some(hash))), Some(password)) => self.hasher.verify(password, hash).await?.then_some(user.id),
            (_, Some(password)) => {
                let decoy = self.decoy.get_or_try_init(|| self.decoy_hash()).await?;
                let _ = self.hasher.verify(password, decoy).await?;
                None
            }
            (_, None) => None,
        };
        let Some(user_id) = verified else {
            self.throttle.failed(&keys, now).await?;
            return Err(DomainError::InvalidCredentials);
        };
        let refresh = self.tokens.refresh_token()?;
        self.sessions.begin(user_id, &self.tokens.digest(&refresh), now + chrono_of(self.refresh_ttl), now).await?;
        Ok(Session { user_id, access: self.tokens.access_token(user_id, now)?, refresh })
    }

    async fn decoy_hash(&self) -> Result<PasswordHash, DomainError> {
        let password = Password::new("not anybody's password").map_err(DomainError::unexpected)?;
        self.hasher.hash(&password).await
    }

    /// Exchanges a live refresh token for a new session of its family; the old token is retired. A retired
    /// token presented again revokes the whole family (it was copied: whoever holds the newer one loses it too).
    ///
    /// # Errors
    /// [`DomainError::InvalidToken`].
    pub async fn refresh(&self, token: &RefreshToken) -> Result<Session, DomainError> {
        let now = self.clock.now();
        let next = self.tokens.refresh_token()?;
        let rotation = self
            .sessions
            .rotate(&self.tokens.digest(token), &self.tokens.digest(&next), now + chrono_of(self.refresh_ttl), now)
            .await?;
        match rotation {
            Rotation::Rotated { user_id } => {
                Ok(Session { user_id, access: self.tokens.access_token(user_id, now)?, refresh: next })
            }
            Rotation::Reused => {
                tracing::warn!("a retired refresh token was presented again; its family is revoked");
                Err(DomainError::InvalidToken)
            }
            Rotation::Unknown => Err(DomainError::InvalidToken),
        }
    }

    /// Signs out: revokes the family of `token` (every refresh token of that sign-in). Access tokens already
    /// issued stay valid until they expire, which is why they are short-lived.
    ///
    /// # Errors
    /// [`DomainError::InvalidToken`] when no live token has this value.
    pub async fn logout(&self, token: &RefreshToken) -> Result<(), DomainError> {
        if self.sessions.revoke(&self.tokens.digest(token), self.clock.now()).await? {
            Ok(())
        } else {
            Err(DomainError::InvalidToken)
        }
    }

    /// Deletes refresh tokens that have expired; how many.
    ///
    /// # Errors
    /// What the store reports.
    pub async fn purge_expired(&self) -> Result<u64, DomainError> {
        self.sessions.purge_expired(self.clock.now()).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use chrono::Utc;

    use super::*;
    use crate::auth::{AccessToken, TokenDigest};
    use crate::ids::UserId;
    use crate::money::Money;
    use crate::ports::{
        MockClock, MockPasswordHasher, MockSessionStore, MockSignInThrottle, MockTokens, MockUserRepository,
    };
    use crate::user::User;

    fn clock() -> Arc<MockClock> {
        let mut clock = MockClock::new();
        clock.expect_now().returning(Utc::now);
        Arc::new(clock)
    }

    fn tokens() -> MockTokens {
        let mut tokens = MockTokens::new();
        tokens.expect_refresh_token().returning(|| Ok(RefreshToken::new("fresh").unwrap()));
        tokens.expect_digest().returning(|t| TokenDigest(format!("#{}", t.expose())));
        tokens.expect_access_token().returning(|user, _| {
            Ok(AccessToken { token: format!("jwt-{user}"), expires_in: Duration::from_secs(900) })
        });
        tokens
    }

    fn kim() -> User {
        User { id: UserId::new(7).unwrap(), name: "kim".into(), balance: Money::ZERO }
    }

    /// A service whose user `kim` has the password "correct horse" (the hasher compares plainly).
    fn service(throttle: MockSignInThrottle, sessions: MockSessionStore) -> AuthService {
        let mut users = MockUserRepository::new();
        users.expect_find_by_name().returning(|name| {
            Ok((name.as_str() == "kim").then(|| (kim(), Some(PasswordHash::new("correct horse".into())))))
        });
        let mut hasher = MockPasswordHasher::new();
        hasher.expect_hash().returning(|p| Ok(PasswordHash::new(p.expose().to_owned())));
        hasher.expect_verify().returning(|p, h| Ok(p.expose() == h.as_str()));
        AuthService::new(
            Arc::new(users),
            Arc::new(hasher),
            Arc::new(tokens()),
            Arc::new(sessions),
            Arc::new(throttle),
            clock(),
            Duration::from_secs(3600),
        )
    }

    fn open_throttle(failures: Arc<Mutex<Vec<Vec<String>>>>) -> MockSignInThrottle {
        let mut throttle = MockSignInThrottle::new();
        throttle.expect_check().returning(|_, _| Ok(()));
        throttle.expect_failed().returning(move |keys, _| {
            failures.lock().unwrap().push(keys.to_vec());
            Ok(())
        });
        throttle
    }

    #[tokio::test]
    async fn the_right_password_begins_a_family_and_answers_both_tokens() {
        let mut sessions = MockSessionStore::new();
        sessions
            .expect_begin()
            .withf(|user, digest, _, _| user.get() == 7 && digest.0 == "#fresh")
            .times(1)
            .returning(|_, _, _, _| Ok(()));
        let failures = Arc::default();
        let session = service(open_throttle(Arc::clone(&failures)), sessions)
            .sign_in("kim", "correct horse", Some("10.0.0.1"))
            .await
            .unwrap();
        assert_eq!((session.user_id.get(), session.access.token.as_str()), (7, "jwt-7"));
        assert!(failures.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_wrong_name_and_a_wrong_password_are_the_same_answer_and_both_count() {
        let failures: Arc<Mutex<Vec<Vec<String>>>> = Arc::default();
        let mut sessions = MockSessionStore::new();
        sessions.expect_begin().never();
        let svc = service(open_throttle(failures.clone()), sessions);
        let wrong = svc.sign_in("kim", "battery staple", Some("10.0.0.1")).await;
        let nobody = svc.sign_in("Nobody", "correct horse", None).await;
        assert!(matches!(wrong, Err(DomainError::InvalidCredentials)));
        assert!(matches!(nobody, Err(DomainError::InvalidCredentials)));
        let failures = failures.lock().unwrap().clone();
        assert_eq!(failures[0], vec!["name:kim".to_owned(), "client:10.0.0.1".to_owned()]);
        assert_eq!(failures[1], vec!["name:nobody".to_owned()], "names are throttled case-insensitively");
    }

    #[tokio::test]
    async fn a_throttled_name_is_refused_before_the_password_is_checked() {
        let mut throttle = MockSignInThrottle::new();
        throttle.expect_check().returning(|_, _| Err(DomainError::TooManyAttempts { retry_after_secs: 30 }));
        throttle.expect_failed().never();
        let err = service(throttle, MockSessionStore::new()).sign_in("kim", "correct horse", None).await.unwrap_err();
        assert!(matches!(err, DomainError::TooManyAttempts { retry_after_secs: 30 }));
    }

    #[tokio::test]
    async fn refreshing_rotates_and_a_reused_token_is_invalid() {
        let mut sessions = MockSessionStore::new();
        let mut outcomes = vec![Rotation::Reused, Rotation::Rotated { user_id: UserId::new(7).unwrap() }];
        sessions
            .expect_rotate()
            .withf(|old, new, _, _| old.0 == "#old" && new.0 == "#fresh")
            .times(2)
            .returning(move |_, _, _, _| Ok(outcomes.pop().unwrap()));
        let svc = service(open_throttle(Arc::default()), sessions);
        let old = RefreshToken::new("old").unwrap();
        let session = svc.refresh(&old).await.unwrap();
        assert_eq!(session.refresh.expose(), "fresh");
        assert!(matches!(svc.refresh(&old).await, Err(DomainError::InvalidToken)));
    }

    #[tokio::test]
    async fn logging_out_an_unknown_token_is_invalid() {
        let mut sessions = MockSessionStore::new();
        sessions.expect_revoke().returning(|digest, _| Ok(digest.0 == "#live"));
        let svc = service(open_throttle(Arc::default()), sessions);
        assert!(svc.logout(&RefreshToken::new("live").unwrap()).await.is_ok());
        assert!(matches!(svc.logout(&RefreshToken::new("gone").unwrap()).await, Err(DomainError::InvalidToken)));
    }
}
