//! A user's cart: one line per option, adding an option that is already there adds to its line.

use crate::error::DomainError;
use crate::ids::{CartItemId, ProductId, ProductOptionId, UserId};
use crate::money::{Money, Quantity};

/// A cart line with what a client shows of its option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CartItem {
    pub id: CartItemId,
    pub user_id: UserId,
    pub product_option_id: ProductOptionId,
    pub product_id: ProductId,
    pub product_name: String,
    pub option_name: String,
    pub price: Money,
    pub quantity: i64,
}

/// The rule for merging a line: the sum must stay within what one line may hold.
///
/// # Errors
/// [`DomainError::CartQuantityLimitExceeded`] when `current + added` passes [`Quantity::MAX`].
pub fn merged_quantity(current: i64, added: Quantity) -> Result<Quantity, DomainError> {
    current
        .checked_add(added.get())
        .and_then(|sum| Quantity::new(sum).ok())
        .ok_or(DomainError::CartQuantityLimitExceeded { max: Quantity::MAX })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merging_adds_quantities_up_to_the_line_limit() {
        assert_eq!(merged_quantity(0, Quantity::new(3).unwrap()).unwrap().get(), 3);
        assert_eq!(merged_quantity(997, Quantity::new(3).unwrap()).unwrap().get(), 1000);
        assert!(matches!(
            merged_quantity(998, Quantity::new(3).unwrap()),
            Err(DomainError::CartQuantityLimitExceeded { max: 1000 })
        ));
    }
}
