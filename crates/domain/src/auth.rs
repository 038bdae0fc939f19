//! Accounts and sessions: the password a user signs in with, the tokens that prove who calls, and the cap on
//! what one user may hold unpaid.
//!
//! A session is an access token (short-lived, signed, checked without a database read) and a refresh token
//! (opaque, stored only as a digest, rotated on every use). The tokens of one sign-in form a *family*: a
//! retired refresh token presented again means it was copied, and the whole family is revoked.

use std::fmt;
use std::time::Duration;

use crate::error::InvalidValue;
use crate::ids::UserId;

/// A password as the client sent it: 8..=128 characters. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    /// # Errors
    /// [`InvalidValue`] outside 8..=128 characters or with control characters.
    pub fn new(raw: &str) -> Result<Self, InvalidValue> {
        if raw.chars().any(char::is_control) {
            return Err(InvalidValue::new("password", "must not contain control characters"));
        }
        match raw.chars().count() {
            8..=128 => Ok(Self(raw.to_owned())),
            _ => Err(InvalidValue::new("password", "must be between 8 and 128 characters")),
        }
    }

    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(***)")
    }
}

/// A password as stored: a self-describing hash (the Argon2id PHC string).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswordHash(String);

impl PasswordHash {
    #[must_use]
    pub fn new(phc: String) -> Self {
        Self(phc)
    }

    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A refresh token as the client holds it: opaque, and never stored as it is. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct RefreshToken(String);

impl RefreshToken {
    /// # Errors
    /// [`InvalidValue`] for an empty or over-long token (nothing the service hands out).
    pub fn new(raw: &str) -> Result<Self, InvalidValue> {
        if raw.is_empty() || raw.len() > 256 || !raw.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(InvalidValue::new("refreshToken", "is not a refresh token"));
        }
        Ok(Self(raw.to_owned()))
    }

    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for RefreshToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RefreshToken(***)")
    }
}

/// What is stored of a refresh token: its digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenDigest(pub String);

/// A signed access token and how long it is valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessToken {
    pub token: String,
    pub expires_in: Duration,
}

/// What signing in or refreshing gives the client.
#[derive(Debug, Clone)]
pub struct Session {
    pub user_id: UserId,
    pub access: AccessToken,
    pub refresh: RefreshToken,
}

/// What rotating a refresh token found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rotation {
    /// The token was live: it is retired and the new one of its family is stored.
    Rotated { user_id: UserId },
    /// The token had been retired already: it was copied, and its whole family is now revoked.
    Reused,
    /// No live token has this digest (never issued, expired, or revoked).
    Unknown,
}

/// How many sign-ins of one key (a name, a client address) may fail in a burst, and over what window the
/// failures are forgiven.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThrottleQuota {
    pub failures: u32,
    pub window: Duration,
}

/// What one user may hold in unpaid orders at once, so that throwaway accounts cannot park a sale's stock for
/// the payment timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingCaps {
    pub orders: u32,
    pub units: i64,
}

impl PendingCaps {
    /// No cap.
    pub const NONE: Self = Self { orders: u32::MAX, units: i64::MAX };
}

/// What a user holds unpaid now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pending {
    pub orders: u32,
    pub units: i64,
}

impl Pending {
    /// This plus one more order of `units`, if `caps` allow it.
    #[must_use]
    pub fn with_order(self, units: i64, caps: PendingCaps) -> Option<Self> {
        let next = Self { orders: self.orders.checked_add(1)?, units: self.units.checked_add(units)? };
        (next.orders <= caps.orders && next.units <= caps.units).then_some(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_8_to_128_characters_and_never_printed() {
        assert!(Password::new("short").is_err());
        assert!(Password::new("correct horse").is_ok());
        assert!(Password::new(&"가".repeat(128)).is_ok(), "characters, not bytes");
        assert!(Password::new(&"a".repeat(129)).is_err());
        assert!(Password::new("nul\u{0}inside").is_err());
        assert_eq!(format!("{:?}", Password::new("correct horse").unwrap()), "Password(***)");
    }

    #[test]
    fn the_pending_cap_counts_orders_and_units() {
        let caps = PendingCaps { orders: 2, units: 5 };
        let one = Pending::default().with_order(3, caps).unwrap();
        assert_eq!(one, Pending { orders: 1, units: 3 });
        assert!(one.with_order(3, caps).is_none(), "6 units is past 5");
        let two = one.with_order(2, caps).unwrap();
        assert!(two.with_order(0, caps).is_none(), "a third order is past 2");
    }
}
