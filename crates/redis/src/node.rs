//! Connecting to one Redis server, and the single-node lease shared by the spin and pub/sub locks.

use std::time::Duration;

use async_trait::async_trait;
use fred::prelude::{Builder, Client, ClientLike, Config, ReconnectPolicy};

use crate::lock::{Lease, LockError};
use crate::scripts;

/// How long a TCP connect (and the handshake commands after it) may take: a dead node must fail in well under
/// a lock wait, not after fred's 10 s default.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// The per-command timeout of a single-node lock: under a third of the lease, so that a renewal stuck on a
/// hung server fails before the next one is due, and bounded so a request never hangs on Redis for long.
pub(crate) fn command_timeout(lease: Duration) -> Duration {
    (lease / 3).clamp(Duration::from_millis(100), Duration::from_secs(2))
}

/// A client builder for `url` whose every command fails after `command_timeout` instead of waiting for a
/// reconnection forever, and which reconnects in the background (with backoff) after losing its server.
pub(crate) fn builder(url: &str, command_timeout: Duration) -> Result<Builder, LockError> {
    let mut builder = Builder::from_config(Config::from_url(url)?);
    builder
        .with_connection_config(|c| {
            c.connection_timeout = CONNECT_TIMEOUT;
            c.internal_command_timeout = CONNECT_TIMEOUT;
        })
        .with_performance_config(|p| p.default_command_timeout = command_timeout)
        // Zero attempts: retry forever. 100 ms to 2 s between tries.
        .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2));
    Ok(builder)
}

/// Connects a client and loads the lock scripts, failing within about [`CONNECT_TIMEOUT`] when the server is
/// not there.
pub(crate) async fn connect(url: &str, command_timeout: Duration) -> Result<Client, LockError> {
    let client = builder(url, command_timeout)?.build()?;
    init(&client).await?;
    scripts::load_all(&client).await?;
    Ok(client)
}

/// Starts `client`'s connection and waits a bounded time for it.
pub(crate) async fn init(client: &impl ClientLike) -> Result<(), LockError> {
    match tokio::time::timeout(CONNECT_TIMEOUT * 2, client.init()).await {
        Ok(Ok(_connection_task)) => Ok(()),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(LockError::Redis(fred::error::Error::new(
            fred::error::ErrorKind::Timeout,
            "connecting to redis timed out",
        ))),
    }
}

/// One Redis server holding the lock: the spin and pub/sub locks.
#[derive(Debug)]
pub(crate) struct SingleNode {
    pub(crate) client: Client,
}

#[async_trait]
impl Lease for SingleNode {
    async fn extend(&self, key: &str, token: &str, lease: Duration) -> Result<bool, LockError> {
        scripts::extend(&self.client, key, token, lease).await
    }

    async fn release(&self, key: &str, token: &str) -> Result<bool, LockError> {
        scripts::unlock(&self.client, key, token).await
    }
}

impl Drop for SingleNode {
    fn drop(&mut self) {
        // The client's connection task would outlive the lock otherwise. Guards hold the node too, so this runs
        // only once the lock and every guard are gone.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let client = self.client.clone();
            runtime.spawn(async move {
                let _ = client.quit().await;
            });
        }
    }
}
