//! Runtime plumbing shared by every Tessera process.
//!
//! # Layout
//! - [`config`]: the one configuration format (TOML file plus `TESSERA_*` environment
//!   overrides) read by every role.
//! - [`telemetry`]: tracing to stderr, installed before anything else so that a failed
//!   start always explains itself, plus the Prometheus recorder.
//! - [`admin`]: the admin HTTP listener every process serves: `/health/live`,
//!   `/health/ready` and `/metrics`.
//! - [`shutdown`]: SIGTERM/SIGINT handling and a cancellation token that tasks watch.
//! - [`start`]: the common start-up sequence a binary's `main` calls.
//! - [`bulk`]: low-priority threads for CPU-heavy bulk work.
//! - [`traces`]: OpenTelemetry export and trace context across HTTP, gRPC and Redis.

pub mod admin;
pub mod bulk;
pub mod config;
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

/// A listener whose connections send small writes at once (`TCP_NODELAY`):
/// request/response traffic on loopback otherwise waits on delayed ACKs.
pub fn nodelay(
    listener: tokio::net::TcpListener,
) -> impl axum::serve::Listener<Addr = std::net::SocketAddr> {
    use axum::serve::ListenerExt;
    listener.tap_io(|tcp| {
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY");
        }
    })
}
