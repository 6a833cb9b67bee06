//! Creating accounts.
//!
//! Registration is closed by default. Accounts come from:
//! - the Synapse-compatible shared-secret endpoint `/_synapse/admin/v1/register`
//!   (nonce + HMAC-SHA1, as `register_new_matrix_user` and Complement use it);
//! - `/register` with a registration token (`m.login.registration_token`),
//!   tokens being made by admins through `/_synapse/admin/v1/registration_tokens`;
//! - `/register` with `m.login.dummy`, only when `registration.open` is set.

use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use hmac::{Hmac, Mac};
use ruma::UserId;
use serde::Deserialize;
use serde_json::{Value, json};
use tessera_matrix_http::auth::Authed;
use tessera_matrix_http::{MatrixError, MatrixJson, MatrixResult};
use tessera_storage::StoreError;
use tessera_storage::users::NewUser;

use super::session::{hash_password, random_string, session_response};
use crate::state::AppState;

const DUMMY: &str = "m.login.dummy";
const TOKEN: &str = "m.login.registration_token";

/// The user ID a localpart makes, if the localpart is acceptable: the
/// characters Synapse allows, not starting with `_` (reserved for bridges).
fn user_id_for(state: &AppState, localpart: &str) -> MatrixResult<ruma::OwnedUserId> {
    if localpart.is_empty() {
        return Err(MatrixError::invalid_username("User ID cannot be empty"));
    }
    if localpart.starts_with('_') {
        return Err(MatrixError::invalid_username(
            "User ID may not begin with '_'",
        ));
    }
    if !localpart
        .chars()
        .all(|c| matches!(c, 'a'..='z' | '0'..='9' | '.' | '_' | '=' | '-' | '/' | '+'))
    {
        return Err(MatrixError::invalid_username(
            "User ID can only contain characters a-z, 0-9, or '=_-./+'",
        ));
    }
    let full = format!("@{localpart}:{}", state.server_name());
    if full.len() > 255 {
        return Err(MatrixError::invalid_username("User ID is too long"));
    }
    UserId::parse(full).map_err(|e| MatrixError::invalid_username(e.to_string()))
}

fn flows(state: &AppState) -> Vec<Value> {
    let mut flows = Vec::new();
    if state.config.registration.open {
        flows.push(json!({ "stages": [DUMMY] }));
    }
    if state.config.registration.tokens {
        flows.push(json!({ "stages": [TOKEN] }));
    }
    flows
}

fn uia_challenge(
    state: &AppState,
    session: &str,
    completed: &[String],
    error: Option<MatrixError>,
) -> MatrixError {
    let mut challenge = MatrixError::new(
        StatusCode::UNAUTHORIZED,
        "M_FORBIDDEN",
        "Additional authentication required",
    )
    .with("flows", Value::Array(flows(state)))
    .with("params", json!({}))
    .with("session", json!(session))
    .with("completed", json!(completed));
    if let Some(error) = error {
        challenge.errcode = error.errcode;
        challenge.message = error.message;
    } else {
        // A plain challenge carries no errcode, per the spec's examples.
        challenge.extra.insert("errcode".into(), Value::Null);
    }
    challenge
}

#[derive(Deserialize, Default)]
pub struct RegisterQuery {
    kind: Option<String>,
}

#[derive(Deserialize)]
pub struct RegisterBody {
    username: Option<String>,
    password: Option<String>,
    device_id: Option<String>,
    initial_device_display_name: Option<String>,
    auth: Option<AuthBody>,
    #[serde(default)]
    inhibit_login: bool,
}

#[derive(Deserialize)]
struct AuthBody {
    #[serde(rename = "type")]
    kind: Option<String>,
    session: Option<String>,
    token: Option<String>,
}

pub async fn register(
    State(state): State<AppState>,
    Query(query): Query<RegisterQuery>,
    MatrixJson(body): MatrixJson<RegisterBody>,
) -> MatrixResult<Json<Value>> {
    if query.kind.as_deref() == Some("guest") {
        return Err(MatrixError::new(
            StatusCode::FORBIDDEN,
            "M_GUEST_ACCESS_FORBIDDEN",
            "Guest access is disabled",
        ));
    }
    if flows(&state).is_empty() {
        return Err(MatrixError::forbidden("Registration has been disabled"));
    }
    let localpart = match &body.username {
        Some(name) => name.to_lowercase(),
        None => format!("{}", rand::random::<u32>()),
    };
    let user_id = user_id_for(&state, &localpart)?;
    if state.store.user(user_id.as_str()).await?.is_some() {
        return Err(MatrixError::user_in_use());
    }
    if let Some(password) = &body.password
        && password.len() > 512
    {
        return Err(MatrixError::bad_json("Password too long"));
    }

    // User-interactive authentication: a session per attempt, in Postgres.
    let Some(auth) = body.auth else {
        let session = random_string(24);
        state.store.create_uia_session(&session).await?;
        return Err(uia_challenge(&state, &session, &[], None));
    };
    let session = auth
        .session
        .ok_or_else(|| MatrixError::missing_param("auth.session is required"))?;
    let Some((mut completed, mut proven_token)) = state.store.uia_session(&session).await? else {
        return Err(MatrixError::new(
            StatusCode::BAD_REQUEST,
            "M_UNKNOWN",
            "Unknown session",
        ));
    };
    match auth.kind.as_deref() {
        Some(DUMMY) if state.config.registration.open => {
            state
                .store
                .complete_uia_stage(&session, DUMMY, None)
                .await?;
            completed.push(DUMMY.to_owned());
        }
        Some(TOKEN) if state.config.registration.tokens => {
            let token = auth
                .token
                .ok_or_else(|| MatrixError::missing_param("auth.token is required"))?;
            if !state
                .store
                .registration_token_valid(&token, now_ms())
                .await?
            {
                return Err(uia_challenge(
                    &state,
                    &session,
                    &completed,
                    Some(MatrixError::forbidden("Invalid registration token")),
                ));
            }
            state
                .store
                .complete_uia_stage(&session, TOKEN, Some(&token))
                .await?;
            completed.push(TOKEN.to_owned());
            proven_token = Some(token);
        }
        Some(other) => {
            return Err(uia_challenge(
                &state,
                &session,
                &completed,
                Some(MatrixError::new(
                    StatusCode::BAD_REQUEST,
                    "M_UNRECOGNIZED",
                    format!("Unsupported stage {other}"),
                )),
            ));
        }
        None => {}
    }
    let done = (state.config.registration.open && completed.iter().any(|c| c == DUMMY))
        || (state.config.registration.tokens && completed.iter().any(|c| c == TOKEN));
    if !done {
        return Err(uia_challenge(&state, &session, &completed, None));
    }
    if let Some(token) = &proven_token
        && !state
            .store
            .consume_registration_token(token, now_ms())
            .await?
    {
        return Err(uia_challenge(
            &state,
            &session,
            &completed,
            Some(MatrixError::forbidden(
                "Registration token is used up or expired",
            )),
        ));
    }
    let password_hash = match body.password {
        Some(password) => Some(hash_password(password).await?),
        None => None,
    };
    create_account(
        &state,
        &user_id,
        password_hash.as_deref(),
        false,
        None,
        None,
    )
    .await?;
    state.store.delete_uia_session(&session).await?;
    tracing::info!(user_id = %user_id, via = if proven_token.is_some() { "token" } else { "open" }, "registered");
    if body.inhibit_login {
        return Ok(Json(
            json!({ "user_id": user_id, "home_server": state.server_name() }),
        ));
    }
    session_response(
        &state,
        &user_id,
        body.device_id,
        body.initial_device_display_name.as_deref(),
    )
    .await
}

async fn create_account(
    state: &AppState,
    user_id: &UserId,
    password_hash: Option<&str>,
    admin: bool,
    user_type: Option<&str>,
    displayname: Option<&str>,
) -> MatrixResult<()> {
    let default_name = user_id.localpart().to_owned();
    let result = state
        .store
        .create_user(&NewUser {
            user_id: user_id.as_str(),
            password_hash,
            admin,
            user_type,
            displayname: Some(displayname.unwrap_or(&default_name)),
        })
        .await;
    match result {
        Ok(()) => {
            metrics::counter!("tessera_registrations_total").increment(1);
            Ok(())
        }
        Err(StoreError::Conflict(_)) => Err(MatrixError::user_in_use()),
        Err(e) => Err(e.into()),
    }
}

fn now_ms() -> i64 {
    crate::rooms::now_ms() as i64
}

#[derive(Deserialize)]
pub struct AvailableQuery {
    username: Option<String>,
}

pub async fn available(
    State(state): State<AppState>,
    Query(query): Query<AvailableQuery>,
) -> MatrixResult<Json<Value>> {
    let username = query
        .username
        .ok_or_else(|| MatrixError::missing_param("username is required"))?;
    let user_id = user_id_for(&state, &username.to_lowercase())?;
    if state.store.user(user_id.as_str()).await?.is_some() {
        return Err(MatrixError::user_in_use());
    }
    Ok(Json(json!({ "available": true })))
}

#[derive(Deserialize)]
pub struct ValidityQuery {
    token: Option<String>,
}

pub async fn token_validity(
    State(state): State<AppState>,
    Query(query): Query<ValidityQuery>,
) -> MatrixResult<Json<Value>> {
    let token = query
        .token
        .ok_or_else(|| MatrixError::missing_param("token is required"))?;
    if !state.config.registration.tokens {
        return Err(MatrixError::forbidden("Registration tokens are disabled"));
    }
    let valid = state
        .store
        .registration_token_valid(&token, now_ms())
        .await?;
    Ok(Json(json!({ "valid": valid })))
}

// --- Synapse-compatible shared-secret registration ---

pub async fn admin_nonce(State(state): State<AppState>) -> MatrixResult<Json<Value>> {
    if state.config.registration.shared_secret.is_none() {
        return Err(MatrixError::new(
            StatusCode::BAD_REQUEST,
            "M_UNKNOWN",
            "Shared secret registration is not enabled",
        ));
    }
    let nonce = random_string(32);
    state.store.create_nonce(&nonce).await?;
    Ok(Json(json!({ "nonce": nonce })))
}

#[derive(Deserialize)]
pub struct AdminRegisterBody {
    nonce: String,
    username: String,
    password: String,
    #[serde(default)]
    admin: bool,
    mac: String,
    displayname: Option<String>,
    user_type: Option<String>,
}

pub async fn admin_register(
    State(state): State<AppState>,
    MatrixJson(body): MatrixJson<AdminRegisterBody>,
) -> MatrixResult<Json<Value>> {
    let Some(secret) = &state.config.registration.shared_secret else {
        return Err(MatrixError::new(
            StatusCode::BAD_REQUEST,
            "M_UNKNOWN",
            "Shared secret registration is not enabled",
        ));
    };
    if body.password.len() > 512 || body.password.contains('\0') {
        return Err(MatrixError::invalid_param("Invalid password"));
    }
    if !state
        .store
        .consume_nonce(&body.nonce, Duration::from_secs(60))
        .await?
    {
        return Err(MatrixError::new(
            StatusCode::BAD_REQUEST,
            "M_UNKNOWN",
            "unrecognised nonce",
        ));
    }
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes())
        .map_err(|e| MatrixError::internal(e.to_string()))?;
    mac.update(body.nonce.as_bytes());
    mac.update(b"\0");
    mac.update(body.username.as_bytes());
    mac.update(b"\0");
    mac.update(body.password.as_bytes());
    mac.update(b"\0");
    mac.update(if body.admin {
        b"admin".as_slice()
    } else {
        b"notadmin".as_slice()
    });
    if let Some(user_type) = &body.user_type {
        mac.update(b"\0");
        mac.update(user_type.as_bytes());
    }
    let given = hex::decode(&body.mac).map_err(|_| MatrixError::forbidden("HMAC incorrect"))?;
    mac.verify_slice(&given)
        .map_err(|_| MatrixError::forbidden("HMAC incorrect"))?;

    let user_id = user_id_for(&state, &body.username.to_lowercase())?;
    let hash = hash_password(body.password).await?;
    create_account(
        &state,
        &user_id,
        Some(&hash),
        body.admin,
        body.user_type.as_deref(),
        body.displayname.as_deref(),
    )
    .await?;
    tracing::info!(user_id = %user_id, admin = body.admin, "registered with the shared secret");
    session_response(&state, &user_id, None, None).await
}

// --- Synapse-compatible registration token admin API ---

pub(crate) fn require_admin(auth: &Authed) -> MatrixResult<()> {
    if auth.admin {
        Ok(())
    } else {
        Err(MatrixError::forbidden("You are not a server admin"))
    }
}

fn token_json(row: &tessera_storage::users::RegistrationTokenRow) -> Value {
    json!({
        "token": row.token,
        "uses_allowed": row.uses_allowed,
        "pending": row.pending,
        "completed": row.completed,
        "expiry_time": row.expiry_time,
    })
}

pub async fn list_tokens(State(state): State<AppState>, auth: Authed) -> MatrixResult<Json<Value>> {
    require_admin(&auth)?;
    let tokens: Vec<Value> = state
        .store
        .registration_tokens()
        .await?
        .iter()
        .map(token_json)
        .collect();
    Ok(Json(json!({ "registration_tokens": tokens })))
}

#[derive(Deserialize)]
pub struct NewTokenBody {
    token: Option<String>,
    uses_allowed: Option<i32>,
    expiry_time: Option<i64>,
    length: Option<usize>,
}

pub async fn new_token(
    State(state): State<AppState>,
    auth: Authed,
    MatrixJson(body): MatrixJson<NewTokenBody>,
) -> MatrixResult<Json<Value>> {
    require_admin(&auth)?;
    let token = match body.token {
        Some(token)
            if !token.is_empty()
                && token.len() <= 64
                && token
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._~-".contains(c)) =>
        {
            token
        }
        Some(_) => {
            return Err(MatrixError::invalid_param(
                "token must be 1-64 characters of [A-Za-z0-9._~-]",
            ));
        }
        None => random_string(body.length.unwrap_or(16).clamp(1, 64)),
    };
    if body.uses_allowed.is_some_and(|u| u < 0) {
        return Err(MatrixError::invalid_param(
            "uses_allowed must be a non-negative integer or null",
        ));
    }
    match state
        .store
        .create_registration_token(&token, body.uses_allowed, body.expiry_time)
        .await
    {
        Ok(()) => {}
        Err(StoreError::Conflict(_)) => {
            return Err(MatrixError::invalid_param(format!(
                "Token already exists: {token}"
            )));
        }
        Err(e) => return Err(e.into()),
    }
    Ok(Json(
        json!({ "token": token, "uses_allowed": body.uses_allowed, "pending": 0, "completed": 0, "expiry_time": body.expiry_time }),
    ))
}

pub async fn delete_token(
    State(state): State<AppState>,
    auth: Authed,
    Path(token): Path<String>,
) -> MatrixResult<Json<Value>> {
    require_admin(&auth)?;
    if !state.store.delete_registration_token(&token).await? {
        return Err(MatrixError::not_found(format!(
            "No such registration token: {token}"
        )));
    }
    Ok(Json(json!({})))
}
