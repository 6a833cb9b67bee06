//! Joining, leaving and knocking from other servers: `make_*` builds an event
//! template from the part of the room's current state it needs (read from
//! Postgres); `send_*`
//! hands the signed event to the room's owner, which checks and persists it
//! at once and answers with the state before it and its auth chain.

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use tessera_events::restricted_join;
use tessera_events::ruma::events::StateEventType;
use tessera_events::ruma::room_version_rules::RoomVersionRules;
use tessera_events::ruma::{
    CanonicalJsonObject, CanonicalJsonValue, RoomId, RoomVersionId, UserId,
};
use tessera_matrix_http::MatrixError;
use tessera_proto::room_worker::{RemoteMembershipRequest, remote_membership_response};
use tokio::sync::SemaphorePermit;

use super::room_for;
use crate::request::Signed;
use crate::state::AppState;

/// The `ver` parameters of a make_join query (repeated).
fn versions(query: Option<&str>) -> Vec<String> {
    let versions: Vec<String> = query
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| pair.strip_prefix("ver="))
        .map(str::to_owned)
        .collect();
    if versions.is_empty() {
        vec!["1".to_owned()]
    } else {
        versions
    }
}

async fn make(
    state: &AppState,
    room: &str,
    user: &str,
    origin: &str,
    membership: &str,
    query: Option<&str>,
) -> Result<Json<Value>, MatrixError> {
    let version = room_for(state, room, origin).await?;
    let user_id = UserId::parse(user)
        .map_err(|e| MatrixError::invalid_param(format!("invalid user ID: {e}")))?;
    if user_id.server_name() != origin {
        return Err(MatrixError::forbidden(
            "the user is not on the requesting server",
        ));
    }
    if membership == "join" && !versions(query).iter().any(|v| v == version.as_str()) {
        return Err(MatrixError::incompatible_room_version(
            version.as_str(),
            format!("the room is version {version}, which the requesting server does not support"),
        ));
    }
    let room_id = RoomId::parse(room).map_err(|e| MatrixError::invalid_param(e.to_string()))?;
    let room_state = state
        .store
        .membership_state(&room_id, &user_id, &state.server_name)
        .await?
        .ok_or_else(|| MatrixError::not_found("unknown room"))?;
    let membership_now = room_state.membership(user_id.as_str());
    let join_rule = room_state
        .get(&StateEventType::RoomJoinRules, "")
        .and_then(|p| p.content_field("join_rule"))
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| "invite".to_owned());
    let mut content = json!({ "membership": membership });
    let allowed = match membership {
        "join" if membership_now.as_deref() == Some("ban") => false,
        "join" if restricted_join::needs_authoriser(&room_state, &user_id) => {
            let authoriser = state
                .store
                .vouching_member(&room_state, &user_id, &state.server_name)
                .await??;
            content["join_authorised_via_users_server"] = json!(authoriser);
            true
        }
        "join" => {
            join_rule == "public" || matches!(membership_now.as_deref(), Some("invite" | "join"))
        }
        "knock" => {
            matches!(join_rule.as_str(), "knock" | "knock_restricted")
                && !matches!(membership_now.as_deref(), Some("join" | "ban" | "invite"))
        }
        _ => matches!(membership_now.as_deref(), Some("join" | "invite" | "knock")),
    };
    if !allowed {
        return Err(MatrixError::forbidden(format!(
            "{user_id} may not {membership} this room"
        )));
    }
    let raw = serde_json::value::to_raw_value(&content).expect("JSON serializes");
    let types = tessera_events::ruma::state_res::auth_types_for_event(
        &tessera_events::ruma::events::TimelineEventType::RoomMember,
        &user_id,
        Some(user_id.as_str()),
        &raw,
        &room_state.rules().authorization,
    )
    .map_err(MatrixError::internal)?;
    let auth_events: Vec<String> = types
        .iter()
        .filter_map(|(kind, key)| room_state.get(kind, key))
        .map(|p| p.event_id().to_string())
        .collect();
    let template = json!({
        "type": "m.room.member",
        "state_key": user_id,
        "sender": user_id,
        "content": content,
        "room_id": room_id,
        "origin": origin,
        "origin_server_ts": tessera_federation::now_ms(),
        "depth": room_state.depth() + 1,
        "prev_events": room_state.extremities(),
        "auth_events": auth_events,
    });
    Ok(Json(
        json!({ "room_version": version.as_str(), "event": template }),
    ))
}

pub async fn make_join(
    State(state): State<AppState>,
    Path((room, user)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    signed: Signed,
) -> Result<Json<Value>, MatrixError> {
    make(
        &state,
        &room,
        &user,
        signed.origin.as_str(),
        "join",
        query.as_deref(),
    )
    .await
}

pub async fn make_leave(
    State(state): State<AppState>,
    Path((room, user)): Path<(String, String)>,
    signed: Signed,
) -> Result<Json<Value>, MatrixError> {
    make(&state, &room, &user, signed.origin.as_str(), "leave", None).await
}

pub async fn make_knock(
    State(state): State<AppState>,
    Path((room, user)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    signed: Signed,
) -> Result<Json<Value>, MatrixError> {
    make(
        &state,
        &room,
        &user,
        signed.origin.as_str(),
        "knock",
        query.as_deref(),
    )
    .await
}

/// A join that names one of our users in `join_authorised_via_users_server`
/// needs our signature beside its sender's: judge the join again (the room's
/// join rule and our view of the rooms it allows may have changed since
/// make_join), then sign. The authorization rules then check the named user
/// (joined, may invite) against the room's state.
async fn vouch_for_join(
    state: &AppState,
    room_id: &RoomId,
    rules: &RoomVersionRules,
    object: &mut CanonicalJsonObject,
) -> Result<(), MatrixError> {
    let Some(CanonicalJsonValue::Object(content)) = object.get("content") else {
        return Ok(());
    };
    let Some(CanonicalJsonValue::String(authoriser)) =
        content.get("join_authorised_via_users_server")
    else {
        return Ok(());
    };
    let authoriser = UserId::parse(authoriser).map_err(|e| {
        MatrixError::bad_json(format!("invalid join_authorised_via_users_server: {e}"))
    })?;
    if authoriser.server_name() != state.server_name || !rules.authorization.restricted_join_rule {
        return Ok(());
    }
    let joiner = match object.get("sender") {
        Some(CanonicalJsonValue::String(sender)) => UserId::parse(sender)
            .map_err(|e| MatrixError::bad_json(format!("invalid sender: {e}")))?,
        _ => return Err(MatrixError::bad_json("the event has no sender")),
    };
    let join_rules = state
        .store
        .state_event(room_id.as_str(), "m.room.join_rules", "")
        .await?
        .map(|stored| stored.pdu())
        .transpose()?;
    if let Some(allowed) = join_rules.and_then(|j| restricted_join::allowed_rooms_in(&j, rules)) {
        let views = state
            .store
            .allowed_room_views(&allowed, joiner.as_str(), state.server_name.as_str())
            .await?;
        restricted_join::judge(&joiner, &views)?;
    }
    tessera_events::ruma::signatures::sign_event(
        state.server_name.as_str(),
        state.key.pair(),
        object,
        &rules.redaction,
    )
    .map_err(|e| MatrixError::bad_json(format!("cannot sign the join: {e}")))
}

/// Check a signed membership event and hand it to the room's owner.
async fn submit<'a>(
    state: &'a AppState,
    room: &str,
    event: &str,
    signed: &Signed,
    membership: &str,
    omit_members: bool,
) -> Result<
    (
        RoomVersionId,
        tessera_proto::room_worker::MembershipAccepted,
        SemaphorePermit<'a>,
    ),
    MatrixError,
> {
    let origin = signed.origin.as_str();
    let version = room_for(state, room, origin).await?;
    let rules = version
        .rules()
        .ok_or_else(|| MatrixError::internal("unsupported room version"))?;
    let mut object: CanonicalJsonObject = serde_json::from_slice(&signed.body)
        .map_err(|e| tessera_matrix_http::extract::json_error(&e))?;
    let room_id = RoomId::parse(room).map_err(|e| MatrixError::invalid_param(e.to_string()))?;
    if membership == "join" {
        vouch_for_join(state, &room_id, &rules, &mut object).await?;
    }
    let pdu = super::checked_event(state, object, &rules, &room_id, event)
        .await?
        .pdu;
    if pdu.kind().to_string() != "m.room.member"
        || pdu.state_key() != Some(pdu.sender().as_str())
        || pdu.membership().as_deref() != Some(membership)
    {
        return Err(MatrixError::bad_json(format!(
            "expected the sender's own {membership} membership event"
        )));
    }
    if pdu.sender().server_name() != origin || pdu.room_id() != &*room_id {
        return Err(MatrixError::forbidden(
            "the event is not from the requesting server, or not for this room",
        ));
    }
    // A membership event is a PDU of its origin's, and its answer can hold
    // the room's whole state: it takes a token from the origin's rate, and
    // waits for one of the receiver's permits, which the caller holds until
    // its answer is built.
    state
        .take_tokens(origin, 1)
        .map_err(MatrixError::limit_exceeded)?;
    if state.memberships.available_permits() == 0 {
        metrics::counter!("tessera_federation_memberships_waited_total").increment(1);
    }
    let permit = state
        .memberships
        .acquire()
        .await
        .map_err(|_| MatrixError::unavailable("shutting down"))?;
    // For omit_members, the members a room without a name is named after
    // (the five `/sync` picks); the owner keeps them if it has no name.
    let keep_members = if omit_members {
        state.store.heroes(room, pdu.sender().as_str(), 5).await?
    } else {
        Vec::new()
    };
    let response = state
        .router
        .submit_remote_membership(
            room_id.as_str(),
            RemoteMembershipRequest {
                room_id: room_id.to_string(),
                origin: origin.to_owned(),
                event_json: pdu.canonical_json().to_owned(),
                omit_members,
                keep_members,
            },
        )
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "cannot submit a remote membership event");
            MatrixError::unavailable("the room's owner is unavailable; try again")
        })?;
    match response.outcome {
        Some(remote_membership_response::Outcome::Accepted(accepted)) => {
            Ok((version, accepted, permit))
        }
        Some(remote_membership_response::Outcome::Refusal(r)) => {
            Err(MatrixError::from_errcode(&r.errcode, r.message))
        }
        None => Err(MatrixError::internal("no outcome from the room's owner")),
    }
}

/// Events passed through as they came from the room's owner, unparsed: a
/// join into a room with 20,000 members answers with 20,000 state events,
/// which as JSON trees cost the receiver ten times their size.
fn raw_all(jsons: Vec<String>) -> Vec<Box<RawValue>> {
    jsons
        .into_iter()
        .filter_map(|j| RawValue::from_string(j).ok())
        .collect()
}

fn parse_all(jsons: &[String]) -> Vec<Value> {
    jsons
        .iter()
        .filter_map(|j| serde_json::from_str(j).ok())
        .collect()
}

/// A `send_join` answer: the owner's events passed through as they came.
#[derive(Serialize)]
struct JoinAnswer<'a> {
    origin: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<Value>,
    state: Vec<Box<RawValue>>,
    auth_chain: Vec<Box<RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    members_omitted: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    servers_in_room: Option<Vec<String>>,
}

pub async fn send_join(
    State(state): State<AppState>,
    Path((room, event)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    signed: Signed,
) -> Result<Response, MatrixError> {
    let omit_members = query
        .unwrap_or_default()
        .split('&')
        .any(|pair| pair == "omit_members=true");
    let (_, accepted, _permit) =
        submit(&state, &room, &event, &signed, "join", omit_members).await?;
    let servers = state.store.servers_in_room(&room).await?;
    let event_json = serde_json::from_str::<Value>(&accepted.event_json).unwrap_or(Value::Null);
    // With omit_members the owner left the members out (but those of an
    // unnamed room's heroes) and gave the auth chain of what it kept.
    Ok(Json(JoinAnswer {
        origin: state.server_name.as_str(),
        event: Some(event_json),
        state: raw_all(accepted.state),
        auth_chain: raw_all(accepted.auth_chain),
        members_omitted: Some(accepted.members_omitted),
        servers_in_room: Some(servers),
    })
    .into_response())
}

pub async fn send_join_v1(
    State(state): State<AppState>,
    Path((room, event)): Path<(String, String)>,
    signed: Signed,
) -> Result<Response, MatrixError> {
    let (_, accepted, _permit) = submit(&state, &room, &event, &signed, "join", false).await?;
    Ok(Json((
        200,
        JoinAnswer {
            origin: state.server_name.as_str(),
            event: None,
            state: raw_all(accepted.state),
            auth_chain: raw_all(accepted.auth_chain),
            members_omitted: None,
            servers_in_room: None,
        },
    ))
    .into_response())
}

pub async fn send_leave(
    State(state): State<AppState>,
    Path((room, event)): Path<(String, String)>,
    signed: Signed,
) -> Result<Json<Value>, MatrixError> {
    let (_, _, _permit) = submit(&state, &room, &event, &signed, "leave", false).await?;
    Ok(Json(json!({})))
}

pub async fn send_leave_v1(
    State(state): State<AppState>,
    Path((room, event)): Path<(String, String)>,
    signed: Signed,
) -> Result<Json<Value>, MatrixError> {
    let (_, _, _permit) = submit(&state, &room, &event, &signed, "leave", false).await?;
    Ok(Json(json!([200, {}])))
}

pub async fn send_knock(
    State(state): State<AppState>,
    Path((room, event)): Path<(String, String)>,
    signed: Signed,
) -> Result<Json<Value>, MatrixError> {
    let (_, accepted, _permit) = submit(&state, &room, &event, &signed, "knock", false).await?;
    const STRIPPED: [&str; 7] = [
        "m.room.create",
        "m.room.join_rules",
        "m.room.name",
        "m.room.avatar",
        "m.room.canonical_alias",
        "m.room.topic",
        "m.room.encryption",
    ];
    let stripped: Vec<Value> = parse_all(&accepted.state)
        .into_iter()
        .filter(|e| {
            e.get("type")
                .and_then(Value::as_str)
                .is_some_and(|t| STRIPPED.contains(&t))
        })
        .map(|e| super::stripped_event(&e))
        .collect();
    Ok(Json(json!({ "knock_room_state": stripped })))
}
