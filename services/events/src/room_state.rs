//! [`RoomState`]: what the owner of a room keeps in memory to create new local
//! events: the current state (with the state events themselves, which the auth
//! rules read), the forward extremities and the depth. The room-worker loads it
//! from storage; tests build it from events.

use std::collections::HashMap;
use std::sync::Arc;

use ruma::events::StateEventType;
use ruma::room_version_rules::RoomVersionRules;
use ruma::{EventId, OwnedEventId, OwnedRoomId, RoomId, RoomVersionId, ServerName};

use crate::auth::{self, AuthError};
use crate::build::{self, BuildError, EventTemplate, Placement};
use crate::keys::SigningKey;
use crate::pdu::Pdu;
use crate::room_version;

pub type StateKey = (StateEventType, String);

/// Why a new event could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("not allowed: {0}")]
    Forbidden(#[from] AuthError),
}

#[derive(Clone)]
pub struct RoomState {
    room_id: OwnedRoomId,
    version: RoomVersionId,
    rules: RoomVersionRules,
    /// Current state: slot → event.
    state: HashMap<StateKey, Arc<Pdu>>,
    extremities: Vec<OwnedEventId>,
    depth: u64,
}

impl RoomState {
    /// Rebuild from stored parts. `state` is the current state's events.
    pub fn from_parts(
        room_id: OwnedRoomId,
        version: RoomVersionId,
        state: impl IntoIterator<Item = Arc<Pdu>>,
        extremities: Vec<OwnedEventId>,
        depth: u64,
    ) -> Option<Self> {
        let rules = room_version::rules(&version).or_else(|| version.rules())?;
        let state = state
            .into_iter()
            .filter_map(|pdu| {
                let key = (
                    StateEventType::from(pdu.kind().to_string()),
                    pdu.state_key()?.to_owned(),
                );
                Some((key, pdu))
            })
            .collect();
        Some(Self {
            room_id,
            version,
            rules,
            state,
            extremities,
            depth,
        })
    }

    /// The state of a brand-new room: just its create event.
    pub fn from_create(create: Arc<Pdu>, version: RoomVersionId) -> Option<Self> {
        let depth = create.depth();
        let extremities = vec![create.event_id().to_owned()];
        Self::from_parts(
            create.room_id().to_owned(),
            version,
            [create],
            extremities,
            depth,
        )
    }

    pub fn room_id(&self) -> &RoomId {
        &self.room_id
    }
    pub fn version(&self) -> &RoomVersionId {
        &self.version
    }
    pub fn rules(&self) -> &RoomVersionRules {
        &self.rules
    }
    pub fn extremities(&self) -> &[OwnedEventId] {
        &self.extremities
    }
    pub fn depth(&self) -> u64 {
        self.depth
    }

    pub fn get(&self, kind: &StateEventType, state_key: &str) -> Option<&Arc<Pdu>> {
        self.state.get(&(kind.clone(), state_key.to_owned()))
    }

    /// The current state as ruma's state map (slot → event ID).
    pub fn state_map(&self) -> crate::resolve::StateMap {
        self.state
            .iter()
            .map(|(k, v)| (k.clone(), v.event_id().to_owned()))
            .collect()
    }

    pub fn state_events(&self) -> impl Iterator<Item = &Arc<Pdu>> {
        self.state.values()
    }

    /// A user's current membership (`join`, `invite`, `leave`, `ban`, `knock`).
    pub fn membership(&self, user_id: &str) -> Option<String> {
        self.get(&StateEventType::RoomMember, user_id)
            .and_then(|pdu| pdu.membership())
    }

    /// A user's power level; `None` means unlimited (a room v12 creator).
    pub fn power_level(&self, user_id: &ruma::UserId) -> Option<i64> {
        let rules = &self.rules.authorization;
        if let Some(create) = self.get(&StateEventType::RoomCreate, "")
            && rules.explicitly_privilege_room_creators
            && ruma::state_res::events::RoomCreateEvent::new(Arc::clone(create))
                .creators(rules)
                .is_ok_and(|creators| creators.contains(user_id))
        {
            return None;
        }
        match self.get(&StateEventType::RoomPowerLevels, "") {
            Some(pl) => ruma::state_res::events::RoomPowerLevelsEvent::new(Arc::clone(pl))
                .user_power_level(user_id, rules)
                .map(i64::from)
                .ok()
                .or(Some(0)),
            // Without power levels the creator has 100, everyone else 0.
            None => {
                let creator = self
                    .get(&StateEventType::RoomCreate, "")
                    .map(|c| c.sender().to_owned());
                Some(if creator.as_deref() == Some(user_id) {
                    100
                } else {
                    0
                })
            }
        }
    }

    /// Whether a redaction by `redactor` hides an event sent by `target_sender`
    /// from clients: senders may redact their own events, others need the
    /// room's `redact` level.
    pub fn redaction_applies(&self, redactor: &ruma::UserId, target_sender: &ruma::UserId) -> bool {
        if redactor == target_sender {
            return true;
        }
        let required = self
            .get(&StateEventType::RoomPowerLevels, "")
            .and_then(|pl| {
                ruma::state_res::events::RoomPowerLevelsEvent::new(Arc::clone(pl))
                    .get_as_int_or_default(
                        ruma::state_res::events::RoomPowerLevelsIntField::Redact,
                        &self.rules.authorization,
                    )
                    .ok()
            })
            .map(i64::from)
            .unwrap_or(50);
        self.power_level(redactor)
            .is_none_or(|level| level >= required)
    }

    /// Build, hash and sign a new event on top of the current state and check it
    /// against the authorization rules. Does not change the state: call
    /// [`RoomState::apply`] once the event is accepted.
    pub fn create_event(
        &self,
        template: &EventTemplate,
        key: &SigningKey,
        server_name: &ServerName,
    ) -> Result<Arc<Pdu>, CreateError> {
        if template.state_key.is_some() {
            crate::content::validate(&template.kind, &template.content)
                .map_err(BuildError::InvalidContent)?;
        }
        let placement = Placement {
            room_id: &self.room_id,
            rules: &self.rules,
            prev_events: &self.extremities,
            prev_depth: self.depth,
        };
        let pdu = build::build_event(
            template,
            &placement,
            |kind, state_key| self.get(kind, state_key).map(|p| p.event_id().to_owned()),
            key,
            server_name,
        )?;
        let by_id: HashMap<&EventId, &Arc<Pdu>> =
            self.state.values().map(|p| (p.event_id(), p)).collect();
        auth::check(
            &pdu,
            &self.rules.authorization,
            |id| by_id.get(id).map(|p| Arc::clone(p)),
            |kind, state_key| self.get(kind, state_key).cloned(),
        )?;
        Ok(Arc::new(pdu))
    }

    /// Make an accepted event the room's new head. Returns the state event it
    /// replaced, if it is a state event.
    pub fn apply(&mut self, pdu: Arc<Pdu>) -> Option<Arc<Pdu>> {
        self.depth = self.depth.max(pdu.depth());
        self.extremities = vec![pdu.event_id().to_owned()];
        let state_key = pdu.state_key()?.to_owned();
        let key = (StateEventType::from(pdu.kind().to_string()), state_key);
        self.state.insert(key, pdu)
    }
}

#[cfg(test)]
pub(crate) mod tests;
