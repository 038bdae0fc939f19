//! Money and quantities. Won has no minor unit, so money is a whole number of won.

use std::fmt;

use crate::error::InvalidValue;

/// A non-negative amount of won.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Money(i64);

impl Money {
    pub const ZERO: Self = Self(0);
    /// The most any balance may hold: one trillion won.
    pub const MAX_BALANCE: Self = Self(1_000_000_000_000);
    /// The most one option may cost.
    pub const MAX_PRICE: Self = Self(1_000_000_000);

    /// # Errors
    /// [`InvalidValue`] for a negative amount.
    pub fn new(won: i64) -> Result<Self, InvalidValue> {
        if won >= 0 { Ok(Self(won)) } else { Err(InvalidValue::new("amount", "must not be negative")) }
    }

    #[must_use]
    pub const fn won(self) -> i64 {
        self.0
    }

    /// `None` on overflow, so a sum can never wrap.
    #[must_use]
    pub fn checked_add(self, other: Self) -> Option<Self> {
        self.0.checked_add(other.0).map(Self)
    }

    /// `None` when `other` is larger: money never goes negative.
    #[must_use]
    pub fn checked_sub(self, other: Self) -> Option<Self> {
        self.0.checked_sub(other.0).filter(|won| *won >= 0).map(Self)
    }

    /// `None` on overflow.
    #[must_use]
    pub fn checked_mul(self, quantity: Quantity) -> Option<Self> {
        self.0.checked_mul(quantity.get()).map(Self)
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} won", self.0)
    }
}

/// How many units of one option a cart line or an order line holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Quantity(i64);

impl Quantity {
    /// The most units one request may ask for on one line.
    pub const MAX: i64 = 1000;

    /// # Errors
    /// [`InvalidValue`] outside `1..=1000`.
    pub fn new(units: i64) -> Result<Self, InvalidValue> {
        if (1..=Self::MAX).contains(&units) {
            Ok(Self(units))
        } else {
            Err(InvalidValue::new("quantity", "must be between 1 and 1000"))
        }
    }

    #[must_use]
    pub const fn get(self) -> i64 {
        self.0
    }
}

/// The stock an option holds: `0..=1_000_000_000` units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Stock(i64);

impl Stock {
    pub const MAX: i64 = 1_000_000_000;

    /// # Errors
    /// [`InvalidValue`] outside `0..=1_000_000_000`.
    pub fn new(units: i64) -> Result<Self, InvalidValue> {
        if (0..=Self::MAX).contains(&units) {
            Ok(Self(units))
        } else {
            Err(InvalidValue::new("stock", "must be between 0 and 1000000000"))
        }
    }

    #[must_use]
    pub const fn get(self) -> i64 {
        self.0
    }

    /// What is left after taking `quantity`; `None` when fewer units are left.
    #[must_use]
    pub fn checked_take(self, quantity: Quantity) -> Option<Self> {
        Self::new(self.0 - quantity.get()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_never_goes_negative() {
        assert!(Money::new(-1).is_err());
        let ten = Money::new(10).unwrap();
        assert_eq!(ten.checked_sub(Money::new(11).unwrap()), None);
        assert_eq!(ten.checked_sub(ten), Some(Money::ZERO));
    }

    #[test]
    fn money_arithmetic_refuses_overflow() {
        let max = Money::new(i64::MAX).unwrap();
        assert_eq!(max.checked_add(Money::new(1).unwrap()), None);
        assert_eq!(max.checked_mul(Quantity::new(2).unwrap()), None);
        assert_eq!(Money::new(1500).unwrap().checked_mul(Quantity::new(3).unwrap()), Some(Money::new(4500).unwrap()));
    }

    #[test]
    fn quantity_and_stock_bounds() {
        assert!(Quantity::new(0).is_err());
        assert!(Quantity::new(1).is_ok());
        assert!(Quantity::new(1000).is_ok());
        assert_eq!(Quantity::new(1001).unwrap_err().field, "quantity");
        assert!(Stock::new(-1).is_err());
        assert!(Stock::new(0).is_ok());
        assert!(Stock::new(Stock::MAX + 1).is_err());
        let three = Stock::new(3).unwrap();
        assert_eq!(three.checked_take(Quantity::new(3).unwrap()), Some(Stock::new(0).unwrap()));
        assert_eq!(three.checked_take(Quantity::new(4).unwrap()), None);
    }
}
