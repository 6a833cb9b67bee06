//! Reading rooms: `/event`, `/state`, `/messages`, `/context`, `/members`,
//! `/joined_members`, `/joined_rooms`. Straight from Postgres, filtered by
//! history visibility.

use axum::Json;
use axum::extract::{Path, Query, State};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tessera_matrix_http::auth::Authed;
use tessera_matrix_http::filter::EventFilter;
use tessera_matrix_http::render::{Viewer, render, render_all};
use tessera_matrix_http::{MatrixError, MatrixResult};
use tessera_storage::events::{Direction, StoredEvent};

use super::membership::parse_room_id;
use crate::state::AppState;
use tessera_events::visibility::Visibility;

pub async fn load_visibility(
    state: &AppState,
    room_id: &str,
    user_id: &str,
) -> MatrixResult<Visibility> {
    Ok(Visibility::new(
        state
            .store
            .room_membership_history(room_id, user_id)
            .await?,
        state.store.history_visibility_changes(room_id).await?,
    ))
}

fn viewer(auth: &Authed) -> Viewer<'_> {
    Viewer {
        user_id: auth.user_id.as_str(),
        device_id: &auth.device_id,
    }
}

/// Visibility for the user, or 403 if they have never been able to read the room.
async fn access(state: &AppState, room_id: &str, auth: &Authed) -> MatrixResult<Visibility> {
    if state.store.room(room_id).await?.is_none() {
        return Err(MatrixError::forbidden(
            "You are not allowed to view this room (unknown room)",
        ));
    }
    let visibility = load_visibility(state, room_id, auth.user_id.as_str()).await?;
    if visibility.readable_upto() == Some(-1) && !visibility.world_readable_now() {
        return Err(MatrixError::forbidden("You are not in this room"));
    }
    Ok(visibility)
}

/// The state the user may read: current state for members (and world-readable
/// rooms), the state at their leave for those who left.
async fn readable_state(
    state: &AppState,
    room_id: &str,
    visibility: &Visibility,
) -> MatrixResult<Vec<StoredEvent>> {
    match visibility.readable_upto() {
        Some(pos) if pos >= 0 && !visibility.world_readable_now() => {
            Ok(state.store.state_at(room_id, pos).await?)
        }
        _ => Ok(state.store.current_state(room_id).await?),
    }
}

fn visible(visibility: &Visibility, event: &StoredEvent, user_id: &str) -> bool {
    let own = event
        .pdu()
        .map(|p| p.kind().to_string() == "m.room.member" && p.state_key() == Some(user_id))
        .unwrap_or(false);
    visibility.can_see(event.pos, own)
}

pub async fn event(
    State(state): State<AppState>,
    auth: Authed,
    Path((room, event)): Path<(String, String)>,
) -> MatrixResult<Json<Value>> {
    let room_id = parse_room_id(&room)?;
    let not_found = || MatrixError::not_found("Event not found");
    let stored = state.store.event(&event).await?.ok_or_else(not_found)?;
    if stored.room_id != room_id.as_str() || stored.hidden_from_clients() {
        return Err(not_found());
    }
    let visibility = load_visibility(&state, room_id.as_str(), auth.user_id.as_str()).await?;
    if !visible(&visibility, &stored, auth.user_id.as_str()) {
        return Err(not_found());
    }
    render(
        &stored,
        viewer(&auth),
        tessera_matrix_http::render::now_ms(),
        true,
    )
    .map(Json)
    .ok_or_else(|| MatrixError::internal("Cannot render the event"))
}

#[derive(Deserialize, Default)]
pub struct StateQuery {
    format: Option<String>,
}

pub async fn state_event(
    State(state): State<AppState>,
    auth: Authed,
    Path((room, kind, key)): Path<(String, String, String)>,
    Query(query): Query<StateQuery>,
) -> MatrixResult<Json<Value>> {
    state_event_inner(state, auth, room, kind, key, query).await
}

pub async fn state_event_empty_key(
    State(state): State<AppState>,
    auth: Authed,
    Path((room, kind)): Path<(String, String)>,
    Query(query): Query<StateQuery>,
) -> MatrixResult<Json<Value>> {
    state_event_inner(state, auth, room, kind, String::new(), query).await
}

async fn state_event_inner(
    state: AppState,
    auth: Authed,
    room: String,
    kind: String,
    key: String,
    query: StateQuery,
) -> MatrixResult<Json<Value>> {
    let room_id = parse_room_id(&room)?;
    let visibility = access(&state, room_id.as_str(), &auth).await?;
    let events = readable_state(&state, room_id.as_str(), &visibility).await?;
    let found = events.iter().find_map(|e| {
        let pdu = e.pdu().ok()?;
        (pdu.kind().to_string() == kind && pdu.state_key() == Some(key.as_str())).then_some(e)
    });
    let stored = found.ok_or_else(|| {
        MatrixError::not_found(format!("Event not found: no {kind} with state key {key:?}"))
    })?;
    let rendered = render(
        stored,
        viewer(&auth),
        tessera_matrix_http::render::now_ms(),
        true,
    )
    .ok_or_else(|| MatrixError::internal("Cannot render the event"))?;
    if query.format.as_deref() == Some("event") {
        return Ok(Json(rendered));
    }
    Ok(Json(rendered.get("content").cloned().unwrap_or(json!({}))))
}

pub async fn room_state(
    State(state): State<AppState>,
    auth: Authed,
    Path(room): Path<String>,
) -> MatrixResult<Json<Value>> {
    let room_id = parse_room_id(&room)?;
    let visibility = access(&state, room_id.as_str(), &auth).await?;
    let events = readable_state(&state, room_id.as_str(), &visibility).await?;
    Ok(Json(Value::Array(render_all(&events, viewer(&auth), true))))
}

/// A pagination token inside one room: `t<pos>` is the boundary right after
/// position `pos`. Sync tokens are accepted too (clients use `prev_batch`).
pub async fn parse_room_token(state: &AppState, token: &str, partition: u32) -> MatrixResult<i64> {
    if let Some(pos) = token.strip_prefix('t') {
        return pos.parse::<i64>().map_err(|_| {
            MatrixError::invalid_param(format!("Invalid pagination token {token:?}"))
        });
    }
    if token.starts_with('s') {
        let decoded = tessera_replication::token::Token::decode(token)?;
        let checkpoint = state
            .store
            .checkpoint(decoded.checkpoint as i64)
            .await?
            .ok_or_else(|| MatrixError::invalid_param("Sync token has expired"))?;
        let positions = decoded.positions(&checkpoint)?;
        return positions
            .get(partition as usize)
            .copied()
            .ok_or_else(|| MatrixError::invalid_param("Invalid sync token"));
    }
    Err(MatrixError::invalid_param(format!(
        "Invalid pagination token {token:?}"
    )))
}

#[derive(Deserialize)]
pub struct MessagesQuery {
    from: Option<String>,
    to: Option<String>,
    dir: Option<String>,
    limit: Option<String>,
    filter: Option<String>,
}

fn parse_limit(limit: Option<&str>, default: i64) -> MatrixResult<i64> {
    match limit {
        None => Ok(default),
        Some(text) => text
            .parse::<i64>()
            .ok()
            .filter(|l| *l >= 0)
            .map(|l| l.min(1000))
            .ok_or_else(|| MatrixError::invalid_param("limit must be a non-negative integer")),
    }
}

pub async fn messages(
    State(state): State<AppState>,
    auth: Authed,
    Path(room): Path<String>,
    Query(query): Query<MessagesQuery>,
) -> MatrixResult<Json<Value>> {
    let room_id = parse_room_id(&room)?;
    let dir = match query.dir.as_deref() {
        Some("b") | None => Direction::Backward,
        Some("f") => Direction::Forward,
        Some(other) => {
            return Err(MatrixError::invalid_param(format!(
                "dir must be 'b' or 'f', not {other:?}"
            )));
        }
    };
    let limit = parse_limit(query.limit.as_deref(), 10)?;
    let filter = EventFilter::from_query(query.filter.as_deref())?;
    let visibility = access(&state, room_id.as_str(), &auth).await?;
    let room_row = state
        .store
        .room(room_id.as_str())
        .await?
        .ok_or_else(|| MatrixError::not_found("Unknown room"))?;
    let upper = visibility
        .readable_upto()
        .filter(|p| *p >= 0 && !visibility.world_readable_now())
        .unwrap_or(room_row.head_pos);
    let from = match &query.from {
        Some(token) => parse_room_token(&state, token, room_row.partition).await?,
        None => match dir {
            Direction::Backward => room_row.head_pos,
            Direction::Forward => 0,
        },
    };
    let to = match &query.to {
        Some(token) => Some(parse_room_token(&state, token, room_row.partition).await?),
        None => None,
    };

    // Page through storage until `limit` visible events are found or the room ends.
    let mut chunk: Vec<StoredEvent> = Vec::new();
    let mut cursor = from;
    let mut exhausted = false;
    for _ in 0..20 {
        if chunk.len() as i64 >= limit {
            break;
        }
        let (after, upto) = match dir {
            Direction::Backward => (to.unwrap_or(0).max(0), cursor.min(upper)),
            Direction::Forward => (cursor, to.unwrap_or(upper).min(upper)),
        };
        if after >= upto {
            exhausted = true;
            break;
        }
        let want = (limit - chunk.len() as i64).max(1) * 2;
        let page = state
            .store
            .room_events(room_id.as_str(), after, upto, dir, want)
            .await?;
        if page.is_empty() {
            exhausted = true;
            break;
        }
        for event in page {
            cursor = match dir {
                Direction::Backward => event.pos - 1,
                Direction::Forward => event.pos,
            };
            if visible(&visibility, &event, auth.user_id.as_str()) && filter.matches_event(&event) {
                chunk.push(event);
                if chunk.len() as i64 >= limit {
                    break;
                }
            }
        }
    }
    let mut body = json!({
        "chunk": render_all(&chunk, viewer(&auth), true),
        "start": format!("t{from}"),
        "state": [],
    });
    if !exhausted && limit > 0 {
        body["end"] = json!(format!("t{cursor}"));
    }
    Ok(Json(body))
}

#[derive(Deserialize)]
pub struct ContextQuery {
    limit: Option<String>,
    filter: Option<String>,
}

pub async fn context(
    State(state): State<AppState>,
    auth: Authed,
    Path((room, event)): Path<(String, String)>,
    Query(query): Query<ContextQuery>,
) -> MatrixResult<Json<Value>> {
    let room_id = parse_room_id(&room)?;
    let limit = parse_limit(query.limit.as_deref(), 10)?;
    let filter = EventFilter::from_query(query.filter.as_deref())?;
    let not_found = || MatrixError::not_found("Event not found");
    let stored = state.store.event(&event).await?.ok_or_else(not_found)?;
    if stored.room_id != room_id.as_str() || stored.hidden_from_clients() {
        return Err(not_found());
    }
    let visibility = access(&state, room_id.as_str(), &auth).await?;
    if !visible(&visibility, &stored, auth.user_id.as_str()) {
        return Err(not_found());
    }
    let room_row = state
        .store
        .room(room_id.as_str())
        .await?
        .ok_or_else(not_found)?;
    let upper = visibility
        .readable_upto()
        .filter(|p| *p >= 0 && !visibility.world_readable_now())
        .unwrap_or(room_row.head_pos);
    let before_n = limit / 2;
    let after_n = limit - before_n;
    let keep = |events: Vec<StoredEvent>| -> Vec<StoredEvent> {
        events
            .into_iter()
            .filter(|e| visible(&visibility, e, auth.user_id.as_str()) && filter.matches_event(e))
            .collect()
    };
    let before = keep(
        state
            .store
            .room_events(
                room_id.as_str(),
                0,
                stored.pos - 1,
                Direction::Backward,
                before_n,
            )
            .await?,
    );
    let after = keep(
        state
            .store
            .room_events(
                room_id.as_str(),
                stored.pos,
                upper,
                Direction::Forward,
                after_n,
            )
            .await?,
    );
    let start = before.last().map(|e| e.pos - 1).unwrap_or(stored.pos - 1);
    let end = after.last().map(|e| e.pos).unwrap_or(stored.pos);
    let state_events = state.store.state_at(room_id.as_str(), stored.pos).await?;
    let v = viewer(&auth);
    let now = tessera_matrix_http::render::now_ms();
    Ok(Json(json!({
        "event": render(&stored, v, now, true),
        "events_before": render_all(&before, v, true),
        "events_after": render_all(&after, v, true),
        "state": render_all(&state_events, v, true),
        "start": format!("t{start}"),
        "end": format!("t{end}"),
    })))
}

#[derive(Deserialize)]
pub struct MembersQuery {
    at: Option<String>,
    membership: Option<String>,
    not_membership: Option<String>,
}

pub async fn members(
    State(state): State<AppState>,
    auth: Authed,
    Path(room): Path<String>,
    Query(query): Query<MembersQuery>,
) -> MatrixResult<Json<Value>> {
    let room_id = parse_room_id(&room)?;
    let visibility = access(&state, room_id.as_str(), &auth).await?;
    let mut events = match &query.at {
        Some(token) => {
            let room_row = state
                .store
                .room(room_id.as_str())
                .await?
                .ok_or_else(|| MatrixError::not_found("Unknown room"))?;
            let mut pos = parse_room_token(&state, token, room_row.partition).await?;
            if let Some(limit) = visibility.readable_upto().filter(|p| *p >= 0) {
                pos = pos.min(limit);
            }
            state.store.state_at(room_id.as_str(), pos).await?
        }
        None => readable_state(&state, room_id.as_str(), &visibility).await?,
    };
    events.retain(|e| {
        let Ok(pdu) = e.pdu() else { return false };
        let membership = pdu.membership();
        pdu.kind().to_string() == "m.room.member"
            && query
                .membership
                .as_ref()
                .is_none_or(|m| membership.as_ref() == Some(m))
            && query
                .not_membership
                .as_ref()
                .is_none_or(|m| membership.as_ref() != Some(m))
    });
    Ok(Json(
        json!({ "chunk": render_all(&events, viewer(&auth), true) }),
    ))
}

pub async fn joined_members(
    State(state): State<AppState>,
    auth: Authed,
    Path(room): Path<String>,
) -> MatrixResult<Json<Value>> {
    let room_id = parse_room_id(&room)?;
    let visibility = access(&state, room_id.as_str(), &auth).await?;
    if !visibility.is_joined() && !visibility.world_readable_now() {
        return Err(MatrixError::forbidden("You are not in this room"));
    }
    let mut joined = Map::new();
    for stored in state.store.members(room_id.as_str(), Some("join")).await? {
        let Ok(pdu) = stored.pdu() else { continue };
        let Some(user) = pdu.state_key() else {
            continue;
        };
        let content = pdu.content_value();
        joined.insert(
            user.to_owned(),
            json!({ "display_name": content.get("displayname"), "avatar_url": content.get("avatar_url") }),
        );
    }
    Ok(Json(json!({ "joined": joined })))
}

pub async fn joined_rooms(
    State(state): State<AppState>,
    auth: Authed,
) -> MatrixResult<Json<Value>> {
    let rooms = state
        .store
        .rooms_with_membership(auth.user_id.as_str(), "join")
        .await?;
    Ok(Json(json!({ "joined_rooms": rooms })))
}
