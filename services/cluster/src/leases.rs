//! The lease loop a room-worker runs.
//!
//! Every `interval`: heartbeat; renew held leases (a lease that fails to renew
//! is dropped at once, since any write under it would be fenced anyway);
//! compute the desired owner of every partition over the live workers; claim
//! free partitions this worker should own; hand over partitions another live
//! worker should own (drain in-flight work, then release).
//!
//! On shutdown the worker marks itself draining (the others stop counting it
//! and take its partitions as it releases them), hands everything over and
//! deregisters. A worker killed outright simply stops renewing; its leases
//! expire after the TTL and the others claim them.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tessera_storage::Store;
use tokio::sync::mpsc;

use crate::assignment::desired_owner;
use crate::ownership::Ownership;

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub worker_id: String,
    /// Where callers reach this worker's gRPC server.
    pub advertise_addr: String,
    pub ttl: Duration,
    pub interval: Duration,
}

/// Ownership changes, for the worker to load or drop per-partition state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseEvent {
    Acquired {
        partition: u32,
        epoch: i64,
    },
    /// The lease was taken away (expired or fenced) without a handoff.
    Lost {
        partition: u32,
    },
    /// Handed over cleanly after draining.
    Released {
        partition: u32,
    },
}

pub struct LeaseManager {
    store: Store,
    config: LeaseConfig,
    ownership: Arc<Ownership>,
    events: mpsc::UnboundedSender<LeaseEvent>,
}

impl LeaseManager {
    pub fn new(
        store: Store,
        config: LeaseConfig,
        ownership: Arc<Ownership>,
    ) -> (Self, mpsc::UnboundedReceiver<LeaseEvent>) {
        let (events, rx) = mpsc::unbounded_channel();
        (
            Self {
                store,
                config,
                ownership,
                events,
            },
            rx,
        )
    }

    /// Run until `shutdown` completes, then hand every partition over.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut ticker = tokio::time::interval(self.config.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = ticker.tick() => {
                    if let Err(error) = self.tick().await {
                        tracing::warn!(%error, "lease round failed; retrying next interval");
                    }
                }
            }
        }
        self.hand_over_all().await;
    }

    /// One round of heartbeat, renewal and rebalancing.
    pub async fn tick(&self) -> Result<(), tessera_storage::StoreError> {
        let me = self.config.worker_id.as_str();
        self.store
            .heartbeat_worker(me, &self.config.advertise_addr, false)
            .await?;
        self.renew().await?;

        let workers: Vec<String> = self
            .store
            .active_workers(self.config.ttl)
            .await?
            .into_iter()
            .map(|w| w.worker_id)
            .collect();
        let held: HashSet<u32> = self.ownership.held().into_iter().map(|(p, _)| p).collect();
        let mut to_release = Vec::new();
        for lease in self.store.leases().await? {
            let desired = desired_owner(lease.partition, &workers);
            let mine = held.contains(&lease.partition);
            match (mine, desired) {
                (false, Some(d)) if d == me && lease.owner.as_deref().is_none_or(|o| o == me) => {
                    if let Some(epoch) = self
                        .store
                        .claim_partition(lease.partition, me, self.config.ttl)
                        .await?
                    {
                        self.ownership.insert(lease.partition, epoch);
                        metrics::counter!("tessera_partition_acquisitions_total").increment(1);
                        tracing::info!(partition = lease.partition, epoch, "acquired partition");
                        let _ = self.events.send(LeaseEvent::Acquired {
                            partition: lease.partition,
                            epoch,
                        });
                    }
                }
                (true, Some(d)) if d != me => to_release.push(lease.partition),
                _ => {}
            }
        }
        if !to_release.is_empty() {
            tracing::info!(
                count = to_release.len(),
                "handing partitions over to their new owners"
            );
            futures::future::join_all(to_release.into_iter().map(|p| self.hand_over(p))).await;
        }
        metrics::gauge!("tessera_partitions_owned").set(self.ownership.count() as f64);
        Ok(())
    }

    async fn renew(&self) -> Result<(), tessera_storage::StoreError> {
        let held = self.ownership.held();
        if held.is_empty() {
            return Ok(());
        }
        let renewed: HashSet<u32> = self
            .store
            .renew_leases(&self.config.worker_id, &held, self.config.ttl)
            .await?
            .into_iter()
            .collect();
        for (partition, epoch) in held {
            if !renewed.contains(&partition) {
                tracing::warn!(partition, epoch, "lease lost without handoff");
                metrics::counter!("tessera_partition_leases_lost_total").increment(1);
                self.ownership.remove(partition);
                let _ = self.events.send(LeaseEvent::Lost { partition });
            }
        }
        Ok(())
    }

    /// Drain one partition and release its lease.
    async fn hand_over(&self, partition: u32) {
        let Some(epoch) = self.ownership.epoch(partition) else {
            return;
        };
        self.ownership.drain(partition).await;
        match self
            .store
            .release_partition(partition, &self.config.worker_id, epoch)
            .await
        {
            Ok(released) => {
                if !released {
                    tracing::warn!(partition, "lease was already gone at handoff");
                }
                metrics::counter!("tessera_partition_handoffs_total").increment(1);
                tracing::info!(partition, epoch, "handed partition over");
            }
            Err(error) => {
                tracing::warn!(partition, %error, "release failed; the lease will expire instead")
            }
        }
        self.ownership.remove(partition);
        let _ = self.events.send(LeaseEvent::Released { partition });
    }

    /// Shutdown: stop being counted, drain and release everything, deregister.
    pub async fn hand_over_all(&self) {
        let me = self.config.worker_id.as_str();
        if let Err(error) = self
            .store
            .heartbeat_worker(me, &self.config.advertise_addr, true)
            .await
        {
            tracing::warn!(%error, "cannot mark this worker as draining");
        }
        let partitions: Vec<u32> = self.ownership.held().into_iter().map(|(p, _)| p).collect();
        tracing::info!(
            count = partitions.len(),
            "draining: handing over every partition"
        );
        futures::future::join_all(partitions.into_iter().map(|p| self.hand_over(p))).await;
        if let Err(error) = self.store.remove_worker(me).await {
            tracing::warn!(%error, "cannot deregister this worker");
        }
        metrics::gauge!("tessera_partitions_owned").set(0.0);
    }
}

#[cfg(test)]
mod tests;
