//! Walking a room's event graph in storage: auth chains, the events before
//! some others (backfill), the gap between two sets (get_missing_events).
//! Every walk is bounded, and rejected events are left out of what it finds.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tessera_events::Pdu;
use tessera_events::ruma::{EventId, OwnedEventId, RoomId};
use tessera_storage::{Store, StoreError};

const MAX_WALK: usize = 10_000;

/// Load events by ID (timeline or outliers) of one room, parsed.
pub async fn load(
    store: &Store,
    room_id: &RoomId,
    ids: &[OwnedEventId],
) -> Result<HashMap<OwnedEventId, (Arc<Pdu>, bool)>, StoreError> {
    let wanted: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
    let mut out = HashMap::new();
    for known in store.known_events(&wanted).await? {
        if known.room_id != room_id.as_str() {
            continue;
        }
        let Ok(id) = EventId::parse(known.event_id.as_str()) else {
            continue;
        };
        if let Ok(pdu) = Pdu::from_canonical_text(id.clone(), room_id, &known.json, known.rejected)
        {
            out.insert(id, (Arc::new(pdu), known.outlier));
        }
    }
    Ok(out)
}

/// The full auth chain of some events (not the events themselves).
pub async fn auth_chain(
    store: &Store,
    room_id: &RoomId,
    roots: &[Arc<Pdu>],
) -> Result<Vec<Arc<Pdu>>, StoreError> {
    let auth_events = roots.iter().flat_map(|p| p.auth_events().to_vec());
    auth_chain_from(store, room_id, auth_events.collect()).await
}

/// Some auth events and their full auth chain, lowest depth first.
async fn auth_chain_from(
    store: &Store,
    room_id: &RoomId,
    auth_events: Vec<OwnedEventId>,
) -> Result<Vec<Arc<Pdu>>, StoreError> {
    let mut seen: HashSet<OwnedEventId> = HashSet::new();
    let mut chain = Vec::new();
    let mut frontier = auth_events;
    while !frontier.is_empty() && seen.len() < MAX_WALK {
        frontier.retain(|id| seen.insert(id.clone()));
        let loaded = load(store, room_id, &frontier).await?;
        frontier = Vec::new();
        for (pdu, _) in loaded.into_values() {
            frontier.extend(
                pdu.auth_events()
                    .iter()
                    .filter(|a| !seen.contains(*a))
                    .cloned(),
            );
            // Rejected events are never served to other servers.
            if !pdu.rejected() {
                chain.push(pdu);
            }
        }
    }
    chain.sort_by_key(|p| p.depth());
    Ok(chain)
}

/// Walk back through prev_events from `from`, not past `stop`, collecting up
/// to `limit` timeline events (the starting ones included when `include_start`).
pub async fn walk_back(
    store: &Store,
    room_id: &RoomId,
    from: &[OwnedEventId],
    stop: &HashSet<OwnedEventId>,
    limit: usize,
    include_start: bool,
) -> Result<Vec<Arc<Pdu>>, StoreError> {
    let mut seen: HashSet<OwnedEventId> = stop.clone();
    let mut out = Vec::new();
    let mut frontier: Vec<OwnedEventId> = if include_start {
        from.to_vec()
    } else {
        let starts = load(store, room_id, from).await?;
        starts
            .values()
            .flat_map(|(p, _)| p.prev_events().to_vec())
            .collect()
    };
    while !frontier.is_empty() && out.len() < limit {
        frontier.retain(|id| seen.insert(id.clone()));
        let mut loaded: Vec<Arc<Pdu>> = load(store, room_id, &frontier)
            .await?
            .into_values()
            .filter(|(_, outlier)| !outlier)
            .map(|(p, _)| p)
            .collect();
        loaded.sort_by_key(|p| std::cmp::Reverse(p.depth()));
        frontier = Vec::new();
        for pdu in loaded {
            if out.len() >= limit {
                break;
            }
            frontier.extend(
                pdu.prev_events()
                    .iter()
                    .filter(|p| !seen.contains(*p))
                    .cloned(),
            );
            // The walk goes on through a rejected event, which is never
            // served to other servers.
            if !pdu.rejected() {
                out.push(pdu);
            }
        }
    }
    Ok(out)
}
