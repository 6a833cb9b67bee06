//! `tessera-client-api`: the client-server API except `/sync`.
//!
//! Stateless: any number of replicas serve any request. Reads come straight
//! from Postgres; anything that creates an event goes to the owner of the
//! room's partition over gRPC and is answered once committed.
//!
//! # Layout (the same shape in every service crate)
//! - `main.rs`: wiring and start-up.
//! - [`state`]: what every handler can reach.
//! - [`api`]: HTTP routes and handlers, one file per area of the spec.
//! - [`rooms`]: sending work to room-workers.

mod api;
mod rooms;
mod state;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use tessera_cluster::router::RoomRouter;
use tessera_replication::{Publisher, StreamKeys};
use tessera_runtime::start::Started;
use tessera_storage::{OpenOptions, Store};

fn main() -> ExitCode {
    tessera_runtime::start::run("client-api", run)
}

async fn run(started: Started) -> anyhow::Result<()> {
    let config = started.config.clone();
    let store = Store::open(OpenOptions {
        url: &config.database.url,
        pool_size: config.database.pool_size,
        min_connections: config.database.min_connections,
        connect_timeout: Duration::from_secs(config.database.connect_timeout_secs),
        migrate: config.database.migrate_on_start,
        server_name: &config.server_name,
        partitions: config.cluster.partitions,
    })
    .await?;
    let publisher = Publisher::connect(
        &config.redis.url,
        StreamKeys::new(&config.redis.key_prefix),
        config.redis.stream_max_len,
        Duration::from_secs(config.database.connect_timeout_secs),
    )
    .await
    .map_err(anyhow::Error::msg)?;

    let router = RoomRouter::new(store.clone(), config.cluster.partitions);
    let listen = config.client_api.listen;
    let app = state::AppState::new(store, router, publisher, config);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot bind the client API listener on {listen}"))?;
    tracing::info!(listen = %listener.local_addr()?, "client API listening");
    started.health.set_ready(true);
    let shutdown = started.shutdown.clone();
    tessera_runtime::http::serve(
        listener,
        api::router(app, started.admin_routes_for_main_listener(true)),
        async move { shutdown.cancelled().await },
    )
    .await;
    Ok(())
}
