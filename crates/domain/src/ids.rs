//! Typed ids: an `i64` that is known to be positive, one type per aggregate so that an order id can never be
//! passed where a user id is expected.

use std::fmt;

use crate::error::InvalidValue;

macro_rules! typed_id {
    ($(#[$doc:meta])* $name:ident, $field:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(i64);

        impl $name {
            /// Accepts positive integers only: ids start at 1 in every table.
            ///
            /// # Errors
            /// [`InvalidValue`] when `raw` is zero or negative.
            pub fn new(raw: i64) -> Result<Self, InvalidValue> {
                if raw > 0 {
                    Ok(Self(raw))
                } else {
                    Err(InvalidValue::new($field, "must be a positive integer"))
                }
            }

            #[must_use]
            pub const fn get(self) -> i64 {
                self.0
            }
        }

        impl TryFrom<i64> for $name {
            type Error = InvalidValue;

            fn try_from(raw: i64) -> Result<Self, Self::Error> {
                Self::new(raw)
            }
        }

        impl From<$name> for i64 {
            fn from(id: $name) -> i64 {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

typed_id!(
    /// Identifies a [`crate::user::User`].
    UserId,
    "userId"
);
typed_id!(
    /// Identifies a [`crate::product::Product`].
    ProductId,
    "productId"
);
typed_id!(
    /// Identifies a [`crate::product::ProductOption`], the unit that has a price and stock.
    ProductOptionId,
    "productOptionId"
);
typed_id!(
    /// Identifies a line of a user's cart.
    CartItemId,
    "cartItemId"
);
typed_id!(
    /// Identifies an [`crate::order::Order`].
    OrderId,
    "orderId"
);
typed_id!(
    /// Identifies a [`crate::payment::Payment`].
    PaymentId,
    "paymentId"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_must_be_positive() {
        assert_eq!(UserId::new(1).map(UserId::get), Ok(1));
        assert_eq!(UserId::new(0).unwrap_err().field, "userId");
        assert!(ProductOptionId::new(-5).is_err());
        assert_eq!(OrderId::try_from(i64::MAX).map(i64::from), Ok(i64::MAX));
    }
}
