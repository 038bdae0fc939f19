//! What readers of the catalogue hear after a commit changed what it shows, so that a cache of it can drop what
//! went stale at once instead of waiting out its staleness bound.

use async_trait::async_trait;

use crate::ids::ProductOptionId;

/// Told after the commit, never inside the transaction: a notice that is lost only lets a cache entry live out
/// its staleness bound. Never fails the use case (the database has committed); implementations log what they
/// could not do and must not wait on a dependency that is down.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait CatalogueChanges: Send + Sync {
    /// These options' stock moved: orders placed, cancelled or expired, an admin's count.
    async fn stock_moved(&self, options: &[ProductOptionId]);

    /// The catalogue itself changed (a product was added): its pages, their totals and the rankings.
    async fn products_changed(&self);
}

/// For a deployment without a catalogue cache, and for tests: hears nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoCatalogueReaders;

#[async_trait]
impl CatalogueChanges for NoCatalogueReaders {
    async fn stock_moved(&self, _options: &[ProductOptionId]) {}

    async fn products_changed(&self) {}
}
