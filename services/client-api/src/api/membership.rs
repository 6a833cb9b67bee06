//! Membership: join (by ID or alias), leave, invite, kick, ban, unban, knock.
//! Each becomes an `m.room.member` event sent through the room's owner, which
//! applies the authorization rules; this layer adds the checks that give
//! clearer errors (unknown room, unknown user, not banned).

use axum::Json;
use axum::extract::{Path, State};
use ruma::{OwnedRoomId, OwnedUserId, RoomAliasId, RoomId, UserId};
use serde::Deserialize;
use serde_json::{Value, json};
use tessera_events::restricted_join;
use tessera_matrix_http::auth::Authed;
use tessera_matrix_http::{MatrixError, MatrixJson, MatrixResult};

use crate::rooms::{send, template};
use crate::state::AppState;

#[derive(Deserialize, Default)]
pub struct ReasonBody {
    reason: Option<String>,
}

#[derive(Deserialize)]
pub struct TargetBody {
    user_id: Option<String>,
    reason: Option<String>,
}

pub fn parse_room_id(room: &str) -> MatrixResult<OwnedRoomId> {
    RoomId::parse(room)
        .map_err(|e| MatrixError::invalid_param(format!("Invalid room ID {room:?}: {e}")))
}

/// A room ID, or an alias resolved through our alias table.
async fn resolve_room(state: &AppState, room: &str) -> MatrixResult<OwnedRoomId> {
    if room.starts_with('#') {
        let alias = RoomAliasId::parse(room)
            .map_err(|e| MatrixError::invalid_param(format!("Invalid alias: {e}")))?;
        let room_id = state
            .store
            .alias_room(alias.as_str())
            .await?
            .ok_or_else(|| MatrixError::not_found(format!("Room alias {alias} not found")))?;
        parse_room_id(&room_id)
    } else {
        parse_room_id(room)
    }
}

fn unknown_room(room_id: &RoomId) -> MatrixError {
    MatrixError::not_found(format!(
        "Unknown room {room_id} (joining rooms on other servers needs outbound federation, which this server does not do yet)"
    ))
}

async fn require_room(state: &AppState, room_id: &RoomId) -> MatrixResult<()> {
    if state.store.room(room_id.as_str()).await?.is_none() {
        return Err(unknown_room(room_id));
    }
    Ok(())
}

fn target(body: &TargetBody) -> MatrixResult<OwnedUserId> {
    let user = body
        .user_id
        .as_deref()
        .ok_or_else(|| MatrixError::bad_json("user_id is required"))?;
    UserId::parse(user).map_err(|e| MatrixError::invalid_param(format!("Invalid user ID: {e}")))
}

fn member_content(membership: &str, reason: Option<&str>) -> Value {
    let mut content = json!({ "membership": membership });
    if let Some(reason) = reason {
        content["reason"] = json!(reason);
    }
    content
}

/// Send `sender`'s membership change for `target`.
async fn change(
    state: &AppState,
    room_id: &RoomId,
    sender: &UserId,
    target: &UserId,
    content: Value,
) -> MatrixResult<()> {
    send(
        state,
        room_id,
        template(sender, "m.room.member", Some(target.as_str()), &content),
    )
    .await?;
    Ok(())
}

async fn join(
    state: &AppState,
    auth: &Authed,
    room_id: OwnedRoomId,
    reason: Option<String>,
) -> MatrixResult<Json<Value>> {
    require_room(state, &room_id).await?;
    if state
        .store
        .membership(room_id.as_str(), auth.user_id.as_str())
        .await?
        .as_deref()
        == Some("join")
    {
        return Ok(Json(json!({ "room_id": room_id })));
    }
    let mut content = member_content("join", reason.as_deref());
    if let Some(profile) = state.store.user(auth.user_id.as_str()).await? {
        if let Some(name) = profile.displayname {
            content["displayname"] = json!(name);
        }
        if let Some(avatar) = profile.avatar_url {
            content["avatar_url"] = json!(avatar);
        }
    }
    if let Some(authoriser) = vouching_member(state, &room_id, &auth.user_id).await? {
        content["join_authorised_via_users_server"] = json!(authoriser);
    }
    change(state, &room_id, &auth.user_id, &auth.user_id, content).await?;
    Ok(Json(json!({ "room_id": room_id })))
}

/// For a join into a room whose join rule is restricted, by a user neither
/// invited nor joined: the member of ours who vouches for it, once the user
/// is found joined to a room the join rule allows.
async fn vouching_member(
    state: &AppState,
    room_id: &RoomId,
    user: &UserId,
) -> MatrixResult<Option<OwnedUserId>> {
    let room = state
        .store
        .membership_state(room_id, user, &state.server_name)
        .await?
        .ok_or_else(|| unknown_room(room_id))?;
    if !restricted_join::needs_authoriser(&room, user) {
        return Ok(None);
    }
    let authoriser = state
        .store
        .vouching_member(&room, user, &state.server_name)
        .await??;
    Ok(Some(authoriser))
}

pub async fn join_by_id(
    State(state): State<AppState>,
    auth: Authed,
    Path(room): Path<String>,
    MatrixJson(body): MatrixJson<ReasonBody>,
) -> MatrixResult<Json<Value>> {
    join(&state, &auth, parse_room_id(&room)?, body.reason).await
}

pub async fn join_by_id_or_alias(
    State(state): State<AppState>,
    auth: Authed,
    Path(room): Path<String>,
    MatrixJson(body): MatrixJson<ReasonBody>,
) -> MatrixResult<Json<Value>> {
    let room_id = resolve_room(&state, &room).await?;
    join(&state, &auth, room_id, body.reason).await
}

pub async fn knock(
    State(state): State<AppState>,
    auth: Authed,
    Path(room): Path<String>,
    MatrixJson(body): MatrixJson<ReasonBody>,
) -> MatrixResult<Json<Value>> {
    let room_id = resolve_room(&state, &room).await?;
    require_room(&state, &room_id).await?;
    change(
        &state,
        &room_id,
        &auth.user_id,
        &auth.user_id,
        member_content("knock", body.reason.as_deref()),
    )
    .await?;
    Ok(Json(json!({ "room_id": room_id })))
}

pub async fn leave(
    State(state): State<AppState>,
    auth: Authed,
    Path(room): Path<String>,
    MatrixJson(body): MatrixJson<ReasonBody>,
) -> MatrixResult<Json<Value>> {
    let room_id = parse_room_id(&room)?;
    let membership = if state.store.room(room_id.as_str()).await?.is_some() {
        state
            .store
            .membership(room_id.as_str(), auth.user_id.as_str())
            .await?
    } else {
        // A room hosted elsewhere: all we may have is an invite from there,
        // which the room's owner then rejects locally.
        match state
            .store
            .latest_out_of_band(room_id.as_str(), auth.user_id.as_str())
            .await?
        {
            Some(latest) => latest.membership,
            None => return Err(unknown_room(&room_id)),
        }
    };
    match membership.as_deref() {
        Some("join" | "invite" | "knock") => {}
        Some("leave") => return Ok(Json(json!({}))),
        _ => return Err(MatrixError::forbidden("You are not in this room")),
    }
    change(
        &state,
        &room_id,
        &auth.user_id,
        &auth.user_id,
        member_content("leave", body.reason.as_deref()),
    )
    .await?;
    Ok(Json(json!({})))
}

/// What an action on another member needs before its membership event is sent.
enum Precondition {
    /// The target must have an account here (invites).
    KnownUser,
    /// The target's current membership must be one of these.
    Membership(&'static [&'static str], &'static str),
    None,
}

/// Invite, kick, ban, unban: check, then send `membership` for the target.
async fn act_on_member(
    state: AppState,
    auth: Authed,
    room: String,
    body: TargetBody,
    membership: &str,
    precondition: Precondition,
) -> MatrixResult<Json<Value>> {
    let room_id = parse_room_id(&room)?;
    let target = target(&body)?;
    require_room(&state, &room_id).await?;
    match precondition {
        Precondition::KnownUser => {
            // Inviting someone elsewhere means sending them the invite: that
            // needs the outbound federation sender, which does not exist yet.
            if !state.is_local(&target) {
                return Err(MatrixError::forbidden(format!(
                    "{target} is on another server: inviting there needs outbound federation, which this server does not do yet"
                )));
            }
            if state.store.user(target.as_str()).await?.is_none() {
                return Err(MatrixError::not_found(format!("Unknown user {target}")));
            }
        }
        Precondition::Membership(allowed, refusal) => {
            let current = state
                .store
                .membership(room_id.as_str(), target.as_str())
                .await?;
            if !current.as_deref().is_some_and(|m| allowed.contains(&m)) {
                return Err(MatrixError::forbidden(format!("{target} {refusal}")));
            }
        }
        Precondition::None => {}
    }
    let content = member_content(membership, body.reason.as_deref());
    change(&state, &room_id, &auth.user_id, &target, content).await?;
    Ok(Json(json!({})))
}

pub async fn invite(
    State(state): State<AppState>,
    auth: Authed,
    Path(room): Path<String>,
    MatrixJson(body): MatrixJson<TargetBody>,
) -> MatrixResult<Json<Value>> {
    act_on_member(state, auth, room, body, "invite", Precondition::KnownUser).await
}

pub async fn kick(
    State(state): State<AppState>,
    auth: Authed,
    Path(room): Path<String>,
    MatrixJson(body): MatrixJson<TargetBody>,
) -> MatrixResult<Json<Value>> {
    let in_room = Precondition::Membership(&["join", "invite", "knock"], "is not in the room");
    act_on_member(state, auth, room, body, "leave", in_room).await
}

pub async fn ban(
    State(state): State<AppState>,
    auth: Authed,
    Path(room): Path<String>,
    MatrixJson(body): MatrixJson<TargetBody>,
) -> MatrixResult<Json<Value>> {
    act_on_member(state, auth, room, body, "ban", Precondition::None).await
}

pub async fn unban(
    State(state): State<AppState>,
    auth: Authed,
    Path(room): Path<String>,
    MatrixJson(body): MatrixJson<TargetBody>,
) -> MatrixResult<Json<Value>> {
    let banned = Precondition::Membership(&["ban"], "is not banned");
    act_on_member(state, auth, room, body, "leave", banned).await
}
