//! Sending: `PUT /send/{type}/{txnId}` (idempotent per device and txnId),
//! `PUT /state/{type}/{stateKey}` and `PUT /redact/{eventId}/{txnId}`.

use axum::Json;
use axum::extract::{Path, State};
use ruma::EventId;
use serde_json::{Value, json};
use tessera_matrix_http::auth::Authed;
use tessera_matrix_http::extract::{MatrixBody, json_object};
use tessera_matrix_http::{MatrixError, MatrixResult};

use super::membership::parse_room_id;
use crate::rooms::{send, template, with_txn};
use crate::state::AppState;

fn check_id_part(what: &str, value: &str) -> MatrixResult<()> {
    if value.len() > 255 {
        return Err(MatrixError::invalid_param(format!(
            "{what} is longer than 255 bytes"
        )));
    }
    Ok(())
}

fn check_type(kind: &str) -> MatrixResult<()> {
    if kind.is_empty() {
        return Err(MatrixError::invalid_param("Event type cannot be empty"));
    }
    check_id_part("Event type", kind)
}

pub async fn send_message(
    State(state): State<AppState>,
    auth: Authed,
    Path((room, kind, txn)): Path<(String, String, String)>,
    MatrixBody(body): MatrixBody,
) -> MatrixResult<Json<Value>> {
    let room_id = parse_room_id(&room)?;
    check_type(&kind)?;
    check_id_part("Transaction ID", &txn)?;
    let content = Value::Object(json_object(&body)?);
    // A repeated transaction is answered by the room's owner with the event
    // the first attempt created.
    let mut t = template(&auth.user_id, &kind, None, &content);
    if kind == "m.room.redaction"
        && let Some(target) = content.get("redacts").and_then(Value::as_str)
    {
        t.redacts = Some(
            EventId::parse(target)
                .map_err(|e| MatrixError::bad_json(format!("redacts: {e}")))?
                .to_string(),
        );
    }
    let event_id = send(&state, &room_id, with_txn(t, &auth.device_id, &txn)).await?;
    metrics::counter!("tessera_client_events_sent_total").increment(1);
    Ok(Json(json!({ "event_id": event_id })))
}

pub async fn put_state(
    State(state): State<AppState>,
    auth: Authed,
    Path((room, kind, key)): Path<(String, String, String)>,
    MatrixBody(body): MatrixBody,
) -> MatrixResult<Json<Value>> {
    put_state_inner(state, auth, room, kind, key, body).await
}

pub async fn put_state_empty_key(
    State(state): State<AppState>,
    auth: Authed,
    Path((room, kind)): Path<(String, String)>,
    MatrixBody(body): MatrixBody,
) -> MatrixResult<Json<Value>> {
    put_state_inner(state, auth, room, kind, String::new(), body).await
}

async fn put_state_inner(
    state: AppState,
    auth: Authed,
    room: String,
    kind: String,
    key: String,
    body: bytes::Bytes,
) -> MatrixResult<Json<Value>> {
    let room_id = parse_room_id(&room)?;
    check_type(&kind)?;
    check_id_part("State key", &key)?;
    let content = Value::Object(json_object(&body)?);
    if kind == "m.room.canonical_alias" {
        check_canonical_alias(&state, room_id.as_str(), &content).await?;
    }
    let event_id = send(
        &state,
        &room_id,
        template(&auth.user_id, &kind, Some(&key), &content),
    )
    .await?;
    Ok(Json(json!({ "event_id": event_id })))
}

/// The spec requires canonical aliases to point at the room (`M_BAD_ALIAS`).
async fn check_canonical_alias(
    state: &AppState,
    room_id: &str,
    content: &Value,
) -> MatrixResult<()> {
    let mut aliases: Vec<&str> = content
        .get("alias")
        .and_then(Value::as_str)
        .into_iter()
        .collect();
    if let Some(alt) = content.get("alt_aliases") {
        let alt = alt
            .as_array()
            .ok_or_else(|| MatrixError::bad_json("alt_aliases must be an array"))?;
        for alias in alt {
            aliases.push(
                alias
                    .as_str()
                    .ok_or_else(|| MatrixError::bad_json("alt_aliases must be strings"))?,
            );
        }
    }
    for alias in aliases {
        if state.store.alias_room(alias).await?.as_deref() != Some(room_id) {
            return Err(MatrixError::new(
                axum::http::StatusCode::BAD_REQUEST,
                "M_BAD_ALIAS",
                format!("Alias {alias} does not point to this room"),
            ));
        }
    }
    Ok(())
}

pub async fn redact(
    State(state): State<AppState>,
    auth: Authed,
    Path((room, event, txn)): Path<(String, String, String)>,
    MatrixBody(body): MatrixBody,
) -> MatrixResult<Json<Value>> {
    let room_id = parse_room_id(&room)?;
    let target = EventId::parse(event.as_str())
        .map_err(|e| MatrixError::invalid_param(format!("Invalid event ID: {e}")))?;
    check_id_part("Transaction ID", &txn)?;
    let mut content = if body.is_empty() {
        serde_json::Map::new()
    } else {
        json_object(&body)?
    };
    if let Some(reason) = content.get("reason")
        && !reason.is_string()
    {
        return Err(MatrixError::bad_json("reason must be a string"));
    }
    if let Some(event_id) = state
        .store
        .txn_event(auth.user_id.as_str(), &auth.device_id, &txn)
        .await?
    {
        return Ok(Json(json!({ "event_id": event_id })));
    }
    let room_row = state
        .store
        .room(room_id.as_str())
        .await?
        .ok_or_else(|| MatrixError::not_found("Unknown room"))?;
    // As Synapse does: a redaction names an event of its own room. (One we
    // have not seen is accepted: it may still arrive, and the redaction
    // waits for it.)
    if let Some(stored) = state.store.event(target.as_str()).await?
        && stored.room_id != room_id.as_str()
    {
        return Err(MatrixError::invalid_param(
            "the event to redact is in another room",
        ));
    }
    let version = ruma::RoomVersionId::try_from(room_row.room_version.as_str())
        .map_err(|e| MatrixError::internal(e.to_string()))?;
    let content_redacts = version
        .rules()
        .is_some_and(|r| r.redaction.content_field_redacts);
    if content_redacts {
        content.insert("redacts".into(), json!(target));
    }
    let mut t = template(
        &auth.user_id,
        "m.room.redaction",
        None,
        &Value::Object(content),
    );
    t.redacts = Some(target.to_string());
    let event_id = send(&state, &room_id, with_txn(t, &auth.device_id, &txn)).await?;
    Ok(Json(json!({ "event_id": event_id })))
}
