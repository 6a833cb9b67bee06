//! What this worker owns right now.
//!
//! Request handlers [`Ownership::enter`] a partition before doing work and hold
//! the returned guard until the work is committed. A handoff first stops new
//! entries, then waits for the guards to drop, and only then releases the lease:
//! that is what "finish in-flight work and hand over" means on SIGTERM.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Accepting,
    Draining,
}

#[derive(Debug)]
struct Owned {
    epoch: i64,
    phase: Phase,
    inflight: usize,
}

/// Why a partition cannot take work here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotOwned {
    #[error("partition {0} is not owned by this worker")]
    Elsewhere(u32),
    #[error("partition {0} is being handed over")]
    Moving(u32),
}

#[derive(Default)]
pub struct Ownership {
    partitions: Mutex<HashMap<u32, Owned>>,
    drained: Notify,
}

impl Ownership {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Start work on a partition; the guard carries the epoch to write with.
    pub fn enter(self: &Arc<Self>, partition: u32) -> Result<PartitionGuard, NotOwned> {
        let mut map = self.partitions.lock().expect("ownership lock");
        match map.get_mut(&partition) {
            Some(owned) if owned.phase == Phase::Accepting => {
                owned.inflight += 1;
                Ok(PartitionGuard {
                    ownership: Arc::clone(self),
                    partition,
                    epoch: owned.epoch,
                })
            }
            Some(_) => Err(NotOwned::Moving(partition)),
            None => Err(NotOwned::Elsewhere(partition)),
        }
    }

    pub fn epoch(&self, partition: u32) -> Option<i64> {
        self.partitions
            .lock()
            .expect("ownership lock")
            .get(&partition)
            .map(|o| o.epoch)
    }

    /// Partitions held, with their epochs.
    pub fn held(&self) -> Vec<(u32, i64)> {
        let mut held: Vec<_> = self
            .partitions
            .lock()
            .expect("ownership lock")
            .iter()
            .map(|(p, o)| (*p, o.epoch))
            .collect();
        held.sort_unstable();
        held
    }

    pub fn count(&self) -> usize {
        self.partitions.lock().expect("ownership lock").len()
    }

    pub(crate) fn insert(&self, partition: u32, epoch: i64) {
        self.partitions.lock().expect("ownership lock").insert(
            partition,
            Owned {
                epoch,
                phase: Phase::Accepting,
                inflight: 0,
            },
        );
    }

    /// Forget a partition at once (its lease is gone; any write will be fenced).
    pub(crate) fn remove(&self, partition: u32) {
        self.partitions
            .lock()
            .expect("ownership lock")
            .remove(&partition);
        self.drained.notify_waiters();
    }

    /// Stop taking new work for a partition and wait until running work ends.
    pub(crate) async fn drain(&self, partition: u32) {
        loop {
            let notified = self.drained.notified();
            {
                let mut map = self.partitions.lock().expect("ownership lock");
                match map.get_mut(&partition) {
                    Some(owned) => {
                        owned.phase = Phase::Draining;
                        if owned.inflight == 0 {
                            return;
                        }
                    }
                    None => return,
                }
            }
            notified.await;
        }
    }

    fn exit(&self, partition: u32) {
        let mut map = self.partitions.lock().expect("ownership lock");
        if let Some(owned) = map.get_mut(&partition) {
            owned.inflight -= 1;
            if owned.inflight == 0 && owned.phase == Phase::Draining {
                self.drained.notify_waiters();
            }
        }
    }
}

/// Proof that work is running on an owned partition, at an epoch.
pub struct PartitionGuard {
    ownership: Arc<Ownership>,
    partition: u32,
    epoch: i64,
}

impl PartitionGuard {
    pub fn partition(&self) -> u32 {
        self.partition
    }
    pub fn epoch(&self) -> i64 {
        self.epoch
    }
}

impl Drop for PartitionGuard {
    fn drop(&mut self) {
        self.ownership.exit(self.partition);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn drain_waits_for_running_work_and_refuses_new_work() {
        let ownership = Ownership::new();
        ownership.insert(3, 7);
        let guard = ownership.enter(3).unwrap();
        assert_eq!(guard.epoch(), 7);
        assert_eq!(ownership.enter(4).err(), Some(NotOwned::Elsewhere(4)));

        let o = Arc::clone(&ownership);
        let drain = tokio::spawn(async move { o.drain(3).await });
        tokio::task::yield_now().await;
        assert_eq!(ownership.enter(3).err(), Some(NotOwned::Moving(3)));
        assert!(!drain.is_finished());
        drop(guard);
        tokio::time::timeout(Duration::from_secs(5), drain)
            .await
            .unwrap()
            .unwrap();
    }
}
