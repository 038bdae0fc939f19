//! The readiness probe: PING on the lock's Redis server(s).

use async_trait::async_trait;
use fred::prelude::{Client, ClientLike};
use futures::future::join_all;
use shop_domain::DomainError;
use shop_domain::ports::Probe;

use crate::lock::LockError;

/// Ready when a majority of the clients answer PING: for one server, that server; for Redlock, enough nodes to
/// grant a lock.
#[derive(Debug, Clone)]
pub struct RedisProbe {
    clients: Vec<Client>,
}

impl RedisProbe {
    /// A probe of these (connected) clients.
    #[must_use]
    pub fn new(clients: Vec<Client>) -> Self {
        Self { clients }
    }
}

#[async_trait]
impl Probe for RedisProbe {
    fn name(&self) -> &'static str {
        "redis"
    }

    async fn ping(&self) -> Result<(), DomainError> {
        let answers = join_all(self.clients.iter().map(|c| c.ping::<String>(None))).await;
        let answered = answers.iter().filter(|a| a.is_ok()).count();
        let needed = self.clients.len() / 2 + 1;
        if answered >= needed {
            return Ok(());
        }
        let cause = answers.into_iter().find_map(Result::err);
        tracing::warn!(answered, needed, error = ?cause, "redis probe failed");
        Err(DomainError::unavailable(LockError::NoQuorum { answered, needed, nodes: self.clients.len() }))
    }
}
