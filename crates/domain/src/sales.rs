//! Units sold per option per day, and the popular-products ranking read from them.

use chrono::{Days, NaiveDate};

use crate::error::InvalidValue;
use std::collections::BTreeMap;

use crate::ids::{ProductId, ProductOptionId};
use crate::order::OrderItem;

/// An inclusive range of days, at most [`DateRange::MAX_DAYS`] long, so a ranking never scans years of rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateRange {
    from: NaiveDate,
    to: NaiveDate,
}

impl DateRange {
    pub const MAX_DAYS: i64 = 92;
    /// The default window: the last three days, today included.
    pub const DEFAULT_DAYS: u64 = 3;

    /// # Errors
    /// [`InvalidValue`] when `from` is after `to` or the range spans more than 92 days.
    pub fn new(from: NaiveDate, to: NaiveDate) -> Result<Self, InvalidValue> {
        if from > to {
            return Err(InvalidValue::new("from", "must not be after to"));
        }
        if (to - from).num_days() + 1 > Self::MAX_DAYS {
            return Err(InvalidValue::new("to", "the range may span at most 92 days"));
        }
        Ok(Self { from, to })
    }

    /// The range a request gets for what it left out: missing ends default to the last three days up to
    /// `today`.
    ///
    /// # Errors
    /// As [`DateRange::new`].
    pub fn with_defaults(
        from: Option<NaiveDate>,
        to: Option<NaiveDate>,
        today: NaiveDate,
    ) -> Result<Self, InvalidValue> {
        let back = Days::new(Self::DEFAULT_DAYS - 1);
        let (from, to) = match (from, to) {
            (Some(from), Some(to)) => (from, to),
            (Some(from), None) => (from, today.max(from)),
            (None, Some(to)) => (to.checked_sub_days(back).unwrap_or(to), to),
            (None, None) => (today.checked_sub_days(back).unwrap_or(today), today),
        };
        Self::new(from, to)
    }

    #[must_use]
    pub const fn from(self) -> NaiveDate {
        self.from
    }

    #[must_use]
    pub const fn to(self) -> NaiveDate {
        self.to
    }
}

/// How many products a ranking lists: `1..=50`, 5 by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankingLimit(u32);

impl RankingLimit {
    pub const DEFAULT: Self = Self(5);

    /// # Errors
    /// [`InvalidValue`] outside `1..=50`.
    pub fn new(limit: i64) -> Result<Self, InvalidValue> {
        u32::try_from(limit)
            .ok()
            .filter(|l| (1..=50).contains(l))
            .map(Self)
            .ok_or(InvalidValue::new("limit", "must be between 1 and 50"))
    }

    #[must_use]
    pub const fn get(self) -> u32 {
        self.0
    }
}

/// Units of one option sold on one day: what a completed payment adds to `daily_popular_products`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DailySales {
    pub day: NaiveDate,
    pub product_id: ProductId,
    pub option_id: ProductOptionId,
    pub units: i64,
}

impl DailySales {
    /// One entry per option, summed and ascending by option id, so that every writer of the day's rows takes
    /// their locks in the same order.
    #[must_use]
    pub fn of_items(day: NaiveDate, items: &[OrderItem]) -> Vec<Self> {
        let mut per_option: BTreeMap<ProductOptionId, Self> = BTreeMap::new();
        for item in items {
            per_option
                .entry(item.product_option_id)
                .or_insert(Self { day, product_id: item.product_id, option_id: item.product_option_id, units: 0 })
                .units += item.quantity.get();
        }
        per_option.into_values().collect()
    }
}

/// A product's place in the ranking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PopularProduct {
    pub rank: u32,
    pub product_id: ProductId,
    pub name: String,
    pub total_sold: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day(d: &str) -> NaiveDate {
        d.parse().unwrap()
    }

    #[test]
    fn range_is_inclusive_and_at_most_92_days() {
        assert!(DateRange::new(day("2026-01-01"), day("2026-01-01")).is_ok());
        assert!(DateRange::new(day("2026-01-01"), day("2026-04-02")).is_ok(), "92 days");
        assert_eq!(DateRange::new(day("2026-01-01"), day("2026-04-03")).unwrap_err().field, "to");
        assert_eq!(DateRange::new(day("2026-01-02"), day("2026-01-01")).unwrap_err().field, "from");
    }

    #[test]
    fn defaults_are_the_last_three_days_including_today() {
        let today = day("2026-11-25");
        let r = DateRange::with_defaults(None, None, today).unwrap();
        assert_eq!((r.from(), r.to()), (day("2026-11-23"), today));
        let r = DateRange::with_defaults(None, Some(day("2026-11-10")), today).unwrap();
        assert_eq!((r.from(), r.to()), (day("2026-11-08"), day("2026-11-10")));
        let r = DateRange::with_defaults(Some(day("2026-11-20")), None, today).unwrap();
        assert_eq!((r.from(), r.to()), (day("2026-11-20"), today));
    }

    #[test]
    fn daily_sales_sum_per_option_in_option_order() {
        use crate::money::{Money, Quantity};
        let item = |option: i64, qty: i64| OrderItem {
            product_id: ProductId::new(1).unwrap(),
            product_option_id: ProductOptionId::new(option).unwrap(),
            product_name: "p".into(),
            option_name: "o".into(),
            quantity: Quantity::new(qty).unwrap(),
            unit_price: Money::ZERO,
            total_price: Money::ZERO,
        };
        let sales = DailySales::of_items(day("2026-11-25"), &[item(9, 2), item(3, 1), item(9, 4)]);
        let got: Vec<(i64, i64)> = sales.iter().map(|s| (s.option_id.get(), s.units)).collect();
        assert_eq!(got, vec![(3, 1), (9, 6)]);
    }

    #[test]
    fn limit_bounds() {
        assert!(RankingLimit::new(0).is_err());
        assert_eq!(RankingLimit::new(50).unwrap().get(), 50);
        assert!(RankingLimit::new(51).is_err());
        assert!(RankingLimit::new(-1).is_err());
    }
}
