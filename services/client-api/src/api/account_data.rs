//! Account data (global and per room), filters, and read markers
//! (`m.fully_read` is room account data). Writes go on the user's data stream
//! and wake their `/sync`.

use axum::Json;
use axum::extract::{Path, State};
use serde_json::{Value, json};
use tessera_matrix_http::auth::Authed;
use tessera_matrix_http::extract::{MatrixBody, json_object};
use tessera_matrix_http::{MatrixError, MatrixResult};

use super::membership::parse_room_id;
use crate::state::AppState;

fn own(auth: &Authed, user: &str) -> MatrixResult<()> {
    if auth.user_id.as_str() != user {
        return Err(MatrixError::forbidden(
            "You cannot access another user's data",
        ));
    }
    Ok(())
}

fn check_kind(kind: &str) -> MatrixResult<()> {
    if kind.is_empty() || kind.len() > 255 {
        return Err(MatrixError::invalid_param("Invalid account data type"));
    }
    if kind == "m.push_rules" {
        return Err(MatrixError::bad_json(
            "Cannot set m.push_rules through this API",
        ));
    }
    Ok(())
}

async fn put(
    state: &AppState,
    auth: &Authed,
    room: &str,
    kind: &str,
    body: &[u8],
) -> MatrixResult<Json<Value>> {
    check_kind(kind)?;
    let content = Value::Object(json_object(body)?);
    state
        .store
        .set_account_data(auth.user_id.as_str(), room, kind, &content)
        .await?;
    state.publisher.publish_user(auth.user_id.as_str()).await;
    Ok(Json(json!({})))
}

async fn get(state: &AppState, auth: &Authed, room: &str, kind: &str) -> MatrixResult<Json<Value>> {
    state
        .store
        .account_data(auth.user_id.as_str(), room, kind)
        .await?
        .map(Json)
        .ok_or_else(|| MatrixError::not_found("Account data not found"))
}

pub async fn put_global(
    State(state): State<AppState>,
    auth: Authed,
    Path((user, kind)): Path<(String, String)>,
    MatrixBody(body): MatrixBody,
) -> MatrixResult<Json<Value>> {
    own(&auth, &user)?;
    put(&state, &auth, "", &kind, &body).await
}

pub async fn get_global(
    State(state): State<AppState>,
    auth: Authed,
    Path((user, kind)): Path<(String, String)>,
) -> MatrixResult<Json<Value>> {
    own(&auth, &user)?;
    get(&state, &auth, "", &kind).await
}

pub async fn put_room(
    State(state): State<AppState>,
    auth: Authed,
    Path((user, room, kind)): Path<(String, String, String)>,
    MatrixBody(body): MatrixBody,
) -> MatrixResult<Json<Value>> {
    own(&auth, &user)?;
    let room_id = parse_room_id(&room)?;
    if kind == "m.fully_read" {
        return Err(MatrixError::bad_json(
            "Use /read_markers to set m.fully_read",
        ));
    }
    put(&state, &auth, room_id.as_str(), &kind, &body).await
}

pub async fn get_room(
    State(state): State<AppState>,
    auth: Authed,
    Path((user, room, kind)): Path<(String, String, String)>,
) -> MatrixResult<Json<Value>> {
    own(&auth, &user)?;
    let room_id = parse_room_id(&room)?;
    get(&state, &auth, room_id.as_str(), &kind).await
}

/// `m.fully_read` is stored as room account data; read receipts are not
/// delivered yet (ephemeral events arrive with the federation work).
pub async fn read_markers(
    State(state): State<AppState>,
    auth: Authed,
    Path(room): Path<String>,
    MatrixBody(body): MatrixBody,
) -> MatrixResult<Json<Value>> {
    let room_id = parse_room_id(&room)?;
    let markers = json_object(&body)?;
    if let Some(event_id) = markers.get("m.fully_read") {
        let event_id = event_id
            .as_str()
            .ok_or_else(|| MatrixError::bad_json("m.fully_read must be an event ID"))?;
        ruma::EventId::parse(event_id)
            .map_err(|e| MatrixError::bad_json(format!("m.fully_read: {e}")))?;
        let content = json!({ "event_id": event_id });
        state
            .store
            .set_account_data(
                auth.user_id.as_str(),
                room_id.as_str(),
                "m.fully_read",
                &content,
            )
            .await?;
        state.publisher.publish_user(auth.user_id.as_str()).await;
    }
    Ok(Json(json!({})))
}

pub async fn create_filter(
    State(state): State<AppState>,
    auth: Authed,
    Path(user): Path<String>,
    MatrixBody(body): MatrixBody,
) -> MatrixResult<Json<Value>> {
    own(&auth, &user)?;
    let filter = Value::Object(json_object(&body)?);
    tessera_matrix_http::filter::SyncFilter::parse(&filter)?;
    let id = state
        .store
        .create_filter(auth.user_id.as_str(), &filter)
        .await?;
    Ok(Json(json!({ "filter_id": id.to_string() })))
}

pub async fn get_filter(
    State(state): State<AppState>,
    auth: Authed,
    Path((user, filter)): Path<(String, String)>,
) -> MatrixResult<Json<Value>> {
    own(&auth, &user)?;
    let id: i64 = filter
        .parse()
        .map_err(|_| MatrixError::not_found("No such filter"))?;
    state
        .store
        .filter(auth.user_id.as_str(), id)
        .await?
        .map(Json)
        .ok_or_else(|| MatrixError::not_found("No such filter"))
}
