//! `lock-contention`: how the Redis locks hand over under contention, measured as a new user would see it.
//!
//! N contenders, each with its own lock client (its own connections, as separate instances of the service have),
//! lock one hot key and release it at once, in a loop, until a fixed number of grants (2,000 with 10 contenders,
//! 1,000 with 100, as issue 20's table). Reported per lock and mode: grants per second, holder changes (consecutive
//! grants to different contenders, of grants - 1: a lock the releaser keeps taking back scores low however fast
//! it is), and the wait of each grant (from calling `lock` to holding the guard) at p50 / p99 / max. The order of
//! grants is the order of their fences, which strictly increase per key, so no clock has to be shared.
//!
//! The single-node locks use the Redis at `--redis` (keys under a random prefix, nothing flushed); Redlock uses
//! three `redis-server` processes started here on free ports. Each cell is run `--repeat` times and the run with
//! the median grants/s is reported; the table goes to `benches/results/locks.md`.
//!
//! `cargo run --release -p shop-bench --bin lock-contention -- --repeat 3`

#[path = "../instances.rs"]
#[allow(dead_code)]
mod instances;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use clap::Parser;
use shop_redis::{DistributedLock, LockError, LockOptions, PubSubLock, Redlock, SpinLock};
use tokio::sync::Barrier;
use tokio::time::Instant;

#[derive(Debug, Parser)]
#[command(about = "Hot-key handover of the Redis locks: N contenders, each with its own client")]
struct Cli {
    /// Locks to measure (comma-separated): redis-spin, redis-pubsub, redis-redlock.
    #[arg(long, value_delimiter = ',', default_value = "redis-spin,redis-pubsub,redis-redlock")]
    locks: Vec<String>,
    /// Modes to measure (comma-separated): racing, fair.
    #[arg(long, value_delimiter = ',', default_value = "racing,fair")]
    modes: Vec<String>,
    /// Contender counts (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "10,100")]
    contenders: Vec<usize>,
    /// Grants per run; by default 2,000 up to 10 contenders, else 1,000.
    #[arg(long)]
    grants: Option<usize>,
    /// Runs per cell; the run with the median grants/s is reported.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// The lock's lease, in seconds.
    #[arg(long, default_value_t = 10)]
    lease_secs: u64,
    /// Redis for the single-node locks.
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis: String,
    /// Where the Markdown table goes.
    #[arg(long, default_value = "benches/results/locks.md")]
    out: PathBuf,
}

/// What one run measured.
#[derive(Debug, Clone)]
struct Run {
    grants: usize,
    elapsed: Duration,
    changes: usize,
    waits: Vec<Duration>,
    errors: usize,
}

impl Run {
    fn per_second(&self) -> f64 {
        self.grants as f64 / self.elapsed.as_secs_f64().max(f64::MIN_POSITIVE)
    }

    fn wait(&self, p: f64) -> Duration {
        if self.waits.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((p / 100.0) * self.waits.len() as f64).ceil() as usize;
        self.waits[rank.clamp(1, self.waits.len()) - 1]
    }
}

/// One cell of the table: every run, and which one is the median.
#[derive(Debug)]
struct Cell {
    lock: String,
    mode: String,
    contenders: usize,
    runs: Vec<Run>,
}

impl Cell {
    fn median(&self) -> Option<&Run> {
        let mut by_rate: Vec<&Run> = self.runs.iter().collect();
        by_rate.sort_by(|a, b| a.per_second().total_cmp(&b.per_second()));
        by_rate.get(by_rate.len() / 2).copied()
    }
}

/// Connects one lock client, as one instance of the service would.
async fn client(lock: &str, fair: bool, cli: &Cli, nodes: &[String]) -> Result<Arc<dyn DistributedLock>, LockError> {
    let lease = Duration::from_secs(cli.lease_secs);
    let options = LockOptions { fair };
    Ok(match lock {
        "redis-spin" => Arc::new(SpinLock::connect_with(&cli.redis, lease, options).await?),
        "redis-pubsub" => Arc::new(PubSubLock::connect_with(&cli.redis, lease, options).await?),
        "redis-redlock" => Arc::new(Redlock::connect_with(nodes, lease, options).await?),
        other => return Err(LockError::Config(format!("unknown lock {other}"))),
    })
}

/// One run: `contenders` clients locking and releasing one key until `total` grants.
async fn run(
    lock: &str,
    fair: bool,
    contenders: usize,
    total: usize,
    cli: &Cli,
    nodes: &[String],
) -> Result<Run, String> {
    let clients = futures::future::try_join_all((0..contenders).map(|_| client(lock, fair, cli, nodes)))
        .await
        .map_err(|e| format!("connecting: {e}"))?;
    let key = format!("bench:contention:{}", uuid::Uuid::new_v4().simple());
    let granted = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(Barrier::new(contenders + 1));
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(id, client)| {
            let (key, granted, errors, barrier) = (key.clone(), granted.clone(), errors.clone(), barrier.clone());
            tokio::spawn(async move {
                // (fence, contender, wait), and when the last counted grant was released.
                let mut seen: Vec<(u64, usize, Duration)> = Vec::new();
                let mut last = None;
                barrier.wait().await;
                while granted.load(Ordering::SeqCst) < total {
                    let asked = Instant::now();
                    let mut guard = match client.lock(&key, asked + Duration::from_secs(60)).await {
                        Ok(guard) => guard,
                        Err(_) => {
                            errors.fetch_add(1, Ordering::SeqCst);
                            continue;
                        }
                    };
                    let waited = asked.elapsed();
                    // Counted under the lock, so exactly `total` grants are measured.
                    let n = granted.fetch_add(1, Ordering::SeqCst);
                    if n < total {
                        seen.push((guard.fence(), id, waited));
                    }
                    if guard.release().await.is_err() {
                        errors.fetch_add(1, Ordering::SeqCst);
                    }
                    if n + 1 == total {
                        last = Some(Instant::now());
                    }
                }
                (seen, last)
            })
        })
        .collect();
    barrier.wait().await;
    let started = Instant::now();
    let mut grants = Vec::with_capacity(total);
    let mut ended = None;
    for task in tasks {
        let (seen, last) = task.await.map_err(|e| format!("a contender panicked: {e}"))?;
        grants.extend(seen);
        ended = ended.max(last);
    }
    let elapsed = ended.unwrap_or_else(Instant::now).saturating_duration_since(started);
    grants.sort_by_key(|&(fence, _, _)| fence);
    let changes = grants.windows(2).filter(|w| w[0].1 != w[1].1).count();
    let mut waits: Vec<Duration> = grants.iter().map(|&(_, _, w)| w).collect();
    waits.sort();
    // Let the dropped clients' quits go out before the next run connects.
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok(Run { grants: grants.len(), elapsed, changes, waits, errors: errors.load(Ordering::SeqCst) })
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    match ms {
        ..1.0 => format!("{ms:.2}"),
        ..10.0 => format!("{ms:.1}"),
        _ => format!("{ms:.0}"),
    }
}

fn thousands(n: f64) -> String {
    let n = n.round() as u64;
    if n >= 1000 { format!("{},{:03}", n / 1000, n % 1000) } else { n.to_string() }
}

fn table(cells: &[Cell], cli: &Cli, loads: &[String]) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "One hot key, each contender with its own lock client, locking and releasing at once in a loop; lease {} s; \
         median of {} runs by grants/s (range in brackets). Load average (1/5/15 min) at each cell's start: {}.\n",
        cli.lease_secs,
        cli.repeat,
        loads.join("; ")
    );
    md.push_str(
        "| lock | mode | contenders | grants/s | holder changes | wait p50 / p99 / max ms | errors |\n\
         |---|---|---:|---:|---:|---:|---:|\n",
    );
    for cell in cells {
        let Some(median) = cell.median() else { continue };
        let rates: Vec<f64> = cell.runs.iter().map(Run::per_second).collect();
        let (low, high) = rates.iter().fold((f64::MAX, 0.0f64), |(lo, hi), &r| (lo.min(r), hi.max(r)));
        let changes = median.changes as f64 / (median.grants.saturating_sub(1).max(1)) as f64 * 100.0;
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} ({}-{}) | {} of {} ({changes:.0}%) | {} / {} / {} | {} |",
            cell.lock,
            cell.mode,
            cell.contenders,
            thousands(median.per_second()),
            thousands(low),
            thousands(high),
            thousands(median.changes as f64),
            thousands(median.grants.saturating_sub(1) as f64),
            ms(median.wait(50.0)),
            ms(median.wait(99.0)),
            ms(median.wait(100.0)),
            cell.runs.iter().map(|r| r.errors).sum::<usize>(),
        );
    }
    md
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let redlock = if cli.locks.iter().any(|l| l == "redis-redlock") {
        match instances::RedisNodes::start(3).await {
            Ok(nodes) => Some(nodes),
            Err(e) => {
                eprintln!("lock-contention: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    let nodes = redlock.as_ref().map(|n| n.urls.clone()).unwrap_or_default();
    let (mut cells, mut loads) = (Vec::new(), Vec::new());
    for lock in &cli.locks {
        for mode in &cli.modes {
            let fair = match mode.as_str() {
                "fair" => true,
                "racing" => false,
                other => {
                    eprintln!("lock-contention: unknown mode {other} (racing, fair)");
                    return ExitCode::from(2);
                }
            };
            for &contenders in &cli.contenders {
                let total = cli.grants.unwrap_or(if contenders <= 10 { 2_000 } else { 1_000 });
                loads.push(format!("{lock} {mode} {contenders}: {}", load_average()));
                let mut cell = Cell { lock: lock.clone(), mode: mode.clone(), contenders, runs: Vec::new() };
                for i in 0..cli.repeat {
                    match run(lock, fair, contenders, total, &cli, &nodes).await {
                        Ok(r) => {
                            let (p50, p99, max) = (ms(r.wait(50.0)), ms(r.wait(99.0)), ms(r.wait(100.0)));
                            eprintln!(
                                "{lock} {mode} {contenders} run {}: {:.0} grants/s, {} of {} changes, \
                                 wait p50 {p50} p99 {p99} max {max} ms, {} errors",
                                i + 1,
                                r.per_second(),
                                r.changes,
                                r.grants.saturating_sub(1),
                                r.errors
                            );
                            cell.runs.push(r);
                        }
                        Err(e) => eprintln!("{lock} {mode} {contenders} run {}: failed: {e}", i + 1),
                    }
                }
                cells.push(cell);
            }
        }
    }
    drop(redlock);
    let md = table(&cells, &cli, &loads);
    println!("{md}");
    if let Some(dir) = cli.out.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    match std::fs::write(&cli.out, &md) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lock-contention: writing {}: {e}", cli.out.display());
            ExitCode::FAILURE
        }
    }
}
