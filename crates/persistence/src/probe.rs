//! The database's readiness probe.

use async_trait::async_trait;
use sea_orm::DatabaseConnection;
use shop_domain::DomainError;
use shop_domain::ports::Probe;

use crate::error::db;

#[derive(Debug, Clone)]
pub struct DatabaseProbe {
    db: DatabaseConnection,
}

impl DatabaseProbe {
    #[must_use]
    pub const fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }
}

#[async_trait]
impl Probe for DatabaseProbe {
    fn name(&self) -> &'static str {
        "database"
    }

    async fn ping(&self) -> Result<(), DomainError> {
        self.db.ping().await.map_err(db)
    }
}
