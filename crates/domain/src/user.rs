//! The user and the rules of their balance.

use crate::error::{DomainError, InvalidValue};
use crate::ids::UserId;
use crate::money::Money;

/// A user's display name: 1..=50 characters after trimming.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserName(String);

impl UserName {
    /// # Errors
    /// [`InvalidValue`] when blank, longer than 50 characters or with control characters.
    pub fn new(raw: &str) -> Result<Self, InvalidValue> {
        let name = raw.trim();
        if name.chars().any(char::is_control) {
            return Err(InvalidValue::new("name", crate::product::CONTROL_CHARACTERS));
        }
        match name.chars().count() {
            0 => Err(InvalidValue::new("name", "must not be blank")),
            1..=50 => Ok(Self(name.to_owned())),
            _ => Err(InvalidValue::new("name", "must be at most 50 characters")),
        }
    }

    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// One charge: `1..=10_000_000` won.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChargeAmount(Money);

impl ChargeAmount {
    pub const MAX: i64 = 10_000_000;

    /// # Errors
    /// [`InvalidValue`] outside `1..=10_000_000`.
    pub fn new(won: i64) -> Result<Self, InvalidValue> {
        if (1..=Self::MAX).contains(&won) {
            Ok(Self(Money::new(won)?))
        } else {
            Err(InvalidValue::new("amount", "must be between 1 and 10000000"))
        }
    }

    #[must_use]
    pub const fn money(self) -> Money {
        self.0
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: UserId,
    pub name: String,
    pub balance: Money,
}

impl User {
    /// No balance may grow past one trillion won.
    pub const BALANCE_LIMIT: Money = Money::MAX_BALANCE;

    /// The balance after charging `amount`.
    ///
    /// # Errors
    /// [`DomainError::BalanceLimitExceeded`] when the result would pass [`User::BALANCE_LIMIT`].
    pub fn charge(&mut self, amount: ChargeAmount) -> Result<Money, DomainError> {
        let next = self
            .balance
            .checked_add(amount.money())
            .filter(|next| *next <= Self::BALANCE_LIMIT)
            .ok_or(DomainError::BalanceLimitExceeded { limit: Self::BALANCE_LIMIT })?;
        self.balance = next;
        Ok(next)
    }

    /// The balance after spending `amount`.
    ///
    /// # Errors
    /// [`DomainError::InsufficientBalance`] when the balance is smaller than `amount`.
    pub fn spend(&mut self, amount: Money) -> Result<Money, DomainError> {
        let next = self
            .balance
            .checked_sub(amount)
            .ok_or(DomainError::InsufficientBalance { balance: self.balance, required: amount })?;
        self.balance = next;
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(balance: i64) -> User {
        User { id: UserId::new(1).unwrap(), name: "kim".into(), balance: Money::new(balance).unwrap() }
    }

    #[test]
    fn names_are_trimmed_and_bounded() {
        assert_eq!(UserName::new("  kim ").unwrap().as_str(), "kim");
        assert!(UserName::new("   ").is_err());
        assert!(UserName::new(&"가".repeat(50)).is_ok(), "50 characters, not bytes");
        assert!(UserName::new(&"a".repeat(51)).is_err());
    }

    #[test]
    fn names_with_control_characters_are_refused() {
        for raw in ["a\u{0}b", "a\nb", "a\u{7f}b", "\u{1b}[31mred"] {
            let err = UserName::new(raw).unwrap_err();
            assert_eq!((err.field, err.to_string().contains("control")), ("name", true), "{raw:?}");
        }
    }

    #[test]
    fn charge_amount_is_bounded() {
        assert!(ChargeAmount::new(0).is_err());
        assert!(ChargeAmount::new(-1).is_err());
        assert!(ChargeAmount::new(1).is_ok());
        assert!(ChargeAmount::new(10_000_000).is_ok());
        assert!(ChargeAmount::new(10_000_001).is_err());
    }

    #[test]
    fn charge_adds_up_to_the_limit_and_not_past_it() {
        let mut u = user(User::BALANCE_LIMIT.won() - 10);
        assert_eq!(u.charge(ChargeAmount::new(10).unwrap()).unwrap(), User::BALANCE_LIMIT);
        let err = u.charge(ChargeAmount::new(1).unwrap()).unwrap_err();
        assert!(matches!(err, DomainError::BalanceLimitExceeded { .. }));
        assert_eq!(u.balance, User::BALANCE_LIMIT, "a refused charge changes nothing");
    }

    #[test]
    fn spend_refuses_more_than_the_balance() {
        let mut u = user(1000);
        assert_eq!(u.spend(Money::new(400).unwrap()).unwrap().won(), 600);
        let err = u.spend(Money::new(601).unwrap()).unwrap_err();
        assert!(matches!(err, DomainError::InsufficientBalance { balance, .. } if balance.won() == 600));
        assert_eq!(u.balance.won(), 600);
    }
}
