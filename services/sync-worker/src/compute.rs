//! One `/sync` response.
//!
//! Inputs: the since positions `T` (none for an initial sync) and this worker's
//! snapshot `V`. The response covers exactly the events in `(T, N]` per
//! partition, where `N = max(T, V)`, and the next token is `N`: every read from
//! Postgres below is bounded by `N`, so what a later commit adds waits for the
//! next sync instead of being shown twice.

use std::collections::{BTreeMap, HashMap};

use serde_json::{Map, Value, json};
use tessera_events::visibility::Visibility;
use tessera_matrix_http::filter::{EventFilter, SyncFilter};
use tessera_matrix_http::render::{Viewer, now_ms, render};
use tessera_replication::token::merge;
use tessera_storage::events::{Direction, StoredEvent};
use tessera_storage::rooms::{Members, MembershipRow};
use tessera_storage::{Store, StoreError};

use crate::view::{View, user_key};

pub struct Request<'a> {
    pub user_id: &'a str,
    pub device_id: &'a str,
    /// (positions, user data position) of the since token.
    pub since: Option<(&'a [i64], i64)>,
    pub filter: &'a SyncFilter,
    pub full_state: bool,
    pub timeline_limit: i64,
    pub partitions: u32,
}

pub struct Response {
    pub body: Map<String, Value>,
    pub has_content: bool,
    pub positions: Vec<i64>,
    pub user_pos: i64,
    /// Keys whose activity should wake this user's long-poll.
    pub wait_keys: Vec<String>,
}

const STRIPPED_STATE_TYPES: [&str; 7] = [
    "m.room.create",
    "m.room.join_rules",
    "m.room.name",
    "m.room.avatar",
    "m.room.canonical_alias",
    "m.room.topic",
    "m.room.encryption",
];

fn kind_of(event: &StoredEvent) -> Option<(String, Option<String>, String)> {
    let pdu = event.pdu().ok()?;
    Some((
        pdu.kind().to_string(),
        pdu.state_key().map(str::to_owned),
        pdu.sender().to_string(),
    ))
}

fn filtered(events: Vec<StoredEvent>, filter: &EventFilter) -> Vec<StoredEvent> {
    events
        .into_iter()
        .filter(|e| filter.matches_event(e))
        .collect()
}

/// `joined_hint`: rooms the user was joined to when last looked at (the
/// keys the long-poll waits on; keys that are not room IDs are ignored).
/// Their new events are read at the same time as the user's memberships
/// instead of after them; a hint that turns out wrong costs a read that is
/// not used.
pub async fn compute(
    store: &Store,
    view: &View,
    request: &Request<'_>,
    snapshot: &[i64],
    joined_hint: &[String],
) -> Result<Response, StoreError> {
    let initial = request.since.is_none();
    let zeros = vec![0i64; snapshot.len()];
    let since = request.since.map(|(p, _)| p).unwrap_or(&zeros);
    let next = if initial {
        snapshot.to_vec()
    } else {
        merge(since, snapshot)
    };
    let viewer = Viewer {
        user_id: request.user_id,
        device_id: request.device_id,
    };
    let now = now_ms();
    let render_list = |events: &[StoredEvent]| -> Vec<Value> {
        events
            .iter()
            .filter_map(|e| render(e, viewer, now, false))
            .collect()
    };

    // Account data changed since the token (all of it for an initial sync),
    // the user's memberships, and the new events of the rooms the user was
    // joined to that have any: independent reads, made at once, so that a
    // woken long-poll waits for one round trip here rather than two.
    let since_user_pos = request.since.map(|(_, u)| u).unwrap_or(0);
    let (account_rows, memberships, mut prefetched) = tokio::try_join!(
        store.account_data_since(request.user_id, since_user_pos),
        store.membership_history(request.user_id),
        prefetch_timelines(store, view, request, since, &next, joined_hint),
    )?;
    let user_pos = account_rows
        .iter()
        .map(|r| r.stream_pos)
        .max()
        .unwrap_or(since_user_pos)
        .max(since_user_pos);
    let mut global_account_data = Vec::new();
    let mut room_account_data: HashMap<String, Vec<Value>> = HashMap::new();
    for row in account_rows {
        let event = json!({ "type": row.kind, "content": row.content });
        if row.room_id.is_empty() {
            if request
                .filter
                .account_data
                .matches(&row.kind, request.user_id)
            {
                global_account_data.push(event);
            }
        } else if request
            .filter
            .room_account_data
            .matches(&row.kind, request.user_id)
        {
            room_account_data
                .entry(row.room_id)
                .or_default()
                .push(event);
        }
    }

    let mut by_room: BTreeMap<String, Vec<MembershipRow>> = BTreeMap::new();
    for row in memberships {
        by_room.entry(row.room_id.clone()).or_default().push(row);
    }

    let mut join = Map::new();
    let mut invite = Map::new();
    let mut knock = Map::new();
    let mut leave = Map::new();
    let mut wait_keys = vec![user_key(request.user_id)];

    for (room_id, rows) in &by_room {
        if !request.filter.wants_room(room_id) {
            continue;
        }
        let p = tessera_cluster::partition_of(room_id, request.partitions) as usize;
        let (upto, after) = (next[p], since[p]);
        let Some(now_row) = rows.iter().rev().find(|r| r.pos <= upto) else {
            continue;
        };
        let since_row = if initial {
            None
        } else {
            rows.iter().rev().find(|r| r.pos <= after)
        };
        let changed = since_row.map(|r| r.pos) != Some(now_row.pos);
        let account_data = room_account_data.remove(room_id).unwrap_or_default();
        match now_row.membership.as_str() {
            "join" => {
                wait_keys.push(room_id.clone());
                let newly = initial
                    || request.full_state
                    || since_row.map(|r| r.membership.as_str()) != Some("join");
                // Membership changes inside the range mean some events may be hidden.
                let check_visibility = newly || rows.iter().any(|r| r.pos > after && r.pos <= upto);
                if let Some(room) = joined_room(
                    store,
                    view,
                    request,
                    room_id,
                    p as u32,
                    after,
                    upto,
                    newly,
                    check_visibility,
                    rows,
                    &render_list,
                    prefetched.remove(room_id),
                )
                .await?
                {
                    let mut room = room;
                    room.insert("account_data".into(), json!({ "events": account_data }));
                    join.insert(room_id.clone(), Value::Object(room));
                } else if !account_data.is_empty() {
                    join.insert(
                        room_id.clone(),
                        json!({
                            "timeline": { "events": [], "limited": false },
                            "state": { "events": [] },
                            "account_data": { "events": account_data },
                            "ephemeral": { "events": [] },
                        }),
                    );
                }
            }
            "invite" | "knock" if changed || initial => {
                let state = stripped_state(store, room_id, now_row).await?;
                if now_row.membership == "invite" {
                    invite.insert(
                        room_id.clone(),
                        json!({ "invite_state": { "events": state } }),
                    );
                } else {
                    knock.insert(
                        room_id.clone(),
                        json!({ "knock_state": { "events": state } }),
                    );
                }
            }
            "leave" | "ban"
                if (changed && !initial) || (initial && request.filter.include_leave) =>
            {
                let left_at = now_row.pos;
                let from = if initial { 0 } else { after };
                let mut timeline = newest_events(store, request, room_id, from, left_at).await?;
                let limited = timeline.len() as i64 > request.timeline_limit;
                timeline.truncate(request.timeline_limit as usize);
                timeline.reverse();
                let visibility = load_visibility(store, room_id, rows).await?;
                timeline.retain(|e| visible(&visibility, e, request.user_id));
                let first = timeline.first().map(|e| e.pos).unwrap_or(left_at + 1);
                let state = state_before_timeline(
                    store,
                    request,
                    room_id,
                    &timeline,
                    (after, first - 1),
                    initial,
                    limited,
                )
                .await?;
                leave.insert(
                    room_id.clone(),
                    json!({
                        "timeline": {
                            "events": render_list(&filtered(timeline, &request.filter.timeline)),
                            "limited": limited,
                            "prev_batch": format!("t{}", first - 1),
                        },
                        "state": { "events": render_list(&filtered(state, &request.filter.state)) },
                        "account_data": { "events": account_data },
                    }),
                );
            }
            _ => {}
        }
    }

    let has_content = !join.is_empty()
        || !invite.is_empty()
        || !knock.is_empty()
        || !leave.is_empty()
        || !global_account_data.is_empty();
    let mut body = Map::new();
    body.insert(
        "rooms".into(),
        json!({ "join": join, "invite": invite, "knock": knock, "leave": leave }),
    );
    body.insert(
        "account_data".into(),
        json!({ "events": global_account_data }),
    );
    body.insert("presence".into(), json!({ "events": [] }));
    Ok(Response {
        body,
        has_content,
        positions: next,
        user_pos,
        wait_keys,
    })
}

/// A room's newest events in `(from, upto]`, newest first: one more than
/// the timeline limit, so that the caller can tell whether it is limited.
/// Every timeline read goes through here, so a prefetched read is the same
/// read `joined_room` would make.
async fn newest_events(
    store: &Store,
    request: &Request<'_>,
    room_id: &str,
    from: i64,
    upto: i64,
) -> Result<Vec<StoredEvent>, StoreError> {
    store
        .room_events(
            room_id,
            from,
            upto,
            Direction::Backward,
            request.timeline_limit + 1,
        )
        .await
}

/// The timeline reads `joined_room` will make for the hinted rooms that are
/// not newly joined (so read from the since position) and have events after
/// it: same arguments, made ahead, [`PREFETCH_CONCURRENCY`] at a time (a
/// device in a flooded room and a quiet one waits for one round trip, not
/// two; one catching up on hundreds of rooms does not take the whole pool).
/// Keyed by room ID.
async fn prefetch_timelines(
    store: &Store,
    view: &View,
    request: &Request<'_>,
    since: &[i64],
    next: &[i64],
    joined_hint: &[String],
) -> Result<HashMap<String, Vec<StoredEvent>>, StoreError> {
    use futures::{StreamExt, TryStreamExt};
    if request.since.is_none() || request.full_state {
        return Ok(HashMap::new());
    }
    let with_news: Vec<(String, i64, i64)> = joined_hint
        .iter()
        .filter(|key| key.starts_with('!') && request.filter.wants_room(key))
        .filter_map(|room_id| {
            let p = tessera_cluster::partition_of(room_id, request.partitions);
            let (after, upto) = (since[p as usize], next[p as usize]);
            view.room_head_after(room_id, p, after)
                .is_some_and(|head| head > after)
                .then(|| (room_id.clone(), after, upto))
        })
        .collect();
    futures::stream::iter(with_news)
        .map(|(room_id, after, upto)| async move {
            let events = newest_events(store, request, &room_id, after, upto).await?;
            Ok::<_, StoreError>((room_id, events))
        })
        .buffer_unordered(PREFETCH_CONCURRENCY)
        .try_collect()
        .await
}

/// Timeline reads one sync makes at once ahead of time.
const PREFETCH_CONCURRENCY: usize = 4;

async fn load_visibility(
    store: &Store,
    room_id: &str,
    rows: &[MembershipRow],
) -> Result<Visibility, StoreError> {
    Ok(Visibility::new(
        rows.iter().map(|r| (r.pos, r.membership.clone())).collect(),
        store.history_visibility_changes(room_id).await?,
    ))
}

fn visible(visibility: &Visibility, event: &StoredEvent, user_id: &str) -> bool {
    let own = kind_of(event)
        .is_some_and(|(kind, key, _)| kind == "m.room.member" && key.as_deref() == Some(user_id));
    visibility.can_see(event.pos, own)
}

#[allow(clippy::too_many_arguments)]
async fn joined_room(
    store: &Store,
    view: &View,
    request: &Request<'_>,
    room_id: &str,
    partition: u32,
    after: i64,
    upto: i64,
    newly: bool,
    check_visibility: bool,
    rows: &[MembershipRow],
    render_list: &impl Fn(&[StoredEvent]) -> Vec<Value>,
    prefetched: Option<Vec<StoredEvent>>,
) -> Result<Option<Map<String, Value>>, StoreError> {
    if !newly
        && let Some(head) = view.room_head_after(room_id, partition, after)
        && head <= after
    {
        return Ok(None);
    }
    let from = if newly { 0 } else { after };
    let mut timeline = match prefetched {
        // Read with `from == after`, which is only right when not newly joined.
        Some(events) if !newly => events,
        _ => newest_events(store, request, room_id, from, upto).await?,
    };
    if !newly && timeline.is_empty() {
        return Ok(None);
    }
    let limited = timeline.len() as i64 > request.timeline_limit;
    timeline.truncate(request.timeline_limit as usize);
    timeline.reverse();
    if check_visibility {
        let visibility = load_visibility(store, room_id, rows).await?;
        timeline.retain(|e| visible(&visibility, e, request.user_id));
    }
    let first = timeline.first().map(|e| e.pos).unwrap_or(upto + 1);
    let state = state_before_timeline(
        store,
        request,
        room_id,
        &timeline,
        (after, first - 1),
        newly,
        limited,
    )
    .await?;
    let mut room = Map::new();
    // With lazy-loaded members, a gap's member changes are not in `state`:
    // a limited timeline then always gets the summary.
    let membership_changed = newly
        || (limited && request.filter.state.lazy_load_members)
        || timeline
            .iter()
            .any(|e| kind_of(e).is_some_and(|(k, _, _)| k == "m.room.member"))
        || state
            .iter()
            .any(|e| kind_of(e).is_some_and(|(k, _, _)| k == "m.room.member"));
    if membership_changed {
        let (joined, invited) = store.member_counts(room_id).await?;
        let heroes = store.heroes(room_id, request.user_id, 5).await?;
        room.insert(
            "summary".into(),
            json!({ "m.joined_member_count": joined, "m.invited_member_count": invited, "m.heroes": heroes }),
        );
    }
    room.insert(
        "timeline".into(),
        json!({
            "events": render_list(&filtered(timeline, &request.filter.timeline)),
            "limited": limited,
            "prev_batch": format!("t{}", first - 1),
        }),
    );
    room.insert(
        "state".into(),
        json!({ "events": render_list(&filtered(state, &request.filter.state)) }),
    );
    room.insert("ephemeral".into(), json!({ "events": [] }));
    Ok(Some(room))
}

/// A room's state section: the state before its timeline (at `before`),
/// whole (`whole`: an initial sync, a new join, `full_state`), as changed
/// since `after` (a limited timeline), or nothing. With lazy-loaded members,
/// of the member events only those of the timeline's senders (and, in a
/// whole state, the syncing user's), whether they changed or not: a room of
/// 20,000 members costs its timeline's senders, not 20,000 events. They are
/// sent again on later syncs (as with `include_redundant_members`), which
/// clients take as they take any state.
async fn state_before_timeline(
    store: &Store,
    request: &Request<'_>,
    room_id: &str,
    timeline: &[StoredEvent],
    (after, before): (i64, i64),
    whole: bool,
    limited: bool,
) -> Result<Vec<StoredEvent>, StoreError> {
    if !request.filter.state.lazy_load_members {
        return if whole {
            store.state_at(room_id, before).await
        } else if limited {
            store.state_changes(room_id, after, before).await
        } else {
            Ok(vec![])
        };
    }
    let mut senders: Vec<String> = timeline
        .iter()
        .filter_map(|e| kind_of(e).map(|(_, _, sender)| sender))
        .collect();
    if whole {
        senders.push(request.user_id.to_owned());
    }
    senders.sort_unstable();
    senders.dedup();
    if whole {
        return store
            .state_at_with(room_id, before, Members::Only(&senders))
            .await;
    }
    let mut state = if limited {
        store
            .state_changes_with(room_id, after, before, Members::Only(&[]))
            .await?
    } else {
        vec![]
    };
    state.extend(store.members_at(room_id, before, &senders).await?);
    state.sort_by_key(|e| e.pos);
    Ok(state)
}

/// The stripped state shown with an invite or knock: the room's basics at
/// that point, and the membership event itself.
async fn stripped_state(
    store: &Store,
    room_id: &str,
    row: &MembershipRow,
) -> Result<Vec<Value>, StoreError> {
    if let Some(invite) = store.out_of_band_membership(&row.event_id).await? {
        // An invite to a room hosted elsewhere: what the inviting server told us.
        let own = invite.pdu().ok();
        let mut events = match invite.stripped_state {
            Value::Array(events) => events,
            _ => Vec::new(),
        };
        events.extend(own.map(|pdu| tessera_events::client::stripped_state(&pdu)));
        return Ok(events);
    }
    let mut events = Vec::new();
    for stored in store.state_at(room_id, row.pos).await? {
        let Ok(pdu) = stored.pdu() else { continue };
        let kind = pdu.kind().to_string();
        let is_own = stored.event_id == row.event_id;
        if is_own || (STRIPPED_STATE_TYPES.contains(&kind.as_str()) && pdu.state_key() == Some(""))
        {
            events.push(tessera_events::client::stripped_state(&pdu));
        }
    }
    Ok(events)
}
