//! What this sync-worker has seen, and who waits for what.
//!
//! The replication reader hands over each partition's events contiguously;
//! the view records each room's newest position, then advances the
//! partition's position, then wakes the long-polls waiting on those rooms (or
//! on the users whose membership changed). A long-poll registers before it
//! takes its snapshot of the positions, so no wake-up can fall between.
//!
//! The view also counts each room's events per second: a room past
//! `sync_worker.busy_room_events_per_second` is busy, and a wake-up from a
//! busy room alone is not urgent (see `api.rs`: such news is answered at most
//! once per `sync_worker.busy_room_response_interval_ms` for a device).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use tessera_replication::{EventEntry, ReplicationSink};
use tokio::sync::Notify;

/// The span over which a room's events are counted.
const RATE_WINDOW: Duration = Duration::from_secs(1);

pub struct View {
    positions: RwLock<Vec<i64>>,
    /// Positions at start: for a partition, heads are known in memory only
    /// for events after this.
    started: Vec<i64>,
    room_heads: RwLock<HashMap<String, RoomHead>>,
    waiters: Mutex<HashMap<String, Vec<Weak<Waiter>>>>,
    /// Events a second from which a room counts as busy (0: none is).
    busy_events_per_second: u32,
    /// When some room was last busy, in ms after `created` (0: never):
    /// while none has been for two windows, no long-poll scans its rooms.
    last_busy_ms: AtomicU64,
    created: Instant,
}

/// A room's newest position and how many events it had lately.
struct RoomHead {
    pos: i64,
    window_start: Instant,
    /// Events since `window_start`.
    events: u32,
    /// Events in the window before, if it ended less than a window ago.
    previous_events: u32,
}

impl RoomHead {
    fn new(now: Instant) -> Self {
        Self {
            pos: 0,
            window_start: now,
            events: 0,
            previous_events: 0,
        }
    }

    fn count(&mut self, pos: i64, now: Instant) {
        self.pos = pos;
        let elapsed = now.saturating_duration_since(self.window_start);
        if elapsed >= RATE_WINDOW {
            self.previous_events = if elapsed < 2 * RATE_WINDOW {
                self.events
            } else {
                0
            };
            self.window_start = now;
            self.events = 0;
        }
        self.events = self.events.saturating_add(1);
    }

    fn busy(&self, threshold: u32, now: Instant) -> bool {
        if threshold == 0 {
            return false;
        }
        let elapsed = now.saturating_duration_since(self.window_start);
        let recent = if elapsed < RATE_WINDOW {
            self.events.max(self.previous_events)
        } else if elapsed < 2 * RATE_WINDOW {
            self.events
        } else {
            0
        };
        recent >= threshold
    }
}

/// A long-poll's registration: notified by any of its keys; urgent once a
/// key other than a busy room's woke it.
#[derive(Default)]
pub struct Waiter {
    notify: Notify,
    urgent: AtomicBool,
}

impl Waiter {
    pub async fn notified(&self) {
        self.notify.notified().await
    }

    pub fn is_urgent(&self) -> bool {
        self.urgent.load(Ordering::Acquire)
    }

    fn wake(&self, urgent: bool) {
        if urgent {
            self.urgent.store(true, Ordering::Release);
        }
        self.notify.notify_one();
    }
}

/// The key a user's own wake-ups use (room keys are room IDs, which start with `!`).
pub fn user_key(user_id: &str) -> String {
    format!("user:{user_id}")
}

impl View {
    pub fn new(heads: Vec<i64>, busy_events_per_second: u32) -> Arc<Self> {
        Arc::new(Self {
            positions: RwLock::new(heads.clone()),
            started: heads,
            room_heads: RwLock::new(HashMap::new()),
            waiters: Mutex::new(HashMap::new()),
            busy_events_per_second,
            last_busy_ms: AtomicU64::new(0),
            created: Instant::now(),
        })
    }

    pub fn positions(&self) -> Vec<i64> {
        self.positions.read().expect("positions lock").clone()
    }

    /// The room's newest position if this worker knows it for every position
    /// after `since`; `None` means "ask Postgres".
    pub fn room_head_after(&self, room_id: &str, partition: u32, since: i64) -> Option<i64> {
        if !self.heads_known_after(partition as usize, since) {
            return None;
        }
        Some(
            self.room_heads
                .read()
                .expect("heads lock")
                .get(room_id)
                .map_or(0, |head| head.pos),
        )
    }

    /// Whether every room head of `partition` after `since` is in memory:
    /// this worker has applied every event since it started.
    fn heads_known_after(&self, partition: usize, since: i64) -> bool {
        since >= self.started[partition]
    }

    fn ms_since_created(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.created).as_millis() as u64
    }

    /// Whether the rooms among `keys` with events after `since` are all
    /// busy ones (and there is at least one). False when a room's head is
    /// not known in memory: then there may be other news.
    pub fn only_busy_rooms_moved(&self, keys: &[String], since: &[i64], partitions: u32) -> bool {
        let now = Instant::now();
        let last_busy = self.last_busy_ms.load(Ordering::Relaxed);
        if last_busy == 0
            || self.ms_since_created(now) > last_busy + 2 * RATE_WINDOW.as_millis() as u64
        {
            return false;
        }
        let heads = self.room_heads.read().expect("heads lock");
        let mut moved = false;
        for room_id in keys.iter().filter(|k| k.starts_with('!')) {
            let p = tessera_cluster::partition_of(room_id, partitions) as usize;
            let Some(&after) = since.get(p) else {
                return false;
            };
            if !self.heads_known_after(p, after) {
                return false;
            }
            if let Some(head) = heads.get(room_id.as_str())
                && head.pos > after
            {
                if !head.busy(self.busy_events_per_second, now) {
                    return false;
                }
                moved = true;
            }
        }
        moved
    }

    /// Wait on these keys; the returned handle is notified by any of them.
    pub fn register(&self, keys: &[String]) -> Arc<Waiter> {
        let waiter = Arc::new(Waiter::default());
        let mut waiters = self.waiters.lock().expect("waiters lock");
        for key in keys {
            let list = waiters.entry(key.clone()).or_default();
            list.retain(|w| w.strong_count() > 0);
            list.push(Arc::downgrade(&waiter));
        }
        metrics::gauge!("tessera_sync_waiter_keys").set(waiters.len() as f64);
        waiter
    }

    fn wake(&self, key: &str, urgent: bool) {
        let mut waiters = self.waiters.lock().expect("waiters lock");
        if let Some(list) = waiters.remove(key) {
            for waiter in list.iter().filter_map(Weak::upgrade) {
                waiter.wake(urgent);
            }
        }
    }
}

impl ReplicationSink for View {
    fn apply(&self, partition: u32, entries: &[EventEntry]) {
        let Some(last) = entries.last() else { return };
        let now = Instant::now();
        // The rooms of these entries that are busy, decided once per room.
        let mut busy: HashMap<&str, bool> = HashMap::new();
        {
            let mut heads = self.room_heads.write().expect("heads lock");
            for entry in entries {
                match heads.get_mut(entry.room_id.as_str()) {
                    Some(head) => head.count(entry.pos, now),
                    None => {
                        let mut head = RoomHead::new(now);
                        head.count(entry.pos, now);
                        heads.insert(entry.room_id.clone(), head);
                    }
                }
            }
            for entry in entries {
                busy.entry(entry.room_id.as_str()).or_insert_with(|| {
                    heads
                        .get(entry.room_id.as_str())
                        .is_some_and(|h| h.busy(self.busy_events_per_second, now))
                });
            }
        }
        if busy.values().any(|b| *b) {
            self.last_busy_ms
                .store(self.ms_since_created(now).max(1), Ordering::Relaxed);
        }
        self.positions.write().expect("positions lock")[partition as usize] = last.pos;
        metrics::gauge!("tessera_sync_stream_position", "partition" => partition.to_string())
            .set(last.pos as f64);
        for entry in entries {
            if entry.rejected {
                continue;
            }
            let room_busy = busy.get(entry.room_id.as_str()).copied().unwrap_or(false);
            self.wake(&entry.room_id, !room_busy);
            if entry.kind == "m.room.member"
                && let Some(target) = &entry.state_key
            {
                self.wake(&user_key(target), true);
            }
        }
    }

    fn user_changed(&self, user_id: &str) {
        self.wake(&user_key(user_id), true);
    }
}

#[cfg(test)]
mod tests;
