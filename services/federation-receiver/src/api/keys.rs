//! The key API: our keys, and keys of other servers as a notary.

use axum::Json;
use axum::extract::{Path, State};
use serde_json::{Value, json};
use tessera_events::ruma::ServerName;
use tessera_federation::keys::server_keys_document;
use tessera_matrix_http::{MatrixError, MatrixJson};

use crate::state::AppState;

pub async fn server(State(state): State<AppState>) -> Json<Value> {
    let valid_until =
        tessera_federation::now_ms() + state.config.federation.key_validity_hours * 3600 * 1000;
    Json(server_keys_document(
        &state.server_name,
        &state.key,
        valid_until,
    ))
}

/// Another server's key document with our signature added (notary).
async fn notarised(state: &AppState, server: &ServerName) -> Option<Value> {
    let document = state.keyring.fetch_document(server).await.ok()?;
    let mut object: tessera_events::ruma::CanonicalJsonObject =
        serde_json::from_value(document).ok()?;
    tessera_events::ruma::signatures::sign_json(
        state.server_name.as_str(),
        state.key.pair(),
        &mut object,
    )
    .ok()?;
    serde_json::to_value(object).ok()
}

pub async fn query(
    State(state): State<AppState>,
    MatrixJson(body): MatrixJson<Value>,
) -> Result<Json<Value>, MatrixError> {
    let servers = body
        .get("server_keys")
        .and_then(Value::as_object)
        .ok_or_else(|| MatrixError::bad_json("server_keys must be an object"))?;
    if servers.len() > 100 {
        return Err(MatrixError::bad_json("too many servers in one query"));
    }
    let mut documents = Vec::new();
    for name in servers.keys() {
        let Ok(server) = <&ServerName>::try_from(name.as_str()) else {
            continue;
        };
        if let Some(document) = notarised(&state, server).await {
            documents.push(document);
        }
    }
    Ok(Json(json!({ "server_keys": documents })))
}

pub async fn query_one(
    State(state): State<AppState>,
    Path(server): Path<String>,
) -> Result<Json<Value>, MatrixError> {
    let server = <&ServerName>::try_from(server.as_str())
        .map_err(|e| MatrixError::invalid_param(format!("invalid server name: {e}")))?;
    let documents: Vec<Value> = notarised(&state, server).await.into_iter().collect();
    Ok(Json(json!({ "server_keys": documents })))
}
