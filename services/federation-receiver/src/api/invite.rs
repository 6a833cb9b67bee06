//! `PUT /_matrix/federation/v2/invite/{roomId}/{eventId}`: another server
//! invites one of our users. The invite is checked (format, hashes, the
//! inviting server's signature, that it invites a user of ours), signed by
//! us and returned; for a room hosted elsewhere the room's partition owner
//! records it so the invitee's /sync shows it with the stripped state sent.

use axum::Json;
use axum::extract::{Path, State};
use serde_json::{Value, json};
use tessera_events::ruma::{CanonicalJsonObject, RoomId, RoomVersionId, UserId};
use tessera_matrix_http::MatrixError;
use tessera_proto::room_worker::StoreInviteRequest;

use crate::request::Signed;
use crate::state::AppState;

/// At most this many stripped state events are kept with an invite.
const MAX_STRIPPED_STATE: usize = 50;

pub async fn invite(
    State(state): State<AppState>,
    Path((room, event)): Path<(String, String)>,
    signed: Signed,
) -> Result<Json<Value>, MatrixError> {
    let origin = signed.origin.as_str();
    let body = signed.json()?;
    let room_id = super::room_id(&room)?;
    let Some(version_name) = body.get("room_version").and_then(Value::as_str) else {
        return Err(MatrixError::bad_json("room_version is required"));
    };
    let rules = RoomVersionId::try_from(version_name)
        .ok()
        .and_then(|v| v.rules().map(|rules| (v, rules)));
    let Some((version, rules)) = rules else {
        return Err(MatrixError::incompatible_room_version(
            version_name,
            format!("this server does not support room version {version_name}"),
        ));
    };
    let Some(event_value) = body.get("event").filter(|e| e.is_object()) else {
        return Err(MatrixError::bad_json("event must be an object"));
    };
    let object: CanonicalJsonObject = serde_json::from_value(event_value.clone())
        .map_err(|e| tessera_matrix_http::extract::json_error(&e))?;
    let checked = super::checked_event(&state, object, &rules, &room_id, &event).await?;
    if checked.redacted {
        return Err(MatrixError::bad_json(
            "the invite's content hash does not match its content",
        ));
    }
    let pdu = checked.pdu;
    check_invite(&state, &pdu, &room_id, origin).await?;

    // A room we host: its ACL applies, and the invite reaches it through
    // /send, where the room's auth rules check it; nothing to store here.
    let hosted = state.room_version(room_id.as_str()).await?.is_some();
    if hosted {
        super::room_for(&state, room_id.as_str(), origin).await?;
    }
    let mut signed_event = pdu.to_object();
    tessera_events::ruma::signatures::sign_event(
        state.server_name.as_str(),
        state.key.pair(),
        &mut signed_event,
        &rules.redaction,
    )
    .map_err(|e| MatrixError::internal(format!("cannot sign the invite: {e}")))?;
    let event_json =
        serde_json::to_string(&signed_event).map_err(|e| MatrixError::internal(e.to_string()))?;
    if !hosted {
        store(
            &state,
            &room_id,
            &version,
            event_json,
            body.get("invite_room_state"),
        )
        .await?;
    }
    metrics::counter!("tessera_federation_invites_received_total").increment(1);
    Ok(Json(json!({ "event": signed_event })))
}

/// Hand the invite to the room's partition owner to record.
async fn store(
    state: &AppState,
    room_id: &RoomId,
    version: &RoomVersionId,
    event_json: String,
    invite_room_state: Option<&Value>,
) -> Result<(), MatrixError> {
    let stripped = stripped_state(invite_room_state);
    state
        .router
        .store_invite(
            room_id.as_str(),
            StoreInviteRequest {
                room_id: room_id.to_string(),
                room_version: version.to_string(),
                event_json,
                stripped_state_json: Value::Array(stripped).to_string(),
            },
        )
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "cannot store an invite");
            MatrixError::unavailable("the room's owner is unavailable; try again")
        })?;
    Ok(())
}

/// The event must be the inviting server's invite of an existing user of ours.
async fn check_invite(
    state: &AppState,
    pdu: &tessera_events::Pdu,
    room_id: &RoomId,
    origin: &str,
) -> Result<(), MatrixError> {
    if pdu.kind().to_string() != "m.room.member" || pdu.membership().as_deref() != Some("invite") {
        return Err(MatrixError::bad_json("the event is not an invite"));
    }
    if pdu.room_id() != room_id {
        return Err(MatrixError::bad_json(
            "the event is for another room than the path says",
        ));
    }
    if pdu.sender().server_name() != origin {
        return Err(MatrixError::forbidden(
            "the inviting user is not on the requesting server",
        ));
    }
    let invitee = pdu
        .state_key()
        .and_then(|key| UserId::parse(key).ok())
        .ok_or_else(|| MatrixError::bad_json("the invite's state_key is not a user ID"))?;
    if invitee.server_name() != state.server_name {
        return Err(MatrixError::bad_json(format!(
            "{invitee} is not a user of this server"
        )));
    }
    match state.store.user(invitee.as_str()).await? {
        Some(user) if !user.deactivated => Ok(()),
        _ => Err(MatrixError::forbidden(format!(
            "{invitee} does not exist here"
        ))),
    }
}

/// The stripped state events worth keeping: objects with a string type and
/// state_key, reduced to the stripped fields, at most [`MAX_STRIPPED_STATE`].
fn stripped_state(given: Option<&Value>) -> Vec<Value> {
    given
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|e| e["type"].is_string() && e["state_key"].is_string() && e["content"].is_object())
        .take(MAX_STRIPPED_STATE)
        .map(super::stripped_event)
        .collect()
}
