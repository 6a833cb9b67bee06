//! Reads by other servers: events, state at an event, auth chains, backfill
//! and missing events. Served from Postgres to servers that are in the room
//! (or for world-readable rooms), within the room's server ACL.

use std::collections::HashSet;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, RawQuery, State};
use serde::Deserialize;
use serde_json::{Value, json};
use tessera_events::Pdu;
use tessera_events::ruma::{EventId, OwnedEventId, RoomId};
use tessera_matrix_http::MatrixError;

use super::{room_for, room_id};
use crate::dag;
use crate::request::Signed;
use crate::state::AppState;

/// The origin may read the room: it has joined members, or the room is world-readable.
async fn may_read(state: &AppState, room: &RoomId, origin: &str) -> Result<(), MatrixError> {
    room_for(state, room.as_str(), origin).await?;
    if state.store.server_in_room(room.as_str(), origin).await? {
        return Ok(());
    }
    let visibility = state
        .store
        .state_event(room.as_str(), "m.room.history_visibility", "")
        .await?;
    let world_readable = visibility
        .and_then(|e| e.pdu().ok())
        .and_then(|p| p.content_field("history_visibility"))
        .is_some_and(|v| v == "world_readable");
    if world_readable {
        Ok(())
    } else {
        Err(MatrixError::forbidden(format!(
            "{origin} is not in the room"
        )))
    }
}

pub(crate) fn json_of(pdus: &[Arc<Pdu>]) -> Vec<Value> {
    pdus.iter()
        .filter_map(|p| serde_json::from_str(p.canonical_json()).ok())
        .collect()
}

fn event_id(text: &str) -> Result<OwnedEventId, MatrixError> {
    EventId::parse(text).map_err(|e| MatrixError::invalid_param(format!("invalid event ID: {e}")))
}

pub async fn event(
    State(state): State<AppState>,
    Path(event): Path<String>,
    signed: Signed,
) -> Result<Json<Value>, MatrixError> {
    let id = event_id(&event)?;
    let known = state.store.known_events(&[id.to_string()]).await?;
    let known = known
        .into_iter()
        .find(|k| !k.rejected)
        .ok_or_else(|| MatrixError::not_found("event not found"))?;
    let room = room_id(&known.room_id)?;
    may_read(&state, &room, signed.origin.as_str()).await?;
    let pdu: Value = serde_json::from_str(&known.json)
        .map_err(|_| MatrixError::internal("stored event is not JSON"))?;
    Ok(Json(json!({
        "origin": state.server_name,
        "origin_server_ts": tessera_federation::now_ms(),
        "pdus": [pdu],
    })))
}

#[derive(Deserialize)]
pub struct AtEvent {
    event_id: Option<String>,
}

/// The state before an event of the room, and its auth chain.
async fn state_at(
    state: &AppState,
    room: &RoomId,
    event: &str,
) -> Result<(Vec<Arc<Pdu>>, Vec<Arc<Pdu>>), MatrixError> {
    let id = event_id(event)?;
    let (before, _) = state
        .store
        .event_state_groups(id.as_str())
        .await?
        .ok_or_else(|| MatrixError::not_found("event not found in this room's timeline"))?;
    let group =
        before.ok_or_else(|| MatrixError::not_found("no state is recorded for that event"))?;
    let ids: Vec<OwnedEventId> = state
        .store
        .state_group_map(&group)
        .await?
        .into_iter()
        .filter_map(|(_, _, e)| EventId::parse(e.as_str()).ok())
        .collect();
    let events: Vec<Arc<Pdu>> = dag::load(&state.store, room, &ids)
        .await?
        .into_values()
        .map(|(p, _)| p)
        .collect();
    let chain = dag::auth_chain(&state.store, room, &events).await?;
    Ok((events, chain))
}

pub async fn state(
    State(state): State<AppState>,
    Path(room): Path<String>,
    Query(query): Query<AtEvent>,
    signed: Signed,
) -> Result<Json<Value>, MatrixError> {
    let room = room_id(&room)?;
    may_read(&state, &room, signed.origin.as_str()).await?;
    let event = query
        .event_id
        .ok_or_else(|| MatrixError::missing_param("event_id is required"))?;
    let (events, chain) = state_at(&state, &room, &event).await?;
    Ok(Json(
        json!({ "pdus": json_of(&events), "auth_chain": json_of(&chain) }),
    ))
}

pub async fn state_ids(
    State(state): State<AppState>,
    Path(room): Path<String>,
    Query(query): Query<AtEvent>,
    signed: Signed,
) -> Result<Json<Value>, MatrixError> {
    let room = room_id(&room)?;
    may_read(&state, &room, signed.origin.as_str()).await?;
    let event = query
        .event_id
        .ok_or_else(|| MatrixError::missing_param("event_id is required"))?;
    let (events, chain) = state_at(&state, &room, &event).await?;
    let ids = |pdus: &[Arc<Pdu>]| {
        pdus.iter()
            .map(|p| p.event_id().to_string())
            .collect::<Vec<_>>()
    };
    Ok(Json(
        json!({ "pdu_ids": ids(&events), "auth_chain_ids": ids(&chain) }),
    ))
}

pub async fn event_auth(
    State(state): State<AppState>,
    Path((room, event)): Path<(String, String)>,
    signed: Signed,
) -> Result<Json<Value>, MatrixError> {
    let room = room_id(&room)?;
    may_read(&state, &room, signed.origin.as_str()).await?;
    let id = event_id(&event)?;
    let loaded = dag::load(&state.store, &room, std::slice::from_ref(&id)).await?;
    let (pdu, _) = loaded
        .get(&id)
        .cloned()
        .ok_or_else(|| MatrixError::not_found("event not found"))?;
    let chain = dag::auth_chain(&state.store, &room, &[pdu]).await?;
    Ok(Json(json!({ "auth_chain": json_of(&chain) })))
}

pub async fn backfill(
    State(state): State<AppState>,
    Path(room): Path<String>,
    RawQuery(query): RawQuery,
    signed: Signed,
) -> Result<Json<Value>, MatrixError> {
    let room = room_id(&room)?;
    may_read(&state, &room, signed.origin.as_str()).await?;
    let mut from = Vec::new();
    let mut limit = 100usize;
    for pair in query.unwrap_or_default().split('&') {
        match pair.split_once('=') {
            Some(("v", v)) => from.push(event_id(&percent_decode(v))?),
            Some(("limit", l)) => {
                limit = l
                    .parse()
                    .map_err(|_| MatrixError::invalid_param("limit must be a number"))?
            }
            _ => {}
        }
    }
    if from.is_empty() {
        return Err(MatrixError::missing_param("v is required"));
    }
    let pdus = dag::walk_back(
        &state.store,
        &room,
        &from,
        &HashSet::new(),
        limit.min(1000),
        true,
    )
    .await?;
    Ok(Json(json!({
        "origin": state.server_name,
        "origin_server_ts": tessera_federation::now_ms(),
        "pdus": json_of(&pdus),
    })))
}

pub async fn get_missing_events(
    State(state): State<AppState>,
    Path(room): Path<String>,
    signed: Signed,
) -> Result<Json<Value>, MatrixError> {
    let room = room_id(&room)?;
    may_read(&state, &room, signed.origin.as_str()).await?;
    let body = signed.json()?;
    let ids = |field: &str| -> Result<Vec<OwnedEventId>, MatrixError> {
        body.get(field)
            .and_then(Value::as_array)
            .ok_or_else(|| MatrixError::bad_json(format!("{field} must be an array of event IDs")))?
            .iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| MatrixError::bad_json(format!("{field} must hold strings")))
                    .and_then(event_id)
            })
            .collect()
    };
    let earliest: HashSet<OwnedEventId> = ids("earliest_events")?.into_iter().collect();
    let latest = ids("latest_events")?;
    let limit = body
        .get("limit")
        .and_then(Value::as_u64)
        .unwrap_or(10)
        .min(100) as usize;
    let min_depth = body.get("min_depth").and_then(Value::as_u64).unwrap_or(0);
    let mut pdus = dag::walk_back(&state.store, &room, &latest, &earliest, limit, false).await?;
    pdus.retain(|p| p.depth() >= min_depth);
    pdus.sort_by_key(|p| p.depth());
    Ok(Json(json!({ "events": json_of(&pdus) })))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(
                std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"),
                16,
            )
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
