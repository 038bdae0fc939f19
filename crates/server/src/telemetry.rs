//! Logging with tracing: human-readable lines by default, JSON with `SHOP_LOG_FORMAT=json`; `RUST_LOG` filters.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber; a second call (as in tests) is a no-op. Every line goes through
/// [`Redacted`], so no password in a URL reaches the log, whoever logged it (a driver's debug span included).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,sea_orm=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(false).with_writer(Redacted);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).try_init(),
    };
}

/// Standard output with the passwords of URLs masked ([`crate::config::redact_urls`]).
#[derive(Debug, Clone, Copy)]
pub struct Redacted;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Redacted {
    type Writer = RedactedWriter;

    fn make_writer(&'a self) -> Self::Writer {
        RedactedWriter(std::io::stdout())
    }
}

/// The writer of [`Redacted`]: the formatter writes each event in one call, so each call is one whole line.
#[derive(Debug)]
pub struct RedactedWriter(std::io::Stdout);

impl std::io::Write for RedactedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        if text.contains("://") {
            self.0.write_all(crate::config::redact_urls(&text).as_bytes())?;
        } else {
            self.0.write_all(buf)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Histogram buckets of every `*_seconds` series: from 100 µs (a cached read, a lock taken at once) to 10 s
/// (the longest a request may wait on the pool or a lock).
const SECONDS: [f64; 16] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Buckets of `shop_batch_size`: powers of two up to past the largest `SHOP_ORDER_BATCH_MAX` worth running.
const SIZES: [f64; 11] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];

/// How often recorded histogram samples are folded into their buckets when nobody scrapes.
const UPKEEP: std::time::Duration = std::time::Duration::from_secs(5);

/// The Prometheus recorder of this process, installed on first use: what `metrics` records anywhere in the
/// process, `/metrics` renders. One per process (a global, like the tracing subscriber): several applications in
/// one process (the tests) share it.
pub fn metrics() -> metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE.get_or_init(install_metrics).clone()
}

fn install_metrics() -> metrics_exporter_prometheus::PrometheusHandle {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    let built = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full("shop_batch_size".into()), &SIZES));
    let recorder = match built {
        Ok(builder) => builder.build_recorder(),
        Err(e) => {
            tracing::error!(error = %e, "metrics buckets refused; histograms are summaries");
            PrometheusBuilder::new().build_recorder()
        }
    };
    let handle = recorder.handle();
    if let Err(e) = metrics::set_global_recorder(recorder) {
        tracing::error!(error = %e, "another metrics recorder is installed; /metrics shows only what this one sees");
    }
    describe_metrics();
    // Without scrapes, samples would pile up until the next render; a thread of its own outlives any runtime.
    let upkeep = handle.clone();
    let _ = std::thread::Builder::new().name("metrics-upkeep".into()).spawn(move || {
        loop {
            std::thread::sleep(UPKEEP);
            upkeep.run_upkeep();
        }
    });
    handle
}

/// The HELP line of every series the service records (the README lists them too).
fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_histogram!(
        "shop_http_request_duration_seconds",
        Unit::Seconds,
        "HTTP requests by method, route template and status class, from the request's arrival to its answer."
    );
    describe_counter!("shop_orders_placed_total", "Orders committed.");
    describe_counter!("shop_orders_refused_early_total", "Orders refused by a stock read, before any transaction.");
    describe_counter!("shop_order_retries_total", "Batch transactions retried after an optimistic conflict.");
    describe_counter!("shop_stock_lock_acquisitions_total", "Locks or reservations taken before a transaction.");
    describe_counter!("shop_stock_lock_wait_microseconds_total", "Time spent waiting for them.");
    describe_histogram!(
        "shop_stock_wait_seconds",
        Unit::Seconds,
        "How long a batch waited for its stock lock (or its Redis reservation)."
    );
    describe_counter!("shop_order_batches_total", "Order batches committed, each in one transaction.");
    describe_counter!("shop_payment_batches_total", "Payment batches committed, each in one transaction.");
    describe_counter!("shop_batch_splits_total", "Batches whose transaction failed and were committed one by one.");
    describe_counter!("shop_requests_shed_total", "Orders and payments refused at once because their lane was full.");
    describe_counter!(
        "shop_requests_abandoned_total",
        "Orders and payments dropped before their batch committed (the client left, or the deadline passed)."
    );
    describe_histogram!("shop_batch_size", "Requests per committed batch, by kind (order, payment).");
    describe_histogram!(
        "shop_batch_queue_wait_seconds",
        Unit::Seconds,
        "How long a batch's oldest request waited in its lane."
    );
    describe_histogram!(
        "shop_batch_commit_seconds",
        Unit::Seconds,
        "How long a batch's transaction took, statements and commit."
    );
    describe_gauge!("shop_lanes_active", "Lanes with work, by kind (order, payment).");
    describe_gauge!("shop_lane_queued_requests", "Requests waiting in lanes besides the batches committing.");
    describe_gauge!("shop_db_pool_connections", "Database pool connections by state (in_use, idle, max).");
}

/// Sets the gauges that are read rather than counted: the lanes of `orders` and the pool of `db`.
pub fn observe_gauges(db: &sea_orm::DatabaseConnection, orders: &shop_domain::services::OrderService, max: u32) {
    #[allow(clippy::cast_precision_loss)] // counts of connections and requests
    let set = |name: &'static str, label: (&'static str, &'static str), value: usize| {
        metrics::gauge!(name, label.0 => label.1).set(value as f64);
    };
    for (kind, load) in [("order", orders.placing_load()), ("payment", orders.paying_load())] {
        set("shop_lanes_active", ("kind", kind), load.lanes);
        set("shop_lane_queued_requests", ("kind", kind), load.queued);
    }
    let (size, idle) = match db.get_database_backend() {
        sea_orm::DatabaseBackend::Postgres => {
            let pool = db.get_postgres_connection_pool();
            (pool.size() as usize, pool.num_idle())
        }
        sea_orm::DatabaseBackend::Sqlite => {
            let pool = db.get_sqlite_connection_pool();
            (pool.size() as usize, pool.num_idle())
        }
        _ => return,
    };
    set("shop_db_pool_connections", ("state", "in_use"), size.saturating_sub(idle));
    set("shop_db_pool_connections", ("state", "idle"), idle);
    set("shop_db_pool_connections", ("state", "max"), max as usize);
}
