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
use shop_domain::DomainError;
use shop_domain::ports::{Clock, OrderRepository, Probe, StockMirror, SystemClock};
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

use shop_redis::{
    OptimisticSettings, PubSubLock, ReconcileReport, RedisLockStock, RedisOptimisticStock, Redlock, SpinLock,
};

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
    #[error("reconciling the stock mirror failed: {0}")]
    Reconcile(DomainError),
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
        let (state, mirror) = wire(&settings, &db, clock, Arc::new(events)).await?;
        background.push(tokio::spawn(sweep(
            state.orders.clone(),
            state.idempotency.clone(),
            settings.order_payment_timeout,
            settings.order_sweep_interval,
        )));
        if let Some(mirror) = mirror {
            background.push(tokio::spawn(reconcile_periodically(mirror, settings.stock_reconcile_interval)));
        }
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

/// The stock strategy the settings name, the probe of what it depends on beyond the database, and its stock
/// mirror when it keeps one (`redis-optimistic`).
struct StockWiring {
    strategy: Arc<dyn StockStrategy>,
    probe: Option<Arc<dyn Probe>>,
    mirror: Option<RedisOptimisticStock>,
}

impl StockWiring {
    fn plain(strategy: Arc<dyn StockStrategy>) -> Self {
        Self { strategy, probe: None, mirror: None }
    }

    fn redis(strategy: Arc<dyn StockStrategy>, probe: shop_redis::RedisProbe) -> Self {
        Self { strategy, probe: Some(Arc::new(probe)), mirror: None }
    }
}

/// The `redis-optimistic` strategy the settings describe; `levels` reads the database's stock.
async fn redis_optimistic(
    settings: &Settings,
    levels: Arc<dyn OrderRepository>,
) -> Result<RedisOptimisticStock, StartupError> {
    let optimistic = OptimisticSettings {
        prefix: settings.redis_key_prefix.clone(),
        max_retries: settings.optimistic_max_retries,
        wait: Duration::from_millis(settings.lock_wait_ms),
    };
    RedisOptimisticStock::connect(settings.redis_url.as_deref().unwrap_or_default(), levels, optimistic)
        .await
        .map_err(|source| StartupError::Redis { strategy: settings.stock_strategy, source })
}

async fn stock_strategy(settings: &Settings, levels: Arc<dyn OrderRepository>) -> Result<StockWiring, StartupError> {
    let wait = Duration::from_millis(settings.lock_wait_ms);
    let lease = Duration::from_millis(settings.lock_lease_ms);
    let redis_error = |source: shop_redis::LockError| StartupError::Redis { strategy: settings.stock_strategy, source };
    let redis_url = || settings.redis_url.clone().unwrap_or_default();
    let prefix = || settings.redis_key_prefix.clone();
    Ok(match settings.stock_strategy {
        StockStrategyName::Conditional => StockWiring::plain(Arc::new(ConditionalStock)),
        StockStrategyName::Pessimistic => StockWiring::plain(Arc::new(PessimisticStock)),
        StockStrategyName::Optimistic => StockWiring::plain(Arc::new(OptimisticStock::new(RetryPolicy {
            max_retries: settings.optimistic_max_retries,
            base: Duration::from_millis(2),
            cap: Duration::from_millis(100),
        }))),
        StockStrategyName::Local => {
            if !settings.is_sqlite() {
                tracing::warn!("the local strategy locks within this process only: run one instance per database");
            }
            StockWiring::plain(Arc::new(LocalLockStock::new(wait)))
        }
        StockStrategyName::RedisSpin => {
            let lock = SpinLock::connect(&redis_url(), lease).await.map_err(redis_error)?;
            let probe = lock.probe();
            StockWiring::redis(Arc::new(RedisLockStock::new(lock, wait, prefix())), probe)
        }
        StockStrategyName::RedisPubsub => {
            let lock = PubSubLock::connect(&redis_url(), lease).await.map_err(redis_error)?;
            let probe = lock.probe();
            StockWiring::redis(Arc::new(RedisLockStock::new(lock, wait, prefix())), probe)
        }
        StockStrategyName::RedisRedlock => {
            let lock = Redlock::connect(&settings.redlock_urls, lease).await.map_err(redis_error)?;
            let probe = lock.probe();
            StockWiring::redis(Arc::new(RedisLockStock::new(lock, wait, prefix())), probe)
        }
        StockStrategyName::RedisOptimistic => {
            let stock = redis_optimistic(settings, levels).await?;
            let mut wiring = StockWiring::redis(Arc::new(stock.clone()), stock.probe());
            wiring.mirror = Some(stock);
            wiring
        }
    })
}

/// `shop-server reconcile`: compares the `redis-optimistic` stock mirror with the database once, repairs what
/// drifted (each repair is also logged) and reports it.
///
/// # Errors
/// [`StartupError::Config`] when the configured strategy keeps no mirror; [`StartupError::Database`] or
/// [`StartupError::Redis`] when either cannot be reached; [`StartupError::Reconcile`] when a step failed.
pub async fn reconcile(settings: &Settings) -> Result<ReconcileReport, StartupError> {
    settings.validate()?;
    if settings.stock_strategy != StockStrategyName::RedisOptimistic {
        return Err(ConfigError::Invalid {
            key: "SHOP_STOCK_STRATEGY",
            message: format!(
                "{} keeps no stock mirror to reconcile: reconcile applies to redis-optimistic",
                settings.stock_strategy
            ),
        }
        .into());
    }
    let pool =
        PoolSettings { max_connections: 2, acquire_timeout: Duration::from_secs(settings.db_acquire_timeout_secs) };
    let db = shop_persistence::connect(&settings.database_url, pool)
        .await
        .map_err(|source| StartupError::Database { url: config::redact_url(&settings.database_url), source })?;
    let mirror = redis_optimistic(settings, Arc::new(SeaOrderRepository::new(db.clone()))).await?;
    let report = mirror.reconcile().await.map_err(StartupError::Reconcile);
    db.close().await.ok();
    report
}

/// Every `interval`, for as long as the server runs: reconciles the stock mirror. Several instances may all
/// run it: a repair is a watched transaction, and an option that moves meanwhile is left for the next run.
async fn reconcile_periodically(mirror: RedisOptimisticStock, interval: Duration) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate; a freshly started instance has nothing of its own to repair yet.
    ticks.tick().await;
    loop {
        ticks.tick().await;
        match mirror.reconcile().await {
            Ok(report) if report.repairs.is_empty() && report.busy.is_empty() => {}
            Ok(report) => tracing::info!(
                checked = report.checked,
                repaired = report.repairs.len(),
                busy = report.busy.len(),
                "reconciled the stock mirror"
            ),
            Err(e) => tracing::warn!(error = %e, "reconciling the stock mirror failed; it runs again next interval"),
        }
    }
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
) -> Result<(AppState, Option<RedisOptimisticStock>), StartupError> {
    let orders = Arc::new(SeaOrderRepository::new(db.clone()));
    let StockWiring { strategy: stock, probe: stock_probe, mirror } = stock_strategy(settings, orders.clone()).await?;
    let stock_mirror: Arc<dyn StockMirror> = match &mirror {
        Some(mirror) => Arc::new(mirror.clone()),
        None => Arc::new(shop_domain::ports::NoStockMirror),
    };
    let mut probes: Vec<Arc<dyn Probe>> = vec![Arc::new(DatabaseProbe::new(db.clone()))];
    probes.extend(stock_probe);
    let users = Arc::new(SeaUserRepository::new(db.clone()));
    let products = Arc::new(SeaProductRepository::new(db.clone()));
    let carts = Arc::new(SeaCartRepository::new(db.clone()));
    let uow = Arc::new(SeaUnitOfWork::new(db.clone()));
    let idempotency = Arc::new(SeaIdempotencyStore::new(db.clone()));
    let state = AppState {
        users: UserService::new(users.clone(), uow.clone(), clock.clone()),
        idempotency: IdempotencyService::new(
            idempotency,
            uow.clone(),
            clock.clone(),
            IDEMPOTENCY_TTL,
            IDEMPOTENCY_LEASE,
        ),
        catalog: CatalogService::new(products, clock.clone()).with_stock_mirror(stock_mirror.clone()),
        orders: OrderService::new(uow.clone(), orders, users.clone(), stock, clock.clone(), events)
            .with_stock_mirror(stock_mirror)
            .combining(settings.order_batch_max as usize),
        cart: CartService::new(carts, users, uow, clock),
        admin_token: settings.admin_token.as_deref().map(Arc::from),
        probes,
    };
    Ok((state, mirror))
}
