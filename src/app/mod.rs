//! The binary's wiring: configuration to a running server, and the other commands.
//!
//! - [`serve()`] / [`run_server`]: the private PostgreSQL or `DATABASE_URL`, migrations, and
//!   every part started and wired together until shutdown.
//! - [`config`]: the command line and environment. [`commands`]: `token`, `export`, `import`
//!   ([`transfer`] does their work). [`telemetry`]: logging. [`secret`]: the JWT secret.
//!   [`embedded_pg`]: the private PostgreSQL. [`metrics_http`]: the metrics endpoint.
//!
//! May import anything; nothing imports it.
mod commands;
pub mod config;
pub mod embedded_pg;
mod metrics_http;
mod secret;
mod serve;
mod telemetry;
mod transfer;

pub use commands::{api_key, export, import, print_token};
pub use serve::{run_server, serve};

pub type AppError = Box<dyn std::error::Error + Send + Sync>;

/// The database the private PostgreSQL serves jobsvc from.
const EMBEDDED_DB: &str = "jobsvc";
