//! The decision a reservation makes between its WATCH and its MULTI: which orders of a batch the mirrored stock
//! admits, in arrival order, each order all its lines or none. Pure, so it is tested without Redis.

use std::collections::BTreeMap;

use shop_domain::ids::ProductOptionId;
use shop_domain::order::OrderLine;

/// What the mirror admits of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Allocation {
    /// Per order (same positions): admitted, or refused naming its first short option.
    pub verdicts: Vec<Result<(), ProductOptionId>>,
    /// Units to reserve per option: the sum over the admitted orders. Empty when nothing is admitted.
    pub take: BTreeMap<ProductOptionId, i64>,
}

/// First fit in arrival order: each order in turn takes every line from what the orders before it left, or is
/// refused whole and leaves the units to the orders after it (a later, smaller order may fit where an earlier,
/// larger one did not). Options missing from `available` are not limited here: they have no row in the
/// database, and the order's transaction refuses them with the rest of its validation.
pub(crate) fn allocate(available: &BTreeMap<ProductOptionId, i64>, orders: &[&[OrderLine]]) -> Allocation {
    let mut left = available.clone();
    let mut take: BTreeMap<ProductOptionId, i64> = BTreeMap::new();
    let verdicts = orders
        .iter()
        .map(|lines| {
            // An order names an option once, but nothing here relies on it: its lines are summed per option,
            // ascending, so the option reported short is the first in the order's (ascending) line order.
            let mut need: BTreeMap<ProductOptionId, i64> = BTreeMap::new();
            for line in lines.iter().filter(|l| left.contains_key(&l.option_id)) {
                *need.entry(line.option_id).or_default() += line.quantity.get();
            }
            if let Some((short, _)) = need.iter().find(|(id, n)| left.get(id).is_none_or(|have| *have < **n)) {
                return Err(*short);
            }
            for (id, n) in need {
                *left.entry(id).or_default() -= n;
                *take.entry(id).or_default() += n;
            }
            Ok(())
        })
        .collect();
    Allocation { verdicts, take }
}

#[cfg(test)]
mod tests {
    use shop_domain::money::Quantity;

    use super::*;

    fn id(n: i64) -> ProductOptionId {
        ProductOptionId::new(n).unwrap()
    }

    fn line(option: i64, quantity: i64) -> OrderLine {
        OrderLine { option_id: id(option), quantity: Quantity::new(quantity).unwrap() }
    }

    fn stock(levels: &[(i64, i64)]) -> BTreeMap<ProductOptionId, i64> {
        levels.iter().map(|(o, n)| (id(*o), *n)).collect()
    }

    #[test]
    fn orders_are_served_in_arrival_order_until_the_stock_runs_out() {
        let orders: Vec<Vec<OrderLine>> = (0..5).map(|_| vec![line(1, 1)]).collect();
        let refs: Vec<&[OrderLine]> = orders.iter().map(Vec::as_slice).collect();
        let a = allocate(&stock(&[(1, 3)]), &refs);
        assert_eq!(a.verdicts, vec![Ok(()), Ok(()), Ok(()), Err(id(1)), Err(id(1))]);
        assert_eq!(a.take, stock(&[(1, 3)]));
    }

    #[test]
    fn an_order_that_does_not_fit_is_refused_whole_and_leaves_its_units_to_later_orders() {
        // The second order wants 1 of option 1 (there) and 5 of option 2 (only 4): it takes neither, so the
        // third order still gets option 1's last unit, and the fourth the four units of option 2.
        let orders = [vec![line(1, 1)], vec![line(1, 1), line(2, 5)], vec![line(1, 1)], vec![line(2, 4)]];
        let refs: Vec<&[OrderLine]> = orders.iter().map(Vec::as_slice).collect();
        let a = allocate(&stock(&[(1, 2), (2, 4)]), &refs);
        assert_eq!(a.verdicts, vec![Ok(()), Err(id(2)), Ok(()), Ok(())]);
        assert_eq!(a.take, stock(&[(1, 2), (2, 4)]));
    }

    #[test]
    fn a_short_order_names_its_first_short_option() {
        let orders = [vec![line(1, 2), line(2, 2), line(3, 2)]];
        let refs: Vec<&[OrderLine]> = orders.iter().map(Vec::as_slice).collect();
        let a = allocate(&stock(&[(1, 5), (2, 1), (3, 1)]), &refs);
        assert_eq!(a.verdicts, vec![Err(id(2))]);
        assert!(a.take.is_empty(), "nothing is reserved for a refused order");
    }

    #[test]
    fn a_later_smaller_order_fits_where_an_earlier_larger_one_did_not() {
        let orders = [vec![line(1, 3)], vec![line(1, 1)], vec![line(1, 2)]];
        let refs: Vec<&[OrderLine]> = orders.iter().map(Vec::as_slice).collect();
        let a = allocate(&stock(&[(1, 2)]), &refs);
        assert_eq!(a.verdicts, vec![Err(id(1)), Ok(()), Err(id(1))]);
        assert_eq!(a.take, stock(&[(1, 1)]));
    }

    #[test]
    fn lines_of_one_option_in_one_order_are_summed() {
        let orders = [vec![line(1, 2), line(1, 2)], vec![line(1, 1)]];
        let refs: Vec<&[OrderLine]> = orders.iter().map(Vec::as_slice).collect();
        let a = allocate(&stock(&[(1, 3)]), &refs);
        assert_eq!(a.verdicts, vec![Err(id(1)), Ok(())]);
    }

    #[test]
    fn options_unknown_to_the_database_are_left_to_the_transaction() {
        let orders = [vec![line(1, 1), line(9, 1000)]];
        let refs: Vec<&[OrderLine]> = orders.iter().map(Vec::as_slice).collect();
        let a = allocate(&stock(&[(1, 1)]), &refs);
        assert_eq!(a.verdicts, vec![Ok(())]);
        assert_eq!(a.take, stock(&[(1, 1)]), "only the known option is reserved");
    }

    #[test]
    fn a_negative_mirror_refuses_everyone() {
        // An admin count below the reservations in flight leaves the mirror owing units until they settle.
        let orders = [vec![line(1, 1)]];
        let refs: Vec<&[OrderLine]> = orders.iter().map(Vec::as_slice).collect();
        let a = allocate(&stock(&[(1, -2)]), &refs);
        assert_eq!(a.verdicts, vec![Err(id(1))]);
    }

    #[test]
    fn never_admits_more_than_the_stock_whatever_the_batch() {
        // Every mix of order sizes over two options: the admitted orders never need more than there is, and an
        // order is refused only if it did not fit in what the admitted orders before it left.
        for seed in 0..500_i64 {
            let orders: Vec<Vec<OrderLine>> = (0..8)
                .map(|i| {
                    let q = (seed * 7 + i * 13) % 4 + 1;
                    if (seed + i) % 3 == 0 { vec![line(1, q), line(2, q)] } else { vec![line(1 + (i % 2), q)] }
                })
                .collect();
            let refs: Vec<&[OrderLine]> = orders.iter().map(Vec::as_slice).collect();
            let have = stock(&[(1, seed % 9), (2, seed % 5)]);
            let a = allocate(&have, &refs);
            let mut left = have.clone();
            for (order, verdict) in orders.iter().zip(&a.verdicts) {
                let fits = order.iter().all(|l| left[&l.option_id] >= l.quantity.get());
                assert_eq!(verdict.is_ok(), fits, "seed {seed}: {order:?}");
                if fits {
                    order.iter().for_each(|l| *left.get_mut(&l.option_id).unwrap() -= l.quantity.get());
                }
            }
            for (option, taken) in &a.take {
                assert!(*taken <= have[option], "seed {seed}: took {taken} of {}", have[option]);
                assert_eq!(*taken, have[option] - left[option]);
            }
        }
    }
}
