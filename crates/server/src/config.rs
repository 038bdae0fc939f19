//! Typed configuration: defaults < optional TOML file (`--config`) < `SHOP_`-prefixed environment variables.
//! Loaded once at start-up, validated with messages that name the key at fault, then passed in.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// How order creation protects stock. Read now; the order use case applies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StockStrategy {
    /// `SELECT ... FOR NO KEY UPDATE` on the option rows (PostgreSQL only).
    Pessimistic,
    /// Compare-and-set on the version column, with bounded retries.
    Optimistic,
    /// `UPDATE ... SET stock = stock - n WHERE stock >= n`: no lock at all.
    Conditional,
    /// An in-process mutex per option (single instance only).
    Local,
    #[serde(alias = "redis-pessimistic")]
    RedisSpin,
    RedisRedlock,
    RedisPubsub,
    RedisOptimistic,
}

impl StockStrategy {
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Pessimistic => "pessimistic",
            Self::Optimistic => "optimistic",
            Self::Conditional => "conditional",
            Self::Local => "local",
            Self::RedisSpin => "redis-spin",
            Self::RedisRedlock => "redis-redlock",
            Self::RedisPubsub => "redis-pubsub",
            Self::RedisOptimistic => "redis-optimistic",
        }
    }

    const fn needs_redis(self) -> bool {
        matches!(self, Self::RedisSpin | Self::RedisRedlock | Self::RedisPubsub | Self::RedisOptimistic)
    }
}

impl fmt::Display for StockStrategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Every setting of the server. Field names are the TOML keys; `SHOP_` + the upper-cased name is the
/// environment variable (`http_addr` = `SHOP_HTTP_ADDR`).
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Where the HTTP server listens.
    pub http_addr: SocketAddr,
    /// `postgres://...` or `sqlite://path?mode=rwc`.
    pub database_url: String,
    /// Bearer token of the admin API; unset disables it. Surrounding blanks are trimmed.
    #[serde(deserialize_with = "text_or_number")]
    pub admin_token: Option<String>,
    /// The key access tokens are signed with (32+ bytes), shared by every instance. Required with PostgreSQL;
    /// an embedded (SQLite) deployment without one generates one and keeps it in its database.
    #[serde(deserialize_with = "text_or_number")]
    pub auth_secret: Option<String>,
    /// How long an access token is valid.
    #[serde(with = "duration_text")]
    pub access_token_ttl: Duration,
    /// How long a refresh token is valid (each use rotates it).
    #[serde(with = "duration_text")]
    pub refresh_token_ttl: Duration,
    /// Argon2id's memory per password hash, in KiB (OWASP's minimum: 19456).
    pub password_hash_memory_kib: u32,
    /// Argon2id's passes.
    pub password_hash_iterations: u32,
    /// Argon2id's lanes.
    pub password_hash_parallelism: u32,
    /// Failed sign-ins one name may have in a burst before it is throttled.
    pub sign_in_failures_per_name: u32,
    /// Failed sign-ins one client address may have in a burst (several users may share one).
    pub sign_in_failures_per_client: u32,
    /// Over how long those failures are forgiven (one more attempt every `window / failures`).
    #[serde(with = "duration_text")]
    pub sign_in_window: Duration,
    /// Count sign-in failures per the client address a proxy forwards (`X-Forwarded-For`); only behind a proxy
    /// that sets it, or clients could pick their own address.
    pub trust_forwarded_for: bool,
    /// Unpaid orders one user may hold at once.
    pub max_pending_orders_per_user: u32,
    /// Units one user may hold in unpaid orders at once.
    pub max_pending_units_per_user: u32,
    pub stock_strategy: StockStrategy,
    pub log_format: LogFormat,
    /// Size of the database connection pool.
    pub db_max_connections: u32,
    /// Seconds a request may wait for a pooled connection before it fails.
    pub db_acquire_timeout_secs: u64,
    /// PostgreSQL: the longest one statement may run before it is cancelled (503).
    #[serde(with = "duration_text")]
    pub db_statement_timeout: Duration,
    /// The longest one statement may wait for a lock before it gives up (503): PostgreSQL's `lock_timeout`,
    /// SQLite's busy timeout.
    #[serde(with = "duration_text")]
    pub db_lock_timeout: Duration,
    /// HTTP worker threads; the number of cores when unset.
    pub http_workers: Option<usize>,
    /// How long an idle keep-alive connection stays open; behind a proxy that keeps connections to the service
    /// (nginx's `keepalive`), longer than the proxy keeps them, so the service never closes one under it.
    #[serde(with = "duration_text")]
    pub http_keep_alive: Duration,
    /// How long a client may take to send a request's head after connecting before 408.
    #[serde(with = "duration_text")]
    pub http_request_timeout: Duration,
    /// How long in-flight requests get to finish after SIGTERM before their connections are closed (whole
    /// seconds, at least 1).
    #[serde(with = "duration_text")]
    pub shutdown_grace: Duration,
    /// Seed demo users and products into an empty SQLite database.
    pub seed_demo: bool,
    /// Redis, for the `redis-spin` and `redis-pubsub` strategies.
    pub redis_url: Option<String>,
    /// The independent Redis nodes of `redis-redlock` (3 or 5), comma-separated.
    #[serde(deserialize_with = "comma_list")]
    pub redlock_urls: Vec<String>,
    /// The namespace of this deployment's keys in Redis (`{prefix}:lock:option:{id}`).
    pub redis_key_prefix: String,
    /// How long a Redis stock lock lives without renewal; a watchdog renews it every third of this while the
    /// order runs, so it only matters when the holder dies.
    pub lock_lease_ms: u64,
    /// Whether the Redis locks hand over in arrival order (a queue in Redis, one waiter woken per release) or
    /// let waiters race. Unset: `redis-pubsub` fair, `redis-spin` and `redis-redlock` racing.
    pub lock_fair: Option<bool>,
    /// Retries of a whole order transaction after an optimistic conflict, before 503 `LOCK_TIMEOUT`.
    pub optimistic_max_retries: u32,
    /// How long an order waits for its stock locks (`local`, `redis-*`) before 503 `LOCK_TIMEOUT`, in
    /// milliseconds.
    pub lock_wait_ms: u64,
    /// How many orders (and, separately, payments) that arrive together one batch combines under one lock hold
    /// and one commit; `1` turns combining off (one order per lock and per commit).
    pub order_batch_max: u32,
    /// How many orders (or payments) one lane (one option's orders; a group of users' payments) queues at most
    /// while its batch commits; a request past it is answered 503 at once.
    pub order_queue_max: u32,
    /// How many batches of one option's orders may run at once in this instance (1 to 16; each holds a database
    /// connection while it runs): the next batches are validated and written while the current one takes its
    /// stock and commits. `optimistic` always runs one, `local` and the Redis locks at most two.
    pub order_pipeline: u32,
    /// How long an order may stay unpaid before the sweeper cancels it: `900`, `90s`, `15m`, `1h`.
    #[serde(with = "duration_text")]
    pub order_payment_timeout: Duration,
    /// How often the sweeper looks for unpaid orders past the timeout.
    #[serde(with = "duration_text")]
    pub order_sweep_interval: Duration,
    /// How often each instance compares the `redis-optimistic` stock mirror with the database and repairs drift.
    #[serde(with = "duration_text")]
    pub stock_reconcile_interval: Duration,
    /// Whether orders, payments and cancellations record their events (the outbox). Off, no event is recorded
    /// or delivered at all (for a deployment that needs none, or to measure what they cost).
    pub outbox: bool,
    /// How long events every sink has had are kept before the sweeper deletes them.
    #[serde(with = "duration_text")]
    pub outbox_retention: Duration,
    /// How often the relay looks for events it was not told of (other instances') and for retries due.
    #[serde(with = "duration_text")]
    pub relay_poll_interval: Duration,
    /// About how many entries the Redis events stream keeps (`XADD ... MAXLEN ~`).
    pub events_stream_max_len: u64,
    /// Webhook endpoints: `url secret` pairs, comma-separated (TOML: `[[webhooks]]` with `url` and `secret`).
    #[serde(deserialize_with = "webhook_list")]
    pub webhooks: Vec<crate::events::Webhook>,
    /// Attempts of one event at one webhook before it is dead-lettered.
    pub webhook_max_attempts: u32,
    /// The first retry's backoff ceiling; it doubles per attempt (full jitter) up to `webhook_retry_max`.
    #[serde(with = "duration_text")]
    pub webhook_retry_base: Duration,
    #[serde(with = "duration_text")]
    pub webhook_retry_max: Duration,
    /// How long one delivery may take before it counts as failed.
    #[serde(with = "duration_text")]
    pub webhook_timeout: Duration,
    /// Megabytes of serialized catalogue responses (detail, pages, rankings) one instance caches; 0 turns the
    /// cache off.
    pub catalogue_cache_mb: u64,
    /// How old a cached product detail or page may be (its stock included), and its `Cache-Control: max-age`.
    #[serde(with = "duration_text")]
    pub catalogue_max_staleness: Duration,
    /// How old a cached popular ranking may be.
    #[serde(with = "duration_text")]
    pub catalogue_popular_staleness: Duration,
}

/// Durations as people write them: `250ms`, `90s`, `15m`, `1h`; a bare number is seconds.
mod duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn parse(text: &str) -> Result<Duration, String> {
        let text = text.trim();
        let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let n: u64 = number.parse().map_err(|_| format!("`{text}` is not a duration like 90s, 15m or 1h"))?;
        match unit.trim() {
            "" | "s" => Ok(Duration::from_secs(n)),
            "ms" => Ok(Duration::from_millis(n)),
            "m" => Ok(Duration::from_secs(n.saturating_mul(60))),
            "h" => Ok(Duration::from_secs(n.saturating_mul(3600))),
            other => Err(format!("unknown unit `{other}` in `{text}`: use ms, s, m or h")),
        }
    }

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}ms", d.as_millis()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Seconds(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Seconds(n) => Ok(Duration::from_secs(n)),
            Raw::Text(t) => parse(&t).map_err(serde::de::Error::custom),
        }
    }
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Secrets stay out of logs: the token, and passwords inside URLs.
        f.debug_struct("Settings")
            .field("http_addr", &self.http_addr)
            .field("database_url", &redact_url(&self.database_url))
            .field("admin_token", &self.admin_token.as_ref().map(|_| "<set>"))
            .field("auth_secret", &self.auth_secret.as_ref().map(|_| "<set>"))
            .field("access_token_ttl", &self.access_token_ttl)
            .field("refresh_token_ttl", &self.refresh_token_ttl)
            .field("password_hash_memory_kib", &self.password_hash_memory_kib)
            .field("password_hash_iterations", &self.password_hash_iterations)
            .field("password_hash_parallelism", &self.password_hash_parallelism)
            .field("sign_in_failures_per_name", &self.sign_in_failures_per_name)
            .field("sign_in_failures_per_client", &self.sign_in_failures_per_client)
            .field("sign_in_window", &self.sign_in_window)
            .field("trust_forwarded_for", &self.trust_forwarded_for)
            .field("max_pending_orders_per_user", &self.max_pending_orders_per_user)
            .field("max_pending_units_per_user", &self.max_pending_units_per_user)
            .field("stock_strategy", &self.stock_strategy)
            .field("log_format", &self.log_format)
            .field("db_max_connections", &self.db_max_connections)
            .field("db_acquire_timeout_secs", &self.db_acquire_timeout_secs)
            .field("db_statement_timeout", &self.db_statement_timeout)
            .field("db_lock_timeout", &self.db_lock_timeout)
            .field("http_workers", &self.http_workers)
            .field("http_keep_alive", &self.http_keep_alive)
            .field("http_request_timeout", &self.http_request_timeout)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("seed_demo", &self.seed_demo)
            .field("redis_url", &self.redis_url.as_deref().map(redact_url))
            .field("redlock_urls", &self.redlock_urls.iter().map(|u| redact_url(u)).collect::<Vec<_>>())
            .field("redis_key_prefix", &self.redis_key_prefix)
            .field("lock_lease_ms", &self.lock_lease_ms)
            .field("lock_fair", &self.lock_fair)
            .field("optimistic_max_retries", &self.optimistic_max_retries)
            .field("lock_wait_ms", &self.lock_wait_ms)
            .field("order_batch_max", &self.order_batch_max)
            .field("order_queue_max", &self.order_queue_max)
            .field("order_pipeline", &self.order_pipeline)
            .field("order_payment_timeout", &self.order_payment_timeout)
            .field("order_sweep_interval", &self.order_sweep_interval)
            .field("stock_reconcile_interval", &self.stock_reconcile_interval)
            .field("outbox", &self.outbox)
            .field("outbox_retention", &self.outbox_retention)
            .field("relay_poll_interval", &self.relay_poll_interval)
            .field("events_stream_max_len", &self.events_stream_max_len)
            .field("webhooks", &self.webhooks)
            .field("webhook_max_attempts", &self.webhook_max_attempts)
            .field("webhook_retry_base", &self.webhook_retry_base)
            .field("webhook_retry_max", &self.webhook_retry_max)
            .field("webhook_timeout", &self.webhook_timeout)
            .field("catalogue_cache_mb", &self.catalogue_cache_mb)
            .field("catalogue_max_staleness", &self.catalogue_max_staleness)
            .field("catalogue_popular_staleness", &self.catalogue_popular_staleness)
            .finish()
    }
}

/// Figment parses `SHOP_ADMIN_TOKEN=12345678` as a number; a token is text whatever it looks like.
fn text_or_number<'de, D: serde::Deserializer<'de>>(de: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Text(String),
        Unsigned(u64),
        Signed(i64),
        Float(f64),
    }
    Ok(Option::<Raw>::deserialize(de)?.map(|raw| match raw {
        Raw::Text(s) => s,
        Raw::Unsigned(n) => n.to_string(),
        Raw::Signed(n) => n.to_string(),
        Raw::Float(n) => n.to_string(),
    }))
}

/// `a,b,c` in the environment, or a TOML list.
fn comma_list<'de, D: serde::Deserializer<'de>>(de: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        List(Vec<String>),
        Text(String),
    }
    Ok(match Raw::deserialize(de)? {
        Raw::List(list) => list,
        Raw::Text(text) => text.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect(),
    })
}

/// `url secret, url secret` in the environment, or a TOML list of tables with `url` and `secret`.
fn webhook_list<'de, D: serde::Deserializer<'de>>(de: D) -> Result<Vec<crate::events::Webhook>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        List(Vec<crate::events::Webhook>),
        Text(String),
    }
    match Raw::deserialize(de)? {
        Raw::List(list) => Ok(list),
        Raw::Text(text) => text
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|pair| match pair.split_whitespace().collect::<Vec<_>>()[..] {
                [url, secret] => Ok(crate::events::Webhook { url: url.to_owned(), secret: secret.to_owned() }),
                _ => Err(serde::de::Error::custom("each webhook is `url secret`, comma-separated")),
            })
            .collect(),
    }
}

/// `scheme://user:secret@host` -> `scheme://user:***@host`.
#[must_use]
pub fn redact_url(url: &str) -> String {
    redact_urls(url)
}

/// Every URL's password in `text` replaced by `***` (`scheme://user:secret@host` -> `scheme://user:***@host`),
/// wherever the URL sits in the text: what the log writer does to every line.
#[must_use]
pub fn redact_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (before, after) = rest.split_at(at + 3);
        out.push_str(before);
        // The authority ends where a path, query, fragment, quote or blank begins.
        let end = after.find(|c: char| matches!(c, '/' | '?' | '#' | '"' | '\'' | '`' | '>') || c.is_whitespace());
        let authority = &after[..end.unwrap_or(after.len())];
        match authority.rsplit_once('@').and_then(|(userinfo, host)| Some((userinfo.split_once(':')?.0, host))) {
            Some((user, host)) => {
                out.push_str(user);
                out.push_str(":***@");
                out.push_str(host);
            }
            None => out.push_str(authority),
        }
        rest = &after[authority.len()..];
    }
    out.push_str(rest);
    out
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            database_url: "sqlite://shop.db?mode=rwc".to_owned(),
            admin_token: None,
            auth_secret: None,
            access_token_ttl: Duration::from_secs(15 * 60),
            refresh_token_ttl: Duration::from_secs(14 * 24 * 3600),
            // OWASP's minimum for Argon2id.
            password_hash_memory_kib: 19_456,
            password_hash_iterations: 2,
            password_hash_parallelism: 1,
            // Five quick failures, then one attempt a minute.
            sign_in_failures_per_name: 5,
            sign_in_failures_per_client: 50,
            sign_in_window: Duration::from_secs(5 * 60),
            trust_forwarded_for: false,
            // Enough for a real basket; too little for one account to park a sale's stock.
            max_pending_orders_per_user: 10,
            max_pending_units_per_user: 100,
            stock_strategy: StockStrategy::Conditional,
            log_format: LogFormat::Text,
            db_max_connections: 16,
            db_acquire_timeout_secs: 10,
            db_statement_timeout: Duration::from_secs(30),
            db_lock_timeout: Duration::from_secs(10),
            http_workers: None,
            // actix-web's defaults.
            http_keep_alive: Duration::from_secs(5),
            http_request_timeout: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(10),
            seed_demo: true,
            redis_url: None,
            redlock_urls: Vec::new(),
            redis_key_prefix: "shop".to_owned(),
            lock_lease_ms: 10_000,
            lock_fair: None,
            optimistic_max_retries: 50,
            lock_wait_ms: 5_000,
            order_batch_max: 128,
            // At the ~6,000 orders/s one hot option commits here, 10,000 queued is under two seconds of wait.
            order_queue_max: 10_000,
            order_pipeline: 4,
            // The reference's timeout.
            order_payment_timeout: Duration::from_secs(15 * 60),
            order_sweep_interval: Duration::from_secs(30),
            stock_reconcile_interval: Duration::from_secs(60),
            outbox: true,
            outbox_retention: Duration::from_secs(7 * 24 * 3600),
            relay_poll_interval: Duration::from_millis(500),
            events_stream_max_len: 1_000_000,
            webhooks: Vec::new(),
            webhook_max_attempts: 10,
            webhook_retry_base: Duration::from_secs(1),
            webhook_retry_max: Duration::from_secs(600),
            webhook_timeout: Duration::from_secs(5),
            catalogue_cache_mb: 64,
            catalogue_max_staleness: Duration::from_secs(1),
            catalogue_popular_staleness: Duration::from_secs(30),
        }
    }
}

/// The largest batch: past it a batch's statements grow without making commits fewer in a way that matters.
pub const MAX_ORDER_BATCH: u32 = 4_096;

/// A setting that is missing, malformed or does not fit the others.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(String),
    #[error("configuration: {key}: {message}")]
    Invalid { key: &'static str, message: String },
}

impl Settings {
    /// Reads defaults, then `file` if given, then the environment.
    ///
    /// # Errors
    /// [`ConfigError`] naming the key that is wrong.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Self::default()));
        if let Some(file) = file {
            if !file.exists() {
                return Err(ConfigError::Load(format!("config file {} does not exist", file.display())));
            }
            figment = figment.merge(Toml::file(file));
        }
        let mut settings: Self = figment
            .merge(Env::prefixed("SHOP_").ignore(&["config"]))
            .extract()
            .map_err(|e| ConfigError::Load(e.to_string()))?;
        // A secret pasted with a trailing newline is the same secret.
        for secret in [&mut settings.admin_token, &mut settings.auth_secret] {
            *secret = secret.take().map(|s| s.trim().to_owned());
        }
        settings.validate()?;
        Ok(settings)
    }

    /// Checks what the types alone cannot.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let sqlite = self.database_url.starts_with("sqlite:");
        if !sqlite && !self.database_url.starts_with("postgres://") && !self.database_url.starts_with("postgresql://") {
            return Err(ConfigError::Invalid {
                key: "SHOP_DATABASE_URL",
                message: "must start with postgres:// or sqlite:".into(),
            });
        }
        if !(1..=MAX_ORDER_BATCH).contains(&self.order_batch_max) {
            return Err(ConfigError::Invalid {
                key: "SHOP_ORDER_BATCH_MAX",
                message: format!("must be 1 (combining off) to {MAX_ORDER_BATCH}"),
            });
        }
        if self.order_queue_max == 0 {
            return Err(ConfigError::Invalid { key: "SHOP_ORDER_QUEUE_MAX", message: "must be at least 1".into() });
        }
        if !(1..=16).contains(&self.order_pipeline) {
            return Err(ConfigError::Invalid { key: "SHOP_ORDER_PIPELINE", message: "must be 1 to 16".into() });
        }
        if self.db_max_connections == 0 {
            return Err(ConfigError::Invalid { key: "SHOP_DB_MAX_CONNECTIONS", message: "must be at least 1".into() });
        }
        if let Some(secret) = self.auth_secret.as_deref().map(str::trim).filter(|s| s.len() < 32) {
            return Err(ConfigError::Invalid {
                key: "SHOP_AUTH_SECRET",
                message: format!("must be at least 32 bytes; {} given", secret.len()),
            });
        }
        for (key, ttl) in
            [("SHOP_ACCESS_TOKEN_TTL", self.access_token_ttl), ("SHOP_REFRESH_TOKEN_TTL", self.refresh_token_ttl)]
        {
            if ttl < Duration::from_secs(1) {
                return Err(ConfigError::Invalid { key, message: "must be at least 1s".into() });
            }
        }
        if self.sign_in_failures_per_name == 0 || self.sign_in_failures_per_client == 0 {
            return Err(ConfigError::Invalid {
                key: "SHOP_SIGN_IN_FAILURES_PER_NAME",
                message: "the sign-in failure quotas must be at least 1".into(),
            });
        }
        if self.sign_in_window < Duration::from_millis(100) {
            return Err(ConfigError::Invalid { key: "SHOP_SIGN_IN_WINDOW", message: "must be at least 100ms".into() });
        }
        if self.admin_token.as_deref().is_some_and(|t| t.trim().len() < 8) {
            return Err(ConfigError::Invalid {
                key: "SHOP_ADMIN_TOKEN",
                message: "must be at least 8 characters (or unset to disable the admin API)".into(),
            });
        }
        if self.stock_strategy == StockStrategy::Pessimistic && sqlite {
            return Err(ConfigError::Invalid {
                key: "SHOP_STOCK_STRATEGY",
                message: "pessimistic needs row locks (SELECT ... FOR NO KEY UPDATE), which SQLite does not have: use \
                          conditional, optimistic or local with SQLite, or point SHOP_DATABASE_URL at PostgreSQL"
                    .into(),
            });
        }
        if self.order_sweep_interval.is_zero() {
            return Err(ConfigError::Invalid { key: "SHOP_ORDER_SWEEP_INTERVAL", message: "must be positive".into() });
        }
        if self.stock_reconcile_interval.is_zero() {
            return Err(ConfigError::Invalid {
                key: "SHOP_STOCK_RECONCILE_INTERVAL",
                message: "must be positive".into(),
            });
        }
        if self.stock_strategy == StockStrategy::RedisRedlock {
            if ![3, 5].contains(&self.redlock_urls.len()) {
                return Err(ConfigError::Invalid {
                    key: "SHOP_REDLOCK_URLS",
                    message: format!(
                        "redis-redlock needs 3 or 5 independent Redis nodes, comma-separated; {} given",
                        self.redlock_urls.len()
                    ),
                });
            }
        } else if self.stock_strategy.needs_redis() && self.redis_url.is_none() {
            return Err(ConfigError::Invalid {
                key: "SHOP_STOCK_STRATEGY",
                message: format!("{} needs Redis: set SHOP_REDIS_URL", self.stock_strategy),
            });
        }
        if self.stock_strategy.needs_redis() && self.lock_lease_ms < 100 {
            return Err(ConfigError::Invalid { key: "SHOP_LOCK_LEASE_MS", message: "must be at least 100".into() });
        }
        if let Some(bad) =
            self.webhooks.iter().find(|w| !w.url.starts_with("http://") && !w.url.starts_with("https://"))
        {
            return Err(ConfigError::Invalid {
                key: "SHOP_WEBHOOKS",
                message: format!("{} is not an http:// or https:// URL", redact_url(&bad.url)),
            });
        }
        if let Some(bad) = self.webhooks.iter().find(|w| w.secret.trim().len() < 8) {
            return Err(ConfigError::Invalid {
                key: "SHOP_WEBHOOKS",
                message: format!("the secret of {} is shorter than 8 bytes", redact_url(&bad.url)),
            });
        }
        if self.catalogue_max_staleness.is_zero() || self.catalogue_popular_staleness.is_zero() {
            return Err(ConfigError::Invalid {
                key: "SHOP_CATALOGUE_MAX_STALENESS",
                message: "the catalogue's staleness bounds must be above zero (SHOP_CATALOGUE_CACHE_MB=0 turns the \
                          cache off)"
                    .into(),
            });
        }
        if self.webhook_max_attempts == 0 || self.relay_poll_interval.is_zero() {
            return Err(ConfigError::Invalid {
                key: "SHOP_WEBHOOK_MAX_ATTEMPTS",
                message: "attempts and the relay's poll interval must be positive".into(),
            });
        }
        Ok(())
    }

    /// The pool these settings describe, with `max` connections.
    #[must_use]
    pub fn pool(&self, max: u32) -> shop_persistence::PoolSettings {
        shop_persistence::PoolSettings {
            max_connections: max,
            acquire_timeout: Duration::from_secs(self.db_acquire_timeout_secs),
            statement_timeout: self.db_statement_timeout,
            lock_timeout: self.db_lock_timeout,
        }
    }

    /// What serving needs beyond [`Settings::validate`] (the other commands sign no tokens).
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] for PostgreSQL without `SHOP_AUTH_SECRET`.
    pub fn validate_for_serving(&self) -> Result<(), ConfigError> {
        self.validate()?;
        if self.auth_secret.is_none() && !self.is_sqlite() {
            return Err(ConfigError::Invalid {
                key: "SHOP_AUTH_SECRET",
                message: "is required with PostgreSQL: every instance signs and checks access tokens with it \
                          (32+ random bytes, e.g. `openssl rand -hex 32`)"
                    .into(),
            });
        }
        Ok(())
    }

    #[must_use]
    pub fn is_sqlite(&self) -> bool {
        self.database_url.starts_with("sqlite:")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(url: &str, strategy: StockStrategy) -> Settings {
        let auth_secret = Some("0123456789abcdef0123456789abcdef".to_owned());
        Settings { database_url: url.into(), stock_strategy: strategy, auth_secret, ..Settings::default() }
    }

    #[test]
    fn postgres_needs_a_long_enough_auth_secret_and_sqlite_makes_its_own() {
        let mut s = settings("postgres://localhost/db", StockStrategy::Conditional);
        s.auth_secret = None;
        assert!(s.validate().is_ok(), "migrate and reconcile sign nothing");
        let err = s.validate_for_serving().unwrap_err().to_string();
        assert!(err.contains("SHOP_AUTH_SECRET") && err.contains("PostgreSQL"), "{err}");
        s.auth_secret = Some("too short".into());
        assert!(s.validate().unwrap_err().to_string().contains("at least 32 bytes"));
        let mut embedded = settings("sqlite://x.db", StockStrategy::Conditional);
        embedded.auth_secret = None;
        assert!(embedded.validate_for_serving().is_ok());
    }

    #[test]
    fn pessimistic_is_refused_on_sqlite_with_a_message_naming_the_key() {
        let err = settings("sqlite://x.db", StockStrategy::Pessimistic).validate().unwrap_err().to_string();
        assert!(err.contains("SHOP_STOCK_STRATEGY") && err.contains("SQLite"), "{err}");
        assert!(settings("postgres://localhost/db", StockStrategy::Pessimistic).validate().is_ok());
    }

    #[test]
    fn redis_strategies_need_a_redis_url() {
        let err = settings("sqlite://x.db", StockStrategy::RedisSpin).validate().unwrap_err().to_string();
        assert!(err.contains("SHOP_REDIS_URL"), "{err}");
    }

    #[test]
    fn redlock_needs_three_or_five_nodes() {
        let mut s = settings("sqlite://x.db", StockStrategy::RedisRedlock);
        s.redlock_urls = vec!["redis://a".into(), "redis://b".into()];
        let err = s.validate().unwrap_err().to_string();
        assert!(err.contains("SHOP_REDLOCK_URLS") && err.contains("2 given"), "{err}");
        s.redlock_urls.push("redis://c".into());
        assert!(s.validate().is_ok());
    }

    #[test]
    fn strategy_names_parse_including_the_pessimistic_alias() {
        let parse = |s: &str| serde_json::from_value::<StockStrategy>(serde_json::Value::String(s.into()));
        assert_eq!(parse("conditional").unwrap(), StockStrategy::Conditional);
        assert_eq!(parse("redis-pessimistic").unwrap(), StockStrategy::RedisSpin);
        assert_eq!(parse("redis-pubsub").unwrap(), StockStrategy::RedisPubsub);
        assert!(parse("fastest").is_err());
    }

    #[test]
    fn database_url_scheme_is_checked() {
        let err = settings("mysql://x", StockStrategy::Conditional).validate().unwrap_err().to_string();
        assert!(err.contains("SHOP_DATABASE_URL"), "{err}");
    }

    #[test]
    fn durations_read_as_people_write_them() {
        use super::duration_text::parse;
        assert_eq!(parse("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse("42"), Ok(Duration::from_secs(42)));
        assert!(parse("soon").is_err());
        assert!(parse("5d").is_err());
    }

    #[test]
    fn secrets_are_redacted() {
        assert_eq!(redact_url("postgres://shop:hunter2@db:5432/shop"), "postgres://shop:***@db:5432/shop");
        assert_eq!(redact_url("sqlite://shop.db"), "sqlite://shop.db");
        assert_eq!(redact_url("redis://:pw@r:6379/0"), "redis://:***@r:6379/0");
        assert_eq!(
            redact_urls(r#"url: "postgres://a:b@h/db", then redis://u:p@x and http://plain/path?q=1"#),
            r#"url: "postgres://a:***@h/db", then redis://u:***@x and http://plain/path?q=1"#
        );
        assert_eq!(redact_urls("no url, a:b@c"), "no url, a:b@c");
        let s = Settings { admin_token: Some("supersecret".into()), ..Settings::default() };
        assert!(!format!("{s:?}").contains("supersecret"));
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail decides the closure's error type
    fn file_then_env_layering() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("shop.toml", "http_addr = \"127.0.0.1:9000\"\nadmin_token = \"from-the-file\"\n")?;
            jail.set_env("SHOP_ADMIN_TOKEN", "from-the-env");
            let s = Settings::load(Some(Path::new("shop.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(s.http_addr.port(), 9000);
            assert_eq!(s.admin_token.as_deref(), Some("from-the-env"));
            jail.set_env("SHOP_ORDER_PAYMENT_TIMEOUT", "2m");
            jail.set_env("SHOP_ORDER_SWEEP_INTERVAL", "5");
            jail.set_env("SHOP_STOCK_RECONCILE_INTERVAL", "90s");
            let s = Settings::load(None).map_err(|e| e.to_string())?;
            assert_eq!((s.order_payment_timeout.as_secs(), s.order_sweep_interval.as_secs()), (120, 5));
            assert_eq!(s.stock_reconcile_interval.as_secs(), 90);
            jail.set_env("SHOP_STOCK_RECONCILE_INTERVAL", "0s");
            let err = Settings::load(None).unwrap_err().to_string();
            assert!(err.contains("SHOP_STOCK_RECONCILE_INTERVAL"), "{err}");
            jail.set_env("SHOP_STOCK_RECONCILE_INTERVAL", "1m");
            jail.set_env("SHOP_REDLOCK_URLS", "redis://a:1, redis://b:2,redis://c:3");
            let s = Settings::load(None).map_err(|e| e.to_string())?;
            assert_eq!(s.redlock_urls, vec!["redis://a:1", "redis://b:2", "redis://c:3"]);
            jail.set_env("SHOP_ADMIN_TOKEN", "12345678");
            assert_eq!(Settings::load(None).map_err(|e| e.to_string())?.admin_token.as_deref(), Some("12345678"));
            jail.set_env("SHOP_ADMIN_TOKEN", "  padded-token \n");
            assert_eq!(Settings::load(None).map_err(|e| e.to_string())?.admin_token.as_deref(), Some("padded-token"));
            jail.set_env("SHOP_STOCK_STRATEGY", "bogus");
            let err = Settings::load(None).unwrap_err().to_string();
            assert!(err.contains("STOCK_STRATEGY") && err.contains("bogus"), "{err}");
            Ok(())
        });
    }
}
