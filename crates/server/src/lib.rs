//! Configuration, wiring and start-up of the shop service: the only crate that knows every adapter.
//!
//! [`Application::build`] turns [`Settings`] into a bound, ready-to-run server (port 0 in tests) and is shared by
//! the binary and the API tests.
//!
//! - [`config`]: typed settings (defaults < TOML file < `SHOP_*` environment), validated at start-up.
//! - [`telemetry`]: the tracing subscriber.

pub mod config;
pub mod telemetry;

use std::sync::Arc;
use std::time::Duration;

use actix_web::HttpServer;
use actix_web::dev::{Server, ServerHandle};
use sea_orm::DatabaseConnection;
use shop_domain::ports::{Clock, SystemClock};
use shop_domain::services::{CartService, CatalogService, UserService};
use shop_http::AppState;
use shop_persistence::{
    DatabaseProbe, PoolSettings, SeaCartRepository, SeaProductRepository, SeaUnitOfWork, SeaUserRepository,
};

pub use config::{ConfigError, Settings, StockStrategy};

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
    shop_persistence::migrate(&db).await.map_err(database_error)?;
    Ok(db)
}

/// A bound server with everything wired, not yet running.
pub struct Application {
    server: Server,
    port: u16,
    db: DatabaseConnection,
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
        let state = wire(&settings, &db, clock);
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
        Ok(Self { server: server.run(), port, db })
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

    /// Serves until SIGTERM / SIGINT (graceful) or [`ServerHandle::stop`].
    ///
    /// # Errors
    /// The server's I/O error.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        self.server.await?;
        self.db.close().await.ok();
        tracing::info!("stopped");
        Ok(())
    }
}

/// One factory for every adapter the settings choose.
fn wire(settings: &Settings, db: &DatabaseConnection, clock: Arc<dyn Clock>) -> AppState {
    let users = Arc::new(SeaUserRepository::new(db.clone()));
    let products = Arc::new(SeaProductRepository::new(db.clone()));
    let carts = Arc::new(SeaCartRepository::new(db.clone()));
    let uow = Arc::new(SeaUnitOfWork::new(db.clone()));
    AppState {
        users: UserService::new(users.clone(), clock.clone()),
        catalog: CatalogService::new(products, clock.clone()),
        cart: CartService::new(carts, users, uow, clock),
        admin_token: settings.admin_token.as_deref().map(Arc::from),
        probes: vec![Arc::new(DatabaseProbe::new(db.clone()))],
    }
}
