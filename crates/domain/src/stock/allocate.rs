//! Who gets stock: the orders of a batch in arrival order, each taking all of its lines or none. The database
//! strategies allocate the rows their claim read; `redis-optimistic` allocates its mirror's levels with the same
//! function, between its WATCH and its EXEC.

use std::collections::BTreeMap;

use crate::error::DomainError;
use crate::ids::ProductOptionId;
use crate::money::Stock;
use crate::order::OrderLine;

/// What a batch's allocation decided.
#[derive(Debug)]
pub struct Allocation {
    /// Per order (same positions): `Ok` when it got every line, or why not.
    pub verdicts: Vec<Result<(), DomainError>>,
    /// Units taken per option, summed over the orders that got theirs; options nothing was taken of are absent.
    pub taken: BTreeMap<ProductOptionId, i64>,
}

/// First fit in arrival order: each order in turn takes every line from what the orders before it left, or is
/// refused whole and leaves the units to the orders after it (a later, smaller order may fit where an earlier,
/// larger one did not).
///
/// An order is refused with [`DomainError::OutOfStock`] naming its first short option (ascending), or with
/// [`DomainError::ProductOptionNotFound`] for an option `available` does not hold.
pub fn allocate<'a>(
    available: &BTreeMap<ProductOptionId, Stock>,
    orders: impl IntoIterator<Item = &'a [OrderLine]>,
) -> Allocation {
    let mut left = available.clone();
    let mut taken: BTreeMap<ProductOptionId, i64> = BTreeMap::new();
    let verdicts = orders
        .into_iter()
        .map(|lines| {
            // What this order leaves of each of its options, decided before anything is taken.
            let mut after: BTreeMap<ProductOptionId, Stock> = BTreeMap::new();
            for line in lines {
                let have = match after.get(&line.option_id).or_else(|| left.get(&line.option_id)) {
                    Some(have) => *have,
                    None => return Err(DomainError::ProductOptionNotFound(line.option_id)),
                };
                let rest =
                    have.checked_take(line.quantity).ok_or(DomainError::OutOfStock { option_id: line.option_id })?;
                after.insert(line.option_id, rest);
            }
            for line in lines {
                *taken.entry(line.option_id).or_default() += line.quantity.get();
            }
            left.extend(after);
            Ok(())
        })
        .collect();
    Allocation { verdicts, taken }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money::Quantity;

    fn id(n: i64) -> ProductOptionId {
        ProductOptionId::new(n).unwrap()
    }

    fn lines(of: &[(i64, i64)]) -> Vec<OrderLine> {
        of.iter().map(|(o, q)| OrderLine { option_id: id(*o), quantity: Quantity::new(*q).unwrap() }).collect()
    }

    fn stock(levels: &[(i64, i64)]) -> BTreeMap<ProductOptionId, Stock> {
        levels.iter().map(|(o, n)| (id(*o), Stock::new(*n).unwrap())).collect()
    }

    fn units(levels: &[(i64, i64)]) -> BTreeMap<ProductOptionId, i64> {
        levels.iter().map(|(o, n)| (id(*o), *n)).collect()
    }

    #[test]
    fn stock_goes_to_orders_in_arrival_order_each_whole_or_not_at_all() {
        let orders = [lines(&[(1, 2)]), lines(&[(1, 1), (2, 2)]), lines(&[(1, 1), (2, 1)]), lines(&[(1, 1)])];
        let a = allocate(&stock(&[(1, 3), (2, 1)]), orders.iter().map(Vec::as_slice));
        assert!(a.verdicts[0].is_ok());
        // Short of option 2: none of its lines is taken, so option 1's unit stays for the next order.
        assert!(matches!(a.verdicts[1], Err(DomainError::OutOfStock { option_id }) if option_id == id(2)));
        assert!(a.verdicts[2].is_ok());
        assert!(matches!(a.verdicts[3], Err(DomainError::OutOfStock { option_id }) if option_id == id(1)));
        assert_eq!(a.taken, units(&[(1, 3), (2, 1)]));
    }

    #[test]
    fn an_option_without_a_row_is_not_found_and_takes_nothing() {
        let orders = [lines(&[(1, 1), (9, 1)])];
        let a = allocate(&stock(&[(1, 5)]), orders.iter().map(Vec::as_slice));
        assert!(matches!(a.verdicts[0], Err(DomainError::ProductOptionNotFound(o)) if o == id(9)));
        assert!(a.taken.is_empty());
    }

    #[test]
    fn a_short_order_names_its_first_short_option() {
        let orders = [lines(&[(1, 2), (2, 2), (3, 2)])];
        let a = allocate(&stock(&[(1, 5), (2, 1), (3, 1)]), orders.iter().map(Vec::as_slice));
        assert!(matches!(a.verdicts[0], Err(DomainError::OutOfStock { option_id }) if option_id == id(2)));
        assert!(a.taken.is_empty(), "nothing is taken for a refused order");
    }

    #[test]
    fn a_later_smaller_order_fits_where_an_earlier_larger_one_did_not() {
        let orders = [lines(&[(1, 3)]), lines(&[(1, 1)]), lines(&[(1, 2)])];
        let a = allocate(&stock(&[(1, 2)]), orders.iter().map(Vec::as_slice));
        let fitted: Vec<bool> = a.verdicts.iter().map(Result::is_ok).collect();
        assert_eq!(fitted, vec![false, true, false]);
        assert_eq!(a.taken, units(&[(1, 1)]));
    }

    #[test]
    fn lines_of_one_option_in_one_order_are_summed() {
        let orders = [lines(&[(1, 2), (1, 2)]), lines(&[(1, 1)])];
        let a = allocate(&stock(&[(1, 3)]), orders.iter().map(Vec::as_slice));
        assert!(a.verdicts[0].is_err() && a.verdicts[1].is_ok());
    }

    #[test]
    fn never_takes_more_than_the_stock_whatever_the_batch() {
        // Every mix of order sizes over two options: the taken units never exceed the stock, and an order is
        // refused only if it did not fit in what the admitted orders before it left.
        for seed in 0..500_i64 {
            let orders: Vec<Vec<OrderLine>> = (0..8)
                .map(|i| {
                    let q = (seed * 7 + i * 13) % 4 + 1;
                    if (seed + i) % 3 == 0 { lines(&[(1, q), (2, q)]) } else { lines(&[(1 + (i % 2), q)]) }
                })
                .collect();
            let have = stock(&[(1, seed % 9), (2, seed % 5)]);
            let a = allocate(&have, orders.iter().map(Vec::as_slice));
            let mut left: BTreeMap<ProductOptionId, i64> = have.iter().map(|(o, s)| (*o, s.get())).collect();
            for (order, verdict) in orders.iter().zip(&a.verdicts) {
                let fits = order.iter().all(|l| left[&l.option_id] >= l.quantity.get());
                assert_eq!(verdict.is_ok(), fits, "seed {seed}: {order:?}");
                if fits {
                    order.iter().for_each(|l| *left.get_mut(&l.option_id).unwrap() -= l.quantity.get());
                }
            }
            for (option, taken) in &a.taken {
                assert_eq!(*taken, have[option].get() - left[option], "seed {seed}");
            }
        }
    }
}
