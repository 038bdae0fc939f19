//! Products, their options (the unit with a price and stock), and what an admin may create.

use std::fmt;
use std::str::FromStr;

use crate::error::{DomainError, InvalidValue};
use crate::ids::{ProductId, ProductOptionId};
use crate::money::{Money, Stock};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProductStatus {
    /// On sale: options can be ordered.
    Active,
    /// Listed but not on sale.
    Inactive,
}

impl ProductStatus {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Active => "ACTIVE",
            Self::Inactive => "INACTIVE",
        }
    }
}

impl fmt::Display for ProductStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ProductStatus {
    type Err = InvalidValue;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ACTIVE" => Ok(Self::Active),
            "INACTIVE" => Ok(Self::Inactive),
            _ => Err(InvalidValue::new("status", "must be ACTIVE or INACTIVE")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProductOption {
    pub id: ProductOptionId,
    pub product_id: ProductId,
    pub name: String,
    pub price: Money,
    pub stock: Stock,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Product {
    pub id: ProductId,
    pub name: String,
    pub status: ProductStatus,
    /// Ordered by option id.
    pub options: Vec<ProductOption>,
}

impl Product {
    /// # Errors
    /// [`DomainError::ProductNotOnSale`] unless the product is [`ProductStatus::Active`].
    pub fn ensure_on_sale(&self) -> Result<(), DomainError> {
        match self.status {
            ProductStatus::Active => Ok(()),
            ProductStatus::Inactive => Err(DomainError::ProductNotOnSale { product_id: self.id }),
        }
    }
}

/// A product name (1..=200 characters) or an option name (1..=100), trimmed, without control characters.
fn bounded_text(raw: &str, field: &'static str, max: usize, too_long: &'static str) -> Result<String, InvalidValue> {
    let text = raw.trim();
    if text.chars().any(char::is_control) {
        return Err(InvalidValue::new(field, CONTROL_CHARACTERS));
    }
    match text.chars().count() {
        0 => Err(InvalidValue::new(field, "must not be blank")),
        n if n <= max => Ok(text.to_owned()),
        _ => Err(InvalidValue::new(field, too_long)),
    }
}

/// Why text with control characters is refused: NUL is not storable on PostgreSQL, and none of them belongs in
/// a name; one rule on every store.
pub(crate) const CONTROL_CHARACTERS: &str = "must not contain control characters";

/// An option as an admin creates it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewOption {
    name: String,
    price: Money,
    stock: Stock,
}

impl NewOption {
    /// # Errors
    /// [`InvalidValue`] for a blank or over-long name, a price outside `0..=1_000_000_000` or a bad stock.
    pub fn new(name: &str, price: i64, stock: i64) -> Result<Self, InvalidValue> {
        let name = bounded_text(name, "options[].name", 100, "must be at most 100 characters")?;
        let price = Money::new(price)
            .ok()
            .filter(|p| *p <= Money::MAX_PRICE)
            .ok_or(InvalidValue::new("options[].price", "must be between 0 and 1000000000"))?;
        let stock =
            Stock::new(stock).map_err(|_| InvalidValue::new("options[].stock", "must be between 0 and 1000000000"))?;
        Ok(Self { name, price, stock })
    }

    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    #[must_use]
    pub const fn price(&self) -> Money {
        self.price
    }

    #[must_use]
    pub const fn stock(&self) -> Stock {
        self.stock
    }
}

/// A product as an admin creates it: a name and 1..=50 options with distinct names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewProduct {
    name: String,
    status: ProductStatus,
    options: Vec<NewOption>,
}

impl NewProduct {
    pub const MAX_OPTIONS: usize = 50;

    /// # Errors
    /// [`InvalidValue`] for a bad name, no options, more than 50, or two options of one name.
    pub fn new(name: &str, status: ProductStatus, options: Vec<NewOption>) -> Result<Self, InvalidValue> {
        let name = bounded_text(name, "name", 200, "must be at most 200 characters")?;
        if options.is_empty() || options.len() > Self::MAX_OPTIONS {
            return Err(InvalidValue::new("options", "must hold between 1 and 50 options"));
        }
        let mut names: Vec<&str> = options.iter().map(NewOption::name).collect();
        names.sort_unstable();
        if names.windows(2).any(|pair| pair[0] == pair[1]) {
            return Err(InvalidValue::new("options", "option names must be distinct"));
        }
        Ok(Self { name, status, options })
    }

    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    #[must_use]
    pub const fn status(&self) -> ProductStatus {
        self.status
    }

    #[must_use]
    pub fn options(&self) -> &[NewOption] {
        &self.options
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_active_products_are_on_sale() {
        let mut p = Product {
            id: ProductId::new(1).unwrap(),
            name: "shirt".into(),
            status: ProductStatus::Active,
            options: vec![],
        };
        assert!(p.ensure_on_sale().is_ok());
        p.status = ProductStatus::Inactive;
        assert!(matches!(p.ensure_on_sale(), Err(DomainError::ProductNotOnSale { .. })));
    }

    #[test]
    fn status_round_trips_through_text() {
        for s in [ProductStatus::Active, ProductStatus::Inactive] {
            assert_eq!(s.as_str().parse::<ProductStatus>().unwrap(), s);
        }
        assert!("active".parse::<ProductStatus>().is_err());
    }

    #[test]
    fn names_with_control_characters_are_refused() {
        assert_eq!(NewOption::new("S\u{0}", 1000, 5).unwrap_err().field, "options[].name");
        assert!(NewOption::new("tab\tbed", 1000, 5).is_err());
        assert!(NewProduct::new("shirt\u{0}", ProductStatus::Active, vec![]).is_err());
    }

    #[test]
    fn new_product_rules() {
        let opt = |n: &str| NewOption::new(n, 1000, 5).unwrap();
        assert!(NewProduct::new("shirt", ProductStatus::Active, vec![opt("S"), opt("M")]).is_ok());
        assert_eq!(NewProduct::new(" ", ProductStatus::Active, vec![opt("S")]).unwrap_err().field, "name");
        assert_eq!(NewProduct::new("shirt", ProductStatus::Active, vec![]).unwrap_err().field, "options");
        assert_eq!(
            NewProduct::new("shirt", ProductStatus::Active, vec![opt("S"), opt("S")]).unwrap_err().field,
            "options"
        );
        assert!(
            NewProduct::new("shirt", ProductStatus::Active, (0..51).map(|i| opt(&i.to_string())).collect()).is_err()
        );
    }

    #[test]
    fn new_option_rules() {
        assert!(NewOption::new("S", 0, 0).is_ok());
        assert_eq!(NewOption::new("S", -1, 0).unwrap_err().field, "options[].price");
        assert_eq!(NewOption::new("S", 1_000_000_001, 0).unwrap_err().field, "options[].price");
        assert_eq!(NewOption::new("S", 1, -1).unwrap_err().field, "options[].stock");
        assert_eq!(NewOption::new(&"x".repeat(101), 1, 1).unwrap_err().field, "options[].name");
    }
}
