//! One factory for every adapter the settings choose: the stock strategy, the stores, the use cases.

use std::sync::Arc;
use std::time::Duration;

use sea_orm::DatabaseConnection;
use shop_auth::{Argon2Hasher, AuthSecret, GovernorThrottle, HashParams, JwtTokens};
use shop_domain::auth::{PendingCaps, ThrottleQuota};
use shop_domain::ports::{
    Clock, EventSink, NoStockMirror, OrderRepository, PasswordHasher, Probe, RetryPolicy, SignInThrottle, StockMirror,
    StockStrategy, Tokens,
};
use shop_domain::services::{
    AuthService, CartService, CatalogService, Combining, Events, IdempotencyService, OrderService, Relay, RelayPolicy,
    UserService,
};
use shop_domain::stock::{ConditionalStock, LocalLockStock, OptimisticStock, PessimisticStock};
use shop_http::AppState;
use shop_http::cache::{CacheSettings, CatalogueCache};
use shop_persistence::{
    DatabaseProbe, PoolSettings, SeaCartRepository, SeaIdempotencyStore, SeaOrderRepository, SeaOutbox,
    SeaProductRepository, SeaSessionStore, SeaUnitOfWork, SeaUserRepository,
};
use shop_redis::{
    CatalogueChannel, LockOptions, OptimisticSettings, PubSubLock, RedisLockStock, RedisOptimisticStock,
    RedisStreamSink, RedisThrottle, Redlock, SpinLock,
};

use crate::catalogue::CatalogueReaders;
use crate::config::{ConfigError, Settings, StockStrategy as StockStrategyName};
use crate::events::{LogSink, WebhookSink};
use crate::startup::StartupError;
use crate::telemetry;

/// Idempotency keys are kept this long (the API contract's 24 hours).
const IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// A running request holds its key this long; a claim older than that belongs to a request that died, and a
/// retry may take it over. Far longer than any request runs (lock waits and pool waits are bounded in seconds).
const IDEMPOTENCY_LEASE: Duration = Duration::from_secs(60);

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
pub(crate) async fn redis_optimistic(
    settings: &Settings,
    levels: Arc<dyn OrderRepository>,
    prefix: String,
) -> Result<RedisOptimisticStock, StartupError> {
    let optimistic = OptimisticSettings {
        prefix,
        max_retries: settings.optimistic_max_retries,
        wait: Duration::from_millis(settings.lock_wait_ms),
    };
    let stock = RedisOptimisticStock::connect(settings.redis_url.as_deref().unwrap_or_default(), levels, optimistic)
        .await
        .map_err(|source| StartupError::Redis { strategy: settings.stock_strategy, source })?;
    // A mirror of a newer state than the database (restored from a backup) is dropped before any order trusts it.
    stock.check_against_database().await.map_err(StartupError::Reconcile)?;
    Ok(stock)
}

/// The prefix of the stock keys in Redis: the configured prefix and the id of this database, made on its first
/// start and kept in it, so that keys left by another or a recreated database are never read as this one's.
pub(crate) async fn stock_prefix(
    settings: &Settings,
    db: &DatabaseConnection,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<String, StartupError> {
    let make = || uuid::Uuid::new_v4().simple().to_string();
    let deployment = shop_persistence::stored_secret(db, "deployment_id", make, now)
        .await
        .map_err(StartupError::database(settings))?;
    Ok(shop_redis::stock_prefix(&settings.redis_key_prefix, &deployment))
}

async fn stock_strategy(
    settings: &Settings,
    levels: Arc<dyn OrderRepository>,
    stock_prefix: &str,
) -> Result<StockWiring, StartupError> {
    let wait = Duration::from_millis(settings.lock_wait_ms);
    let lease = Duration::from_millis(settings.lock_lease_ms);
    let redis_error = |source: shop_redis::LockError| StartupError::Redis { strategy: settings.stock_strategy, source };
    let redis_url = || settings.redis_url.clone().unwrap_or_default();
    let prefix = || stock_prefix.to_owned();
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
            let options = LockOptions { fair: settings.lock_fair.unwrap_or(false) };
            let lock = SpinLock::connect_with(&redis_url(), lease, options).await.map_err(redis_error)?;
            let probe = lock.probe();
            StockWiring::redis(Arc::new(RedisLockStock::new(lock, wait, prefix())), probe)
        }
        StockStrategyName::RedisPubsub => {
            let options = LockOptions { fair: settings.lock_fair.unwrap_or(true) };
            let lock = PubSubLock::connect_with(&redis_url(), lease, options).await.map_err(redis_error)?;
            let probe = lock.probe();
            StockWiring::redis(Arc::new(RedisLockStock::new(lock, wait, prefix())), probe)
        }
        StockStrategyName::RedisRedlock => {
            let options = LockOptions { fair: settings.lock_fair.unwrap_or(false) };
            let lock = Redlock::connect_with(&settings.redlock_urls, lease, options).await.map_err(redis_error)?;
            let probe = lock.probe();
            StockWiring::redis(Arc::new(RedisLockStock::new(lock, wait, prefix())), probe)
        }
        StockStrategyName::RedisOptimistic => {
            let stock = redis_optimistic(settings, levels, prefix()).await?;
            let mut wiring = StockWiring::redis(Arc::new(stock.clone()), stock.probe());
            wiring.mirror = Some(stock);
            wiring
        }
    })
}

/// A pool of its own for `/health/ready`: under a sale the main pool may be busy for seconds, and a balancer
/// asking whether the database is up must learn it in well under a second, not after a pool wait.
async fn readiness_pool(settings: &Settings) -> Result<DatabaseConnection, StartupError> {
    let pool = PoolSettings {
        max_connections: 1,
        acquire_timeout: Duration::from_secs(1),
        statement_timeout: Duration::from_secs(1),
        lock_timeout: Duration::from_secs(1),
    };
    shop_persistence::connect(&settings.database_url, pool).await.map_err(StartupError::database(settings))
}

/// The password hasher the settings describe.
pub(crate) fn hasher(settings: &Settings) -> Result<Argon2Hasher, StartupError> {
    let params = HashParams {
        memory_kib: settings.password_hash_memory_kib,
        iterations: settings.password_hash_iterations,
        parallelism: settings.password_hash_parallelism,
    };
    Argon2Hasher::new(params)
        .map_err(|message| ConfigError::Invalid { key: "SHOP_PASSWORD_HASH_MEMORY_KIB", message }.into())
}

/// The key tokens are signed with: the configured one, or (embedded) the one this database keeps, made on first
/// start.
async fn auth_secret(
    settings: &Settings,
    db: &DatabaseConnection,
    clock: &dyn Clock,
) -> Result<AuthSecret, StartupError> {
    let text = match &settings.auth_secret {
        Some(secret) => secret.clone(),
        None => {
            let generate = || String::from_utf8_lossy(AuthSecret::generate().as_bytes()).into_owned();
            shop_persistence::stored_secret(db, "auth_secret", generate, clock.now())
                .await
                .map_err(StartupError::database(settings))?
        }
    };
    AuthSecret::new(text.into_bytes())
        .map_err(|message| ConfigError::Invalid { key: "SHOP_AUTH_SECRET", message }.into())
}

/// Failed sign-ins counted in Redis when the deployment has one (every instance then shares the count), else in
/// this process.
async fn throttle(settings: &Settings, clock: Arc<dyn Clock>) -> Result<Arc<dyn SignInThrottle>, StartupError> {
    let names = ThrottleQuota { failures: settings.sign_in_failures_per_name, window: settings.sign_in_window };
    let clients = ThrottleQuota { failures: settings.sign_in_failures_per_client, window: settings.sign_in_window };
    if let Some(url) = &settings.redis_url {
        let redis = RedisThrottle::connect(url, settings.redis_key_prefix.clone(), names, clients)
            .await
            .map_err(|source| StartupError::Redis { strategy: settings.stock_strategy, source })?;
        return Ok(Arc::new(redis));
    }
    let local = GovernorThrottle::new(names, clients, clock)
        .map_err(|message| ConfigError::Invalid { key: "SHOP_SIGN_IN_WINDOW", message })?;
    Ok(Arc::new(local))
}

/// Connections of the relay's own pool: its hand-over loop, one per-event sink loop, the pruning, the admin API.
const RELAY_CONNECTIONS: u32 = 3;

/// The relay of the outbox, over the sinks the settings configure: the Redis stream when Redis is configured,
/// each webhook, and the log when neither is.
async fn relay(settings: &Settings, db: &DatabaseConnection, clock: Arc<dyn Clock>) -> Result<Relay, StartupError> {
    let mut sinks: Vec<Arc<dyn EventSink>> = Vec::new();
    if let Some(url) = &settings.redis_url {
        let stream = RedisStreamSink::connect(url, &settings.redis_key_prefix, settings.events_stream_max_len)
            .await
            .map_err(|source| StartupError::Redis { strategy: settings.stock_strategy, source })?;
        sinks.push(Arc::new(stream));
    }
    for webhook in &settings.webhooks {
        let sink = WebhookSink::new(webhook.clone(), settings.webhook_timeout).map_err(|e| ConfigError::Invalid {
            key: "SHOP_WEBHOOKS",
            message: format!("cannot build the webhook client: {e}"),
        })?;
        sinks.push(Arc::new(sink));
    }
    if sinks.is_empty() {
        sinks.push(Arc::new(LogSink));
    }
    let policy = RelayPolicy {
        batch: 500,
        poll: settings.relay_poll_interval,
        max_attempts: settings.webhook_max_attempts,
        retry: RetryPolicy {
            max_retries: settings.webhook_max_attempts,
            base: settings.webhook_retry_base,
            cap: settings.webhook_retry_max,
        },
        retention: settings.outbox_retention,
    };
    // On PostgreSQL the relay has a small pool of its own: in a sale every connection of the main pool may be
    // held by the batches of a hundred hot options' lanes, and the events must not wait behind them. SQLite's writers queue on one file anyway.
    let outbox_db = if settings.database_url.starts_with("postgres") {
        shop_persistence::connect(&settings.database_url, settings.pool(RELAY_CONNECTIONS))
            .await
            .map_err(StartupError::database(settings))?
    } else {
        db.clone()
    };
    Ok(Relay::new(Arc::new(SeaOutbox::new(outbox_db)), sinks, clock, policy))
}

/// What [`wire`] builds.
pub(crate) struct Wired {
    pub state: AppState,
    /// The stock mirror, when the strategy keeps one.
    pub mirror: Option<RedisOptimisticStock>,
    /// The prefix of this database's stock keys in Redis.
    pub stock_prefix: String,
    /// The outbox's relay; `None` with the outbox off.
    pub relay: Option<Relay>,
    /// Applies the other instances' catalogue changes to this one's cache (with Redis).
    pub catalogue_listener: Option<tokio::task::JoinHandle<()>>,
}

/// Every use case on the adapters the settings choose, and the stock mirror when the strategy keeps one.
pub(crate) async fn wire(
    settings: &Settings,
    db: &DatabaseConnection,
    clock: Arc<dyn Clock>,
    hasher: Arc<dyn PasswordHasher>,
) -> Result<Wired, StartupError> {
    let orders = Arc::new(SeaOrderRepository::new(db.clone()));
    let stock_prefix = stock_prefix(settings, db, clock.now()).await?;
    let StockWiring { strategy: stock, probe: stock_probe, mirror } =
        stock_strategy(settings, orders.clone(), &stock_prefix).await?;
    let stock_mirror: Arc<dyn StockMirror> = match &mirror {
        Some(mirror) => Arc::new(mirror.clone()),
        None => Arc::new(NoStockMirror),
    };
    let mut probes: Vec<Arc<dyn Probe>> = vec![Arc::new(DatabaseProbe::new(readiness_pool(settings).await?))];
    probes.extend(stock_probe);
    let users = Arc::new(SeaUserRepository::new(db.clone()));
    let products = Arc::new(SeaProductRepository::new(db.clone()));
    let carts = Arc::new(SeaCartRepository::new(db.clone()));
    let uow = Arc::new(SeaUnitOfWork::new(db.clone()));
    let idempotency = Arc::new(SeaIdempotencyStore::new(db.clone()));
    let tokens: Arc<dyn Tokens> =
        Arc::new(JwtTokens::new(&auth_secret(settings, db, clock.as_ref()).await?, settings.access_token_ttl));
    let combining = Combining {
        batch_max: settings.order_batch_max as usize,
        queue_max: settings.order_queue_max as usize,
        wait: Duration::from_millis(settings.lock_wait_ms),
        pipeline: settings.order_pipeline as usize,
    };
    let caps = PendingCaps {
        orders: settings.max_pending_orders_per_user,
        units: i64::from(settings.max_pending_units_per_user),
    };
    let relay = if settings.outbox { Some(relay(settings, db, clock.clone()).await?) } else { None };
    let events = match &relay {
        Some(relay) => Events::Recorded(Arc::new(relay.clone())),
        None => Events::Off,
    };
    let catalogue_cache = CatalogueCache::new(CacheSettings {
        max_bytes: settings.catalogue_cache_mb << 20,
        stock_staleness: settings.catalogue_max_staleness,
        popular_staleness: settings.catalogue_popular_staleness,
    });
    let (channel, catalogue_listener) = match &settings.redis_url {
        Some(url) => {
            // Under the database's own prefix: another database on the same Redis has its own catalogue.
            let (channel, heard) = CatalogueChannel::connect(url, &stock_prefix)
                .map_err(|source| StartupError::Redis { strategy: settings.stock_strategy, source })?;
            (Some(Arc::new(channel)), Some(crate::catalogue::listen(catalogue_cache.clone(), heard)))
        }
        None => (None, None),
    };
    let readers: Arc<dyn shop_domain::ports::CatalogueChanges> =
        Arc::new(CatalogueReaders::new(catalogue_cache.clone(), channel));
    let placing = OrderService::new(uow.clone(), orders, users.clone(), stock, clock.clone(), events)
        .with_stock_mirror(stock_mirror.clone())
        .with_catalogue_changes(readers.clone())
        .with_pending_caps(caps)
        .combining(combining);
    let metrics: shop_http::RenderMetrics = {
        let (handle, db, orders, max) =
            (telemetry::metrics(), db.clone(), placing.clone(), settings.db_max_connections);
        Arc::new(move || {
            telemetry::observe_gauges(&db, &orders, max);
            handle.render()
        })
    };
    let state = AppState {
        users: UserService::new(users.clone(), hasher.clone(), uow.clone(), clock.clone()),
        auth: AuthService::new(
            users.clone(),
            hasher,
            tokens.clone(),
            Arc::new(SeaSessionStore::new(db.clone())),
            throttle(settings, clock.clone()).await?,
            clock.clone(),
            settings.refresh_token_ttl,
        ),
        tokens,
        clock: clock.clone(),
        trust_forwarded_for: settings.trust_forwarded_for,
        idempotency: IdempotencyService::new(
            idempotency,
            uow.clone(),
            clock.clone(),
            IDEMPOTENCY_TTL,
            IDEMPOTENCY_LEASE,
        ),
        catalog: CatalogService::new(products, clock.clone())
            .with_stock_mirror(stock_mirror.clone())
            .with_catalogue_changes(readers),
        catalogue_cache,
        orders: placing.clone(),
        cart: CartService::new(carts, users, uow, clock),
        admin_token: settings.admin_token.as_deref().map(Arc::from),
        probes,
        metrics,
        relay: relay.clone(),
    };
    Ok(Wired { state, mirror, stock_prefix, relay, catalogue_listener })
}
