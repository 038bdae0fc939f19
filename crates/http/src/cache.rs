//! The catalogue's read cache: the serialized responses of product detail, product pages and the popular
//! ranking, each with its `ETag`, held in bounded `moka` caches so that a hit costs no database round trip and
//! no serialization.
//!
//! - **Staleness.** Detail and pages live at most `stock_staleness` (`SHOP_CATALOGUE_MAX_STALENESS`, 1 s by
//!   default), the ranking `popular_staleness`: what a reader sees is never older than that, whether or not a
//!   change was heard of. `Cache-Control: public, max-age` says the same to browsers and CDNs.
//! - **Invalidation.** After a commit that moved stock, the service drops the detail of the options' products
//!   and the pages that show them ([`CatalogueCache::stock_moved`]); after a product was added, every page and
//!   ranking ([`CatalogueCache::products_changed`]). Other instances hear of it through Redis (see the server's
//!   wiring). A read that began before a change may still store what it read just after the change was heard:
//!   that entry lives out its bound, which is the guarantee; invalidation only makes changes show sooner.
//! - **Coalescing.** Concurrent misses of one entry make one database read; the others wait for it.
//! - **Orders never read it**: stock is decided by the stock strategy, in the database or Redis, as ever.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header::{self, CacheControl, CacheDirective, ETag, EntityTag, IfNoneMatch};
use actix_web::web::Bytes;
use actix_web::{HttpRequest, HttpResponse};
use chrono::NaiveDate;
use moka::future::Cache;
use serde::Serialize;
use sha2::{Digest, Sha256};
use shop_domain::DomainError;

use crate::problem::ApiError;

/// One serialized response: its body, its entity tag, and the products it shows (to drop it when they change).
#[derive(Debug)]
pub struct Cached {
    body: Bytes,
    etag: EntityTag,
    max_age: u32,
    products: Box<[i64]>,
}

impl Cached {
    /// Serializes `value` once; `products` are the products it shows, with each of their options.
    fn new(value: &impl Serialize, max_age: u32, products: Box<[i64]>) -> Result<Self, DomainError> {
        let body = serde_json::to_vec(value).map_err(|e| DomainError::unexpected(format!("serializing: {e}")))?;
        let digest = Sha256::digest(&body);
        let tag: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
        Ok(Self { body: Bytes::from(body), etag: EntityTag::new_strong(tag), max_age, products })
    }

    /// 304 when the request's `If-None-Match` names this version, else 200 with the body; both with the `ETag`
    /// and a `Cache-Control` that matches the staleness bound.
    #[must_use]
    pub fn respond(&self, request: &HttpRequest) -> HttpResponse {
        let asked = request.headers().contains_key(header::IF_NONE_MATCH);
        let fresh = asked
            && match <IfNoneMatch as header::Header>::parse(request) {
                Ok(IfNoneMatch::Any) => true,
                Ok(IfNoneMatch::Items(tags)) => tags.iter().any(|t| t.weak_eq(&self.etag)),
                Err(_) => false,
            };
        let mut response = if fresh { HttpResponse::NotModified() } else { HttpResponse::Ok() };
        response
            .insert_header(ETag(self.etag.clone()))
            .insert_header(CacheControl(vec![CacheDirective::Public, CacheDirective::MaxAge(self.max_age)]));
        if fresh {
            return response.finish();
        }
        response.insert_header(header::ContentType::json()).body(self.body.clone())
    }

    /// The bytes of the body (for tests and weights).
    #[must_use]
    pub fn body(&self) -> &[u8] {
        &self.body
    }
}

/// The query of a popular ranking as the client sent it (defaults are resolved by the use case).
pub type PopularKey = (Option<NaiveDate>, Option<NaiveDate>, u8);

/// Sizes and bounds of the cache.
#[derive(Debug, Clone, Copy)]
pub struct CacheSettings {
    /// Bytes of serialized responses held at most, over all entries; 0 turns the cache off (every read goes to
    /// the database, with the same headers).
    pub max_bytes: u64,
    /// How old a detail or a page may be.
    pub stock_staleness: Duration,
    /// How old a ranking may be.
    pub popular_staleness: Duration,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            max_bytes: 64 << 20,
            stock_staleness: Duration::from_secs(1),
            popular_staleness: Duration::from_secs(30),
        }
    }
}

/// The cache of one instance; cheap to clone (the clones share it).
#[derive(Clone)]
pub struct CatalogueCache {
    products: Option<Cache<i64, Arc<Cached>>>,
    pages: Option<Cache<(u64, u64), Arc<Cached>>>,
    popular: Option<Cache<PopularKey, Arc<Cached>>>,
    /// Which product an option belongs to (it never changes), for the options a commit names.
    owners: Option<Cache<i64, i64>>,
    /// How many products there are: counted once per bound (or product added), not per page read.
    total: Option<Cache<(), u64>>,
    stock_age: u32,
    popular_age: u32,
}

impl std::fmt::Debug for CatalogueCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CatalogueCache")
            .field("on", &self.products.is_some())
            .field("products", &self.products.as_ref().map(Cache::entry_count))
            .field("pages", &self.pages.as_ref().map(Cache::entry_count))
            .finish_non_exhaustive()
    }
}

/// Which kind of entry a metric is about.
#[derive(Debug, Clone, Copy)]
enum Entry {
    Product,
    Page,
    Popular,
}

impl Entry {
    const fn name(self) -> &'static str {
        match self {
            Self::Product => "product",
            Self::Page => "page",
            Self::Popular => "popular",
        }
    }
}

fn weighed<K>(max_bytes: u64, ttl: Duration) -> Cache<K, Arc<Cached>>
where
    K: std::hash::Hash + Eq + Send + Sync + 'static,
{
    Cache::builder()
        .max_capacity(max_bytes)
        .weigher(|_, v: &Arc<Cached>| u32::try_from(v.body.len() + 128).unwrap_or(u32::MAX))
        .time_to_live(ttl)
        .build()
}

/// Whole seconds for `max-age`, at least 1 (a bound under a second still lets a client reuse a response within
/// the second, which is what the server itself does).
fn seconds(d: Duration) -> u32 {
    u32::try_from(d.as_secs().max(1)).unwrap_or(u32::MAX)
}

impl CatalogueCache {
    #[must_use]
    pub fn new(settings: CacheSettings) -> Self {
        let (stock_age, popular_age) = (seconds(settings.stock_staleness), seconds(settings.popular_staleness));
        if settings.max_bytes == 0 {
            return Self {
                products: None,
                pages: None,
                popular: None,
                owners: None,
                total: None,
                stock_age,
                popular_age,
            };
        }
        // Detail gets most of the budget: during a sale it is what everyone refreshes.
        let part = |n: u64| (settings.max_bytes / 10 * n).max(1);
        Self {
            products: Some(weighed(part(6), settings.stock_staleness)),
            pages: Some(weighed(part(3), settings.stock_staleness)),
            popular: Some(weighed(part(1), settings.popular_staleness)),
            owners: Some(Cache::builder().max_capacity(1 << 20).build()),
            total: Some(Cache::builder().max_capacity(1).time_to_live(settings.stock_staleness).build()),
            stock_age,
            popular_age,
        }
    }

    /// The cache off: every read loads, with the same headers.
    #[must_use]
    pub fn off() -> Self {
        Self::new(CacheSettings { max_bytes: 0, ..CacheSettings::default() })
    }

    /// A product's detail: cached, or loaded by `load` (one load for concurrent misses). `load` returns the
    /// response and the ids of the product's options.
    ///
    /// # Errors
    /// What `load` failed with (nothing is cached then).
    pub async fn product<V, F>(&self, id: i64, load: F) -> Result<Arc<Cached>, ApiError>
    where
        V: Serialize,
        F: Future<Output = Result<(V, Vec<i64>), DomainError>>,
    {
        let (age, owners) = (self.stock_age, self.owners.clone());
        let build = async move {
            let (value, options) = load.await?;
            if let Some(owners) = owners {
                for option in options {
                    owners.insert(option, id).await;
                }
            }
            Cached::new(&value, age, Box::new([id])).map(Arc::new)
        };
        cached(self.products.as_ref(), id, Entry::Product, build).await
    }

    /// A page of products: cached, or loaded by `load`, which returns the page and the (product, option) pairs
    /// on it.
    ///
    /// # Errors
    /// What `load` failed with.
    pub async fn page<V, F>(&self, page: u64, size: u64, load: F) -> Result<Arc<Cached>, ApiError>
    where
        V: Serialize,
        F: Future<Output = Result<(V, Vec<(i64, i64)>), DomainError>>,
    {
        let (age, owners) = (self.stock_age, self.owners.clone());
        let build = async move {
            let (value, shown) = load.await?;
            let mut products: Vec<i64> = shown.iter().map(|(p, _)| *p).collect();
            products.dedup();
            if let Some(owners) = owners {
                for (product, option) in shown {
                    owners.insert(option, product).await;
                }
            }
            Cached::new(&value, age, products.into_boxed_slice()).map(Arc::new)
        };
        cached(self.pages.as_ref(), (page, size), Entry::Page, build).await
    }

    /// How many products there are: cached, or counted by `count` (one count for concurrent misses).
    ///
    /// # Errors
    /// What `count` failed with.
    pub async fn total<F>(&self, count: F) -> Result<u64, DomainError>
    where
        F: Future<Output = Result<u64, DomainError>>,
    {
        match &self.total {
            Some(total) => total.try_get_with((), count).await.map_err(|e| e.replicate()),
            None => count.await,
        }
    }

    /// A popular ranking: cached (for the longer popular bound), or loaded by `load`.
    ///
    /// # Errors
    /// What `load` failed with.
    pub async fn popular<V, F>(&self, key: PopularKey, load: F) -> Result<Arc<Cached>, ApiError>
    where
        V: Serialize,
        F: Future<Output = Result<V, DomainError>>,
    {
        let age = self.popular_age;
        let build = async move { Cached::new(&load.await?, age, Box::default()).map(Arc::new) };
        cached(self.popular.as_ref(), key, Entry::Popular, build).await
    }

    /// These options' stock moved: their products' detail and every cached page showing one of them go.
    /// `origin` labels the metric (`local` for this instance's commits, `remote` for another's).
    pub async fn stock_moved(&self, options: &[i64], origin: &'static str) {
        let (Some(owners), Some(products), Some(pages)) = (&self.owners, &self.products, &self.pages) else {
            return;
        };
        let mut changed = Vec::with_capacity(options.len());
        for option in options {
            if let Some(product) = owners.get(option).await {
                changed.push(product);
            }
        }
        changed.sort_unstable();
        changed.dedup();
        if changed.is_empty() {
            return;
        }
        for product in &changed {
            products.invalidate(product).await;
        }
        // Pages are few (a page per (number, size) read in the last bound): a scan of them is cheap.
        let stale: Vec<Arc<(u64, u64)>> = pages
            .iter()
            .filter(|(_, page)| page.products.iter().any(|p| changed.binary_search(p).is_ok()))
            .map(|(key, _)| key)
            .collect();
        for key in stale {
            pages.invalidate(&*key).await;
        }
        metrics::counter!("shop_catalogue_cache_invalidations_total", "origin" => origin)
            .increment(changed.len() as u64);
    }

    /// A product was added: every page (their totals) and every ranking go.
    pub fn products_changed(&self, origin: &'static str) {
        if let (Some(pages), Some(popular), Some(total)) = (&self.pages, &self.popular, &self.total) {
            total.invalidate_all();
            pages.invalidate_all();
            popular.invalidate_all();
            metrics::counter!("shop_catalogue_cache_invalidations_total", "origin" => origin).increment(1);
        }
    }
}

/// `key`'s entry of `cache`, or `build`'s (stored unless the cache is off), counting hits and misses.
async fn cached<K, F>(
    cache: Option<&Cache<K, Arc<Cached>>>,
    key: K,
    kind: Entry,
    build: F,
) -> Result<Arc<Cached>, ApiError>
where
    K: std::hash::Hash + Eq + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Arc<Cached>, DomainError>>,
{
    let Some(cache) = cache else { return build.await.map_err(ApiError::from) };
    let entry = cache.entry(key).or_try_insert_with(build).await.map_err(|e| ApiError::from(e.replicate()))?;
    let result = if entry.is_fresh() { "miss" } else { "hit" };
    metrics::counter!("shop_catalogue_cache_requests_total", "entry" => kind.name(), "result" => result).increment(1);
    Ok(entry.into_value())
}
