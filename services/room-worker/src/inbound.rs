//! Events from other servers: the owner's side of inbound federation.
//!
//! The federation-receiver has already checked each PDU's format, hashes and
//! signatures and staged it in Postgres. Here the room's owner processes a
//! room's staged PDUs in order, one turn of at most `staged_batch` at a time
//! (the fair scheduler gives other rooms their turns in between), following
//! the spec's checks on receipt of a PDU:
//!
//! 1. its auth events must be known (fetched with `/event_auth` when not) and
//!    pass the state-independent rules;
//! 2. its prev events must be known. When they are not, and are not already
//!    staged behind it, the PDU waits `missing_prev_wait` for them to arrive in
//!    other transactions, then they are fetched with `/get_missing_events`;
//!    if a gap remains, the state before the PDU comes from `/state_ids`;
//! 3. it must pass the auth rules against the state before it (else it is
//!    stored as rejected) and against the current state (else it is stored as
//!    soft-failed: never shown, never built on);
//! 4. the room's forward extremities and current state move on, through state
//!    resolution (ruma) when branches merge.
//!
//! A turn's events, their state groups, the fetched outliers and the removal
//! of the processed staged rows are committed in one fenced statement, so a
//! staged PDU is processed exactly once even if the worker dies mid-turn.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ruma::canonical_json::CanonicalJsonObject;
use ruma::events::StateEventType;
use ruma::room_version_rules::RoomVersionRules;
use ruma::{EventId, OwnedEventId, OwnedServerName, RoomId, ServerName};
use serde_json::{Value, json};
use tessera_events::Pdu;
use tessera_events::auth;
use tessera_events::resolve;
use tessera_events::room_state::{RoomState, extends_chain};
use tessera_events::state_map::{self, StateIds, StateKey};
use tessera_federation::KeyRing;
use tessera_replication::EventEntry;
use tessera_storage::federation::StagedPdu;
use tessera_storage::persist::{
    Batch, EventToPersist, NewStateGroup, Outlier, Redacts, StateChange,
};
use tessera_storage::{Store, StoreError};

use crate::engine::Engine;
use crate::known_events::KnownEvents;

/// Federation settings of the room-worker.
pub struct Inbound {
    pub keyring: Arc<KeyRing>,
    pub missing_prev_wait: Duration,
    pub staged_batch: i64,
    pub max_staged_per_room: i64,
}

/// What a turn over a room's staged PDUs left behind.
#[derive(Debug, PartialEq, Eq)]
pub enum StagedOutcome {
    /// Nothing left.
    Done,
    /// More staged PDUs are ready: schedule another turn.
    More,
    /// The next staged PDU waits for missing prev events until then.
    RetryAt(Instant),
    /// The turn failed (storage, fencing); try again later.
    Failed,
}

/// The result of a remote membership event (send_join and friends).
pub struct MembershipResult {
    pub event_json: String,
    pub state: Vec<String>,
    pub auth_chain: Vec<String>,
    pub members_omitted: bool,
}

/// Why a remote membership event was refused.
#[derive(Debug)]
pub struct MembershipRefusal {
    pub errcode: &'static str,
    pub message: String,
}

/// Everything known during one turn, and what it will write.
struct Turn<'e> {
    engine: &'e Engine,
    inbound: &'e Inbound,
    /// The normal pool, or the bulk lane's.
    store: &'e Store,
    rules: RoomVersionRules,
    room: RoomState,
    /// The current state as IDs, mirroring `room`.
    current: Arc<StateIds>,
    pdus: KnownEvents,
    rejected: HashSet<OwnedEventId>,
    /// Events in the timeline (stored before or in this turn), with their
    /// state group after.
    timeline: HashMap<OwnedEventId, Option<String>>,
    groups: HashMap<String, Arc<StateIds>>,
    /// How many deltas lead to each group from its snapshot, for the groups
    /// whose chain this turn knows: the room's group when the turn began and
    /// every group the turn made.
    chains: HashMap<String, u32>,
    /// Resolutions this turn made: the set of state groups resolved (sorted)
    /// → the group of the result.
    resolutions: HashMap<Vec<String>, String>,
    events: Vec<(EventToPersist, bool)>,
    new_groups: Vec<NewStateGroup>,
    outliers: Vec<Outlier>,
    outlier_ids: HashSet<OwnedEventId>,
}

/// The events some PDUs cite (prev and auth events) and the PDUs' own IDs:
/// what a turn loads before processing them.
fn cited_and_own<'a>(pdus: impl IntoIterator<Item = &'a Pdu>) -> Vec<OwnedEventId> {
    pdus.into_iter()
        .flat_map(|p| {
            p.prev_events()
                .iter()
                .chain(p.auth_events())
                .cloned()
                .chain([p.event_id().to_owned()])
        })
        .collect()
}

/// What a state group derived from another costs in the group cache beside
/// its own slots: the tree nodes on the paths to them, copied (about a
/// node's worth of slots each).
const PATH_COPY_SLOTS: usize = 128;

/// How many times a resolution may run again after loading events it
/// missed: each round loads what the last one looked for (with its auth
/// chain), so two or three are the most seen; the bound only keeps a
/// pathological chain from looping.
const RESOLUTION_ROUNDS: usize = 8;

/// Every slot of a state, as a snapshot state group lists them.
fn snapshot_entries(state: &StateIds) -> Vec<(String, String, Option<String>)> {
    state
        .iter()
        .map(|((k, s), e)| (k.to_string(), s.clone(), Some(e.to_string())))
        .collect()
}

fn parse(event_id: &str, room_id: &RoomId, json: &str, rejected: bool) -> Option<Pdu> {
    let event_id = EventId::parse(event_id).ok()?;
    Pdu::from_canonical_text(event_id, room_id, json, rejected).ok()
}

impl<'e> Turn<'e> {
    async fn start(
        engine: &'e Engine,
        inbound: &'e Inbound,
        store: &'e Store,
        room_id: &RoomId,
    ) -> Result<Option<Turn<'e>>, StoreError> {
        let room = match engine.cached_state(room_id) {
            Some(room) => room,
            None => match store.room_state(room_id).await? {
                Some(room) => room,
                None => return Ok(None),
            },
        };
        let rules = room.rules().clone();
        let current = Arc::new(room.state_map());
        let pdus = KnownEvents::new(room.state_by_id());
        // With one forward extremity the current state is the state after
        // it. With several, each has its own (the current state is their
        // resolution): those are read with the events when cited.
        let mut timeline = HashMap::new();
        if let [extremity] = room.extremities() {
            timeline.insert(extremity.clone(), room.state_group().map(str::to_owned));
        }
        let chains: HashMap<String, u32> = room
            .group()
            .map(|(group, chain)| (group.to_owned(), chain))
            .into_iter()
            .collect();
        let mut groups = HashMap::new();
        if let Some(group) = room.state_group() {
            groups.insert(group.to_owned(), Arc::clone(&current));
        }
        Ok(Some(Turn {
            engine,
            inbound,
            store,
            rules,
            room,
            current,
            pdus,
            rejected: HashSet::new(),
            timeline,
            groups,
            events: Vec::new(),
            new_groups: Vec::new(),
            outliers: Vec::new(),
            outlier_ids: HashSet::new(),
            chains,
            resolutions: HashMap::new(),
        }))
    }

    /// Whether every prev event of `pdu` is in this turn's timeline and
    /// every auth event among its known events (nothing to wait for or fetch).
    fn cites_only_known(&self, pdu: &Pdu) -> bool {
        pdu.prev_events()
            .iter()
            .all(|e| self.timeline.contains_key(e))
            && pdu.auth_events().iter().all(|e| self.pdus.contains_key(e))
    }

    /// Load events we have stored (timeline or outliers) that this turn has
    /// not seen, with their places in the timeline.
    async fn load(
        &mut self,
        ids: impl IntoIterator<Item = OwnedEventId>,
    ) -> Result<(), StoreError> {
        self.load_where(ids, true).await
    }

    /// Load events this turn does not have, for themselves only (their
    /// places in the timeline are not wanted: the room's state events are
    /// at hand without them).
    async fn load_events(
        &mut self,
        ids: impl IntoIterator<Item = OwnedEventId>,
    ) -> Result<(), StoreError> {
        self.load_where(ids, false).await
    }

    async fn load_where(
        &mut self,
        ids: impl IntoIterator<Item = OwnedEventId>,
        with_place: bool,
    ) -> Result<(), StoreError> {
        let wanted: Vec<String> = ids
            .into_iter()
            .filter(|id| {
                !self.pdus.contains_key(id) || (with_place && !self.timeline.contains_key(id))
            })
            .map(|id| id.to_string())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        let known = self.store.known_events(&wanted).await?;
        metrics::counter!("tessera_room_worker_events_loaded_total").increment(known.len() as u64);
        for known in known {
            let room_id = self.room.room_id().to_owned();
            let Some(pdu) = parse(&known.event_id, &room_id, &known.json, known.rejected) else {
                continue;
            };
            let id = pdu.event_id().to_owned();
            if known.rejected {
                self.rejected.insert(id.clone());
            }
            // Soft-failed events count too: never built on by us, but their
            // state is defined for events that cite them.
            if !known.outlier {
                self.timeline.insert(id.clone(), known.state_group.clone());
            }
            self.pdus.insert(id, Arc::new(pdu));
        }
        Ok(())
    }

    /// A state group's state (and, learnt on the way, its chain length).
    async fn group(&mut self, id: &str) -> Result<Arc<StateIds>, StoreError> {
        if let Some(map) = self.groups.get(id) {
            return Ok(Arc::clone(map));
        }
        let (map, chain) = match self.engine.cached_group(id) {
            Some(cached) => cached,
            None => {
                let mut map = StateIds::new();
                let (slots, chain) = self.store.state_group_with_chain(id).await?;
                for (kind, key, event) in slots {
                    if let Ok(event) = EventId::parse(event.as_str()) {
                        map.insert((StateEventType::from(kind), key), event);
                    }
                }
                let chain = chain.map(|c| c.max(0) as u32);
                let map = Arc::new(map);
                // Read from storage, the map shares nothing: it costs its slots.
                self.engine
                    .cache_group(id, Arc::clone(&map), chain, map.len());
                (map, chain)
            }
        };
        if let Some(chain) = chain {
            self.chains.entry(id.to_owned()).or_insert(chain);
        }
        self.groups.insert(id.to_owned(), Arc::clone(&map));
        Ok(map)
    }

    /// Load every event of some states and their auth chains, so state
    /// resolution (which looks events up synchronously) finds them.
    async fn load_auth_closure(&mut self, roots: Vec<OwnedEventId>) -> Result<(), StoreError> {
        let mut frontier = roots;
        let mut seen: HashSet<OwnedEventId> = HashSet::new();
        while !frontier.is_empty() {
            self.load_events(frontier.iter().cloned()).await?;
            let mut next = Vec::new();
            for id in frontier {
                if !seen.insert(id.clone()) {
                    continue;
                }
                if let Some(pdu) = self.pdus.get(&id) {
                    next.extend(
                        pdu.auth_events()
                            .iter()
                            .filter(|a| !seen.contains(*a))
                            .cloned(),
                    );
                }
            }
            frontier = next;
        }
        Ok(())
    }

    fn fetch(&self) -> impl Fn(&EventId) -> Option<Arc<Pdu>> + '_ {
        |id| self.pdus.get(id).cloned()
    }

    /// The state before an event whose prev events are all in the timeline.
    async fn state_before(&mut self, pdu: &Pdu) -> Result<(Option<String>, Arc<StateIds>), String> {
        // The common case: built on exactly our forward extremities.
        if pdu.prev_events() == self.room.extremities()
            && let Some(group) = self.room.state_group()
        {
            return Ok((Some(group.to_owned()), Arc::clone(&self.current)));
        }
        let mut groups: Vec<String> = Vec::new();
        for prev in pdu.prev_events() {
            let group = self
                .timeline
                .get(prev)
                .cloned()
                .flatten()
                .ok_or_else(|| format!("prev event {prev} has no state"))?;
            if !groups.contains(&group) {
                groups.push(group);
            }
        }
        let (group, map) = self
            .resolved_group(groups, format!("{}~before", pdu.event_id()), None)
            .await?;
        Ok((Some(group), map))
    }

    /// The resolution of some state groups' states, as a state group: one
    /// of them when it equals the result, else a new one named `name`.
    /// Remembered by the set of groups, so a room whose forward extremities
    /// keep their states (several servers sending messages, each on its own
    /// latest event) resolves them once, not for every event.
    ///
    /// A new group is stored as a delta on `near` when given (a group
    /// expected to differ from the result by little), else on the first of
    /// `groups`. The room's next current state is near its current one (the
    /// fork that moved changed a slot or two), whereas any one fork differs
    /// from the resolution by the whole conflict.
    async fn resolved_group(
        &mut self,
        mut groups: Vec<String>,
        name: String,
        near: Option<String>,
    ) -> Result<(String, Arc<StateIds>), String> {
        groups.sort_unstable();
        groups.dedup();
        let known = match groups.as_slice() {
            [group] => Some(group.clone()),
            _ => self
                .resolutions
                .get(&groups)
                .cloned()
                .or_else(|| self.engine.cached_resolution(&groups)),
        };
        if let Some(group) = known {
            let map = self.group(&group).await.map_err(|e| e.to_string())?;
            return Ok((group, map));
        }
        let mut maps = Vec::with_capacity(groups.len());
        for group in &groups {
            maps.push(self.group(group).await.map_err(|e| e.to_string())?);
        }
        let resolved = self.resolve(maps.clone()).await?;
        let same = groups
            .iter()
            .zip(&maps)
            .find(|(_, map)| map.ptr_eq(&resolved) || ***map == resolved);
        let (group, map) = match same {
            Some((group, map)) => (group.clone(), Arc::clone(map)),
            None => {
                let map = Arc::new(resolved);
                let parent = near.unwrap_or_else(|| groups[0].clone());
                self.add_state_group(name.clone(), &map, Some(parent))
                    .await?;
                (name, map)
            }
        };
        self.resolutions.insert(groups, group.clone());
        Ok((group, map))
    }

    async fn resolve(&mut self, maps: Vec<Arc<StateIds>>) -> Result<StateIds, String> {
        let first = &maps[0];
        if maps.iter().all(|m| m.ptr_eq(first) || m == first) {
            return Ok(first.as_ref().clone());
        }
        let forks: Vec<StateIds> = maps.iter().map(|m| m.as_ref().clone()).collect();
        metrics::counter!("tessera_room_worker_state_resolutions_total").increment(1);
        // Resolution reads the conflicted events and their auth chains, and
        // a few more (the unconflicted state at their auth slots, the power
        // levels' chain, rarely the unconflicted state's chain), looking
        // them up synchronously: the room's state and this turn's events are
        // at hand, and what it missed is loaded, with its auth chain, before
        // it runs again. Events we do not have stay missing.
        let mut absent: HashSet<OwnedEventId> = HashSet::new();
        for _ in 0..RESOLUTION_ROUNDS {
            let missed: RefCell<HashSet<OwnedEventId>> = RefCell::default();
            let resolved = resolve::resolve(&self.rules, &forks, |id| {
                let pdu = self.pdus.get(id).cloned();
                if pdu.is_none() && !absent.contains(id) {
                    missed.borrow_mut().insert(id.to_owned());
                }
                pdu
            });
            let missed: Vec<OwnedEventId> = missed.into_inner().into_iter().collect();
            if missed.is_empty() {
                return resolved.map_err(|e| e.to_string());
            }
            self.load_auth_closure(missed.clone())
                .await
                .map_err(|e| e.to_string())?;
            absent.extend(missed.into_iter().filter(|id| !self.pdus.contains_key(id)));
        }
        resolve::resolve(&self.rules, &forks, self.fetch()).map_err(|e| e.to_string())
    }

    /// Check an event against a state given as IDs (loading what the rules read).
    async fn allowed_by(&mut self, pdu: &Pdu, state: &StateIds) -> Result<(), String> {
        let mut needed: Vec<OwnedEventId> = Vec::new();
        let content = pdu.content();
        let types = ruma::state_res::auth_types_for_event(
            pdu.kind(),
            pdu.sender(),
            pdu.state_key(),
            content,
            &self.rules.authorization,
        )?;
        for key in types
            .into_iter()
            .chain([(StateEventType::RoomCreate, String::new())])
        {
            // The checks need the events themselves, not their place in the
            // timeline (which `load` also wants): the room's current state is
            // in memory, so the usual event reads nothing.
            if let Some(id) = state.get(&key)
                && !self.pdus.contains_key(id)
            {
                needed.push(id.clone());
            }
        }
        self.load(needed).await.map_err(|e| e.to_string())?;
        auth::check_against_state(pdu, &self.rules.authorization, |kind, key| {
            state
                .get(&(kind.clone(), key.to_owned()))
                .and_then(|id| self.pdus.get(id).cloned())
        })
        .map_err(|e| e.0)
    }

    /// Check the events a remote answered with (the array `field` of its
    /// response: an auth chain, missing events) for signatures and keep the
    /// good ones as outliers for now. Lowest depth first.
    async fn take_remote(&mut self, mut response: Value, field: &str) -> Vec<Arc<Pdu>> {
        let values = match response.get_mut(field).map(Value::take) {
            Some(Value::Array(values)) => values,
            _ => Vec::new(),
        };
        let mut taken = Vec::new();
        for value in values {
            let Ok(object) = serde_json::from_value::<CanonicalJsonObject>(value) else {
                continue;
            };
            match tessera_federation::pdu::check(
                &self.inbound.keyring,
                object,
                &self.rules,
                Some(self.room.room_id()),
            )
            .await
            {
                Ok(checked) => {
                    if checked.pdu.room_id() != self.room.room_id() {
                        continue;
                    }
                    let pdu = Arc::new(checked.pdu);
                    taken.push(Arc::clone(&pdu));
                    self.pdus.insert_if_absent(pdu);
                }
                Err(error) => tracing::info!(%error, "dropped a fetched event"),
            }
        }
        taken.sort_by_key(|p| p.depth());
        taken
    }

    /// Make sure the auth events of `pdu` are known: fetch its auth chain from
    /// `origin` when not, checking each fetched event's own auth rules.
    async fn ensure_auth_events(&mut self, pdu: &Pdu, origin: &ServerName) -> Result<(), String> {
        self.load(pdu.auth_events().to_vec())
            .await
            .map_err(|e| e.to_string())?;
        if pdu.auth_events().iter().all(|a| self.pdus.contains_key(a)) {
            return Ok(());
        }
        metrics::counter!("tessera_room_worker_fetches_total", "kind" => "event_auth").increment(1);
        let path = format!(
            "/_matrix/federation/v1/event_auth/{}/{}",
            encode(self.room.room_id().as_str()),
            encode(pdu.event_id().as_str())
        );
        let response = self
            .inbound
            .keyring
            .client()
            .get(origin, &path)
            .await
            .map_err(|e| e.to_string())?;
        for event in self.take_remote(response, "auth_chain").await {
            self.accept_outlier(&event).await;
        }
        if pdu.auth_events().iter().all(|a| self.pdus.contains_key(a)) {
            Ok(())
        } else {
            Err("its auth events could not be fetched".to_owned())
        }
    }

    /// Keep a fetched event outside the timeline, rejected if its own auth
    /// events do not allow it.
    async fn accept_outlier(&mut self, event: &Arc<Pdu>) {
        let id = event.event_id().to_owned();
        if self.timeline.contains_key(&id) || self.outlier_ids.contains(&id) {
            return;
        }
        let rejected = self.auth_by_auth_events(event).is_err();
        if rejected {
            self.rejected.insert(id.clone());
        }
        self.outlier_ids.insert(id.clone());
        self.outliers.push(Outlier {
            event_id: id.to_string(),
            json: event.canonical_json().to_owned(),
            rejected,
        });
    }

    /// The state-independent rules, then the state-dependent ones against the
    /// event's own auth events.
    fn auth_by_auth_events(&self, pdu: &Pdu) -> Result<(), String> {
        let fetch = self.fetch();
        ruma::state_res::check_state_independent_auth_rules(
            &self.rules.authorization,
            pdu,
            &fetch,
        )?;
        if pdu.auth_events().iter().any(|a| self.rejected.contains(a)) {
            return Err("an auth event was rejected".to_owned());
        }
        let by_key: HashMap<StateKey, Arc<Pdu>> = pdu
            .auth_events()
            .iter()
            .filter_map(|a| self.pdus.get(a))
            .filter_map(|p| Some((state_map::key_of(p)?, Arc::clone(p))))
            .collect();
        let create = self.room.get(&StateEventType::RoomCreate, "").cloned();
        auth::check_against_state(pdu, &self.rules.authorization, |kind, key| {
            by_key
                .get(&(kind.clone(), key.to_owned()))
                .cloned()
                .or_else(|| {
                    (*kind == StateEventType::RoomCreate && key.is_empty())
                        .then(|| create.clone())
                        .flatten()
                })
        })
        .map_err(|e| e.0)
    }

    /// Ask `origin` for the events between our extremities and `pdu`.
    async fn fetch_missing(
        &mut self,
        pdu: &Pdu,
        origin: &ServerName,
    ) -> Result<Vec<Arc<Pdu>>, String> {
        metrics::counter!("tessera_room_worker_fetches_total", "kind" => "get_missing_events")
            .increment(1);
        let body = json!({
            "earliest_events": self.room.extremities(),
            "latest_events": [pdu.event_id()],
            "limit": 50,
            "min_depth": 0,
        });
        let path = format!(
            "/_matrix/federation/v1/get_missing_events/{}",
            encode(self.room.room_id().as_str())
        );
        let response = self
            .inbound
            .keyring
            .client()
            .post(origin, &path, &body)
            .await
            .map_err(|e| e.to_string())?;
        Ok(self.take_remote(response, "events").await)
    }

    /// The state before `pdu` as `origin` tells it (`/state_ids`), with the
    /// events we lack fetched as outliers.
    async fn remote_state_before(
        &mut self,
        pdu: &Pdu,
        origin: &ServerName,
    ) -> Result<StateIds, String> {
        metrics::counter!("tessera_room_worker_fetches_total", "kind" => "state_ids").increment(1);
        let path = format!(
            "/_matrix/federation/v1/state_ids/{}?event_id={}",
            encode(self.room.room_id().as_str()),
            encode(pdu.event_id().as_str())
        );
        let response = self
            .inbound
            .keyring
            .client()
            .get(origin, &path)
            .await
            .map_err(|e| e.to_string())?;
        let ids: Vec<OwnedEventId> = ids_of(&response, "pdu_ids");
        let auth_ids: Vec<OwnedEventId> = ids_of(&response, "auth_chain_ids");
        let all: Vec<OwnedEventId> = ids.iter().chain(&auth_ids).cloned().collect();
        self.load(all.clone()).await.map_err(|e| e.to_string())?;
        let missing: Vec<OwnedEventId> = all
            .iter()
            .filter(|id| !self.pdus.contains_key(id))
            .cloned()
            .collect();
        let mut fetched = Vec::new();
        for id in missing.iter().take(500) {
            let path = format!("/_matrix/federation/v1/event/{}", encode(id.as_str()));
            if let Ok(response) = self.inbound.keyring.client().get(origin, &path).await {
                fetched.extend(self.take_remote(response, "pdus").await);
            }
        }
        fetched.sort_by_key(|p| p.depth());
        for event in &fetched {
            self.accept_outlier(event).await;
        }
        let mut state = StateIds::new();
        for id in ids {
            let Some(event) = self.pdus.get(&id) else {
                return Err(format!("state event {id} could not be fetched"));
            };
            if let Some(key) = state_map::key_of(event) {
                state.insert(key, id);
            }
        }
        Ok(state)
    }

    /// Process one event whose prev events are in the timeline (or whose
    /// state before is given). Records what to write.
    async fn process(
        &mut self,
        pdu: Arc<Pdu>,
        origin: &ServerName,
        given_state: Option<StateIds>,
    ) -> Result<Outcome, String> {
        let id = pdu.event_id().to_owned();
        let (group_before, before) = match given_state {
            Some(state) => (None, Arc::new(state)),
            None => self.state_before(&pdu).await?,
        };
        let independent = {
            let fetch = self.fetch();
            ruma::state_res::check_state_independent_auth_rules(
                &self.rules.authorization,
                &*pdu,
                &fetch,
            )
            .and_then(|()| {
                if pdu.auth_events().iter().any(|a| self.rejected.contains(a)) {
                    Err("an auth event was rejected".to_owned())
                } else {
                    Ok(())
                }
            })
        };
        // The auth rules against the event's own auth events, then against
        // the state before it (the spec's checks 4 and 5); a failure of
        // either rejects it. (metrics reason, message)
        let mut auth_state: StateIds = pdu
            .auth_events()
            .iter()
            .filter_map(|a| Some((state_map::key_of(self.pdus.get(a)?)?, a.clone())))
            .collect();
        // From room version 12 the create event is implied by the room ID,
        // not listed among the auth events.
        let create = (StateEventType::RoomCreate, String::new());
        if !auth_state.contains_key(&create)
            && let Some(id) = self.current.get(&create)
        {
            auth_state.insert(create, id.clone());
        }
        let rejection = match independent {
            Err(error) => Some(("auth_events", error)),
            Ok(()) => match self.allowed_by(&pdu, &auth_state).await {
                Err(error) => Some(("auth_events", error)),
                Ok(()) => self
                    .allowed_by(&pdu, &before)
                    .await
                    .err()
                    .map(|error| ("state_before", error)),
            },
        };
        let rejected = rejection.is_some();
        // Against the current state (soft failure): when the state before
        // the event is the current state (the usual event, built on the
        // room's head), that is the check just passed, so it is not run again.
        let before_is_current =
            group_before.is_some() && group_before.as_deref() == self.room.state_group();
        let soft_failed = !rejected && !before_is_current && {
            let current = Arc::clone(&self.current);
            self.allowed_by(&pdu, &current).await.is_err()
        };
        if rejected {
            self.rejected.insert(id.clone());
        }

        // State groups: the state before (stored if it came from a resolution
        // or from the origin, as a delta on a prev event's group when it
        // can), then the state after.
        let group_before = match group_before {
            Some(group) => group,
            None => {
                let group_id = format!("{id}~before");
                let near = pdu
                    .prev_events()
                    .iter()
                    .find_map(|p| self.timeline.get(p).cloned().flatten());
                self.add_state_group(group_id.clone(), &before, near)
                    .await?;
                group_id
            }
        };
        let after: Arc<StateIds> = match (rejected, state_map::key_of(&pdu)) {
            (false, Some(_)) => {
                let after = Arc::new(state_map::with_event(&before, &pdu));
                self.add_state_group(id.to_string(), &after, Some(group_before.clone()))
                    .await?;
                after
            }
            _ => Arc::clone(&before),
        };
        let group_after = if Arc::ptr_eq(&after, &before) {
            group_before.clone()
        } else {
            id.to_string()
        };
        self.pdus.insert(id.clone(), Arc::clone(&pdu));
        self.timeline.insert(id.clone(), Some(group_after.clone()));

        // The room moves on only with accepted, not soft-failed events.
        let state_changes = if rejected || soft_failed {
            Vec::new()
        } else {
            let mut extremities: Vec<OwnedEventId> = self
                .room
                .extremities()
                .iter()
                .filter(|e| !pdu.prev_events().contains(e))
                .cloned()
                .collect();
            extremities.push(id.clone());
            // The usual event, built on the whole head and on the current
            // state, moves it by its own slot at most: the diff inside
            // visits that slot's path (or nothing: same map) and reads nothing.
            self.move_current(&pdu, &after, &group_after, extremities)
                .await?
        };
        let prev_state = state_map::key_of(&pdu).and_then(|k| before.get(&k).cloned());
        let redacts = match (rejected || soft_failed, pdu.redacts()) {
            (false, Some(target)) => self
                .redaction_target(&pdu, target)
                .await
                .map_err(|e| format!("storage: {e}"))?,
            _ => None,
        };
        self.events.push((
            EventToPersist {
                event_id: id.to_string(),
                kind: pdu.kind().to_string(),
                state_key: pdu.state_key().map(str::to_owned),
                sender: pdu.sender().to_string(),
                origin_server_ts: pdu.origin_server_ts() as i64,
                depth: pdu.depth() as i64,
                membership: pdu.membership(),
                rejected,
                prev_state_event_id: prev_state.map(|e| e.to_string()),
                json: pdu.canonical_json().to_owned(),
                state_changes,
                redacts,
                txn: None,
                state_group: Some(group_after),
                state_group_before: Some(group_before),
                soft_failed,
                origin: Some(origin.to_string()),
            },
            rejected || soft_failed,
        ));
        let outcome = match (&rejection, soft_failed) {
            (Some((why, reason)), _) => {
                metrics::counter!("tessera_room_worker_inbound_pdus_total", "result" => "rejected")
                    .increment(1);
                metrics::counter!("tessera_federation_pdus_rejected_total", "reason" => *why)
                    .increment(1);
                tracing::info!(event_id = %id, %reason, "rejected a PDU");
                Outcome::Rejected(reason.clone())
            }
            (None, true) => {
                metrics::counter!("tessera_room_worker_inbound_pdus_total", "result" => "soft_failed").increment(1);
                Outcome::SoftFailed
            }
            (None, false) => {
                metrics::counter!("tessera_room_worker_inbound_pdus_total", "result" => "accepted")
                    .increment(1);
                Outcome::Accepted
            }
        };
        Ok(outcome)
    }

    /// What an accepted redaction from another server hides
    /// ([`RoomState::federated_redaction_reach`], [`Store::redacts`]).
    async fn redaction_target(
        &self,
        redaction: &Pdu,
        target: &EventId,
    ) -> Result<Option<Redacts>, StoreError> {
        let reach = self.room.federated_redaction_reach(redaction.sender());
        let sender = self.pdus.get(target).map(|pdu| pdu.sender());
        self.store
            .redacts(self.room.room_id().as_str(), target.as_str(), reach, sender)
            .await
    }

    /// Move the room to a new head after an accepted event: resolve the
    /// extremities' states when there are several, then move the current
    /// state by the slots that differ. Returns those slots.
    async fn move_current(
        &mut self,
        pdu: &Pdu,
        after: &Arc<StateIds>,
        group_after: &str,
        extremities: Vec<OwnedEventId>,
    ) -> Result<Vec<StateChange>, String> {
        let (new_current, current_group) = if extremities.len() == 1 {
            (Arc::clone(after), group_after.to_owned())
        } else {
            // The other extremities' states: from storage when this turn has
            // not met them (its timeline starts empty in a forked room).
            let unplaced: Vec<OwnedEventId> = extremities
                .iter()
                .filter(|e| !self.timeline.contains_key(*e))
                .cloned()
                .collect();
            self.load(unplaced).await.map_err(|e| e.to_string())?;
            let groups: Vec<String> = extremities
                .iter()
                .map(|extremity| {
                    self.timeline
                        .get(extremity)
                        .cloned()
                        .flatten()
                        .unwrap_or_else(|| group_after.to_owned())
                })
                .collect();
            let (group, map) = self
                .resolved_group(
                    groups,
                    format!("{}~current", pdu.event_id()),
                    self.room.state_group().map(str::to_owned),
                )
                .await?;
            (map, group)
        };
        // The states share their structure, so this visits the slots that
        // differ, not the room's state.
        let changes = state_map::diff(&self.current, &new_current);
        let unseen: Vec<OwnedEventId> = changes
            .iter()
            .filter_map(|(_, event)| event.clone())
            .filter(|e| !self.pdus.contains_key(e))
            .collect();
        self.load_events(unseen).await.map_err(|e| e.to_string())?;
        let mut state_changes = Vec::with_capacity(changes.len());
        let mut slots = Vec::with_capacity(changes.len());
        for ((kind, key), event) in changes {
            let state_event = event.as_ref().and_then(|e| self.pdus.get(e)).cloned();
            state_changes.push(StateChange {
                kind: kind.to_string(),
                state_key: key.clone(),
                event_id: event.map(|e| e.to_string()),
                membership: state_event.as_ref().and_then(|p| p.membership()),
            });
            slots.push(((kind, key), state_event));
        }
        // An unknown chain length: the next state group is a snapshot.
        let chain = self.chain_length(&current_group).unwrap_or(u32::MAX);
        self.room
            .move_state(slots, extremities, pdu.depth(), (current_group, chain));
        self.current = new_current;
        Ok(state_changes)
    }

    /// Record a new state group for `state`: a delta on `parent` when that
    /// group's chain is known and short, else a full snapshot.
    async fn add_state_group(
        &mut self,
        id: String,
        state: &Arc<StateIds>,
        parent: Option<String>,
    ) -> Result<(), String> {
        let parent = parent.and_then(|parent| {
            let chain = self.chain_length(&parent)?;
            extends_chain(Some(chain), state.len()).then_some((parent, chain))
        });
        let (parent, chain_length, entries) = match parent {
            Some((parent, chain)) => {
                let base = self.group(&parent).await.map_err(|e| e.to_string())?;
                let entries = state_map::diff(&base, state)
                    .into_iter()
                    .map(|((kind, key), event)| {
                        (kind.to_string(), key, event.map(|e| e.to_string()))
                    })
                    .collect();
                (Some(parent), chain + 1, entries)
            }
            None => (None, 0, snapshot_entries(state)),
        };
        self.add_group(NewStateGroup {
            id: id.clone(),
            parent,
            chain_length: chain_length as i32,
            entries,
        });
        self.groups.insert(id, Arc::clone(state));
        Ok(())
    }

    /// How many deltas lead to a state group from its snapshot, when known:
    /// for the room's group when the turn began and the groups it made.
    fn chain_length(&self, group: &str) -> Option<u32> {
        self.chains.get(group).copied()
    }

    fn add_group(&mut self, group: NewStateGroup) {
        self.chains
            .insert(group.id.clone(), group.chain_length as u32);
        self.new_groups.push(group);
    }

    /// Commit everything this turn decided, fenced by `epoch`.
    async fn commit(mut self, epoch: i64, staged_ids: Vec<i64>) -> Result<RoomState, StoreError> {
        let partition =
            tessera_cluster::partition_of(self.room.room_id().as_str(), self.engine.partitions);
        // Outliers that made it into the timeline in this turn are not outliers.
        let in_timeline: HashSet<String> = self
            .events
            .iter()
            .map(|(e, _)| e.event_id.clone())
            .collect();
        self.outliers.retain(|o| !in_timeline.contains(&o.event_id));
        let mut batch = Batch::new(
            partition,
            &self.engine.worker_id,
            epoch,
            self.room.room_id().as_str(),
        );
        batch.depth = self.room.depth() as i64;
        batch.extremities = self
            .room
            .extremities()
            .iter()
            .map(|e| e.to_string())
            .collect();
        batch.state_group = self.room.state_group().map(str::to_owned);
        // The groups a later turn starts from, kept once committed: the
        // room's current group and its forward extremities' (a later turn
        // resolving the forks would otherwise read them back from storage).
        // Not every group made here: a group shares all but its changed
        // slots' paths with its parent, but those paths are a few tree
        // nodes each, and a flood of joins would fill the cache with them.
        let heads: HashSet<&str> = self
            .room
            .extremities()
            .iter()
            .filter_map(|e| self.timeline.get(e)?.as_deref())
            .chain(self.room.state_group())
            .collect();
        let made: Vec<(String, Arc<StateIds>, u32, usize)> = self
            .new_groups
            .iter()
            .filter(|g| heads.contains(g.id.as_str()))
            .filter_map(|g| {
                let map = self.groups.get(&g.id)?;
                Some((
                    g.id.clone(),
                    Arc::clone(map),
                    g.chain_length as u32,
                    g.entries.len() + PATH_COPY_SLOTS,
                ))
            })
            .collect();
        batch.new_groups = self.new_groups;
        let resolutions = self.resolutions;
        batch.staged_ids = staged_ids;
        batch.outliers = self.outliers;
        let hidden: Vec<bool> = self.events.iter().map(|(_, hidden)| *hidden).collect();
        batch.events = self.events.into_iter().map(|(e, _)| e).collect();
        let _order = self.engine.partition_lock(partition).lock().await;
        let positions = self.store.persist(&batch).await?;
        for (id, map, chain, cost) in made {
            self.engine.cache_group(&id, map, Some(chain), cost);
        }
        for (groups, group) in resolutions {
            self.engine.cache_resolution(groups, group);
        }
        let entries: Vec<EventEntry> = batch
            .events
            .iter()
            .zip(&positions)
            .zip(hidden)
            .map(|((e, pos), hidden)| e.entry(&batch.room_id, *pos, hidden))
            .collect();
        metrics::counter!("tessera_room_worker_persisted_events_total")
            .increment(entries.len() as u64);
        self.engine.publisher.publish(partition, &entries).await;
        Ok(self.room)
    }
}

enum Outcome {
    Accepted,
    SoftFailed,
    Rejected(String),
}

fn ids_of(value: &Value, field: &str) -> Vec<OwnedEventId> {
    value
        .get(field)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str())
                .filter_map(|s| EventId::parse(s).ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Percent-encode a path segment.
pub fn encode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// One turn over a room's staged PDUs.
pub async fn process_staged(
    engine: &Engine,
    inbound: &Inbound,
    store: &Store,
    room_id: &RoomId,
    epoch: i64,
) -> StagedOutcome {
    match staged_turn(engine, inbound, store, room_id, epoch).await {
        Ok(outcome) => outcome,
        Err(error) => {
            tracing::warn!(room = %room_id, %error, "a turn over staged PDUs failed; will retry");
            engine.drop_state(room_id);
            StagedOutcome::Failed
        }
    }
}

async fn staged_turn(
    engine: &Engine,
    inbound: &Inbound,
    store: &Store,
    room_id: &RoomId,
    epoch: i64,
) -> Result<StagedOutcome, StoreError> {
    // In the bulk lane, a turn and each PDU in it wait for urgent work.
    tessera_runtime::bulk::yield_to_urgent().await;
    let staged = store
        .staged_for_room(room_id.as_str(), inbound.staged_batch)
        .await?;
    if staged.is_empty() {
        return Ok(StagedOutcome::Done);
    }
    let full_batch = staged.len() as i64 == inbound.staged_batch;
    let Some(mut turn) = Turn::start(engine, inbound, store, room_id).await? else {
        // The room is not (or no longer) ours to process: drop its staged PDUs.
        let mut batch = Batch::new(
            tessera_cluster::partition_of(room_id.as_str(), engine.partitions),
            &engine.worker_id,
            epoch,
            room_id.as_str(),
        );
        batch.staged_ids = staged.iter().map(|s| s.id).collect();
        store.persist(&batch).await?;
        engine.adjust_backlog(room_id, -(batch.staged_ids.len() as i64));
        return Ok(StagedOutcome::Done);
    };

    // Parse, drop duplicates of what we already have, order by depth.
    let turn_started = Instant::now();
    let staged_at: HashMap<i64, i64> = staged.iter().map(|s| (s.id, s.staged_at_ms)).collect();
    let mut done: Vec<i64> = Vec::new();
    let mut parsed: Vec<(StagedPdu, Arc<Pdu>)> = Vec::new();
    for row in staged {
        match parse(&row.event_id, room_id, &row.json, false) {
            Some(pdu) => parsed.push((row, Arc::new(pdu))),
            None => {
                tracing::warn!(event_id = %row.event_id, "dropping an unparsable staged PDU");
                done.push(row.id);
            }
        }
    }
    turn.load(cited_and_own(parsed.iter().map(|(_, p)| &**p)))
        .await?;
    parsed.sort_by_key(|(row, pdu)| (pdu.depth(), row.id));
    let in_batch: HashSet<OwnedEventId> = parsed
        .iter()
        .map(|(_, p)| p.event_id().to_owned())
        .collect();

    let mut outcome = if full_batch {
        StagedOutcome::More
    } else {
        StagedOutcome::Done
    };
    for (row, pdu) in parsed {
        tessera_runtime::bulk::yield_to_urgent().await;
        let id = pdu.event_id().to_owned();
        if turn.timeline.contains_key(&id) {
            done.push(row.id);
            continue;
        }
        let origin = match OwnedServerName::try_from(row.origin.clone()) {
            Ok(origin) => origin,
            Err(_) => {
                done.push(row.id);
                continue;
            }
        };
        if let Err(reason) = turn.ensure_auth_events(&pdu, &origin).await {
            tracing::info!(event_id = %id, %reason, "rejecting a PDU whose auth events are unknown");
            metrics::counter!("tessera_federation_pdus_rejected_total", "reason" => "unknown_auth_events")
                .increment(1);
            turn.rejected.insert(id.clone());
            turn.outliers.push(Outlier {
                event_id: id.to_string(),
                json: pdu.canonical_json().to_owned(),
                rejected: true,
            });
            done.push(row.id);
            continue;
        }
        let mut missing: Vec<OwnedEventId> = pdu
            .prev_events()
            .iter()
            .filter(|p| !turn.timeline.contains_key(*p))
            .cloned()
            .collect();
        let mut given_state = None;
        if !missing.is_empty() {
            // Already on its way behind us in staging: wait for it.
            let staged_elsewhere = store
                .staged_event_ids(
                    room_id.as_str(),
                    &missing.iter().map(|m| m.to_string()).collect::<Vec<_>>(),
                )
                .await?;
            let waited = row_age(&row) >= inbound.missing_prev_wait;
            // Parents already staged come first in (depth, arrival) order, so
            // the next turn takes them. A turn that made no progress at all
            // would load this same batch again (the parents claim a greater
            // depth than their child): then ask the origin instead.
            if !done.is_empty()
                && !staged_elsewhere.is_empty()
                && missing
                    .iter()
                    .all(|m| in_batch.contains(m) || staged_elsewhere.contains(&m.to_string()))
            {
                outcome = StagedOutcome::More;
                break;
            }
            if !waited {
                outcome = StagedOutcome::RetryAt(
                    Instant::now() + inbound.missing_prev_wait.saturating_sub(row_age(&row)),
                );
                break;
            }
            // Ask the origin for the gap, then process what it sends first.
            match turn.fetch_missing(&pdu, &origin).await {
                Ok(fetched) => {
                    for event in fetched {
                        let eid = event.event_id().to_owned();
                        if turn.timeline.contains_key(&eid) || eid == id {
                            continue;
                        }
                        if turn.ensure_auth_events(&event, &origin).await.is_err() {
                            continue;
                        }
                        if event
                            .prev_events()
                            .iter()
                            .all(|p| turn.timeline.contains_key(p))
                            && let Err(error) =
                                turn.process(Arc::clone(&event), &origin, None).await
                        {
                            tracing::info!(event_id = %eid, %error, "could not process a fetched event");
                        }
                    }
                }
                Err(error) => tracing::info!(event_id = %id, %error, "get_missing_events failed"),
            }
            missing.retain(|p| !turn.timeline.contains_key(p));
            if !missing.is_empty() {
                match turn.remote_state_before(&pdu, &origin).await {
                    Ok(state) => given_state = Some(state),
                    Err(error) => {
                        // Not stored at all, not even as rejected: the failure
                        // may pass, and a later event that cites this one
                        // fetches it again.
                        tracing::warn!(event_id = %id, %origin, %error, "cannot learn the state before a PDU; dropping it");
                        metrics::counter!("tessera_federation_server_pdus_dropped_total", "reason" => "state_unavailable")
                            .increment(1);
                        done.push(row.id);
                        continue;
                    }
                }
            }
        }
        match turn.process(Arc::clone(&pdu), &origin, given_state).await {
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(event_id = %id, %error, "could not process a PDU; dropping it")
            }
        }
        done.push(row.id);
    }
    let processed = done.len() as i64;
    let waits: Vec<u64> = done
        .iter()
        .filter_map(|id| staged_at.get(id))
        .map(|at| tessera_federation::now_ms().saturating_sub((*at).max(0) as u64))
        .collect();
    let room = turn.commit(epoch, done).await?;
    engine.adjust_backlog(room_id, -processed);
    if processed > 0 {
        metrics::histogram!("tessera_federation_pdu_processing_seconds")
            .record(turn_started.elapsed().as_secs_f64() / processed as f64);
    }
    let lane = if std::ptr::eq(store, &engine.store) {
        "normal"
    } else {
        "bulk"
    };
    for wait in waits {
        metrics::histogram!("tessera_federation_pdu_staged_wait_seconds", "lane" => lane)
            .record(wait as f64 / 1000.0);
    }
    engine.cache_state(room);
    Ok(outcome)
}

/// PDUs for a room with nothing staged, processed at once instead of staged
/// when everything they cite is already here: a quiet room's event then costs
/// one lookup and one commit, not a staging round trip, a commit and a turn.
/// Answers the indices (into `pdus`) of those it left alone, for the caller
/// to stage: a PDU whose prev or auth events are missing needs the staged
/// path's waiting and fetching, which must not hold up the transaction.
pub async fn process_direct(
    engine: &Engine,
    inbound: &Inbound,
    room_id: &RoomId,
    origin: &ServerName,
    pdus: &[(String, String)],
    epoch: i64,
) -> Result<Vec<usize>, StoreError> {
    let all = || (0..pdus.len()).collect();
    let Some(mut turn) = Turn::start(engine, inbound, &engine.store, room_id).await? else {
        return Ok(all());
    };
    let started = Instant::now();
    let mut parsed: Vec<(usize, Arc<Pdu>)> = Vec::new();
    let mut left = Vec::new();
    for (i, (event_id, json)) in pdus.iter().enumerate() {
        match parse(event_id, room_id, json, false) {
            Some(pdu) => parsed.push((i, Arc::new(pdu))),
            None => left.push(i),
        }
    }
    // The usual quiet event cites the room's forward extremities and current
    // state, all in memory: then nothing is read. A repeat of a stored event
    // is then caught by the commit's unique key, and the caller stages the
    // PDUs instead, which skips known events.
    if !parsed.iter().all(|(_, p)| turn.cites_only_known(p)) {
        turn.load(cited_and_own(parsed.iter().map(|(_, p)| &**p)))
            .await?;
    }
    parsed.sort_by_key(|(i, pdu)| (pdu.depth(), *i));
    let mut processed = 0;
    for (i, pdu) in parsed {
        if turn.timeline.contains_key(pdu.event_id()) {
            continue;
        }
        if !turn.cites_only_known(&pdu) {
            left.push(i);
            continue;
        }
        if let Err(error) = turn.process(Arc::clone(&pdu), origin, None).await {
            tracing::warn!(event_id = %pdu.event_id(), %error, "could not process a PDU; dropping it");
        }
        processed += 1;
    }
    if processed > 0 {
        let room = turn.commit(epoch, vec![]).await?;
        engine.cache_state(room);
        metrics::histogram!("tessera_federation_pdu_processing_seconds")
            .record(started.elapsed().as_secs_f64() / processed as f64);
        metrics::counter!("tessera_federation_pdus_direct_total").increment(processed as u64);
    }
    left.sort_unstable();
    Ok(left)
}

fn row_age(row: &StagedPdu) -> Duration {
    Duration::from_millis(
        tessera_federation::now_ms().saturating_sub(row.staged_at_ms.max(0) as u64),
    )
}

/// A membership event a remote server built through make_join (or leave,
/// knock): check it, persist it now, and answer with the state before it and
/// the auth chain.
pub async fn process_membership(
    engine: &Engine,
    inbound: &Inbound,
    room_id: &RoomId,
    origin: &ServerName,
    pdu: Pdu,
    omit_members: Option<&[String]>,
    epoch: i64,
) -> Result<MembershipResult, MembershipRefusal> {
    let refuse = |errcode, message: String| MembershipRefusal { errcode, message };
    let unavailable = |e: StoreError| refuse("M_UNKNOWN", format!("storage: {e}"));
    let Some(mut turn) = Turn::start(engine, inbound, &engine.store, room_id)
        .await
        .map_err(unavailable)?
    else {
        return Err(refuse("M_NOT_FOUND", format!("unknown room {room_id}")));
    };
    let pdu = Arc::new(pdu);
    turn.load(cited_and_own([&*pdu]))
        .await
        .map_err(unavailable)?;
    if turn.timeline.contains_key(pdu.event_id()) {
        return Err(refuse(
            "M_FORBIDDEN",
            "this event is already in the room".to_owned(),
        ));
    }
    if !pdu
        .prev_events()
        .iter()
        .all(|p| turn.timeline.contains_key(p))
    {
        return Err(refuse(
            "M_BAD_JSON",
            "the event's prev_events are not known here; call make_join again".to_owned(),
        ));
    }
    turn.ensure_auth_events(&pdu, origin)
        .await
        .map_err(|e| refuse("M_FORBIDDEN", e))?;
    let (_, before) = turn
        .state_before(&pdu)
        .await
        .map_err(|e| refuse("M_UNKNOWN", e))?;
    match turn.process(Arc::clone(&pdu), origin, None).await {
        Ok(Outcome::Accepted) => {}
        Ok(Outcome::SoftFailed) => {
            return Err(refuse(
                "M_FORBIDDEN",
                "the room's current state does not allow this".to_owned(),
            ));
        }
        Ok(Outcome::Rejected(reason)) => return Err(refuse("M_FORBIDDEN", reason)),
        Err(error) => return Err(refuse("M_UNKNOWN", error)),
    }
    // The state before the event (without most members for omit_members:
    // in a room with 20,000 members they are nearly all of it), and the auth
    // chain of what is kept and of the event.
    let kept: Vec<OwnedEventId> = match omit_members {
        None => before.values().cloned().collect(),
        Some(heroes) => {
            let named = [StateEventType::RoomName, StateEventType::RoomCanonicalAlias]
                .into_iter()
                .any(|kind| before.contains_key(&(kind, String::new())));
            before
                .iter()
                .filter(|((kind, key), _)| {
                    *kind != StateEventType::RoomMember
                        || (!named && heroes.iter().any(|h| h == key))
                })
                .map(|(_, id)| id.clone())
                .collect()
        }
    };
    let roots: Vec<OwnedEventId> = kept
        .iter()
        .cloned()
        .chain(pdu.auth_events().iter().cloned())
        .collect();
    turn.load_auth_closure(roots).await.map_err(unavailable)?;
    let state: Vec<String> = kept
        .iter()
        .filter_map(|id| turn.pdus.get(id))
        .map(|p| p.canonical_json().to_owned())
        .collect();
    let chain = resolve::auth_chain(
        kept.iter().cloned().chain([pdu.event_id().to_owned()]),
        turn.fetch(),
    );
    let auth_chain: Vec<String> = chain
        .iter()
        .filter_map(|id| turn.pdus.get(id))
        .map(|p| p.canonical_json().to_owned())
        .collect();
    let event_json = pdu.canonical_json().to_owned();
    let room = turn.commit(epoch, vec![]).await.map_err(unavailable)?;
    engine.cache_state(room);
    Ok(MembershipResult {
        event_json,
        state,
        auth_chain,
        members_omitted: omit_members.is_some(),
    })
}
