//! The catalogue's readers: this instance's read cache, and (with Redis) the other instances', told of what a
//! commit changed.

use std::sync::Arc;

use async_trait::async_trait;
use shop_domain::ids::ProductOptionId;
use shop_domain::ports::CatalogueChanges;
use shop_http::cache::CatalogueCache;
use shop_redis::{CatalogueChange, CatalogueChannel};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::JoinHandle;

/// Drops what a commit changed from this instance's cache at once, and tells the other instances.
pub(crate) struct CatalogueReaders {
    cache: CatalogueCache,
    channel: Option<Arc<CatalogueChannel>>,
}

impl CatalogueReaders {
    pub(crate) fn new(cache: CatalogueCache, channel: Option<Arc<CatalogueChannel>>) -> Self {
        Self { cache, channel }
    }
}

#[async_trait]
impl CatalogueChanges for CatalogueReaders {
    async fn stock_moved(&self, options: &[ProductOptionId]) {
        let ids: Vec<i64> = options.iter().map(|o| o.get()).collect();
        self.cache.stock_moved(&ids, "local").await;
        if let Some(channel) = &self.channel {
            channel.publish(CatalogueChange::Stock(ids));
        }
    }

    async fn products_changed(&self) {
        self.cache.products_changed("local");
        if let Some(channel) = &self.channel {
            channel.publish(CatalogueChange::Products);
        }
    }
}

/// Applies what the other instances publish to this instance's cache, until the channel closes.
pub(crate) fn listen(cache: CatalogueCache, mut heard: UnboundedReceiver<CatalogueChange>) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(change) = heard.recv().await {
            match change {
                CatalogueChange::Stock(options) => cache.stock_moved(&options, "remote").await,
                CatalogueChange::Products => cache.products_changed("remote"),
            }
        }
    })
}
