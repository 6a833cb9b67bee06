//! What this sync-worker has seen, and who waits for what.
//!
//! The replication reader hands over each partition's events contiguously;
//! the view records each room's newest position, then advances the
//! partition's position, then wakes the long-polls waiting on those rooms (or
//! on the users whose membership changed). A long-poll registers before it
//! takes its snapshot of the positions, so no wake-up can fall between.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock, Weak};

use tessera_replication::{EventEntry, ReplicationSink};
use tokio::sync::Notify;

pub struct View {
    positions: RwLock<Vec<i64>>,
    /// Positions at start: for a partition, heads are known in memory only
    /// for events after this.
    started: Vec<i64>,
    room_heads: RwLock<HashMap<String, i64>>,
    waiters: Mutex<HashMap<String, Vec<Weak<Notify>>>>,
}

/// The key a user's own wake-ups use (room keys are room IDs, which start with `!`).
pub fn user_key(user_id: &str) -> String {
    format!("user:{user_id}")
}

impl View {
    pub fn new(heads: Vec<i64>) -> Arc<Self> {
        Arc::new(Self {
            positions: RwLock::new(heads.clone()),
            started: heads,
            room_heads: RwLock::new(HashMap::new()),
            waiters: Mutex::new(HashMap::new()),
        })
    }

    pub fn positions(&self) -> Vec<i64> {
        self.positions.read().expect("positions lock").clone()
    }

    /// The room's newest position if this worker knows it for every position
    /// after `since`; `None` means "ask Postgres".
    pub fn room_head_after(&self, room_id: &str, partition: u32, since: i64) -> Option<i64> {
        if since < self.started[partition as usize] {
            return None;
        }
        Some(
            self.room_heads
                .read()
                .expect("heads lock")
                .get(room_id)
                .copied()
                .unwrap_or(0),
        )
    }

    /// Wait on these keys; the returned handle is notified by any of them.
    pub fn register(&self, keys: &[String]) -> Arc<Notify> {
        let notify = Arc::new(Notify::new());
        let mut waiters = self.waiters.lock().expect("waiters lock");
        for key in keys {
            let list = waiters.entry(key.clone()).or_default();
            list.retain(|w| w.strong_count() > 0);
            list.push(Arc::downgrade(&notify));
        }
        metrics::gauge!("tessera_sync_waiter_keys").set(waiters.len() as f64);
        notify
    }

    fn wake(&self, key: &str) {
        let mut waiters = self.waiters.lock().expect("waiters lock");
        if let Some(list) = waiters.remove(key) {
            for waiter in list.iter().filter_map(Weak::upgrade) {
                waiter.notify_one();
            }
        }
    }
}

impl ReplicationSink for View {
    fn apply(&self, partition: u32, entries: &[EventEntry]) {
        let Some(last) = entries.last() else { return };
        {
            let mut heads = self.room_heads.write().expect("heads lock");
            for entry in entries {
                heads.insert(entry.room_id.clone(), entry.pos);
            }
        }
        self.positions.write().expect("positions lock")[partition as usize] = last.pos;
        metrics::gauge!("tessera_sync_stream_position", "partition" => partition.to_string())
            .set(last.pos as f64);
        for entry in entries {
            if entry.rejected {
                continue;
            }
            self.wake(&entry.room_id);
            if entry.kind == "m.room.member"
                && let Some(target) = &entry.state_key
            {
                self.wake(&user_key(target));
            }
        }
    }

    fn user_changed(&self, user_id: &str) {
        self.wake(&user_key(user_id));
    }
}
