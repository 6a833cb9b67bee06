//! [`RoomState`]: what the owner of a room keeps in memory to create new local
//! events: the current state (with the state events themselves, which the auth
//! rules read), the forward extremities and the depth. The room-worker loads it
//! from storage; tests build it from events.

use std::sync::Arc;

use ruma::events::StateEventType;
use ruma::room_version_rules::RoomVersionRules;
use ruma::{OwnedEventId, OwnedRoomId, RoomId, RoomVersionId, ServerName};

use crate::auth::{self, AuthError};
use crate::build::{self, BuildError, EventTemplate, Placement};
use crate::keys::SigningKey;
use crate::pdu::Pdu;
use crate::room_version;
use crate::state_map::StateIds;

pub type StateKey = (StateEventType, String);

/// A room state's events by event ID.
pub type StateById = imbl::HashMap<OwnedEventId, Arc<Pdu>>;

/// Why a new event could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("not allowed: {0}")]
    Forbidden(#[from] AuthError),
}

/// After this many deltas in a row (at least; see [`extends_chain`]), a
/// state group is written as a full snapshot, so reading any group walks a
/// bounded chain.
pub const SNAPSHOT_EVERY: u32 = 100;

/// In a large state, a snapshot comes once every this many slots of state
/// in deltas: a snapshot writes every slot, so with a fixed chain length a
/// wave of joins into a room of 20,000 members wrote 200 rows per join
/// (every hundredth writing 20,000); this way each state change writes at
/// most about this many rows besides its own, and a read walks at most this
/// share more rows than the snapshot it ends on.
const SLOTS_PER_LINK: usize = 16;

/// Whether a new state group may be a delta on a group `chain` deltas away
/// from its snapshot, in a state of `slots` slots (an unknown chain, `None`,
/// may not).
pub fn extends_chain(chain: Option<u32>, slots: usize) -> bool {
    let limit = SNAPSHOT_EVERY.max(u32::try_from(slots / SLOTS_PER_LINK).unwrap_or(u32::MAX));
    chain.is_some_and(|chain| chain < limit)
}

/// A state group to store: the event that defines it, its parent (None for a
/// full snapshot) and the slots that differ from the parent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupDelta {
    pub id: String,
    pub parent: Option<String>,
    pub chain_length: u32,
    /// (type, state_key, event ID; None when the slot is removed).
    pub entries: Vec<(String, String, Option<String>)>,
}

/// What applying an event changed.
#[derive(Debug, Clone)]
pub struct Applied {
    /// The state event this one replaced, if any.
    pub replaced: Option<Arc<Pdu>>,
    /// State groups before and after the event.
    pub group_before: Option<String>,
    pub group_after: String,
    /// A group to store, when the event changed the state (or the room had none).
    pub new_group: Option<GroupDelta>,
}

/// Whose events a redaction hides from clients, decided when the redaction
/// is accepted (the redactor's power then) so it can be applied to a target
/// that arrives later.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedactionReach {
    /// Anyone's: the redactor has the room's `redact` level.
    Anyone,
    /// Only the redactor's own.
    Sender(ruma::OwnedUserId),
    /// Only those of users on this server.
    Server(ruma::OwnedServerName),
}

impl RedactionReach {
    /// Whether the redaction hides an event sent by `target_sender`.
    pub fn covers(&self, target_sender: &ruma::UserId) -> bool {
        match self {
            Self::Anyone => true,
            Self::Sender(user) => user == target_sender,
            Self::Server(server) => server == target_sender.server_name(),
        }
    }
}

#[derive(Clone)]
pub struct RoomState {
    room_id: OwnedRoomId,
    version: RoomVersionId,
    rules: RoomVersionRules,
    /// Current state: slot → event. It and the two indexes below are
    /// persistent maps: handing a large room's state to a turn, or caching
    /// it back, copies nothing, and a state event changes one slot's path.
    state: imbl::HashMap<StateKey, Arc<Pdu>>,
    /// The same events by ID (the auth rules look events up by ID).
    by_id: StateById,
    /// The same state as event IDs.
    ids: StateIds,
    extremities: Vec<OwnedEventId>,
    depth: u64,
    /// The current state's group and how many deltas lead to it from a snapshot.
    group: Option<(String, u32)>,
}

impl RoomState {
    /// Rebuild from stored parts. `state` is the current state's events.
    pub fn from_parts(
        room_id: OwnedRoomId,
        version: RoomVersionId,
        state: impl IntoIterator<Item = Arc<Pdu>>,
        extremities: Vec<OwnedEventId>,
        depth: u64,
        group: Option<(String, u32)>,
    ) -> Option<Self> {
        let rules = room_version::rules(&version).or_else(|| version.rules())?;
        let mut room = Self {
            room_id,
            version,
            rules,
            state: Default::default(),
            by_id: Default::default(),
            ids: Default::default(),
            extremities,
            depth,
            group,
        };
        room.replace_state(state);
        Some(room)
    }

    /// The state of a brand-new room: just its create event, in a snapshot
    /// group named after it ([`RoomState::create_group`] is what to store).
    pub fn from_create(create: Arc<Pdu>, version: RoomVersionId) -> Option<Self> {
        let depth = create.depth();
        let extremities = vec![create.event_id().to_owned()];
        let group = Some((create.event_id().to_string(), 0));
        Self::from_parts(
            create.room_id().to_owned(),
            version,
            [create],
            extremities,
            depth,
            group,
        )
    }

    /// What a new room's create event did to the (empty) state.
    pub fn create_group(create: &Pdu) -> Applied {
        let id = create.event_id().to_string();
        Applied {
            replaced: None,
            group_before: None,
            group_after: id.clone(),
            new_group: Some(GroupDelta {
                id: id.clone(),
                parent: None,
                chain_length: 0,
                entries: vec![("m.room.create".to_owned(), String::new(), Some(id))],
            }),
        }
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

    /// How many state events the current state holds.
    pub fn state_len(&self) -> usize {
        self.state.len()
    }

    /// The current state as event IDs (a persistent map: no copy).
    pub fn state_map(&self) -> StateIds {
        self.ids.clone()
    }

    /// The current state's events by ID (a persistent map: no copy).
    pub fn state_by_id(&self) -> StateById {
        self.by_id.clone()
    }

    pub fn state_events(&self) -> impl Iterator<Item = &Arc<Pdu>> {
        self.state.values()
    }

    /// Put a state event in its slot (in all three maps).
    fn insert_state(&mut self, key: StateKey, pdu: Arc<Pdu>) -> Option<Arc<Pdu>> {
        let id = pdu.event_id().to_owned();
        let replaced = self.state.insert(key.clone(), Arc::clone(&pdu));
        if let Some(old) = &replaced {
            self.by_id.remove(old.event_id());
        }
        self.by_id.insert(id.clone(), pdu);
        self.ids.insert(key, id);
        replaced
    }

    /// Empty a slot (in all three maps).
    fn remove_state(&mut self, key: &StateKey) {
        if let Some(old) = self.state.remove(key) {
            self.by_id.remove(old.event_id());
        }
        self.ids.remove(key);
    }

    /// Make `state` the whole current state.
    fn replace_state(&mut self, state: impl IntoIterator<Item = Arc<Pdu>>) {
        self.state = imbl::HashMap::new();
        self.by_id = StateById::new();
        self.ids = StateIds::new();
        for pdu in state {
            if let Some(key) = crate::state_map::key_of(&pdu) {
                self.insert_state(key, pdu);
            }
        }
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

    /// The power level needed to invite.
    pub fn invite_level(&self) -> i64 {
        self.required_level(ruma::state_res::events::RoomPowerLevelsIntField::Invite, 0)
    }

    /// The level a power levels field requires: as the room's power levels
    /// say, else the field's default, `without_power_levels` without them.
    fn required_level(
        &self,
        field: ruma::state_res::events::RoomPowerLevelsIntField,
        without_power_levels: i64,
    ) -> i64 {
        self.get(&StateEventType::RoomPowerLevels, "")
            .and_then(|pl| {
                ruma::state_res::events::RoomPowerLevelsEvent::new(Arc::clone(pl))
                    .get_as_int_or_default(field, &self.rules.authorization)
                    .ok()
            })
            .map_or(without_power_levels, i64::from)
    }

    /// Whose events a local user's redaction hides from clients: senders may
    /// redact their own events, others need the room's `redact` level.
    pub fn redaction_reach(&self, redactor: &ruma::UserId) -> RedactionReach {
        if self.may_redact_others(redactor) {
            RedactionReach::Anyone
        } else {
            RedactionReach::Sender(redactor.to_owned())
        }
    }

    /// Whose events a redaction received over federation hides from
    /// clients: as the spec has servers apply redactions, events of users on
    /// the redactor's server (that server vouches for its users), or anyone's
    /// when the redactor has the room's `redact` level. (A local user's
    /// redaction is held to [`RoomState::redaction_reach`], which is per user.)
    pub fn federated_redaction_reach(&self, redactor: &ruma::UserId) -> RedactionReach {
        if self.may_redact_others(redactor) {
            RedactionReach::Anyone
        } else {
            RedactionReach::Server(redactor.server_name().to_owned())
        }
    }

    fn may_redact_others(&self, redactor: &ruma::UserId) -> bool {
        let required =
            self.required_level(ruma::state_res::events::RoomPowerLevelsIntField::Redact, 50);
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
        let by_id = &self.by_id;
        auth::check(
            &pdu,
            &self.rules.authorization,
            |id| by_id.get(id).cloned(),
            |kind, state_key| self.get(kind, state_key).cloned(),
        )?;
        Ok(Arc::new(pdu))
    }

    /// Move the room to a new head whose state differs from the current one
    /// in the given slots (an accepted event's own slot, or whatever a state
    /// resolution or a remote event's given state changed). `None` empties a
    /// slot, as does an event not at hand. Costs the changed slots, not the
    /// room's state.
    pub fn move_state(
        &mut self,
        changes: impl IntoIterator<Item = (StateKey, Option<Arc<Pdu>>)>,
        extremities: Vec<OwnedEventId>,
        depth: u64,
        group: (String, u32),
    ) {
        for (key, pdu) in changes {
            match pdu {
                Some(pdu) => {
                    self.insert_state(key, pdu);
                }
                None => self.remove_state(&key),
            }
        }
        self.extremities = extremities;
        self.depth = self.depth.max(depth);
        self.group = Some(group);
    }

    /// The current state group and its chain length.
    pub fn group(&self) -> Option<(&str, u32)> {
        self.group.as_ref().map(|(id, chain)| (id.as_str(), *chain))
    }

    /// The current state group, if the room has one yet.
    pub fn state_group(&self) -> Option<&str> {
        self.group.as_ref().map(|(id, _)| id.as_str())
    }

    /// Make an accepted event the room's new head, and say which state group
    /// it leaves the room in.
    pub fn apply(&mut self, pdu: Arc<Pdu>) -> Applied {
        self.depth = self.depth.max(pdu.depth());
        self.extremities = vec![pdu.event_id().to_owned()];
        let group_before = self.group.as_ref().map(|(id, _)| id.clone());
        let replaced = crate::state_map::key_of(&pdu).map(|key| {
            let old = self.insert_state(key.clone(), Arc::clone(&pdu));
            (key, old)
        });
        let id = pdu.event_id().to_string();
        let new_group = match (&self.group, &replaced) {
            // A message in a room with a group: the state does not change.
            (Some(_), None) => None,
            // A state change: a delta on the current group, unless the chain is long.
            (Some((parent, chain)), Some(((kind, key), _)))
                if extends_chain(Some(*chain), self.state.len()) =>
            {
                Some(GroupDelta {
                    id: id.clone(),
                    parent: Some(parent.clone()),
                    chain_length: chain + 1,
                    entries: vec![(kind.to_string(), key.clone(), Some(id.clone()))],
                })
            }
            // No group yet, or time for a snapshot.
            _ => Some(GroupDelta {
                id: id.clone(),
                parent: None,
                chain_length: 0,
                entries: self
                    .state
                    .iter()
                    .map(|((kind, key), pdu)| {
                        (
                            kind.to_string(),
                            key.clone(),
                            Some(pdu.event_id().to_string()),
                        )
                    })
                    .collect(),
            }),
        };
        if let Some(group) = &new_group {
            self.group = Some((group.id.clone(), group.chain_length));
        }
        Applied {
            replaced: replaced.and_then(|(_, old)| old),
            group_before,
            group_after: self
                .group
                .as_ref()
                .map(|(id, _)| id.clone())
                .expect("set above when missing"),
            new_group,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
