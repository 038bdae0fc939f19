//! Orders: lines priced at order time, and the status machine PENDING_PAYMENT -> PAID | CANCELLED.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};

use crate::error::{DomainError, InvalidValue};
use crate::ids::{OrderId, ProductId, ProductOptionId, UserId};
use crate::money::{Money, Quantity};
use crate::payment::Payment;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderStatus {
    /// Stock is held until the order is paid or expires.
    PendingPayment,
    Paid,
    Cancelled,
}

impl OrderStatus {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::PendingPayment => "PENDING_PAYMENT",
            Self::Paid => "PAID",
            Self::Cancelled => "CANCELLED",
        }
    }
}

impl fmt::Display for OrderStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for OrderStatus {
    type Err = InvalidValue;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "PENDING_PAYMENT" => Ok(Self::PendingPayment),
            "PAID" => Ok(Self::Paid),
            "CANCELLED" => Ok(Self::Cancelled),
            _ => Err(InvalidValue::new("status", "is not an order status")),
        }
    }
}

/// One line of an order request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrderLine {
    pub option_id: ProductOptionId,
    pub quantity: Quantity,
}

/// What a buyer asks for: 1..=50 lines, one per option (the same option twice is merged into one line),
/// sorted by option id so that stock is always taken in the same order and never deadlocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderRequest {
    user_id: UserId,
    lines: Vec<OrderLine>,
}

impl OrderRequest {
    pub const MAX_LINES: usize = 50;

    /// # Errors
    /// [`DomainError::Invalid`] for no lines, more than 50 distinct options, or a merged quantity over 1000.
    pub fn new(user_id: UserId, lines: impl IntoIterator<Item = OrderLine>) -> Result<Self, DomainError> {
        let mut merged: BTreeMap<ProductOptionId, i64> = BTreeMap::new();
        for line in lines {
            *merged.entry(line.option_id).or_default() += line.quantity.get();
        }
        if merged.is_empty() || merged.len() > Self::MAX_LINES {
            return Err(InvalidValue::new("items", "must hold between 1 and 50 distinct options").into());
        }
        let lines = merged
            .into_iter()
            .map(|(option_id, units)| Ok(OrderLine { option_id, quantity: Quantity::new(units)? }))
            .collect::<Result<Vec<_>, InvalidValue>>()?;
        Ok(Self { user_id, lines })
    }

    #[must_use]
    pub const fn user_id(&self) -> UserId {
        self.user_id
    }

    /// Ascending by option id.
    #[must_use]
    pub fn lines(&self) -> &[OrderLine] {
        &self.lines
    }
}

/// An order line as stored: names and price copied at order time, so later catalogue edits do not rewrite
/// history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderItem {
    pub product_id: ProductId,
    pub product_option_id: ProductOptionId,
    pub product_name: String,
    pub option_name: String,
    pub quantity: Quantity,
    pub unit_price: Money,
    pub total_price: Money,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    pub id: OrderId,
    pub user_id: UserId,
    pub status: OrderStatus,
    pub total_price: Money,
    pub ordered_at: DateTime<Utc>,
    pub items: Vec<OrderItem>,
    pub payment: Payment,
}

impl Order {
    /// # Errors
    /// [`DomainError::OrderNotPayable`] unless the order is still waiting for payment.
    pub fn ensure_payable(&self) -> Result<(), DomainError> {
        match self.status {
            OrderStatus::PendingPayment => Ok(()),
            status => Err(DomainError::OrderNotPayable { order_id: self.id, status }),
        }
    }
}

/// Sums the lines' totals.
///
/// # Errors
/// [`DomainError::Invalid`] when the total overflows.
pub fn order_total(items: &[OrderItem]) -> Result<Money, DomainError> {
    items
        .iter()
        .try_fold(Money::ZERO, |sum, item| sum.checked_add(item.total_price))
        .ok_or_else(|| InvalidValue::new("items", "the order total is too large").into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(option: i64, quantity: i64) -> OrderLine {
        OrderLine { option_id: ProductOptionId::new(option).unwrap(), quantity: Quantity::new(quantity).unwrap() }
    }

    #[test]
    fn lines_are_merged_per_option_and_sorted() {
        let req = OrderRequest::new(UserId::new(1).unwrap(), [line(9, 1), line(3, 2), line(9, 4)]).unwrap();
        assert_eq!(req.lines(), &[line(3, 2), line(9, 5)]);
    }

    #[test]
    fn requests_need_one_to_fifty_options() {
        let user = UserId::new(1).unwrap();
        assert!(OrderRequest::new(user, []).is_err());
        assert!(OrderRequest::new(user, (1..=50).map(|i| line(i, 1))).is_ok());
        assert!(OrderRequest::new(user, (1..=51).map(|i| line(i, 1))).is_err());
    }

    #[test]
    fn merged_quantity_keeps_the_line_limit() {
        let user = UserId::new(1).unwrap();
        assert!(OrderRequest::new(user, [line(1, 600), line(1, 400)]).is_ok());
        assert!(OrderRequest::new(user, [line(1, 600), line(1, 401)]).is_err());
    }

    #[test]
    fn status_round_trips_through_text() {
        for s in [OrderStatus::PendingPayment, OrderStatus::Paid, OrderStatus::Cancelled] {
            assert_eq!(s.as_str().parse::<OrderStatus>().unwrap(), s);
        }
    }
}
