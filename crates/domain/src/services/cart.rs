//! The cart: list, add (merging into the option's line) and remove.

use std::sync::Arc;

use crate::cart::{CartItem, merged_quantity};
use crate::error::DomainError;
use crate::ids::{CartItemId, ProductOptionId, UserId};
use crate::money::Quantity;
use crate::ports::{CartRepository, Clock, UnitOfWork, UserRepository};

#[derive(Clone)]
pub struct CartService {
    carts: Arc<dyn CartRepository>,
    users: Arc<dyn UserRepository>,
    uow: Arc<dyn UnitOfWork>,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for CartService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CartService").finish_non_exhaustive()
    }
}

impl CartService {
    pub fn new(
        carts: Arc<dyn CartRepository>,
        users: Arc<dyn UserRepository>,
        uow: Arc<dyn UnitOfWork>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self { carts, users, uow, clock }
    }

    /// # Errors
    /// [`DomainError::UserNotFound`].
    pub async fn list(&self, user_id: UserId) -> Result<Vec<CartItem>, DomainError> {
        self.ensure_user(user_id).await?;
        self.carts.list(user_id).await
    }

    /// Adds units of an option; the user, the option and the merge are checked and written in one
    /// transaction. The merge rule ([`merged_quantity`]) decides on the line as read; the upsert behind it adds
    /// relatively and refuses to pass [`Quantity::MAX`], so a line never outgrows it however many adds race.
    ///
    /// # Errors
    /// [`DomainError::UserNotFound`], [`DomainError::ProductOptionNotFound`],
    /// [`DomainError::CartQuantityLimitExceeded`].
    pub async fn add(
        &self,
        user_id: UserId,
        option_id: ProductOptionId,
        quantity: Quantity,
    ) -> Result<CartItem, DomainError> {
        let mut tx = self.uow.begin().await?;
        if !tx.user_exists(user_id).await? {
            return Err(DomainError::UserNotFound(user_id));
        }
        if tx.find_option(option_id).await?.is_none() {
            return Err(DomainError::ProductOptionNotFound(option_id));
        }
        let current = tx.cart_quantity(user_id, option_id).await?.map_or(0, Quantity::get);
        merged_quantity(current, quantity)?;
        let item = tx
            .add_to_cart(user_id, option_id, quantity, self.clock.now())
            .await?
            .ok_or(DomainError::CartQuantityLimitExceeded { max: Quantity::MAX })?;
        tx.commit().await?;
        Ok(item)
    }

    /// # Errors
    /// [`DomainError::UserNotFound`]; [`DomainError::CartItemNotFound`] also for another user's line.
    pub async fn remove(&self, user_id: UserId, item_id: CartItemId) -> Result<(), DomainError> {
        self.ensure_user(user_id).await?;
        if self.carts.remove(user_id, item_id, self.clock.now()).await? {
            Ok(())
        } else {
            Err(DomainError::CartItemNotFound(item_id))
        }
    }

    async fn ensure_user(&self, user_id: UserId) -> Result<(), DomainError> {
        match self.users.find(user_id).await? {
            Some(_) => Ok(()),
            None => Err(DomainError::UserNotFound(user_id)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::ProductId;
    use crate::money::{Money, Stock};
    use crate::ports::{
        MockCartRepository, MockClock, MockTransaction, MockUnitOfWork, MockUserRepository, Transaction,
    };
    use crate::product::ProductOption;
    use crate::user::User;
    use chrono::Utc;

    fn uid() -> UserId {
        UserId::new(1).unwrap()
    }

    fn oid() -> ProductOptionId {
        ProductOptionId::new(5).unwrap()
    }

    fn clock() -> Arc<MockClock> {
        let mut clock = MockClock::new();
        clock.expect_now().returning(Utc::now);
        Arc::new(clock)
    }

    fn users(exists: bool) -> Arc<MockUserRepository> {
        let mut users = MockUserRepository::new();
        users
            .expect_find()
            .returning(move |id| Ok(exists.then(|| User { id, name: "kim".into(), balance: Money::ZERO })));
        Arc::new(users)
    }

    fn option() -> ProductOption {
        ProductOption {
            id: oid(),
            product_id: ProductId::new(2).unwrap(),
            name: "L".into(),
            price: Money::new(100).unwrap(),
            stock: Stock::new(3).unwrap(),
        }
    }

    fn item(quantity: i64) -> CartItem {
        CartItem {
            id: CartItemId::new(8).unwrap(),
            user_id: uid(),
            product_option_id: oid(),
            product_id: ProductId::new(2).unwrap(),
            product_name: "shirt".into(),
            option_name: "L".into(),
            price: Money::new(100).unwrap(),
            quantity,
        }
    }

    /// A unit of work whose one transaction is set up by `setup`.
    fn uow(setup: impl FnOnce(&mut MockTransaction) + Send + 'static) -> Arc<MockUnitOfWork> {
        let mut tx = MockTransaction::new();
        setup(&mut tx);
        let mut uow = MockUnitOfWork::new();
        let mut tx = Some(tx);
        uow.expect_begin().times(1).returning(move || {
            let tx: Box<dyn Transaction> = Box::new(tx.take().expect("begin is called once"));
            Ok(tx)
        });
        Arc::new(uow)
    }

    #[tokio::test]
    async fn add_checks_user_and_option_then_merges_and_commits() {
        let uow = uow(|tx| {
            tx.expect_user_exists().returning(|_| Ok(true));
            tx.expect_find_option().returning(|_| Ok(Some(option())));
            tx.expect_cart_quantity().returning(|_, _| Ok(Some(Quantity::new(3).unwrap())));
            tx.expect_add_to_cart().withf(|_, _, q, _| q.get() == 2).returning(|_, _, _, _| Ok(Some(item(5))));
            tx.expect_commit().times(1).returning(|| Ok(()));
        });
        let svc = CartService::new(Arc::new(MockCartRepository::new()), users(true), uow, clock());
        let line = svc.add(uid(), oid(), Quantity::new(2).unwrap()).await.unwrap();
        assert_eq!(line.quantity, 5);
    }

    #[tokio::test]
    async fn add_for_an_unknown_user_writes_nothing() {
        let uow = uow(|tx| {
            tx.expect_user_exists().returning(|_| Ok(false));
            tx.expect_add_to_cart().never();
            tx.expect_commit().never();
        });
        let svc = CartService::new(Arc::new(MockCartRepository::new()), users(false), uow, clock());
        let err = svc.add(uid(), oid(), Quantity::new(1).unwrap()).await.unwrap_err();
        assert!(matches!(err, DomainError::UserNotFound(_)));
    }

    #[tokio::test]
    async fn add_of_an_unknown_option_is_not_found_and_writes_nothing() {
        let uow = uow(|tx| {
            tx.expect_user_exists().returning(|_| Ok(true));
            tx.expect_find_option().returning(|_| Ok(None));
            tx.expect_add_to_cart().never();
            tx.expect_commit().never();
        });
        let svc = CartService::new(Arc::new(MockCartRepository::new()), users(true), uow, clock());
        let err = svc.add(uid(), oid(), Quantity::new(1).unwrap()).await.unwrap_err();
        assert!(matches!(err, DomainError::ProductOptionNotFound(id) if id == oid()));
    }

    #[tokio::test]
    async fn add_past_the_line_limit_is_refused_by_the_merge_rule_before_any_write() {
        let uow = uow(|tx| {
            tx.expect_user_exists().returning(|_| Ok(true));
            tx.expect_find_option().returning(|_| Ok(Some(option())));
            tx.expect_cart_quantity().returning(|_, _| Ok(Some(Quantity::new(1).unwrap())));
            tx.expect_add_to_cart().never();
            tx.expect_commit().never();
        });
        let svc = CartService::new(Arc::new(MockCartRepository::new()), users(true), uow, clock());
        let err = svc.add(uid(), oid(), Quantity::new(1000).unwrap()).await.unwrap_err();
        assert!(matches!(err, DomainError::CartQuantityLimitExceeded { max: 1000 }));
    }

    #[tokio::test]
    async fn a_concurrent_add_that_fills_the_line_first_is_caught_by_the_guard() {
        let uow = uow(|tx| {
            tx.expect_user_exists().returning(|_| Ok(true));
            tx.expect_find_option().returning(|_| Ok(Some(option())));
            tx.expect_cart_quantity().returning(|_, _| Ok(None));
            tx.expect_add_to_cart().returning(|_, _, _, _| Ok(None));
            tx.expect_commit().never();
        });
        let svc = CartService::new(Arc::new(MockCartRepository::new()), users(true), uow, clock());
        let err = svc.add(uid(), oid(), Quantity::new(1000).unwrap()).await.unwrap_err();
        assert!(matches!(err, DomainError::CartQuantityLimitExceeded { .. }));
    }

    #[tokio::test]
    async fn list_of_an_unknown_user_is_not_found() {
        let svc = CartService::new(
            Arc::new(MockCartRepository::new()),
            users(false),
            Arc::new(MockUnitOfWork::new()),
            clock(),
        );
        assert!(matches!(svc.list(uid()).await, Err(DomainError::UserNotFound(_))));
    }

    #[tokio::test]
    async fn list_returns_the_lines() {
        let mut carts = MockCartRepository::new();
        carts.expect_list().returning(|_| Ok(vec![item(1), item(2)]));
        let svc = CartService::new(Arc::new(carts), users(true), Arc::new(MockUnitOfWork::new()), clock());
        assert_eq!(svc.list(uid()).await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn removing_a_line_the_user_does_not_have_is_not_found() {
        let mut carts = MockCartRepository::new();
        carts.expect_remove().returning(|_, _, _| Ok(false));
        let svc = CartService::new(Arc::new(carts), users(true), Arc::new(MockUnitOfWork::new()), clock());
        let err = svc.remove(uid(), CartItemId::new(8).unwrap()).await.unwrap_err();
        assert!(matches!(err, DomainError::CartItemNotFound(id) if id.get() == 8));
    }

    #[tokio::test]
    async fn removing_an_own_line_succeeds() {
        let mut carts = MockCartRepository::new();
        carts.expect_remove().returning(|_, _, _| Ok(true));
        let svc = CartService::new(Arc::new(carts), users(true), Arc::new(MockUnitOfWork::new()), clock());
        assert!(svc.remove(uid(), CartItemId::new(8).unwrap()).await.is_ok());
    }
}
