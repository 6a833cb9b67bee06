//! Runtime plumbing shared by every Tessera process.
//!
//! # Layout
//! - [`config`]: the one configuration format (TOML file plus `TESSERA_*` environment
//!   overrides) read by every role.
//! - [`telemetry`]: tracing to stderr, installed before anything else so that a failed
//!   start always explains itself, plus the Prometheus recorder.
//! - [`admin`]: the admin HTTP listener every process serves: `/health/live`,
//!   `/health/ready` and `/metrics`.
//! - [`http`]: the accept loop of every HTTP listener, with header timeouts and a
//!   drain on shutdown.
//! - [`shutdown`]: SIGTERM/SIGINT handling and a cancellation token that tasks watch.
//! - [`start`]: the common start-up sequence a binary's `main` calls.
//! - [`bulk`]: low-priority threads for CPU-heavy bulk work.
//! - [`traces`]: OpenTelemetry export and trace context across HTTP, gRPC and Redis.

pub mod admin;
pub mod bulk;
pub mod config;
pub mod http;
pub mod shutdown;
pub mod start;
pub mod telemetry;
pub mod traces;

pub use config::Config;
pub use shutdown::Shutdown;

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
