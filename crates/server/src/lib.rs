//! Configuration, wiring and start-up of the shop service: the only crate that knows every adapter.
//!
//! [`Application::build`] turns [`Settings`] (and a clock) into a bound, ready-to-run server (port 0 in tests)
//! and is shared by the binary and the API tests.
//!
//! - [`config`]: typed settings (defaults < TOML file < `SHOP_*` environment), validated at start-up.
//! - [`startup`]: [`Application`]: connect, migrate, seed, wire, bind; and why start-up can fail.
//! - `wiring`: the one factory from settings to adapters and use cases.
//! - `catalogue`: the catalogue cache told of commits, here and (through Redis) in the other instances.
//! - [`background`]: the sweeper and the stock-mirror reconciliation every instance runs.
//! - [`commands`]: `migrate` and `reconcile`.
//! - [`events`]: the in-process event broadcast and its logging subscriber.
//! - [`telemetry`]: the tracing subscriber.

pub mod background;
mod catalogue;
pub mod commands;
pub mod config;
pub mod events;
pub mod startup;
pub mod telemetry;
mod wiring;

pub use config::{ConfigError, Settings, StockStrategy as StockStrategyName};
pub use startup::{Application, StartupError, connect_and_migrate};
