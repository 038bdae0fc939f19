//! Browsing the catalogue, the popular-products ranking, and the admin's product and stock edits.

use std::sync::Arc;

use chrono::NaiveDate;

use crate::error::DomainError;
use crate::ids::{ProductId, ProductOptionId};
use crate::money::Stock;
use crate::page::{Page, PageRequest};
use crate::ports::{CatalogueChanges, Clock, NoCatalogueReaders, NoStockMirror, ProductRepository, StockMirror};
use crate::product::{NewProduct, Product, ProductOption};
use crate::sales::{DateRange, PopularProduct, RankingLimit};

#[derive(Clone)]
pub struct CatalogService {
    products: Arc<dyn ProductRepository>,
    clock: Arc<dyn Clock>,
    mirror: Arc<dyn StockMirror>,
    catalogue: Arc<dyn CatalogueChanges>,
}

impl std::fmt::Debug for CatalogService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CatalogService").finish_non_exhaustive()
    }
}

/// The ranking and the range it covers (after defaults were applied).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ranking {
    pub range: DateRange,
    pub items: Vec<PopularProduct>,
}

impl CatalogService {
    pub fn new(products: Arc<dyn ProductRepository>, clock: Arc<dyn Clock>) -> Self {
        Self { products, clock, mirror: Arc::new(NoStockMirror), catalogue: Arc::new(NoCatalogueReaders) }
    }

    /// Tells `mirror` of every stock count an admin sets (after it is stored): the strategy's copy of the stock,
    /// when it keeps one.
    #[must_use]
    pub fn with_stock_mirror(mut self, mirror: Arc<dyn StockMirror>) -> Self {
        self.mirror = mirror;
        self
    }

    /// Tells `catalogue` of every product added and stock count set, after the write.
    #[must_use]
    pub fn with_catalogue_changes(mut self, catalogue: Arc<dyn CatalogueChanges>) -> Self {
        self.catalogue = catalogue;
        self
    }

    /// A page of products with the total.
    ///
    /// # Errors
    /// [`DomainError::Unexpected`] when the store fails.
    pub async fn list(&self, page: PageRequest) -> Result<Page<Product>, DomainError> {
        let total = self.products.count_live().await?;
        Ok(Page { items: self.products.list(page).await?, page: page.page(), size: page.size(), total })
    }

    /// A page of products without the total (for a reader that knows it).
    ///
    /// # Errors
    /// [`DomainError::Unexpected`] when the store fails.
    pub async fn list_items(&self, page: PageRequest) -> Result<Vec<Product>, DomainError> {
        self.products.list(page).await
    }

    /// How many products are on the shelf.
    ///
    /// # Errors
    /// [`DomainError::Unexpected`] when the store fails.
    pub async fn count(&self) -> Result<u64, DomainError> {
        self.products.count_live().await
    }

    /// # Errors
    /// [`DomainError::ProductNotFound`], also for a soft-deleted product.
    pub async fn get(&self, id: ProductId) -> Result<Product, DomainError> {
        self.products.find(id).await?.ok_or(DomainError::ProductNotFound(id))
    }

    /// The best sellers over `from..=to`; missing ends default to the last three days including today.
    ///
    /// # Errors
    /// [`DomainError::Invalid`] for `from > to` or a range over 92 days.
    pub async fn popular(
        &self,
        from: Option<NaiveDate>,
        to: Option<NaiveDate>,
        limit: RankingLimit,
    ) -> Result<Ranking, DomainError> {
        let range = DateRange::with_defaults(from, to, self.clock.now().date_naive())?;
        let items = self.products.popular(range, limit).await?;
        Ok(Ranking { range, items })
    }

    /// # Errors
    /// [`DomainError::Unexpected`] when the store fails.
    pub async fn create(&self, product: NewProduct) -> Result<Product, DomainError> {
        let created = self.products.create(&product, self.clock.now()).await?;
        self.catalogue.products_changed().await;
        Ok(created)
    }

    /// # Errors
    /// [`DomainError::ProductOptionNotFound`].
    pub async fn set_stock(&self, id: ProductOptionId, stock: Stock) -> Result<ProductOption, DomainError> {
        let option = self.products.set_stock(id, stock, self.clock.now()).await?;
        self.mirror.stock_set(id, option.stock).await;
        self.catalogue.stock_moved(&[id]).await;
        Ok(option)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money::Money;
    use crate::ports::{MockClock, MockProductRepository, MockStockMirror};
    use crate::product::{NewOption, ProductStatus};
    use chrono::{TimeZone, Utc};
    use mockall::predicate::eq;

    fn clock() -> Arc<MockClock> {
        let mut clock = MockClock::new();
        clock.expect_now().returning(|| Utc.with_ymd_and_hms(2026, 11, 25, 23, 59, 0).unwrap());
        Arc::new(clock)
    }

    fn day(d: &str) -> NaiveDate {
        d.parse().unwrap()
    }

    fn pid(n: i64) -> ProductId {
        ProductId::new(n).unwrap()
    }

    #[tokio::test]
    async fn get_of_a_missing_product_is_not_found() {
        let mut repo = MockProductRepository::new();
        repo.expect_find().with(eq(pid(3))).returning(|_| Ok(None));
        let err = CatalogService::new(Arc::new(repo), clock()).get(pid(3)).await.unwrap_err();
        assert!(matches!(err, DomainError::ProductNotFound(id) if id == pid(3)));
    }

    #[tokio::test]
    async fn popular_defaults_to_the_last_three_days_of_the_clock() {
        let mut repo = MockProductRepository::new();
        repo.expect_popular()
            .withf(|range, limit| {
                range.from() == day("2026-11-23") && range.to() == day("2026-11-25") && limit.get() == 5
            })
            .returning(|_, _| {
                Ok(vec![PopularProduct { rank: 1, product_id: pid(2), name: "shirt".into(), total_sold: 9 }])
            });
        let ranking =
            CatalogService::new(Arc::new(repo), clock()).popular(None, None, RankingLimit::DEFAULT).await.unwrap();
        assert_eq!(ranking.range.from(), day("2026-11-23"));
        assert_eq!(ranking.items.len(), 1);
    }

    #[tokio::test]
    async fn popular_refuses_a_backward_range_without_asking_the_store() {
        let repo = MockProductRepository::new(); // any call would panic: no expectation is set
        let err = CatalogService::new(Arc::new(repo), clock())
            .popular(Some(day("2026-11-25")), Some(day("2026-11-24")), RankingLimit::DEFAULT)
            .await
            .unwrap_err();
        assert!(matches!(err, DomainError::Invalid(v) if v.field == "from"));
    }

    #[tokio::test]
    async fn create_hands_the_validated_product_to_the_store() {
        let mut repo = MockProductRepository::new();
        repo.expect_create()
            .withf(|p, _| p.name() == "shirt" && p.options().len() == 2)
            .returning(|p, _| Ok(Product { id: pid(1), name: p.name().into(), status: p.status(), options: vec![] }));
        let new = NewProduct::new(
            "shirt",
            ProductStatus::Active,
            vec![NewOption::new("S", 10, 1).unwrap(), NewOption::new("M", 10, 1).unwrap()],
        )
        .unwrap();
        let created = CatalogService::new(Arc::new(repo), clock()).create(new).await.unwrap();
        assert_eq!(created.id, pid(1));
    }

    #[tokio::test]
    async fn set_stock_of_an_unknown_option_is_not_found_and_tells_the_mirror_nothing() {
        let mut repo = MockProductRepository::new();
        repo.expect_set_stock().returning(|id, _, _| Err(DomainError::ProductOptionNotFound(id)));
        let mut mirror = MockStockMirror::new();
        mirror.expect_stock_set().never();
        let err = CatalogService::new(Arc::new(repo), clock())
            .with_stock_mirror(Arc::new(mirror))
            .set_stock(ProductOptionId::new(4).unwrap(), Stock::new(1).unwrap())
            .await
            .unwrap_err();
        assert!(matches!(err, DomainError::ProductOptionNotFound(_)));
    }

    #[tokio::test]
    async fn a_stored_stock_count_is_told_to_the_mirror() {
        let option = ProductOptionId::new(4).unwrap();
        let mut repo = MockProductRepository::new();
        repo.expect_set_stock().returning(|id, stock, _| {
            Ok(ProductOption { id, product_id: pid(1), name: "M".into(), price: Money::new(10).unwrap(), stock })
        });
        let mut mirror = MockStockMirror::new();
        mirror
            .expect_stock_set()
            .withf(move |id, stock| *id == option && stock.get() == 25)
            .times(1)
            .returning(|_, _| ());
        let stored = CatalogService::new(Arc::new(repo), clock())
            .with_stock_mirror(Arc::new(mirror))
            .set_stock(option, Stock::new(25).unwrap())
            .await
            .unwrap();
        assert_eq!(stored.stock.get(), 25);
    }
}
