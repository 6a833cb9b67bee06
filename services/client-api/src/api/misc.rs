//! Discovery and server capabilities: `/versions`, `.well-known`,
//! `/capabilities` and the default push rules.

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};
use tessera_events::room_version;
use tessera_matrix_http::MatrixResult;
use tessera_matrix_http::auth::Authed;

use crate::state::AppState;

pub async fn versions() -> Json<Value> {
    Json(json!({
        "versions": [
            "r0.6.1", "v1.1", "v1.2", "v1.3", "v1.4", "v1.5", "v1.6", "v1.7", "v1.8", "v1.9",
            "v1.10", "v1.11", "v1.12"
        ],
        "unstable_features": {}
    }))
}

pub async fn well_known(State(state): State<AppState>) -> Json<Value> {
    let base = state
        .config
        .client_api
        .public_baseurl
        .clone()
        .unwrap_or_else(|| format!("http://{}", state.config.server_name));
    Json(json!({ "m.homeserver": { "base_url": base } }))
}

/// `/.well-known/matrix/server`: where other servers reach us, when configured.
pub async fn well_known_server(State(state): State<AppState>) -> MatrixResult<Json<Value>> {
    match &state.config.client_api.well_known_server {
        Some(server) => Ok(Json(json!({ "m.server": server }))),
        None => Err(tessera_matrix_http::MatrixError::not_found(
            "this server does not delegate federation (client_api.well_known_server is unset)",
        )),
    }
}

pub async fn capabilities(_auth: Authed) -> Json<Value> {
    let available: serde_json::Map<String, Value> = room_version::supported()
        .iter()
        .map(|v| (v.to_string(), json!("stable")))
        .collect();
    Json(json!({
        "capabilities": {
            "m.change_password": { "enabled": false },
            "m.room_versions": {
                "default": room_version::DEFAULT_ROOM_VERSION.as_str(),
                "available": available,
            },
            "m.set_displayname": { "enabled": true },
            "m.set_avatar_url": { "enabled": true },
            "m.3pid_changes": { "enabled": false },
            "m.get_login_token": { "enabled": false },
        }
    }))
}

/// The spec's default push rules for the user (per-user rule changes are not
/// stored yet).
pub async fn push_rules(auth: Authed) -> MatrixResult<Json<Value>> {
    Ok(Json(json!({ "global": default_ruleset(&auth)? })))
}

pub async fn push_rules_global(auth: Authed) -> MatrixResult<Json<Value>> {
    Ok(Json(default_ruleset(&auth)?))
}

fn default_ruleset(auth: &Authed) -> MatrixResult<Value> {
    let ruleset = ruma::push::Ruleset::server_default(&auth.user_id);
    serde_json::to_value(ruleset)
        .map_err(|e| tessera_matrix_http::MatrixError::internal(e.to_string()))
}
