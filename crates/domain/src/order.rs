//! Orders: lines priced at order time, and the status machine PENDING_PAYMENT -> PAID | CANCELLED.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};

use crate::error::{DomainError, InvalidValue};
use crate::ids::{OrderId, ProductId, ProductOptionId, UserId};
use crate::money::{Money, Quantity};
use crate::payment::Payment;
use crate::product::{ProductOption, ProductStatus};

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
            .map(|(option_id, units)| {
                let quantity = Quantity::new(units)
                    .map_err(|_| InvalidValue::new("items", "the lines of one option add up to more than 1000"))?;
                Ok(OrderLine { option_id, quantity })
            })
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

/// An option as an order sees it: with its product's name and whether the product is on sale.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderableOption {
    pub option: ProductOption,
    pub product_name: String,
    pub product_status: ProductStatus,
}

/// An order priced and ready to insert, with a pending payment of its total.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewOrder {
    pub user_id: UserId,
    pub items: Vec<OrderItem>,
    pub total_price: Money,
    pub ordered_at: DateTime<Utc>,
}

impl NewOrder {
    /// Prices every line of `request` from `options` (the live options found for it).
    ///
    /// # Errors
    /// [`DomainError::ProductOptionNotFound`] for a line whose option is not among `options`;
    /// [`DomainError::ProductNotOnSale`] for an option of an inactive product; [`DomainError::Invalid`] when a
    /// total overflows.
    pub fn price(request: &OrderRequest, options: &[OrderableOption], now: DateTime<Utc>) -> Result<Self, DomainError> {
        let mut items = Vec::with_capacity(request.lines().len());
        for line in request.lines() {
            let found = options
                .iter()
                .find(|o| o.option.id == line.option_id)
                .ok_or(DomainError::ProductOptionNotFound(line.option_id))?;
            if found.product_status != ProductStatus::Active {
                return Err(DomainError::ProductNotOnSale { product_id: found.option.product_id });
            }
            let total_price = found
                .option
                .price
                .checked_mul(line.quantity)
                .ok_or(InvalidValue::new("items", "a line total is too large"))?;
            items.push(OrderItem {
                product_id: found.option.product_id,
                product_option_id: line.option_id,
                product_name: found.product_name.clone(),
                option_name: found.option.name.clone(),
                quantity: line.quantity,
                unit_price: found.option.price,
                total_price,
            });
        }
        let total_price = order_total(&items)?;
        Ok(Self { user_id: request.user_id(), items, total_price, ordered_at: now })
    }
}

impl Order {
    /// The stock lines this order holds, ascending by option id (the order every writer locks in).
    #[must_use]
    pub fn stock_lines(&self) -> Vec<OrderLine> {
        let mut lines: Vec<OrderLine> =
            self.items.iter().map(|i| OrderLine { option_id: i.product_option_id, quantity: i.quantity }).collect();
        lines.sort_by_key(|l| l.option_id);
        lines
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
        let err = OrderRequest::new(user, [line(1, 600), line(1, 401)]).unwrap_err();
        assert!(matches!(err, DomainError::Invalid(v) if v.field == "items"));
    }

    fn orderable(id: i64, price: i64, status: ProductStatus) -> OrderableOption {
        OrderableOption {
            option: ProductOption {
                id: ProductOptionId::new(id).unwrap(),
                product_id: ProductId::new(100 + id).unwrap(),
                name: format!("opt{id}"),
                price: Money::new(price).unwrap(),
                stock: crate::money::Stock::new(5).unwrap(),
            },
            product_name: format!("product{id}"),
            product_status: status,
        }
    }

    #[test]
    fn pricing_copies_names_and_prices_and_sums_the_total() {
        let req = OrderRequest::new(UserId::new(1).unwrap(), [line(2, 3), line(1, 1)]).unwrap();
        let options = [orderable(1, 1000, ProductStatus::Active), orderable(2, 250, ProductStatus::Active)];
        let order = NewOrder::price(&req, &options, Utc::now()).unwrap();
        assert_eq!(order.total_price.won(), 1750);
        assert_eq!(order.items[0].product_option_id.get(), 1, "lines stay ascending by option");
        assert_eq!((order.items[1].unit_price.won(), order.items[1].total_price.won()), (250, 750));
        assert_eq!((order.items[1].product_name.as_str(), order.items[1].option_name.as_str()), ("product2", "opt2"));
    }

    #[test]
    fn pricing_refuses_missing_options_and_products_off_sale() {
        let req = OrderRequest::new(UserId::new(1).unwrap(), [line(1, 1), line(2, 1)]).unwrap();
        let err = NewOrder::price(&req, &[orderable(1, 1, ProductStatus::Active)], Utc::now()).unwrap_err();
        assert!(matches!(err, DomainError::ProductOptionNotFound(id) if id.get() == 2));
        let options = [orderable(1, 1, ProductStatus::Active), orderable(2, 1, ProductStatus::Inactive)];
        let err = NewOrder::price(&req, &options, Utc::now()).unwrap_err();
        assert!(matches!(err, DomainError::ProductNotOnSale { product_id } if product_id.get() == 102));
    }

    #[test]
    fn pricing_refuses_overflowing_totals() {
        let req = OrderRequest::new(UserId::new(1).unwrap(), [line(1, 1000)]).unwrap();
        let err = NewOrder::price(&req, &[orderable(1, i64::MAX / 10, ProductStatus::Active)], Utc::now()).unwrap_err();
        assert!(matches!(err, DomainError::Invalid(_)));
    }

    #[test]
    fn status_round_trips_through_text() {
        for s in [OrderStatus::PendingPayment, OrderStatus::Paid, OrderStatus::Cancelled] {
            assert_eq!(s.as_str().parse::<OrderStatus>().unwrap(), s);
        }
    }
}
