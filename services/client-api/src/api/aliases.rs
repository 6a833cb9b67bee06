//! Room aliases and the room directory: `/directory/room/{alias}`,
//! `/rooms/{room}/aliases`, `/directory/list/room/{room}`, `/publicRooms`.

use axum::Json;
use axum::extract::{Path, Query, State};
use ruma::RoomAliasId;
use serde::Deserialize;
use serde_json::{Value, json};
use tessera_events::room_state::RoomState;
use tessera_matrix_http::auth::Authed;
use tessera_matrix_http::{MatrixError, MatrixJson, MatrixResult};
use tessera_storage::StoreError;

use super::membership::parse_room_id;
use crate::state::AppState;

fn parse_alias(state: &AppState, alias: &str) -> MatrixResult<ruma::OwnedRoomAliasId> {
    let alias = RoomAliasId::parse(alias)
        .map_err(|e| MatrixError::invalid_param(format!("Invalid room alias: {e}")))?;
    if alias.server_name() != state.server_name() {
        return Err(MatrixError::invalid_param(
            "Room alias is on another server (federation is not supported yet)",
        ));
    }
    Ok(alias)
}

/// The room an alias of ours points to, or `M_NOT_FOUND`.
async fn alias_room(state: &AppState, alias: &ruma::RoomAliasId) -> MatrixResult<String> {
    state
        .store
        .alias_room(alias.as_str())
        .await?
        .ok_or_else(|| MatrixError::not_found(format!("Room alias {alias} not found")))
}

pub async fn get_alias(
    State(state): State<AppState>,
    Path(alias): Path<String>,
) -> MatrixResult<Json<Value>> {
    let alias = parse_alias(&state, &alias)?;
    let room_id = alias_room(&state, &alias).await?;
    Ok(Json(
        json!({ "room_id": room_id, "servers": [state.server_name()] }),
    ))
}

#[derive(Deserialize)]
pub struct PutAliasBody {
    room_id: String,
}

pub async fn put_alias(
    State(state): State<AppState>,
    auth: Authed,
    Path(alias): Path<String>,
    MatrixJson(body): MatrixJson<PutAliasBody>,
) -> MatrixResult<Json<Value>> {
    let alias = parse_alias(&state, &alias)?;
    let room_id = parse_room_id(&body.room_id)?;
    if state.store.room(room_id.as_str()).await?.is_none() {
        return Err(MatrixError::not_found("Unknown room"));
    }
    match state
        .store
        .create_alias(alias.as_str(), room_id.as_str(), auth.user_id.as_str())
        .await
    {
        Ok(()) => Ok(Json(json!({}))),
        Err(StoreError::Conflict(_)) => Err(MatrixError::new(
            axum::http::StatusCode::CONFLICT,
            "M_UNKNOWN",
            format!("Room alias {alias} already exists"),
        )),
        Err(e) => Err(e.into()),
    }
}

/// The room's state as the owner sees it, for power checks.
async fn room_state(state: &AppState, room_id: &str) -> MatrixResult<RoomState> {
    state
        .store
        .room_state(&parse_room_id(room_id)?)
        .await?
        .ok_or_else(|| MatrixError::not_found("Unknown room"))
}

/// Moderators (power ≥ 50) may manage aliases and directory listing.
async fn is_moderator(state: &AppState, room_id: &str, auth: &Authed) -> MatrixResult<bool> {
    let room = room_state(state, room_id).await?;
    Ok(
        room.membership(auth.user_id.as_str()).as_deref() == Some("join")
            && room.power_level(&auth.user_id).is_none_or(|p| p >= 50),
    )
}

pub async fn delete_alias(
    State(state): State<AppState>,
    auth: Authed,
    Path(alias): Path<String>,
) -> MatrixResult<Json<Value>> {
    let alias = parse_alias(&state, &alias)?;
    let room_id = alias_room(&state, &alias).await?;
    let creator = state.store.alias_creator(alias.as_str()).await?;
    let allowed = auth.admin
        || creator.as_deref() == Some(auth.user_id.as_str())
        || is_moderator(&state, &room_id, &auth).await?;
    if !allowed {
        return Err(MatrixError::forbidden("You may not delete this alias"));
    }
    state.store.delete_alias(alias.as_str()).await?;
    Ok(Json(json!({})))
}

pub async fn room_aliases(
    State(state): State<AppState>,
    auth: Authed,
    Path(room): Path<String>,
) -> MatrixResult<Json<Value>> {
    let room_id = parse_room_id(&room)?;
    let room = room_state(&state, room_id.as_str()).await?;
    if room.membership(auth.user_id.as_str()).as_deref() != Some("join") {
        return Err(MatrixError::forbidden("You are not in this room"));
    }
    Ok(Json(
        json!({ "aliases": state.store.room_aliases(room_id.as_str()).await? }),
    ))
}

pub async fn get_visibility(
    State(state): State<AppState>,
    Path(room): Path<String>,
) -> MatrixResult<Json<Value>> {
    let room_id = parse_room_id(&room)?;
    let row = state
        .store
        .room(room_id.as_str())
        .await?
        .ok_or_else(|| MatrixError::not_found("Unknown room"))?;
    Ok(Json(
        json!({ "visibility": if row.is_public { "public" } else { "private" } }),
    ))
}

#[derive(Deserialize)]
pub struct VisibilityBody {
    visibility: Option<String>,
}

pub async fn put_visibility(
    State(state): State<AppState>,
    auth: Authed,
    Path(room): Path<String>,
    MatrixJson(body): MatrixJson<VisibilityBody>,
) -> MatrixResult<Json<Value>> {
    let room_id = parse_room_id(&room)?;
    let public = match body.visibility.as_deref() {
        Some("public") => true,
        Some("private") | None => false,
        Some(other) => {
            return Err(MatrixError::invalid_param(format!(
                "Unknown visibility {other:?}"
            )));
        }
    };
    if !auth.admin && !is_moderator(&state, room_id.as_str(), &auth).await? {
        return Err(MatrixError::forbidden(
            "You may not change this room's directory listing",
        ));
    }
    state
        .store
        .set_room_public(room_id.as_str(), public)
        .await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
pub struct PublicRoomsQuery {
    limit: Option<String>,
    since: Option<String>,
}

pub async fn public_rooms(
    State(state): State<AppState>,
    Query(query): Query<PublicRoomsQuery>,
) -> MatrixResult<Json<Value>> {
    let limit: i64 = query
        .limit
        .as_deref()
        .map(str::parse)
        .transpose()
        .map_err(|_| MatrixError::invalid_param("limit must be a number"))?
        .unwrap_or(100)
        .clamp(1, 500);
    let offset: i64 = match query.since.as_deref() {
        Some(s) => s
            .strip_prefix('o')
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| MatrixError::invalid_param("Invalid since token"))?,
        None => 0,
    };
    let (rooms, total) = state.store.public_rooms(limit, offset).await?;
    let mut chunk = Vec::new();
    for (room_id, members) in &rooms {
        let room = room_state(&state, room_id).await?;
        let field = |kind: &str, key: &str| {
            room.get(&ruma::events::StateEventType::from(kind), "")
                .and_then(|p| p.content_field(key))
        };
        chunk.push(json!({
            "room_id": room_id,
            "num_joined_members": members,
            "name": field("m.room.name", "name"),
            "topic": field("m.room.topic", "topic"),
            "canonical_alias": field("m.room.canonical_alias", "alias"),
            "avatar_url": field("m.room.avatar", "url"),
            "join_rule": field("m.room.join_rules", "join_rule"),
            "world_readable": field("m.room.history_visibility", "history_visibility") == Some(json!("world_readable")),
            "guest_can_join": field("m.room.guest_access", "guest_access") == Some(json!("can_join")),
        }));
    }
    let mut body = json!({ "chunk": chunk, "total_room_count_estimate": total });
    if offset + (rooms.len() as i64) < total {
        body["next_batch"] = json!(format!("o{}", offset + rooms.len() as i64));
    }
    if offset > 0 {
        body["prev_batch"] = json!(format!("o{}", (offset - limit).max(0)));
    }
    Ok(Json(body))
}
