//! Queries and the version endpoint.

use axum::Json;
use axum::extract::{Query, State};
use serde::Deserialize;
use serde_json::{Value, json};
use tessera_matrix_http::MatrixError;

use crate::request::Signed;
use crate::state::AppState;

pub async fn version() -> Json<Value> {
    Json(json!({ "server": { "name": "Tessera", "version": env!("CARGO_PKG_VERSION") } }))
}

#[derive(Deserialize)]
pub struct ProfileQuery {
    user_id: Option<String>,
    field: Option<String>,
}

pub async fn profile(
    State(state): State<AppState>,
    Query(query): Query<ProfileQuery>,
    _signed: Signed,
) -> Result<Json<Value>, MatrixError> {
    let user = query
        .user_id
        .ok_or_else(|| MatrixError::missing_param("user_id is required"))?;
    let user_id = tessera_events::ruma::UserId::parse(user.as_str())
        .map_err(|e| MatrixError::invalid_param(format!("invalid user ID: {e}")))?;
    if user_id.server_name() != state.server_name {
        return Err(MatrixError::invalid_param("the user is not on this server"));
    }
    let row = state
        .store
        .user(user_id.as_str())
        .await?
        .ok_or_else(|| MatrixError::not_found("profile not found"))?;
    let mut body = json!({});
    match query.field.as_deref() {
        None => {
            body["displayname"] = json!(row.displayname);
            body["avatar_url"] = json!(row.avatar_url);
        }
        Some("displayname") => body["displayname"] = json!(row.displayname),
        Some("avatar_url") => body["avatar_url"] = json!(row.avatar_url),
        Some(other) => {
            return Err(MatrixError::invalid_param(format!(
                "unknown profile field {other:?}"
            )));
        }
    }
    Ok(Json(body))
}

#[derive(Deserialize)]
pub struct DirectoryQuery {
    room_alias: Option<String>,
}

pub async fn directory(
    State(state): State<AppState>,
    Query(query): Query<DirectoryQuery>,
    _signed: Signed,
) -> Result<Json<Value>, MatrixError> {
    let alias = query
        .room_alias
        .ok_or_else(|| MatrixError::missing_param("room_alias is required"))?;
    let alias = tessera_events::ruma::RoomAliasId::parse(alias.as_str())
        .map_err(|e| MatrixError::invalid_param(format!("invalid alias: {e}")))?;
    let room_id = state
        .store
        .alias_room(alias.as_str())
        .await?
        .ok_or_else(|| MatrixError::not_found("room alias not found"))?;
    let mut servers = state.store.servers_in_room(&room_id).await?;
    if !servers.contains(&state.server_name.to_string()) {
        servers.insert(0, state.server_name.to_string());
    }
    Ok(Json(json!({ "room_id": room_id, "servers": servers })))
}
