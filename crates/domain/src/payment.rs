//! The payment of an order: one per order, by balance.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};

use crate::error::InvalidValue;
use crate::ids::{OrderId, PaymentId, UserId};
use crate::money::Money;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaymentStatus {
    Pending,
    Completed,
    Failed,
}

impl PaymentStatus {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Completed => "COMPLETED",
            Self::Failed => "FAILED",
        }
    }
}

impl fmt::Display for PaymentStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PaymentStatus {
    type Err = InvalidValue;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "PENDING" => Ok(Self::Pending),
            "COMPLETED" => Ok(Self::Completed),
            "FAILED" => Ok(Self::Failed),
            _ => Err(InvalidValue::new("status", "is not a payment status")),
        }
    }
}

/// How a payment is made. The balance is the only method today.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaymentMethod {
    Balance,
}

impl PaymentMethod {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Balance => "BALANCE",
        }
    }
}

impl FromStr for PaymentMethod {
    type Err = InvalidValue;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "BALANCE" => Ok(Self::Balance),
            _ => Err(InvalidValue::new("method", "is not a payment method")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payment {
    pub id: PaymentId,
    pub order_id: OrderId,
    pub user_id: UserId,
    pub status: PaymentStatus,
    pub method: PaymentMethod,
    pub amount: Money,
    pub paid_at: Option<DateTime<Utc>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip_through_text() {
        for s in [PaymentStatus::Pending, PaymentStatus::Completed, PaymentStatus::Failed] {
            assert_eq!(s.as_str().parse::<PaymentStatus>().unwrap(), s);
        }
        assert_eq!("BALANCE".parse::<PaymentMethod>().unwrap(), PaymentMethod::Balance);
        assert!("CARD".parse::<PaymentMethod>().is_err());
    }
}
