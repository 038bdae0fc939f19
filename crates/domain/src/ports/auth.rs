//! What signing in needs from the outside world: a password hasher, a token issuer, the store of sessions, and
//! a throttle of failed sign-ins.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::auth::{AccessToken, Password, PasswordHash, RefreshToken, Rotation, TokenDigest};
use crate::error::DomainError;
use crate::ids::UserId;

/// Hashes passwords for storage and checks them. Hashing is deliberately slow (memory-hard): implementations
/// run it off the async workers.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait PasswordHasher: Send + Sync {
    async fn hash(&self, password: &Password) -> Result<PasswordHash, DomainError>;

    /// Whether `password` is the one `hash` was made of. A hash this hasher cannot read is `false`.
    async fn verify(&self, password: &Password, hash: &PasswordHash) -> Result<bool, DomainError>;
}

/// Issues and checks access tokens (signed, self-contained: checking one reads no database), and makes the
/// opaque refresh tokens and their digests.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
pub trait Tokens: Send + Sync {
    /// # Errors
    /// [`DomainError::Unexpected`] when signing fails.
    fn access_token(&self, user_id: UserId, now: DateTime<Utc>) -> Result<AccessToken, DomainError>;

    /// The user an access token speaks for.
    ///
    /// # Errors
    /// [`DomainError::InvalidToken`] for a token that is malformed, badly signed, signed with another algorithm,
    /// or expired at `now`.
    fn verify_access(&self, token: &str, now: DateTime<Utc>) -> Result<UserId, DomainError>;

    /// A fresh refresh token: random, unguessable.
    ///
    /// # Errors
    /// [`DomainError::Unexpected`] when no randomness is to be had.
    fn refresh_token(&self) -> Result<RefreshToken, DomainError>;

    /// What is stored of a refresh token.
    fn digest(&self, token: &RefreshToken) -> TokenDigest;
}

/// Where refresh tokens live (as digests), by family.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait SessionStore: Send + Sync {
    /// Stores the first token of a new family (a sign-in).
    async fn begin(
        &self,
        user_id: UserId,
        token: &TokenDigest,
        expires_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<(), DomainError>;

    /// Retires `old` and stores `new` in its family, in one transaction, if `old` is live; revokes the family if
    /// `old` was retired already (a copied token). Of two concurrent rotations of one token exactly one rotates.
    async fn rotate(
        &self,
        old: &TokenDigest,
        new: &TokenDigest,
        expires_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<Rotation, DomainError>;

    /// Revokes the family of `token`; `false` when no live token has this digest.
    async fn revoke(&self, token: &TokenDigest, now: DateTime<Utc>) -> Result<bool, DomainError>;

    /// Deletes tokens that expired before `now`; how many.
    async fn purge_expired(&self, now: DateTime<Utc>) -> Result<u64, DomainError>;
}

/// Counts failed sign-ins per key (a name, a client address) and refuses further attempts of a key that failed
/// too often, until it cools down.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait SignInThrottle: Send + Sync {
    /// # Errors
    /// [`DomainError::TooManyAttempts`] while any of `keys` is throttled.
    async fn check(&self, keys: &[String], now: DateTime<Utc>) -> Result<(), DomainError>;

    /// Counts a failed attempt against every key.
    ///
    /// # Errors
    /// [`DomainError::TooManyAttempts`] when this failure was one too many for a key.
    async fn failed(&self, keys: &[String], now: DateTime<Utc>) -> Result<(), DomainError>;
}
