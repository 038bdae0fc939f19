//! Access tokens are HS256 JWTs (`sub` the user id, `exp`, `iat`, `jti`): checking one is an HMAC and a clock
//! comparison, no database read. Refresh tokens are 256 random bits, hex; the store keeps only their SHA-256.

use std::time::Duration;

use chrono::{DateTime, Utc};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, decode, encode};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use shop_domain::DomainError;
use shop_domain::auth::{AccessToken, RefreshToken, TokenDigest};
use shop_domain::ids::UserId;
use shop_domain::ports::Tokens;

/// The key every instance of a deployment signs and checks tokens with: 32 bytes or more.
#[derive(Clone, PartialEq, Eq)]
pub struct AuthSecret(Vec<u8>);

impl AuthSecret {
    pub const MIN_BYTES: usize = 32;

    /// # Errors
    /// A message when the secret is shorter than [`AuthSecret::MIN_BYTES`].
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self, String> {
        let bytes = bytes.into();
        if bytes.len() < Self::MIN_BYTES {
            return Err(format!("must be at least {} bytes; {} given", Self::MIN_BYTES, bytes.len()));
        }
        Ok(Self(bytes))
    }

    /// A fresh random secret (hex text, 64 bytes of it): what an embedded deployment makes for itself.
    #[must_use]
    pub fn generate() -> Self {
        let mut bytes = [0_u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        Self(hex(&bytes).into_bytes())
    }

    #[must_use]
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for AuthSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuthSecret(***)")
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: i64,
    iat: i64,
    jti: String,
}

/// Signs and checks access tokens with one [`AuthSecret`]; `ttl` is how long one is valid.
#[derive(Clone)]
pub struct JwtTokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    ttl: Duration,
}

impl std::fmt::Debug for JwtTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtTokens").field("ttl", &self.ttl).finish_non_exhaustive()
    }
}

impl JwtTokens {
    #[must_use]
    pub fn new(secret: &AuthSecret, ttl: Duration) -> Self {
        // HS256 only: a token whose header names another algorithm (`none` included) is refused.
        let mut validation = Validation::new(Algorithm::HS256);
        // Expiry is judged against the domain's clock below, so that it follows the clock the service runs on.
        validation.validate_exp = false;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Self {
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            decoding: DecodingKey::from_secret(secret.as_bytes()),
            validation,
            ttl,
        }
    }
}

impl Tokens for JwtTokens {
    fn access_token(&self, user_id: UserId, now: DateTime<Utc>) -> Result<AccessToken, DomainError> {
        let ttl = chrono::Duration::from_std(self.ttl).map_err(DomainError::unexpected)?;
        let claims = Claims {
            sub: user_id.to_string(),
            iat: now.timestamp(),
            exp: (now + ttl).timestamp(),
            jti: uuid::Uuid::new_v4().simple().to_string(),
        };
        let token = encode(&Header::new(Algorithm::HS256), &claims, &self.encoding).map_err(DomainError::unexpected)?;
        Ok(AccessToken { token, expires_in: self.ttl })
    }

    fn verify_access(&self, token: &str, now: DateTime<Utc>) -> Result<UserId, DomainError> {
        let claims =
            decode::<Claims>(token, &self.decoding, &self.validation).map_err(|_| DomainError::InvalidToken)?.claims;
        if claims.exp <= now.timestamp() {
            return Err(DomainError::InvalidToken);
        }
        claims.sub.parse::<i64>().ok().and_then(|id| UserId::new(id).ok()).ok_or(DomainError::InvalidToken)
    }

    fn refresh_token(&self) -> Result<RefreshToken, DomainError> {
        let mut bytes = [0_u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        RefreshToken::new(&hex(&bytes)).map_err(DomainError::unexpected)
    }

    fn digest(&self, token: &RefreshToken) -> TokenDigest {
        TokenDigest(hex(&Sha256::digest(token.expose().as_bytes())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(secret: &str) -> JwtTokens {
        JwtTokens::new(&AuthSecret::new(secret.as_bytes().to_vec()).unwrap(), Duration::from_secs(900))
    }

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn a_token_speaks_for_its_user_until_it_expires() {
        let t = tokens(SECRET);
        let now = Utc::now();
        let access = t.access_token(UserId::new(42).unwrap(), now).unwrap();
        assert_eq!(access.expires_in, Duration::from_secs(900));
        assert_eq!(t.verify_access(&access.token, now).unwrap().get(), 42);
        let later = now + chrono::Duration::seconds(901);
        assert!(matches!(t.verify_access(&access.token, later), Err(DomainError::InvalidToken)));
    }

    #[test]
    fn another_secret_a_truncated_token_and_alg_none_are_refused() {
        let now = Utc::now();
        let access = tokens(SECRET).access_token(UserId::new(42).unwrap(), now).unwrap().token;
        let other = tokens("another secret, at least thirty-two bytes long");
        assert!(other.verify_access(&access, now).is_err());
        let t = tokens(SECRET);
        assert!(t.verify_access(&access[..access.len() - 3], now).is_err());
        // The same claims, unsigned, under `alg: none`.
        let payload = access.split('.').nth(1).unwrap();
        let none = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{payload}.");
        assert!(t.verify_access(&none, now).is_err());
        assert!(t.verify_access("", now).is_err());
    }

    #[test]
    fn secrets_are_long_and_refresh_tokens_are_random_with_stable_digests() {
        assert!(AuthSecret::new(b"short".to_vec()).is_err());
        assert_eq!(AuthSecret::generate().as_bytes().len(), 64);
        let t = tokens(SECRET);
        let (a, b) = (t.refresh_token().unwrap(), t.refresh_token().unwrap());
        assert_ne!(a, b);
        assert_eq!(a.expose().len(), 64);
        assert_eq!(t.digest(&a), t.digest(&a));
        assert_ne!(t.digest(&a), t.digest(&b));
        assert_ne!(t.digest(&a).0, a.expose(), "the digest is not the token");
    }
}
