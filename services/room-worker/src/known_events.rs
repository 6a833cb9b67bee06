//! [`KnownEvents`]: the events a turn over a room's inbound PDUs can look up
//! by ID: the room's current state when the turn began (shared with the
//! room's cached state, not copied, however large the room) and what the turn
//! loaded or processed itself.

use std::collections::HashMap;
use std::sync::Arc;

use ruma::{EventId, OwnedEventId};
use tessera_events::Pdu;
use tessera_events::room_state::StateById;

pub(crate) struct KnownEvents {
    state: StateById,
    added: HashMap<OwnedEventId, Arc<Pdu>>,
}

impl KnownEvents {
    pub(crate) fn new(state: StateById) -> Self {
        Self {
            state,
            added: HashMap::new(),
        }
    }

    /// The event, as the turn last put it in (a loaded copy can carry its
    /// rejection), else from the state.
    pub(crate) fn get(&self, id: &EventId) -> Option<&Arc<Pdu>> {
        self.added.get(id).or_else(|| self.state.get(id))
    }

    pub(crate) fn contains_key(&self, id: &EventId) -> bool {
        self.added.contains_key(id) || self.state.contains_key(id)
    }

    pub(crate) fn insert(&mut self, id: OwnedEventId, pdu: Arc<Pdu>) {
        self.added.insert(id, pdu);
    }

    /// Put the event in unless it is known already.
    pub(crate) fn insert_if_absent(&mut self, pdu: Arc<Pdu>) {
        if !self.contains_key(pdu.event_id()) {
            self.added.insert(pdu.event_id().to_owned(), pdu);
        }
    }
}
