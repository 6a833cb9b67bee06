//! Sessions: `/login` (m.login.password), `/logout`, `/logout/all`,
//! `/account/whoami`, `/devices`. Passwords are argon2 hashes; access tokens
//! are random and stored as SHA-256 hashes.

use axum::Json;
use axum::extract::State;
use rand::Rng;
use rand::distributions::Alphanumeric;
use ruma::{OwnedUserId, UserId};
use serde::Deserialize;
use serde_json::{Value, json};
use tessera_matrix_http::auth::{Authed, hash_token};
use tessera_matrix_http::{MatrixError, MatrixJson, MatrixResult};

use crate::state::AppState;

pub async fn login_flows() -> Json<Value> {
    Json(json!({ "flows": [{ "type": "m.login.password" }] }))
}

#[derive(Deserialize)]
pub struct LoginBody {
    #[serde(rename = "type")]
    kind: String,
    identifier: Option<Identifier>,
    /// Deprecated top-level user field, still sent by older clients.
    user: Option<String>,
    password: Option<String>,
    device_id: Option<String>,
    initial_device_display_name: Option<String>,
}

#[derive(Deserialize)]
struct Identifier {
    #[serde(rename = "type")]
    kind: String,
    user: Option<String>,
}

pub fn random_string(len: usize) -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

pub fn new_device_id() -> String {
    let mut rng = rand::thread_rng();
    (0..10)
        .map(|_| (b'A' + rng.gen_range(0..26)) as char)
        .collect()
}

/// Create a device (or reuse one) with a fresh access token.
pub async fn issue_session(
    state: &AppState,
    user_id: &UserId,
    device_id: Option<String>,
    display_name: Option<&str>,
) -> MatrixResult<(String, String)> {
    let device_id = device_id
        .filter(|d| !d.is_empty() && d.len() <= 255)
        .unwrap_or_else(new_device_id);
    let token = format!("tsr_{}", random_string(40));
    state
        .store
        .create_session(
            user_id.as_str(),
            &device_id,
            display_name,
            &hash_token(&token),
        )
        .await?;
    Ok((token, device_id))
}

/// A new device and token for the user, as `/login` and `/register` answer.
pub async fn session_response(
    state: &AppState,
    user_id: &UserId,
    device_id: Option<String>,
    display_name: Option<&str>,
) -> MatrixResult<Json<Value>> {
    let (token, device_id) = issue_session(state, user_id, device_id, display_name).await?;
    Ok(Json(json!({
        "user_id": user_id,
        "access_token": token,
        "device_id": device_id,
        "home_server": state.server_name(),
    })))
}

/// Resolve `@user:server` or a bare localpart to one of our user IDs.
pub fn local_user_id(state: &AppState, user: &str) -> MatrixResult<OwnedUserId> {
    let full = if user.starts_with('@') {
        user.to_owned()
    } else {
        format!("@{}:{}", user.to_lowercase(), state.server_name())
    };
    let user_id = UserId::parse(full)
        .map_err(|e| MatrixError::invalid_param(format!("Invalid user ID: {e}")))?;
    if !state.is_local(&user_id) {
        return Err(MatrixError::forbidden("That user is not on this server"));
    }
    Ok(user_id)
}

pub async fn hash_password(password: String) -> MatrixResult<String> {
    tokio::task::spawn_blocking(move || {
        use argon2::PasswordHasher;
        argon2::Argon2::default()
            .hash_password(password.as_bytes())
            .map(|h| h.to_string())
    })
    .await
    .map_err(|e| MatrixError::internal(e.to_string()))?
    .map_err(|e| MatrixError::internal(format!("cannot hash password: {e}")))
}

async fn verify_password(password: String, hash: Option<String>) -> bool {
    // Unknown users are checked against a throwaway hash, so response times
    // do not tell which users exist.
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    tokio::task::spawn_blocking(move || {
        use argon2::PasswordHasher;
        use argon2::PasswordVerifier;
        let argon = argon2::Argon2::default();
        let hash = hash.unwrap_or_else(|| {
            DUMMY
                .get_or_init(|| {
                    argon
                        .hash_password(random_string(16).as_bytes())
                        .map(|h| h.to_string())
                        .unwrap_or_default()
                })
                .clone()
        });
        match argon2::password_hash::phc::PasswordHash::new(&hash) {
            Ok(parsed) => argon.verify_password(password.as_bytes(), &parsed).is_ok(),
            Err(_) => false,
        }
    })
    .await
    .unwrap_or(false)
}

pub async fn login(
    State(state): State<AppState>,
    MatrixJson(body): MatrixJson<LoginBody>,
) -> MatrixResult<Json<Value>> {
    if body.kind != "m.login.password" {
        return Err(MatrixError::new(
            axum::http::StatusCode::BAD_REQUEST,
            "M_UNKNOWN",
            format!("Unknown login type {}", body.kind),
        ));
    }
    let user = match (&body.identifier, &body.user) {
        (Some(identifier), _) if identifier.kind == "m.id.user" => identifier
            .user
            .clone()
            .ok_or_else(|| MatrixError::bad_json("identifier.user is required"))?,
        (Some(identifier), _) => {
            return Err(MatrixError::new(
                axum::http::StatusCode::BAD_REQUEST,
                "M_UNKNOWN",
                format!("Unsupported identifier type {}", identifier.kind),
            ));
        }
        (None, Some(user)) => user.clone(),
        (None, None) => return Err(MatrixError::bad_json("identifier is required")),
    };
    let password = body
        .password
        .ok_or_else(|| MatrixError::bad_json("password is required"))?;
    let forbidden = || MatrixError::forbidden("Invalid username or password");
    let user_id = local_user_id(&state, &user).map_err(|_| forbidden())?;
    let row = state.store.user(user_id.as_str()).await?;
    let hash = row.as_ref().and_then(|r| r.password_hash.clone());
    if !verify_password(password, hash).await || row.is_none() {
        return Err(forbidden());
    }
    if row.as_ref().is_some_and(|r| r.deactivated) {
        return Err(MatrixError::new(
            axum::http::StatusCode::FORBIDDEN,
            "M_USER_DEACTIVATED",
            "This account has been deactivated",
        ));
    }
    metrics::counter!("tessera_logins_total").increment(1);
    session_response(
        &state,
        &user_id,
        body.device_id,
        body.initial_device_display_name.as_deref(),
    )
    .await
}

pub async fn logout(State(state): State<AppState>, auth: Authed) -> MatrixResult<Json<Value>> {
    state
        .store
        .delete_device(auth.user_id.as_str(), &auth.device_id)
        .await?;
    Ok(Json(json!({})))
}

pub async fn logout_all(State(state): State<AppState>, auth: Authed) -> MatrixResult<Json<Value>> {
    state
        .store
        .delete_all_devices(auth.user_id.as_str())
        .await?;
    Ok(Json(json!({})))
}

pub async fn whoami(auth: Authed) -> Json<Value> {
    Json(json!({ "user_id": auth.user_id, "device_id": auth.device_id, "is_guest": false }))
}

pub async fn devices(State(state): State<AppState>, auth: Authed) -> MatrixResult<Json<Value>> {
    let devices: Vec<Value> = state
        .store
        .devices(auth.user_id.as_str())
        .await?
        .into_iter()
        .map(|(device_id, display_name)| json!({ "device_id": device_id, "display_name": display_name }))
        .collect();
    Ok(Json(json!({ "devices": devices })))
}
