//! `tessera-room-worker`: owns the rooms of the partitions it holds leases for.
//!
//! # Layout (the same shape in every service crate)
//! - `main.rs`: wiring and start-up.
//! - [`api`]: the gRPC handlers: ownership check, then hand the work to the engine.
//! - [`engine`]: per-room queues and the fair scheduler that runs them.
//! - [`process`]: what a turn does for one room: build, authorise, persist, publish.
//! - [`inbound`]: events from other servers: staged PDUs and remote joins.
//! - [`load`]: loading a room's in-memory state from storage.

mod api;
mod engine;
mod inbound;
mod known_events;
mod out_of_band;
mod process;
mod state_cache;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tessera_cluster::Ownership;
use tessera_cluster::leases::{LeaseConfig, LeaseEvent, LeaseManager};
use tessera_events::ruma::OwnedServerName;
use tessera_federation::KeyRing;
use tessera_proto::room_worker::room_worker_server::RoomWorkerServer;
use tessera_replication::{Publisher, StreamKeys};
use tessera_runtime::start::Started;
use tessera_storage::{OpenOptions, Store};

fn main() -> ExitCode {
    tessera_runtime::start::run("room-worker", run)
}

async fn run(started: Started) -> anyhow::Result<()> {
    let config = &started.config;
    let store = Store::open(OpenOptions {
        url: &config.database.url,
        pool_size: config.database.pool_size,
        min_connections: config.database.min_connections,
        connect_timeout: Duration::from_secs(config.database.connect_timeout_secs),
        migrate: config.database.migrate_on_start || started.migrate_only,
        server_name: &config.server_name,
        partitions: config.cluster.partitions,
    })
    .await?;
    if started.migrate_only {
        tracing::info!("the database schema is migrated and compatible with this release");
        return Ok(());
    }
    let key = Arc::new(
        tessera_federation::keys::cluster_signing_key(
            &store,
            config.federation.signing_key_path.as_deref(),
        )
        .await?,
    );

    let publisher = Publisher::connect(
        &config.redis.url,
        StreamKeys::new(&config.redis.key_prefix),
        config.redis.stream_max_len,
        Duration::from_secs(config.database.connect_timeout_secs),
    )
    .await
    .map_err(anyhow::Error::msg)?;

    let listener = tokio::net::TcpListener::bind(config.room_worker.listen)
        .await
        .with_context(|| {
            format!(
                "cannot bind the gRPC listener on {}",
                config.room_worker.listen
            )
        })?;
    let local = listener.local_addr()?;
    let advertise = config
        .room_worker
        .advertise
        .clone()
        .unwrap_or_else(|| local.to_string());
    let worker_id = config
        .room_worker
        .worker_id
        .clone()
        .unwrap_or_else(default_worker_id);
    tracing::info!(%worker_id, listen = %local, %advertise, "room-worker listening");

    // The bulk lane: backlogged rooms' turns on low-priority threads, with
    // database connections of their own made there.
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let bulk_runtime = tessera_runtime::bulk::low_priority_runtime("bulk-turns", cores)
        .context("cannot start the bulk lane")?;
    let bulk_store = {
        let (url, connections) = (
            config.database.url.clone(),
            config.room_worker.bulk_connections,
        );
        let timeout = Duration::from_secs(config.database.connect_timeout_secs);
        bulk_runtime
            .spawn(async move {
                let store = Store::connect_lane(&url, Some("bulk"), connections, timeout).await?;
                store.warm(connections).await;
                Ok::<_, tessera_storage::StoreError>(store)
            })
            .await
            .context("the bulk lane stopped")??
    };
    let ownership = Ownership::new();
    let engine = engine::Engine::start(engine::EngineConfig {
        worker_id: worker_id.clone(),
        ownership: Arc::clone(&ownership),
        store: store.clone(),
        publisher,
        key: Arc::clone(&key),
        server_name: config.server_name.clone(),
        partitions: config.cluster.partitions,
        concurrency: config.room_worker.concurrency,
        batch_size: config.room_worker.batch_size,
        state_cache_events: config.room_worker.state_cache_events,
        bulk: Some(engine::BulkLane {
            runtime: bulk_runtime,
            store: bulk_store,
        }),
    });
    let server_name =
        OwnedServerName::try_from(config.server_name.clone()).context("server_name")?;
    engine.set_inbound(Arc::new(inbound::Inbound {
        keyring: Arc::new(KeyRing::for_server(
            store.clone(),
            server_name,
            Arc::clone(&key),
            config.federation.verify_certificates,
            &config.federation.trusted_key_servers,
        )),
        missing_prev_wait: Duration::from_millis(config.federation.missing_prev_wait_ms),
        staged_batch: config.federation.staged_batch.max(1),
        max_staged_per_room: config.federation.max_staged_per_room,
    }));
    spawn_staging_metrics(store.clone(), Arc::clone(&ownership));

    let (leases, mut lease_events) = LeaseManager::new(
        store.clone(),
        LeaseConfig {
            worker_id: worker_id.clone(),
            advertise_addr: advertise.clone(),
            ttl: Duration::from_millis(config.cluster.lease_ttl_ms),
            interval: Duration::from_millis(config.cluster.heartbeat_interval_ms),
        },
        Arc::clone(&ownership),
    );
    {
        let engine = Arc::clone(&engine);
        tokio::spawn(async move {
            while let Some(event) = lease_events.recv().await {
                match event {
                    LeaseEvent::Lost { partition } | LeaseEvent::Released { partition } => {
                        engine.forget_partition(partition)
                    }
                    LeaseEvent::Acquired { partition, .. } => {
                        // PDUs staged before a previous owner died (or handed
                        // over) are this worker's now.
                        let engine = Arc::clone(&engine);
                        tokio::spawn(async move { engine.resume_staged(partition).await });
                    }
                }
            }
        });
    }

    let service = api::RoomWorkerApi::new(
        Arc::clone(&engine),
        Arc::clone(&ownership),
        store.clone(),
        config.cluster.partitions,
    );
    let server_stop = tessera_runtime::Shutdown::new();
    let server = {
        let stop = server_stop.clone();
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .layer(tessera_runtime::traces::GrpcServerLayer)
                .add_service(RoomWorkerServer::new(service))
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                    stop.cancelled(),
                )
                .await
        })
    };
    started.health.set_ready(true);

    // Leases run until SIGTERM, then hand every partition over after its
    // in-flight work ends; only then does the gRPC server stop.
    let drain_timeout = Duration::from_millis(config.room_worker.drain_timeout_ms);
    let shutdown = started.shutdown.clone();
    let leases_task = tokio::spawn(leases.run(async move { shutdown.cancelled().await }));
    started.shutdown.cancelled().await;
    started.health.set_ready(false);
    if tokio::time::timeout(drain_timeout, leases_task)
        .await
        .is_err()
    {
        tracing::warn!("drain did not finish in time; remaining leases will expire");
    }
    server_stop.trigger();
    server.await?.context("gRPC server")?;
    Ok(())
}

/// Rooms reported by name in the staging metrics (the largest backlogs).
const TOP_STAGED_ROOMS: i64 = 5;

/// Staged PDUs and the age of the oldest, per owned partition and for the
/// rooms with the largest backlogs, every 5 seconds. Partitions and rooms
/// whose backlog is gone read 0.
fn spawn_staging_metrics(store: Store, ownership: Arc<Ownership>) {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(Duration::from_secs(5));
        let mut reported_partitions = std::collections::HashSet::new();
        let mut reported_rooms = std::collections::HashSet::new();
        loop {
            ticker.tick().await;
            let owned: Vec<u32> = ownership.held().into_iter().map(|(p, _)| p).collect();
            let Ok(stats) = store.staging_stats().await else {
                continue;
            };
            let mut now = std::collections::HashMap::new();
            for (partition, count, oldest) in stats {
                if owned.contains(&partition) {
                    now.insert(partition, (count, oldest));
                }
            }
            for partition in reported_partitions
                .union(&now.keys().copied().collect())
                .copied()
                .collect::<Vec<u32>>()
            {
                let (count, oldest) = now.get(&partition).copied().unwrap_or((0, 0.0));
                metrics::gauge!("tessera_federation_staged_pdus", "partition" => partition.to_string()).set(count as f64);
                metrics::gauge!("tessera_federation_staged_oldest_age_seconds", "partition" => partition.to_string()).set(oldest);
            }
            reported_partitions = now.keys().copied().collect();

            let top = if now.is_empty() {
                Vec::new()
            } else {
                store
                    .top_staged_rooms(&now.keys().copied().collect::<Vec<_>>(), TOP_STAGED_ROOMS)
                    .await
                    .unwrap_or_default()
            };
            let current: std::collections::HashSet<String> =
                top.iter().map(|(room, _, _)| room.clone()).collect();
            for room in reported_rooms.difference(&current) {
                metrics::gauge!("tessera_federation_staged_room_pdus", "room" => room.clone())
                    .set(0.0);
                metrics::gauge!("tessera_federation_staged_room_oldest_age_seconds", "room" => room.clone()).set(0.0);
            }
            for (room, count, oldest) in top {
                metrics::gauge!("tessera_federation_staged_room_pdus", "room" => room.clone())
                    .set(count as f64);
                metrics::gauge!("tessera_federation_staged_room_oldest_age_seconds", "room" => room).set(oldest);
            }
            reported_rooms = current;
        }
    });
}

fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "room-worker".to_owned());
    format!("{host}-{}", std::process::id())
}
