//! The start-up sequence every binary shares: parse `--config`, load the
//! configuration, install logging and metrics, start the admin listener, run the
//! role, and turn any error into a logged message and a non-zero exit code.

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::admin::{self, Health};
use crate::config::{Config, LogConfig};
use crate::shutdown::Shutdown;
use crate::telemetry;

#[derive(Parser, Debug)]
struct CommonArgs {
    /// Path of the TOML configuration file shared by every role.
    #[arg(long, env = "TESSERA_CONFIG")]
    config: Option<PathBuf>,
    /// Load and check the configuration, then exit (0 when it is valid).
    #[arg(long)]
    check_config: bool,
    /// Apply the database migrations (or refuse an incompatible database),
    /// then exit; what the Helm chart's pre-upgrade Job runs. Only
    /// `tessera-room-worker` takes it.
    #[arg(long)]
    migrate_only: bool,
}

/// What a role's main function receives.
pub struct Started {
    pub role: &'static str,
    /// `--migrate-only`: migrate the database and exit, nothing else.
    pub migrate_only: bool,
    pub config: Config,
    pub shutdown: Shutdown,
    pub health: Arc<Health>,
    pub metrics: PrometheusHandle,
}

impl Started {
    /// The admin routes for a role's main listener, only when the process has
    /// no admin listener of its own (`admin.listen` unset). `with_metrics`
    /// false leaves `/metrics` off a listener that faces other servers.
    pub fn admin_routes_for_main_listener(&self, with_metrics: bool) -> Option<axum::Router> {
        if self.config.admin.listen.is_some() {
            return None;
        }
        Some(admin::router(
            Arc::clone(&self.health),
            with_metrics.then(|| self.metrics.clone()),
        ))
    }
}

/// Run a role to completion. Returns the process exit code.
pub fn run<F, Fut>(role: &'static str, main: F) -> ExitCode
where
    F: FnOnce(Started) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let args = CommonArgs::parse();
    let config = match Config::load(args.config.as_deref(), std::env::vars()) {
        Ok(config) => config,
        Err(error) => {
            telemetry::init_tracing(&LogConfig::default());
            tracing::error!(role, "cannot start: {error}");
            return ExitCode::FAILURE;
        }
    };
    if args.check_config {
        telemetry::init_tracing(&config.log);
        println!("{role}: the configuration is valid");
        return ExitCode::SUCCESS;
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(error) => {
            telemetry::init_tracing(&config.log);
            tracing::error!(role, "cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    // The OTLP exporter's connection lives on the runtime.
    let exporter = {
        let _entered = runtime.enter();
        telemetry::init_tracing_with_traces(&config.log, &config.telemetry, role)
    };
    let exporter = match exporter {
        Ok(exporter) => exporter,
        Err(error) => {
            telemetry::init_tracing(&config.log);
            tracing::error!(role, "cannot start the trace exporter: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    if args.migrate_only && role != "room-worker" {
        tracing::error!(role, "--migrate-only is for tessera-room-worker");
        return ExitCode::FAILURE;
    }

    let result = runtime.block_on(async move {
        let metrics = telemetry::install_metrics()?;
        let shutdown = Shutdown::new();
        shutdown.listen_for_signals();
        let health = Arc::new(Health::default());
        if let Some(addr) = config.admin.listen.filter(|_| !args.migrate_only) {
            let (health, metrics, shutdown) = (health.clone(), metrics.clone(), shutdown.clone());
            tokio::spawn(async move {
                if let Err(error) = admin::serve(addr, health, metrics, shutdown.clone()).await {
                    tracing::error!("{error:#}");
                    shutdown.trigger();
                }
            });
        }
        tracing::info!(role, version = env!("CARGO_PKG_VERSION"), "starting");
        main(Started {
            role,
            migrate_only: args.migrate_only,
            config,
            shutdown,
            health,
            metrics,
        })
        .await
    });
    if let Some(exporter) = exporter {
        runtime.block_on(crate::traces::shutdown(exporter));
    }
    match result {
        Ok(()) => {
            tracing::info!(role, "stopped");
            ExitCode::SUCCESS
        }
        Err(error) => {
            tracing::error!(role, "fatal: {error:#}");
            ExitCode::FAILURE
        }
    }
}
