//! Configuration, wiring and start-up of the shop service: the only crate that knows every adapter.
//!
//! [`Application::build`] turns [`Settings`] into a bound, ready-to-run server (port 0 in tests) and is shared by
//! the binary and the API tests.
//!
//! - [`config`]: typed settings (defaults < TOML file < `SHOP_*` environment), validated at start-up.
//! - [`events`]: the in-process event broadcast and its logging subscriber.
//! - [`telemetry`]: the tracing subscriber.

pub mod config;
pub mod events;
pub mod telemetry;

use std::sync::Arc;
use std::time::Duration;

use actix_web::HttpServer;
use actix_web::dev::{Server, ServerHandle};
use sea_orm::DatabaseConnection;
use shop_domain::ports::{Clock, Probe, SystemClock};
use shop_domain::services::{CartService, CatalogService, IdempotencyService, OrderService, UserService};
use shop_domain::stock::{
    ConditionalStock, LocalLockStock, OptimisticStock, PessimisticStock, RetryPolicy, StockStrategy,
};
use shop_http::AppState;
use shop_persistence::{
    DatabaseProbe, PoolSettings, SeaCartRepository, SeaIdempotencyStore, SeaOrderRepository, SeaProductRepository,
    SeaUnitOfWork, SeaUserRepository,
};

/// Idempotency keys are kept this long (the API contract's 24 hours).
const IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// A running request holds its key this long; a claim older than that belongs to a request that died, and a
/// retry may take it over. Far longer than any request runs (lock waits and pool waits are bounded in seconds).
const IDEMPOTENCY_LEASE: Duration = Duration::from_secs(60);
use tokio::task::JoinHandle;

use shop_redis::{PubSubLock, RedisLockStock, Redlock, SpinLock};

use crate::events::BroadcastPublisher;

pub use config::{ConfigError, Settings, StockStrategy as StockStrategyName};

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("database {url}: {source}")]
    Database { url: String, source: sea_orm::DbErr },
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("the server failed: {0}")]
    Serve(std::io::Error),
    #[error("{strategy} cannot reach Redis: {source}")]
    Redis { strategy: StockStrategyName, source: shop_redis::LockError },
}

/// Opens the pool and applies pending migrations.
///
/// # Errors
/// [`StartupError::Database`] when the database cannot be reached or migrated.
pub async fn connect_and_migrate(settings: &Settings) -> Result<DatabaseConnection, StartupError> {
    let database_error = |source| StartupError::Database { url: config::redact_url(&settings.database_url), source };
    let pool = PoolSettings {
        max_connections: settings.db_max_connections,
        acquire_timeout: Duration::from_secs(settings.db_acquire_timeout_secs),
    };
    let db = shop_persistence::connect(&settings.database_url, pool).await.map_err(database_error)?;
    shop_persistence::migrate(&db, &settings.database_url).await.map_err(database_error)?;
    Ok(db)
}

/// A bound server with everything wired, not yet running.
pub struct Application {
    server: Server,
    port: u16,
    db: DatabaseConnection,
    orders: OrderService,
    idempotency: IdempotencyService,
    background: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Application").field("port", &self.port).finish_non_exhaustive()
    }
}

impl Application {
    /// Connects, migrates, seeds an empty embedded database, wires the use cases and binds the listener.
    ///
    /// # Errors
    /// [`StartupError`] saying what is wrong.
    pub async fn build(settings: Settings) -> Result<Self, StartupError> {
        settings.validate()?;
        let db = connect_and_migrate(&settings).await?;
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        if settings.is_sqlite() && settings.seed_demo {
            match shop_persistence::seed::seed_demo(&db, clock.now()).await {
                Ok(Some(seeded)) => tracing::info!(
                    users = seeded.users,
                    products = seeded.products,
                    options = seeded.options,
                    "seeded the empty embedded database with demo data"
                ),
                Ok(None) => {}
                Err(source) => {
                    return Err(StartupError::Database { url: config::redact_url(&settings.database_url), source });
                }
            }
        }
        let events = BroadcastPublisher::new(1024);
        let mut background = vec![tokio::spawn(events::log_events(events.subscribe()))];
        let state = wire(&settings, &db, clock, Arc::new(events)).await?;
        background.push(tokio::spawn(sweep(
            state.orders.clone(),
            state.idempotency.clone(),
            settings.order_payment_timeout,
            settings.order_sweep_interval,
        )));
        let orders = state.orders.clone();
        let idempotency = state.idempotency.clone();
        let doc = shop_http::openapi();
        let mut server = HttpServer::new(move || shop_http::app(state.clone(), doc.clone()))
            // In-flight requests get this long to finish after SIGTERM.
            .shutdown_timeout(10);
        if let Some(workers) = settings.http_workers {
            server = server.workers(workers);
        }
        let server = server
            .bind(settings.http_addr)
            .map_err(|source| StartupError::Bind { addr: settings.http_addr, source })?;
        let port = server.addrs().first().map_or(settings.http_addr.port(), std::net::SocketAddr::port);
        tracing::info!(
            addr = %settings.http_addr, port, strategy = %settings.stock_strategy,
            "listening; Swagger UI at /swagger-ui/"
        );
        Ok(Self { server: server.run(), port, db, orders, idempotency, background })
    }

    #[must_use]
    pub const fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server gracefully (what SIGTERM does).
    #[must_use]
    pub fn handle(&self) -> ServerHandle {
        self.server.handle()
    }

    /// The pool the application uses, for tests that look at the rows behind an answer.
    #[must_use]
    pub fn database(&self) -> DatabaseConnection {
        self.db.clone()
    }

    /// The idempotency use case as wired, for tests that drive the purge directly.
    #[must_use]
    pub fn idempotency(&self) -> IdempotencyService {
        self.idempotency.clone()
    }

    /// The order use case as wired, for tests that drive the sweeper directly.
    #[must_use]
    pub fn orders(&self) -> OrderService {
        self.orders.clone()
    }

    /// Serves until SIGTERM / SIGINT (graceful) or [`ServerHandle::stop`].
    ///
    /// # Errors
    /// The server's I/O error.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let served = self.server.await;
        for task in &self.background {
            task.abort();
        }
        served?;
        self.db.close().await.ok();
        tracing::info!("stopped");
        Ok(())
    }
}

/// The stock strategy the settings name, and the probe of what it depends on beyond the database.
async fn stock_strategy(settings: &Settings) -> Result<(Arc<dyn StockStrategy>, Option<Arc<dyn Probe>>), StartupError> {
    let wait = Duration::from_millis(settings.lock_wait_ms);
    let lease = Duration::from_millis(settings.lock_lease_ms);
    let redis_error = |source: shop_redis::LockError| StartupError::Redis { strategy: settings.stock_strategy, source };
    let redis_url = || settings.redis_url.clone().unwrap_or_default();
    let strategy: Arc<dyn StockStrategy> = match settings.stock_strategy {
        StockStrategyName::Conditional => Arc::new(ConditionalStock),
        StockStrategyName::Pessimistic => Arc::new(PessimisticStock),
        StockStrategyName::Optimistic => Arc::new(OptimisticStock::new(RetryPolicy {
            max_retries: settings.optimistic_max_retries,
            base: Duration::from_millis(2),
            cap: Duration::from_millis(100),
        })),
        StockStrategyName::Local => {
            if !settings.is_sqlite() {
                tracing::warn!("the local strategy locks within this process only: run one instance per database");
            }
            Arc::new(LocalLockStock::new(wait))
        }
        // Refused by `Settings::validate` until the Redis adapter exists.
        StockStrategyName::RedisSpin => {
            let lock = SpinLock::connect(&redis_url(), lease).await.map_err(redis_error)?;
            let probe: Arc<dyn Probe> = Arc::new(lock.probe());
            return Ok((Arc::new(RedisLockStock::new(lock, wait, settings.redis_key_prefix.clone())), Some(probe)));
        }
        StockStrategyName::RedisPubsub => {
            let lock = PubSubLock::connect(&redis_url(), lease).await.map_err(redis_error)?;
            let probe: Arc<dyn Probe> = Arc::new(lock.probe());
            return Ok((Arc::new(RedisLockStock::new(lock, wait, settings.redis_key_prefix.clone())), Some(probe)));
        }
        StockStrategyName::RedisRedlock => {
            let lock = Redlock::connect(&settings.redlock_urls, lease).await.map_err(redis_error)?;
            let probe: Arc<dyn Probe> = Arc::new(lock.probe());
            return Ok((Arc::new(RedisLockStock::new(lock, wait, settings.redis_key_prefix.clone())), Some(probe)));
        }
        StockStrategyName::RedisOptimistic => {
            return Err(ConfigError::Invalid {
                key: "SHOP_STOCK_STRATEGY",
                message: "redis-optimistic is not available in this version: use redis-spin, redis-pubsub, \
                          redis-redlock or a database strategy"
                    .into(),
            }
            .into());
        }
    };
    Ok((strategy, None))
}

/// Every `interval`, for as long as the server runs: cancels unpaid orders past the timeout and deletes expired
/// idempotency keys. Several instances may all run it: each order is cancelled, and its stock given back,
/// exactly once.
async fn sweep(orders: OrderService, idempotency: IdempotencyService, timeout: Duration, interval: Duration) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        match orders.expire_overdue(timeout, 100).await {
            Ok(0) => {}
            Ok(cancelled) => tracing::info!(cancelled, "cancelled unpaid orders past the payment timeout"),
            Err(e) => tracing::warn!(error = %e, "the overdue-order sweep failed; it runs again next interval"),
        }
        match idempotency.purge_expired().await {
            Ok(0) => {}
            Ok(purged) => tracing::info!(purged, "deleted expired idempotency keys"),
            Err(e) => tracing::warn!(error = %e, "the idempotency-key purge failed; it runs again next interval"),
        }
    }
}

/// One factory for every adapter the settings choose.
async fn wire(
    settings: &Settings,
    db: &DatabaseConnection,
    clock: Arc<dyn Clock>,
    events: Arc<BroadcastPublisher>,
) -> Result<AppState, StartupError> {
    let (stock, stock_probe) = stock_strategy(settings).await?;
    let mut probes: Vec<Arc<dyn Probe>> = vec![Arc::new(DatabaseProbe::new(db.clone()))];
    probes.extend(stock_probe);
    let users = Arc::new(SeaUserRepository::new(db.clone()));
    let products = Arc::new(SeaProductRepository::new(db.clone()));
    let carts = Arc::new(SeaCartRepository::new(db.clone()));
    let orders = Arc::new(SeaOrderRepository::new(db.clone()));
    let uow = Arc::new(SeaUnitOfWork::new(db.clone()));
    let idempotency = Arc::new(SeaIdempotencyStore::new(db.clone()));
    Ok(AppState {
        users: UserService::new(users.clone(), uow.clone(), clock.clone()),
        idempotency: IdempotencyService::new(
            idempotency,
            uow.clone(),
            clock.clone(),
            IDEMPOTENCY_TTL,
            IDEMPOTENCY_LEASE,
        ),
        catalog: CatalogService::new(products, clock.clone()),
        orders: OrderService::new(uow.clone(), orders, users.clone(), stock, clock.clone(), events)
            .combining(settings.order_batch_max as usize),
        cart: CartService::new(carts, users, uow, clock),
        admin_token: settings.admin_token.as_deref().map(Arc::from),
        probes,
    })
}
