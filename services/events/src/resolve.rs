//! State resolution through ruma (no hand-written algorithm), handed only
//! the part of the forks it can read, plus the two inputs ruma asks the
//! caller for: each fork's auth chain and, from room version 12, the
//! conflicted state subgraph.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use ruma::events::StateEventType;
use ruma::room_version_rules::{RoomVersionRules, StateResolutionVersion};
use ruma::state_res::utils::event_id_set::EventIdSet;
use ruma::{EventId, OwnedEventId};

use crate::pdu::Pdu;
use crate::state_map::{StateIds, StateKey};

/// A room state as ruma's state resolution takes it.
type StateMap = ruma::state_res::StateMap<OwnedEventId>;

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("room version uses state resolution v1, which is not supported")]
    UnsupportedVersion,
    #[error("state resolution failed: {0}")]
    Ruma(#[from] ruma::state_res::Error),
}

/// Resolve several forks of a room's state into one. `fetch` must find every
/// event of the forks' conflicted state and of its auth chains that the
/// server has, and the events the auth checks of the full conflicted set
/// read (the unconflicted state at their auth slots, and the power levels'
/// chain); the rest of the unconflicted state is never read.
///
/// Exactly ruma's resolution of the whole forks, at the cost of the
/// conflicted part: the algorithm reads the unconflicted state only where
/// the iterative auth checks of the full conflicted set look (each event's
/// auth slots) and otherwise copies it into the result, so ruma is given
/// the conflicted slots and those auth slots, and the rest is copied here.
pub fn resolve(
    rules: &RoomVersionRules,
    forks: &[StateIds],
    fetch: impl Fn(&EventId) -> Option<Arc<Pdu>>,
) -> Result<StateIds, ResolveError> {
    let StateResolutionVersion::V2(state_res_rules) = &rules.state_res else {
        return Err(ResolveError::UnsupportedVersion);
    };
    let Some(base) = forks.first() else {
        return Ok(StateIds::new());
    };
    let conflicted = conflicted_keys(forks);
    if conflicted.is_empty() {
        return Ok(base.clone());
    }
    let conflicted_events: Vec<OwnedEventId> = conflicted_events(forks, &conflicted);
    let auth_chains = auth_chains_for_difference(forks, &conflicted, &fetch);
    let subgraph: HashSet<OwnedEventId> = if state_res_rules.consider_conflicted_state_subgraph {
        conflicted_state_subgraph(&conflicted_events, &fetch)
    } else {
        HashSet::new()
    };

    // Every slot an auth check of the full conflicted set reads.
    let union: HashSet<&OwnedEventId> = auth_chains.iter().flatten().collect();
    let difference = union
        .into_iter()
        .filter(|id| !auth_chains.iter().all(|chain| chain.contains(*id)));
    let mut read: HashSet<StateKey> = HashSet::from([(StateEventType::RoomCreate, String::new())]);
    for id in difference.chain(&conflicted_events).chain(&subgraph) {
        let Some(pdu) = fetch(id) else { continue };
        if let Ok(types) = ruma::state_res::auth_types_for_event(
            pdu.kind(),
            pdu.sender(),
            pdu.state_key(),
            pdu.content(),
            &rules.authorization,
        ) {
            read.extend(types);
        }
    }
    let ruma_forks: Vec<StateMap> = forks
        .iter()
        .map(|fork| {
            conflicted
                .iter()
                .chain(read.iter().filter(|key| !conflicted.contains(*key)))
                .filter_map(|key| Some((key.clone(), fork.get(key)?.clone())))
                .collect()
        })
        .collect();
    let resolved = ruma::state_res::resolve(
        &rules.authorization,
        state_res_rules,
        ruma_forks.iter(),
        auth_chains
            .into_iter()
            .map(|chain| chain.into_iter().collect::<EventIdSet<_>>())
            .collect(),
        &fetch,
        |_| Some(subgraph.iter().cloned().collect()),
    )?;

    // The result as the first fork with the slots resolution decided, so it
    // shares that fork's structure: diffs and comparisons against it, or
    // against states derived from it, skip what did not change. A slot the
    // forks agree on keeps their event (ruma's last step); a conflicted slot,
    // or one no fork has that an event of the full conflicted set won, takes
    // ruma's.
    let mut result = base.clone();
    for key in &conflicted {
        match resolved.get(key) {
            Some(id) => {
                if base.get(key) != Some(id) {
                    result.insert(key.clone(), id.clone());
                }
            }
            None => {
                result.remove(key);
            }
        }
    }
    for (key, id) in resolved {
        if !conflicted.contains(&key) && !base.contains_key(&key) {
            result.insert(key, id);
        }
    }
    Ok(result)
}

/// The slots the forks do not all agree on (held by different events, or
/// missing from some). Found by diffing the forks' trees, which skips the
/// subtrees they share.
pub fn conflicted_keys(forks: &[StateIds]) -> HashSet<StateKey> {
    let Some((base, others)) = forks.split_first() else {
        return HashSet::new();
    };
    others
        .iter()
        .flat_map(|fork| crate::state_map::diff(base, fork))
        .map(|(key, _)| key)
        .collect()
}

/// The events at the conflicted slots of every fork.
pub fn conflicted_events(forks: &[StateIds], conflicted: &HashSet<StateKey>) -> Vec<OwnedEventId> {
    let events: HashSet<&OwnedEventId> = forks
        .iter()
        .flat_map(|fork| conflicted.iter().filter_map(|key| fork.get(key)))
        .collect();
    events.into_iter().cloned().collect()
}

/// What ruma needs of each fork's auth chain: the auth difference (the
/// events in some forks' full auth chains and not in all) and nothing else,
/// so each fork's chain cut down to where that difference can lie.
///
/// With U the events the forks agree on, C_i fork i's conflicted events,
/// X_i the auth chain of C_i and Y that of U, fork i's full chain is
/// Y ∪ X_i, and the difference is (∪X_i) − (∩X_i) − Y. So the sets
/// X_i ∪ (Y ∩ W), with W = (∪X_i) − (∩X_i), have the full chains'
/// difference; and Y is walked only while some event of W is not yet found
/// in it (usually W is empty: every fork's conflicted events rest on the
/// same create, power levels and join rules events).
pub fn auth_chains_for_difference(
    forks: &[StateIds],
    conflicted: &HashSet<StateKey>,
    fetch: impl Fn(&EventId) -> Option<Arc<Pdu>>,
) -> Vec<HashSet<OwnedEventId>> {
    let Some(base) = forks.first() else {
        return Vec::new();
    };
    let mut chains: Vec<HashSet<OwnedEventId>> = forks
        .iter()
        .map(|fork| {
            auth_chain(
                conflicted.iter().filter_map(|key| fork.get(key).cloned()),
                &fetch,
            )
        })
        .collect();
    let union: HashSet<&OwnedEventId> = chains.iter().flatten().collect();
    let mut wanted: HashSet<OwnedEventId> = union
        .into_iter()
        .filter(|id| !chains.iter().all(|chain| chain.contains(*id)))
        .cloned()
        .collect();
    if wanted.is_empty() {
        return chains;
    }
    let unconflicted = base
        .iter()
        .filter(|(key, _)| !conflicted.contains(*key))
        .map(|(_, id)| id.clone());
    let mut shared = Vec::new();
    walk_auth_chain(unconflicted, &fetch, |id| {
        if wanted.remove(id) {
            shared.push(id.clone());
        }
        !wanted.is_empty()
    });
    for chain in &mut chains {
        chain.extend(shared.iter().cloned());
    }
    chains
}

/// The full recursive auth chain of some events (not including the events
/// themselves unless one is in another's chain).
pub fn auth_chain(
    events: impl IntoIterator<Item = OwnedEventId>,
    fetch: impl Fn(&EventId) -> Option<Arc<Pdu>>,
) -> HashSet<OwnedEventId> {
    walk_auth_chain(events, fetch, |_| true)
}

/// Walk the auth chain of some events, calling `visit` once for each event
/// of it until `visit` says to stop; returns what was visited.
fn walk_auth_chain(
    events: impl IntoIterator<Item = OwnedEventId>,
    fetch: impl Fn(&EventId) -> Option<Arc<Pdu>>,
    mut visit: impl FnMut(&OwnedEventId) -> bool,
) -> HashSet<OwnedEventId> {
    let mut chain = HashSet::new();
    let mut todo: Vec<OwnedEventId> = Vec::new();
    for id in events {
        if let Some(pdu) = fetch(&id) {
            todo.extend(pdu.auth_events().iter().cloned());
        }
        // Depth first from each event in turn, so a walk that stops early
        // has not queued the whole state's auth events first.
        while let Some(id) = todo.pop() {
            if chain.contains(&id) {
                continue;
            }
            let go_on = visit(&id);
            if let Some(pdu) = fetch(&id) {
                todo.extend(
                    pdu.auth_events()
                        .iter()
                        .filter(|a| !chain.contains(*a))
                        .cloned(),
                );
            }
            chain.insert(id);
            if !go_on {
                return chain;
            }
        }
    }
    chain
}

/// The conflicted state subgraph (state resolution v2.1): every event that is
/// reachable through `auth_events` from some conflicted state event and from
/// which some conflicted state event is reachable, the conflicted events
/// included.
pub fn conflicted_state_subgraph(
    conflicted: &[OwnedEventId],
    fetch: impl Fn(&EventId) -> Option<Arc<Pdu>>,
) -> HashSet<OwnedEventId> {
    let seeds: HashSet<&OwnedEventId> = conflicted.iter().collect();
    // Everything reachable from the conflicted events, with its auth edges.
    let mut edges: HashMap<OwnedEventId, Vec<OwnedEventId>> = HashMap::new();
    let mut todo: Vec<OwnedEventId> = conflicted.to_vec();
    while let Some(id) = todo.pop() {
        if edges.contains_key(&id) {
            continue;
        }
        let parents = fetch(&id)
            .map(|p| p.auth_events().to_vec())
            .unwrap_or_default();
        todo.extend(parents.iter().filter(|p| !edges.contains_key(*p)).cloned());
        edges.insert(id, parents);
    }
    // Which of those reach a conflicted event: memoised depth-first search
    // (iterative, since auth chains can be long).
    let mut reaches: HashMap<OwnedEventId, bool> = HashMap::new();
    for start in edges.keys() {
        if reaches.contains_key(start) {
            continue;
        }
        let mut stack: Vec<(OwnedEventId, usize)> = vec![(start.clone(), 0)];
        let mut on_stack: HashSet<OwnedEventId> = HashSet::from([start.clone()]);
        while let Some((node, next_child)) = stack.pop() {
            let children = &edges[&node];
            if next_child < children.len() {
                stack.push((node.clone(), next_child + 1));
                let child = &children[next_child];
                if edges.contains_key(child)
                    && !reaches.contains_key(child)
                    && on_stack.insert(child.clone())
                {
                    stack.push((child.clone(), 0));
                }
                continue;
            }
            let reached = children
                .iter()
                .any(|c| seeds.contains(c) || reaches.get(c).copied().unwrap_or(false));
            reaches.insert(node.clone(), reached);
            on_stack.remove(&node);
        }
    }
    edges
        .keys()
        .filter(|id| seeds.contains(id) || reaches.get(*id).copied().unwrap_or(false))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests;
