//! The rooms' current states a room-worker keeps in memory between turns,
//! bounded by how many state events they hold in all: the rooms used least
//! recently are forgotten first, and their next turn reads them from
//! Postgres again.

use std::collections::HashMap;

use ruma::{OwnedRoomId, RoomId};

/// Rooms' states (`V`) with their sizes in state events.
pub struct StateCache<V> {
    rooms: HashMap<OwnedRoomId, Entry<V>>,
    /// State events held in all.
    events: usize,
    bound: usize,
    /// Counts uses, to order rooms by their last.
    clock: u64,
}

struct Entry<V> {
    value: V,
    events: usize,
    last_used: u64,
}

impl<V: Clone> StateCache<V> {
    /// A cache holding up to `bound` state events (more while a single room
    /// is larger than that: the room in use is never forgotten).
    pub fn new(bound: usize) -> Self {
        Self {
            rooms: HashMap::new(),
            events: 0,
            bound,
            clock: 0,
        }
    }

    /// A copy of the room's state, if kept; counts as a use.
    pub fn get(&mut self, room_id: &RoomId) -> Option<V> {
        self.clock += 1;
        let entry = self.rooms.get_mut(room_id)?;
        entry.last_used = self.clock;
        Some(entry.value.clone())
    }

    /// The room's state, if kept, without counting a use.
    pub fn peek(&self, room_id: &RoomId) -> Option<&V> {
        self.rooms.get(room_id).map(|entry| &entry.value)
    }

    /// Keep a room's state of `events` state events, replacing what was
    /// kept for it. Returns the states forgotten to stay within the bound,
    /// for the caller to drop once it no longer holds a lock (freeing a
    /// large room's state takes a while). The room just kept is never among
    /// them; when the bound is passed, rooms are forgotten down to nine
    /// tenths of it, so a cache kept full does not sort itself on every use.
    pub fn insert(&mut self, room_id: OwnedRoomId, value: V, events: usize) -> Vec<V> {
        self.clock += 1;
        let entry = Entry {
            value,
            events,
            last_used: self.clock,
        };
        self.events += events;
        if let Some(old) = self.rooms.insert(room_id.clone(), entry) {
            self.events -= old.events;
        }
        if self.events <= self.bound {
            return Vec::new();
        }
        let low_water = self.bound - self.bound / 10;
        let mut by_age: Vec<(u64, OwnedRoomId)> = self
            .rooms
            .iter()
            .filter(|(room, _)| **room != room_id)
            .map(|(room, entry)| (entry.last_used, room.clone()))
            .collect();
        by_age.sort_unstable();
        let mut forgotten = Vec::new();
        for (_, room) in by_age {
            if self.events <= low_water {
                break;
            }
            forgotten.extend(self.remove(&room));
        }
        forgotten
    }

    /// Forget a room's state.
    pub fn remove(&mut self, room_id: &RoomId) -> Option<V> {
        let entry = self.rooms.remove(room_id)?;
        self.events -= entry.events;
        Some(entry.value)
    }

    /// Forget every room `keep` says no to; returns their states (to drop
    /// outside any lock).
    pub fn retain(&mut self, mut keep: impl FnMut(&RoomId) -> bool) -> Vec<V> {
        let gone: Vec<OwnedRoomId> = self
            .rooms
            .keys()
            .filter(|room| !keep(room))
            .cloned()
            .collect();
        gone.iter().filter_map(|room| self.remove(room)).collect()
    }

    /// State events held in all.
    pub fn events(&self) -> usize {
        self.events
    }

    /// Rooms held.
    pub fn rooms(&self) -> usize {
        self.rooms.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(n: u32) -> OwnedRoomId {
        RoomId::parse(format!("!r{n}:test.local")).unwrap()
    }

    #[test]
    fn least_recently_used_rooms_go_first_down_to_nine_tenths() {
        let mut cache = StateCache::new(100);
        for n in 0..5 {
            assert!(cache.insert(room(n), n, 20).is_empty());
        }
        assert_eq!(cache.events(), 100);
        // Room 0 is used again, so rooms 1 and 2 are now the oldest.
        assert_eq!(cache.get(&room(0)), Some(0));
        let forgotten = cache.insert(room(5), 5, 20);
        assert_eq!(forgotten, vec![1, 2], "down to 90 events or fewer");
        assert_eq!(cache.events(), 80);
        assert_eq!(cache.rooms(), 4);
        assert!(cache.peek(&room(1)).is_none() && cache.peek(&room(2)).is_none());
        assert_eq!(cache.peek(&room(0)), Some(&0));
    }

    #[test]
    fn a_room_larger_than_the_bound_is_kept_alone() {
        let mut cache = StateCache::new(100);
        cache.insert(room(1), 1, 30);
        cache.insert(room(2), 2, 30);
        assert_eq!(cache.insert(room(3), 3, 500), vec![1, 2]);
        assert_eq!(cache.get(&room(3)), Some(3));
        assert_eq!(cache.events(), 500);
        // It grows again on its next turn: still kept.
        assert!(cache.insert(room(3), 3, 600).is_empty());
        assert_eq!(cache.events(), 600);
    }

    #[test]
    fn replacing_removing_and_retaining_keep_the_count() {
        let mut cache = StateCache::new(1_000);
        cache.insert(room(1), 1, 10);
        cache.insert(room(1), 11, 15);
        cache.insert(room(2), 2, 7);
        assert_eq!(cache.events(), 22);
        assert_eq!(cache.remove(&room(2)), Some(2));
        assert_eq!(cache.remove(&room(2)), None);
        assert_eq!(cache.events(), 15);
        cache.insert(room(3), 3, 5);
        let gone = cache.retain(|r| r.as_str() != "!r1:test.local");
        assert_eq!(gone, vec![11]);
        assert_eq!(cache.events(), 5);
        assert_eq!(cache.get(&room(1)), None);
    }
}
