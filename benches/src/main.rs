//! `shop-bench`: the reference's stock experiments (100 buyers on 100 units, 1,000 on 1,000, 1,000 on 100, and
//! 1,000 on 1,000 over two instances), run against real release `shop-server` processes over a fresh PostgreSQL
//! database per run, for each stock strategy; the median of N runs per cell goes to `benches/results/`.
//!
//! - [`api`]: signing buyers up and in.
//! - [`instances`]: building and starting servers, fresh databases.
//! - [`scenario`]: one run: set up through the API, release every buyer at once, measure, verify.
//! - [`reads`]: `--reads`, the catalogue's read routes against the floor, during a sale, and deep pages.
//! - [`report`]: statistics, the Markdown table and the SVG chart.

mod api;
mod instances;
mod reads;
mod report;
mod scenario;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};

use crate::scenario::Scenario;

#[derive(Debug, Parser)]
#[command(about = "Lock-strategy benchmark: the reference's experiments against release shop-server instances")]
struct Cli {
    /// Stock strategies to measure (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "conditional,pessimistic,optimistic,local,redis-spin,redis-pubsub,redis-redlock,redis-optimistic"
    )]
    strategies: Vec<String>,
    /// Scenarios: 100x100, 1000x1000, 1000on100, 1000x1000x2 (two instances), 5000x5000 (sustained), 100seq (one
    /// buyer at a time), catalogue (1,000 buyers of one option with 1,000 buyers of 100 other options).
    #[arg(long, value_delimiter = ',', default_value = "100x100,1000x1000,1000on100,1000x1000x2,5000x5000,100seq")]
    scenarios: Vec<String>,
    /// Runs per cell; the median is reported.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Each buyer also pays its order, measured as a second phase.
    #[arg(long)]
    pay: bool,
    /// Order combining (`SHOP_ORDER_BATCH_MAX`) values to compare; empty leaves the server's default.
    #[arg(long, value_delimiter = ',')]
    batch_max: Vec<u32>,
    /// PostgreSQL to create the fresh databases in.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    postgres: String,
    /// Redis, for the redis-* strategies.
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis: String,
    /// Where the results go.
    #[arg(long, default_value = "benches/results")]
    out: PathBuf,
    /// Database pool size of each instance.
    #[arg(long, default_value_t = 16)]
    pool: u32,
    /// Scrape every instance's `/metrics` every this many milliseconds during the order phase; the last scrape
    /// goes to `<out>/scrape.txt`.
    #[arg(long)]
    scrape_ms: Option<u64>,
    /// Measure the catalogue's reads instead (with the first strategy): each route against the floor, product
    /// reads during a 5,000-buyer sale, deep pages of 100,000 products; the table goes to `<out>/reads.md`.
    #[arg(long)]
    reads: bool,
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // Built beside shop-server, reqwest has rustls without a provider of its own; a second install is a no-op.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let scenarios: Vec<Scenario> = match cli.scenarios.iter().map(|s| s.parse()).collect() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("shop-bench: {e}");
            return ExitCode::from(2);
        }
    };
    let binary = match instances::build_release() {
        Ok(path) => path,
        Err(e) => {
            eprintln!("shop-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    if cli.reads {
        return reads_only(&cli, binary).await;
    }
    let batches: Vec<Option<u32>> =
        if cli.batch_max.is_empty() { vec![None] } else { cli.batch_max.iter().copied().map(Some).collect() };
    let total = cli.strategies.len() * scenarios.len() * batches.len() * cli.repeat;
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let redlock = if cli.strategies.iter().any(|s| s == "redis-redlock") {
        match instances::RedisNodes::start(3).await {
            Ok(nodes) => Some(nodes),
            Err(e) => {
                eprintln!("shop-bench: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    let mut cells = Vec::new();
    for strategy in &cli.strategies {
        for scenario in &scenarios {
            for batch in &batches {
                let mut runs = Vec::with_capacity(cli.repeat);
                for run in 0..cli.repeat {
                    bar.set_message(format!("{strategy} {scenario} run {}", run + 1));
                    let setup = scenario::Setup {
                        binary: binary.clone(),
                        postgres: cli.postgres.clone(),
                        redis: cli.redis.clone(),
                        redlock: redlock.as_ref().map(|n| n.urls.clone()).unwrap_or_default(),
                        strategy: strategy.clone(),
                        batch_max: *batch,
                        pool: cli.pool,
                        pay: cli.pay,
                        scrape: cli.scrape_ms.map(std::time::Duration::from_millis),
                        scrape_out: cli.scrape_ms.map(|_| cli.out.join("scrape.txt")),
                    };
                    match scenario::run(&setup, scenario).await {
                        Ok(result) => runs.push(result),
                        Err(e) => bar.println(format!("{strategy} {scenario}: run failed: {e}")),
                    }
                    bar.inc(1);
                }
                if !runs.is_empty() {
                    cells.push(report::Cell::median_of(strategy, *scenario, *batch, runs));
                }
            }
        }
    }
    bar.finish_with_message("done");
    match report::write(&cli.out, &cells, cli.pay) {
        Ok(table) => {
            println!("{table}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("shop-bench: writing the results: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `--reads`: the read benchmark, `--repeat` times, the medians to `<out>/reads.md`.
async fn reads_only(cli: &Cli, binary: PathBuf) -> ExitCode {
    let setup = scenario::Setup {
        binary,
        postgres: cli.postgres.clone(),
        redis: cli.redis.clone(),
        redlock: Vec::new(),
        strategy: cli.strategies.first().cloned().unwrap_or_else(|| "conditional".into()),
        batch_max: None,
        pool: cli.pool,
        pay: false,
        scrape: None,
        scrape_out: None,
    };
    let mut runs = Vec::new();
    for run in 0..cli.repeat {
        match reads::run(&setup).await {
            Ok(r) => runs.push(r),
            Err(e) => eprintln!("reads, run {}: failed: {e}", run + 1),
        }
    }
    if runs.is_empty() {
        return ExitCode::FAILURE;
    }
    let table = reads::report(&runs);
    println!("{table}");
    if let Err(e) = std::fs::create_dir_all(&cli.out).and_then(|()| std::fs::write(cli.out.join("reads.md"), &table)) {
        eprintln!("shop-bench: writing the results: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
