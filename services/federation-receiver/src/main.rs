//! `tessera-federation-receiver`: the server-server API.
//!
//! Stateless: any number of replicas. Every request's `X-Matrix`
//! authentication is checked first. Transactions' PDUs are checked (format,
//! signatures, content hashes, server ACLs), grouped by room and handed to
//! each room's owner, which stages them durably; the transaction is answered
//! once every group is staged, and processing continues per room. Reads are
//! served from Postgres; membership writes go through the room's owner.
//!
//! # Layout (the same shape in every service crate)
//! - `main.rs`: wiring and start-up, plain HTTP or TLS.
//! - [`state`]: what every handler can reach, and the per-origin rate limit.
//! - [`request`]: the authenticated-request extractor.
//! - [`dag`]: walking the event graph in storage (auth chains, backfill, gaps).
//! - [`api`]: the routes: keys, transactions, membership, reads, queries.

mod api;
mod dag;
mod request;
mod state;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tessera_cluster::router::RoomRouter;
use tessera_events::ruma::OwnedServerName;
use tessera_federation::KeyRing;
use tessera_runtime::start::Started;
use tessera_storage::{OpenOptions, Store};

fn main() -> ExitCode {
    tessera_runtime::start::run("federation-receiver", run)
}

async fn run(started: Started) -> anyhow::Result<()> {
    let config = started.config.clone();
    tessera_federation::install_tls_provider();
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
    let key = Arc::new(
        tessera_federation::keys::cluster_signing_key(
            &store,
            config.federation.signing_key_path.as_deref(),
        )
        .await?,
    );
    let server_name =
        OwnedServerName::try_from(config.server_name.clone()).context("server_name")?;
    let keyring = Arc::new(KeyRing::for_server(
        store.clone(),
        server_name.clone(),
        Arc::clone(&key),
        config.federation.verify_certificates,
        &config.federation.trusted_key_servers,
    ));
    let router = RoomRouter::new(store.clone(), config.cluster.partitions);
    tokio::spawn(prune_transaction_records(
        store.clone(),
        Duration::from_secs(config.federation.transaction_retention_hours * 3600),
        started.shutdown.clone(),
    ));
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let bulk = tessera_runtime::bulk::low_priority_runtime("bulk-send", cores)
        .context("cannot start the low-priority runtime")?;
    let app = state::AppState::new(
        store,
        keyring,
        router,
        key,
        server_name,
        config.clone(),
        bulk,
    );

    let listener = tokio::net::TcpListener::bind(config.federation_receiver.listen)
        .await
        .with_context(|| {
            format!(
                "cannot bind the federation listener on {}",
                config.federation_receiver.listen
            )
        })?;
    let routes = api::router(app, started.admin_routes_for_main_listener(false));
    started.health.set_ready(true);
    let shutdown = started.shutdown.clone();
    match (
        &config.federation_receiver.tls_certificate,
        &config.federation_receiver.tls_private_key,
    ) {
        (Some(cert), Some(key)) => {
            let acceptor =
                tessera_federation::tls::acceptor(cert, key).map_err(anyhow::Error::msg)?;
            tracing::info!(listen = %listener.local_addr()?, "federation API listening (TLS)");
            tessera_federation::tls::serve(listener, acceptor, routes, async move {
                shutdown.cancelled().await
            })
            .await;
        }
        (None, None) => {
            tracing::info!(listen = %listener.local_addr()?, "federation API listening (plain HTTP: terminate TLS in front)");
            tessera_runtime::http::serve(
                listener,
                routes,
                async move { shutdown.cancelled().await },
            )
            .await;
        }
        _ => anyhow::bail!("federation_receiver.tls_certificate and tls_private_key go together"),
    }
    Ok(())
}

/// EDUs whose meaning expires within seconds (who is typing, who is
/// online): kept for an hour at most, so that a stream of them cannot
/// fill the database while nothing consumes them. Device lists and
/// to-device messages are kept (receipts are kept apart, one per reader).
const EPHEMERAL_EDUS: [&str; 2] = ["m.typing", "m.presence"];
const EPHEMERAL_EDU_RETENTION: Duration = Duration::from_secs(3600);

/// Every half hour (and at start), delete the records of inbound
/// transactions older than the retention, and ephemeral EDUs older than an
/// hour. Every replica does it: their deletes take different rows or none.
async fn prune_transaction_records(
    store: Store,
    retention: Duration,
    shutdown: tessera_runtime::shutdown::Shutdown,
) {
    let mut every = tokio::time::interval(Duration::from_secs(30 * 60));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        match store.prune_federation_txns(retention, 10_000).await {
            Ok(0) => {}
            Ok(pruned) => {
                metrics::counter!("tessera_federation_transactions_pruned_total").increment(pruned);
                tracing::info!(pruned, "deleted old inbound transaction records");
            }
            Err(error) => tracing::warn!(%error, "cannot delete old inbound transaction records"),
        }
        match store
            .prune_received_edus(&EPHEMERAL_EDUS, EPHEMERAL_EDU_RETENTION, 10_000)
            .await
        {
            Ok(0) => {}
            Ok(pruned) => {
                metrics::counter!("tessera_federation_edus_pruned_total").increment(pruned);
                tracing::info!(pruned, "deleted old typing and presence EDUs");
            }
            Err(error) => tracing::warn!(%error, "cannot delete old typing and presence EDUs"),
        }
    }
}
