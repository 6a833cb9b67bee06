//! The admin listener each process serves: liveness, readiness and Prometheus
//! metrics. Kubernetes probes and Prometheus scrape these; they never share a
//! port with client or federation traffic.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::shutdown::Shutdown;

/// Readiness of this process; liveness is implied by the listener answering.
#[derive(Default)]
pub struct Health {
    ready: AtomicBool,
}

impl Health {
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
}

#[derive(Clone)]
struct AdminState {
    health: Arc<Health>,
    metrics: Option<PrometheusHandle>,
}

/// Routes of the admin listener, exposed so a role can also mount them on its
/// main listener when it has no separate admin port (see
/// `Started::admin_routes_for_main_listener`); `/metrics` only with a handle.
pub fn router(health: Arc<Health>, metrics: Option<PrometheusHandle>) -> Router {
    let router = Router::new()
        .route("/health/live", get(|| async { "ok" }))
        .route("/health/ready", get(ready));
    let router = match metrics {
        Some(_) => router.route("/metrics", get(render_metrics)),
        None => router,
    };
    router.with_state(AdminState { health, metrics })
}

async fn ready(State(state): State<AdminState>) -> (StatusCode, &'static str) {
    if state.health.is_ready() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

async fn render_metrics(State(state): State<AdminState>) -> String {
    match &state.metrics {
        Some(metrics) => {
            metrics.run_upkeep();
            metrics.render()
        }
        None => String::new(),
    }
}

/// Bind and serve the admin routes until shutdown.
pub async fn serve(
    addr: SocketAddr,
    health: Arc<Health>,
    metrics: PrometheusHandle,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind admin listener on {addr}: {e}"))?;
    tracing::info!(%addr, "admin listener (health, metrics) started");
    crate::http::serve(listener, router(health, Some(metrics)), async move {
        shutdown.cancelled().await
    })
    .await;
    Ok(())
}
