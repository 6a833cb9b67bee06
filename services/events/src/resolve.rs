//! State resolution through ruma (no hand-written algorithm), plus the two
//! inputs ruma asks the caller for: each fork's auth chain and, from room
//! version 12, the conflicted state subgraph.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

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
/// event of the forks and of their auth chains that the server has.
pub fn resolve(
    rules: &RoomVersionRules,
    forks: &[StateIds],
    fetch: impl Fn(&EventId) -> Option<Arc<Pdu>>,
) -> Result<StateIds, ResolveError> {
    let StateResolutionVersion::V2(state_res_rules) = &rules.state_res else {
        return Err(ResolveError::UnsupportedVersion);
    };
    if forks.len() == 1 {
        return Ok(forks[0].clone());
    }
    let ruma_forks: Vec<StateMap> = forks
        .iter()
        .map(|fork| fork.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .collect();
    let auth_chains: Vec<EventIdSet<OwnedEventId>> = auth_chains_for_difference(forks, &fetch)
        .into_iter()
        .map(|chain| chain.into_iter().collect())
        .collect();
    let resolved = ruma::state_res::resolve(
        &rules.authorization,
        state_res_rules,
        ruma_forks.iter(),
        auth_chains,
        &fetch,
        |conflicted| {
            let seeds: Vec<OwnedEventId> = conflicted.values().flatten().cloned().collect();
            Some(
                conflicted_state_subgraph(&seeds, &fetch)
                    .into_iter()
                    .collect(),
            )
        },
    )?;
    // The result as the first fork with the slots resolution changed, so it
    // shares that fork's structure: diffs and comparisons against it, or
    // against states derived from it, skip what did not change.
    let base = &forks[0];
    let mut result = base.clone();
    for (key, id) in &resolved {
        if base.get(key) != Some(id) {
            result.insert(key.clone(), id.clone());
        }
    }
    if result.len() != resolved.len() {
        for key in base.keys() {
            if !resolved.contains_key(key) {
                result.remove(key);
            }
        }
    }
    Ok(result)
}

/// What ruma needs of each fork's auth chain: the auth difference (the
/// events in some forks' full auth chains and not in all) and nothing else,
/// so each fork's chain cut down to where that difference can lie.
///
/// With U the events the forks agree on, C_i fork i's conflicted events,
/// X_i the auth chain of C_i and Y that of U, fork i's full chain is
/// Y ∪ X_i, and the difference is (∪X_i) − Y − (∩X_i): it lies within
/// Z = ∪X_i, and the sets X_i ∪ (Y ∩ Z) have the same difference as the
/// full chains. So the unconflicted state's chain is walked once, not once
/// per fork, and ruma counts a few events, not every fork's whole chain.
pub fn auth_chains_for_difference(
    forks: &[StateIds],
    fetch: impl Fn(&EventId) -> Option<Arc<Pdu>>,
) -> Vec<HashSet<OwnedEventId>> {
    let Some((base, others)) = forks.split_first() else {
        return Vec::new();
    };
    let conflicted: HashSet<StateKey> = others
        .iter()
        .flat_map(|fork| crate::state_map::diff(base, fork))
        .map(|(key, _)| key)
        .collect();
    let conflicted_chains: Vec<HashSet<OwnedEventId>> = forks
        .iter()
        .map(|fork| {
            auth_chain(
                conflicted.iter().filter_map(|key| fork.get(key).cloned()),
                &fetch,
            )
        })
        .collect();
    let reachable: HashSet<&OwnedEventId> = conflicted_chains.iter().flatten().collect();
    let unconflicted_chain = auth_chain(
        base.iter()
            .filter(|(key, _)| !conflicted.contains(*key))
            .map(|(_, id)| id.clone()),
        &fetch,
    );
    let shared: Vec<OwnedEventId> = reachable
        .into_iter()
        .filter(|id| unconflicted_chain.contains(*id))
        .cloned()
        .collect();
    conflicted_chains
        .into_iter()
        .map(|mut chain| {
            chain.extend(shared.iter().cloned());
            chain
        })
        .collect()
}

/// The full recursive auth chain of some events (not including the events
/// themselves unless one is in another's chain).
pub fn auth_chain(
    events: impl IntoIterator<Item = OwnedEventId>,
    fetch: impl Fn(&EventId) -> Option<Arc<Pdu>>,
) -> HashSet<OwnedEventId> {
    let mut chain = HashSet::new();
    let mut todo: Vec<OwnedEventId> = Vec::new();
    for id in events {
        if let Some(pdu) = fetch(&id) {
            todo.extend(pdu.auth_events().iter().cloned());
        }
    }
    while let Some(id) = todo.pop() {
        if chain.insert(id.clone())
            && let Some(pdu) = fetch(&id)
        {
            todo.extend(
                pdu.auth_events()
                    .iter()
                    .filter(|a| !chain.contains(*a))
                    .cloned(),
            );
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
