//! Logging and metrics set-up.
//!
//! Logs go to stderr through a synchronous writer: nothing is buffered in a
//! background thread, so the lines explaining a failed start (bad config,
//! unreachable database) are on stderr before the process exits.

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::prelude::*;

use crate::config::{LogConfig, TelemetryConfig};

/// Install the global tracing subscriber. `RUST_LOG`, when set, wins over the
/// configured filter. Safe to call twice (the second call is a no-op), which lets
/// the start-up path install a default before the config is known.
pub fn init_tracing(log: &LogConfig) {
    let _ = init_tracing_with_traces(log, &TelemetryConfig::default(), "");
}

/// As [`init_tracing`], plus the OpenTelemetry exporter when
/// `telemetry.otlp_endpoint` is set (call inside the tokio runtime then).
/// Returns the exporter, to flush at exit.
pub fn init_tracing_with_traces(
    log: &LogConfig,
    telemetry: &TelemetryConfig,
    role: &str,
) -> anyhow::Result<Option<crate::traces::Exporter>> {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .or_else(|| EnvFilter::try_new(&log.filter).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let (traces, exporter) = match crate::traces::exporter_layer(telemetry, role)? {
        Some((layer, exporter)) => (Some(layer), Some(exporter)),
        None => (None, None),
    };
    let registry = registry.with(traces);
    let result = if log.format == "json" {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .try_init()
    } else {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(false),
            )
            .try_init()
    };
    if result.is_ok() {
        install_panic_hook();
    }
    Ok(exporter)
}

/// Panics are bugs; make sure they reach the log with their location, not only
/// the default hook's stderr line, so log collectors see them.
fn install_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        tracing::error!(panic = %info, "panic");
        default(info);
    }));
}

/// Install the process-wide Prometheus recorder and return the handle that
/// renders `/metrics`.
pub fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets(&[
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            30.0, 60.0,
        ])?
        .install_recorder()?;
    Ok(handle)
}
