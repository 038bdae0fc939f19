//! `shop-server`: serves the API (default), applies migrations (`migrate`), prints the OpenAPI document
//! (`openapi`) or reconciles the `redis-optimistic` stock mirror with the database (`reconcile`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use shop_domain::ports::SystemClock;
use shop_server::{Application, Settings, commands, telemetry};

#[derive(Debug, Parser)]
#[command(name = "shop-server", version, about = "The shop's REST API")]
struct Cli {
    /// A TOML file of settings; `SHOP_*` environment variables override it.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the API (the default).
    Serve,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Print the OpenAPI document (what `openapi/openapi.json` holds) and exit.
    Openapi,
    /// Compare the redis-optimistic stock mirror with the database (stock minus reservations in flight),
    /// repair what drifted, print what changed and exit.
    Reconcile,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Serve);
    if let Command::Openapi = command {
        print!("{}", shop_http::openapi_json());
        return ExitCode::SUCCESS;
    }
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("shop-server: {e}");
            return ExitCode::from(2);
        }
    };
    telemetry::init(settings.log_format);
    tracing::debug!(?settings, "settings");
    let result = match command {
        Command::Migrate => commands::migrate(&settings).await.map(|()| tracing::info!("migrations applied")),
        Command::Reconcile => commands::reconcile(&settings).await.map(|report| println!("{report}")),
        Command::Serve | Command::Openapi => match Application::build(settings, Arc::new(SystemClock)).await {
            Ok(app) => app.run_until_stopped().await.map_err(shop_server::StartupError::Serve),
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "shop-server failed");
            eprintln!("shop-server: {e}");
            ExitCode::FAILURE
        }
    }
}
