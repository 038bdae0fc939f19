//! Start-up: the database, the wiring and the listener, as one [`Application`] that the binary runs and the API
//! tests spawn (on port 0, with a clock of their own).

use std::sync::Arc;

use actix_web::HttpServer;
use actix_web::dev::{Server, ServerHandle};
use sea_orm::DatabaseConnection;
use shop_domain::DomainError;
use shop_domain::auth::Password;
use shop_domain::ports::{Clock, PasswordHasher};
use shop_domain::services::{IdempotencyService, OrderService};
use tokio::task::JoinHandle;

use crate::config::{self, ConfigError, Settings, StockStrategy as StockStrategyName};
use crate::{background, wiring};

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
    #[error("seeding the demo data failed: {0}")]
    Seed(DomainError),
}

impl StartupError {
    pub(crate) fn database(settings: &Settings) -> impl FnOnce(sea_orm::DbErr) -> Self + '_ {
        |source| Self::Database { url: config::redact_url(&settings.database_url), source }
    }
}

/// Opens the pool and applies pending migrations.
///
/// # Errors
/// [`StartupError::Database`] when the database cannot be reached or migrated.
pub async fn connect_and_migrate(settings: &Settings) -> Result<DatabaseConnection, StartupError> {
    let db = shop_persistence::connect(&settings.database_url, settings.pool(settings.db_max_connections))
        .await
        .map_err(StartupError::database(settings))?;
    shop_persistence::migrate(&db, &settings.database_url).await.map_err(StartupError::database(settings))?;
    Ok(db)
}

/// Seeds the demo users (their passwords hashed as any other) and catalogue into an empty embedded database,
/// and says how to sign in as them.
async fn seed_demo(
    settings: &Settings,
    db: &DatabaseConnection,
    clock: &dyn Clock,
    hasher: &dyn PasswordHasher,
) -> Result<(), StartupError> {
    use shop_persistence::seed::{self, DEMO_USERS};
    if !seed::is_empty(db).await.map_err(StartupError::database(settings))? {
        return Ok(());
    }
    let mut hashes = Vec::with_capacity(DEMO_USERS.len());
    for demo in DEMO_USERS {
        let password = Password::new(demo.password).map_err(|e| StartupError::Seed(e.into()))?;
        let hash = hasher.hash(&password).await.map_err(StartupError::Seed)?;
        hashes.push(hash.as_str().to_owned());
    }
    if let Some(seeded) = seed::seed_demo(db, clock.now(), &hashes).await.map_err(StartupError::database(settings))? {
        tracing::info!(
            users = seeded.users,
            products = seeded.products,
            options = seeded.options,
            "seeded the empty embedded database with demo data"
        );
        for demo in DEMO_USERS {
            // Demo accounts of a local database only: their passwords are in the README too.
            tracing::info!(
                name = demo.name,
                password = demo.password,
                "demo user: sign in with POST /api/v1/auth/token"
            );
        }
    }
    Ok(())
}

/// A bound server with everything wired, not yet running.
pub struct Application {
    server: Server,
    port: u16,
    db: DatabaseConnection,
    orders: OrderService,
    idempotency: IdempotencyService,
    stock_prefix: String,
    background: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Application").field("port", &self.port).finish_non_exhaustive()
    }
}

impl Application {
    /// Connects, migrates, seeds an empty embedded database, wires the use cases on `clock` and binds the
    /// listener.
    ///
    /// # Errors
    /// [`StartupError`] saying what is wrong.
    pub async fn build(settings: Settings, clock: Arc<dyn Clock>) -> Result<Self, StartupError> {
        settings.validate_for_serving()?;
        crate::events::install_crypto_provider();
        let db = connect_and_migrate(&settings).await?;
        let hasher = Arc::new(wiring::hasher(&settings)?);
        if settings.is_sqlite() && settings.seed_demo {
            seed_demo(&settings, &db, clock.as_ref(), hasher.as_ref()).await?;
        }
        let wiring::Wired { state, mirror, stock_prefix, relay, catalogue_listener } =
            wiring::wire(&settings, &db, clock, hasher).await?;
        let mut background = vec![tokio::spawn(background::sweep(
            state.orders.clone(),
            state.idempotency.clone(),
            state.auth.clone(),
            relay.clone(),
            settings.order_payment_timeout,
            settings.order_sweep_interval,
        ))];
        if let Some(relay) = relay {
            background.push(tokio::spawn(relay.run()));
        }
        background.extend(catalogue_listener);
        if let Some(mirror) = mirror {
            background
                .push(tokio::spawn(background::reconcile_periodically(mirror, settings.stock_reconcile_interval)));
        }
        let orders = state.orders.clone();
        let idempotency = state.idempotency.clone();
        let doc = shop_http::openapi();
        let mut server = HttpServer::new(move || shop_http::app(state.clone(), doc.clone()))
            // Requests that wait in an order lane are dropped if their client hangs up meanwhile.
            .on_connect(shop_http::connection::watch)
            .keep_alive(settings.http_keep_alive)
            .client_request_timeout(settings.http_request_timeout)
            // In-flight requests get this long to finish after SIGTERM.
            .shutdown_timeout(settings.shutdown_grace.as_secs().max(1));
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
        Ok(Self { server: server.run(), port, db, orders, idempotency, stock_prefix, background })
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

    /// The prefix of this database's stock keys in Redis (locks, fences, the mirror): the configured prefix and
    /// the database's id.
    #[must_use]
    pub fn stock_key_prefix(&self) -> &str {
        &self.stock_prefix
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
