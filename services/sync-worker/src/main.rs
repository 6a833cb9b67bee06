//! `tessera-sync-worker`: serves `/sync`.
//!
//! Each sync-worker follows every partition's stream (so any worker can serve
//! any user) and keeps only positions, per-room heads and the long-polls
//! waiting on them; what a response contains is read from Postgres, bounded by
//! the positions, so it never shows an event twice or skips one.
//!
//! # Layout (the same shape in every service crate)
//! - `main.rs`: wiring and start-up.
//! - [`view`]: what this worker has seen (positions, room heads) and who is
//!   waiting for what; fed by the replication reader.
//! - [`tokens`]: since tokens in and out, through the checkpoints.
//! - [`compute`]: building one sync response.
//! - [`api`]: the HTTP handler and the long-poll loop.

mod api;
mod compute;
mod tokens;
mod view;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tessera_replication::{StreamKeys, StreamReader};
use tessera_runtime::start::Started;
use tessera_storage::{OpenOptions, Store};

fn main() -> ExitCode {
    tessera_runtime::start::run("sync-worker", run)
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
    let redis = redis::Client::open(config.redis.url.as_str()).context("invalid redis.url")?;

    // Start from the committed heads: history before them is read from
    // Postgres by each sync; the stream brings everything after.
    let heads = store.partition_heads().await?;
    let view = view::View::new(
        heads.clone(),
        config.sync_worker.busy_room_events_per_second,
    );
    let reader = StreamReader::new(
        store.clone(),
        redis,
        StreamKeys::new(&config.redis.key_prefix),
        heads,
    );
    {
        let view = Arc::clone(&view);
        let shutdown = started.shutdown.clone();
        tokio::spawn(async move {
            reader
                .run(view, async move { shutdown.cancelled().await })
                .await
        });
    }
    let tokens = Arc::new(tokens::Tokens::new(
        store.clone(),
        config.cluster.partitions as usize,
    ));
    {
        let (store, days) = (store.clone(), config.sync_worker.token_lifetime_days);
        let (tokens, view, every) = (
            Arc::clone(&tokens),
            Arc::clone(&view),
            config.sync_worker.checkpoint_interval_secs,
        );
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_secs(every.max(1)));
            loop {
                ticker.tick().await;
                if let Err(error) = tokens.refresh_checkpoint(&view.positions()).await {
                    tracing::warn!(%error, "cannot write a sync checkpoint");
                }
                match store.expire_checkpoints(days).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(expired = n, "expired old sync checkpoints"),
                    Err(error) => tracing::warn!(%error, "cannot expire old sync checkpoints"),
                }
            }
        });
    }

    let state = api::SyncApi::new(store, view, tokens, config.clone());
    let listener = tokio::net::TcpListener::bind(config.sync_worker.listen)
        .await
        .with_context(|| {
            format!(
                "cannot bind the sync listener on {}",
                config.sync_worker.listen
            )
        })?;
    tracing::info!(listen = %listener.local_addr()?, "sync listening");
    started.health.set_ready(true);
    let shutdown = started.shutdown.clone();
    tessera_runtime::http::serve(
        listener,
        api::router(state, started.admin_routes_for_main_listener(true)),
        async move { shutdown.cancelled().await },
    )
    .await;
    Ok(())
}
