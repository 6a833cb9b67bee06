//! Profiles: displayname and avatar_url. A change is also sent as a new
//! membership event into every room the user is in, as clients expect.

use axum::Json;
use axum::extract::{Path, State};
use ruma::UserId;
use serde::Deserialize;
use serde_json::{Value, json};
use tessera_matrix_http::auth::Authed;
use tessera_matrix_http::{MatrixError, MatrixJson, MatrixResult};

use crate::rooms::{send, template};
use crate::state::AppState;

async fn profile_row(
    state: &AppState,
    user: &str,
) -> MatrixResult<tessera_storage::users::UserRow> {
    let user_id = UserId::parse(user)
        .map_err(|e| MatrixError::invalid_param(format!("Invalid user ID: {e}")))?;
    state
        .store
        .user(user_id.as_str())
        .await?
        .ok_or_else(|| MatrixError::not_found("Profile was not found"))
}

pub async fn profile(
    State(state): State<AppState>,
    Path(user): Path<String>,
) -> MatrixResult<Json<Value>> {
    let row = profile_row(&state, &user).await?;
    let mut body = json!({});
    if let Some(name) = row.displayname {
        body["displayname"] = json!(name);
    }
    if let Some(avatar) = row.avatar_url {
        body["avatar_url"] = json!(avatar);
    }
    Ok(Json(body))
}

pub async fn get_displayname(
    State(state): State<AppState>,
    Path(user): Path<String>,
) -> MatrixResult<Json<Value>> {
    let row = profile_row(&state, &user).await?;
    Ok(Json(match row.displayname {
        Some(name) => json!({ "displayname": name }),
        None => json!({}),
    }))
}

pub async fn get_avatar_url(
    State(state): State<AppState>,
    Path(user): Path<String>,
) -> MatrixResult<Json<Value>> {
    let row = profile_row(&state, &user).await?;
    Ok(Json(match row.avatar_url {
        Some(url) => json!({ "avatar_url": url }),
        None => json!({}),
    }))
}

#[derive(Deserialize)]
pub struct DisplaynameBody {
    displayname: Option<String>,
}

#[derive(Deserialize)]
pub struct AvatarBody {
    avatar_url: Option<String>,
}

fn own(auth: &Authed, user: &str) -> MatrixResult<()> {
    if auth.user_id.as_str() != user {
        return Err(MatrixError::forbidden(
            "You cannot change another user's profile",
        ));
    }
    Ok(())
}

pub async fn set_displayname(
    State(state): State<AppState>,
    auth: Authed,
    Path(user): Path<String>,
    MatrixJson(body): MatrixJson<DisplaynameBody>,
) -> MatrixResult<Json<Value>> {
    own(&auth, &user)?;
    if body.displayname.as_ref().is_some_and(|n| n.len() > 256) {
        return Err(MatrixError::bad_json(
            "displayname is longer than 256 bytes",
        ));
    }
    state
        .store
        .set_displayname(auth.user_id.as_str(), body.displayname.as_deref())
        .await?;
    propagate(&state, &auth).await?;
    Ok(Json(json!({})))
}

pub async fn set_avatar_url(
    State(state): State<AppState>,
    auth: Authed,
    Path(user): Path<String>,
    MatrixJson(body): MatrixJson<AvatarBody>,
) -> MatrixResult<Json<Value>> {
    own(&auth, &user)?;
    if body.avatar_url.as_ref().is_some_and(|u| u.len() > 1024) {
        return Err(MatrixError::bad_json("avatar_url is too long"));
    }
    state
        .store
        .set_avatar_url(auth.user_id.as_str(), body.avatar_url.as_deref())
        .await?;
    propagate(&state, &auth).await?;
    Ok(Json(json!({})))
}

/// Send an updated membership event into every joined room.
async fn propagate(state: &AppState, auth: &Authed) -> MatrixResult<()> {
    let Some(row) = state.store.user(auth.user_id.as_str()).await? else {
        return Ok(());
    };
    for room in state
        .store
        .rooms_with_membership(auth.user_id.as_str(), "join")
        .await?
    {
        let Ok(room_id) = ruma::RoomId::parse(room.as_str()) else {
            continue;
        };
        let mut content = json!({ "membership": "join" });
        if let Some(name) = &row.displayname {
            content["displayname"] = json!(name);
        }
        if let Some(avatar) = &row.avatar_url {
            content["avatar_url"] = json!(avatar);
        }
        if let Err(error) = send(
            state,
            &room_id,
            template(
                &auth.user_id,
                "m.room.member",
                Some(auth.user_id.as_str()),
                &content,
            ),
        )
        .await
        {
            tracing::warn!(room = %room_id, %error, "cannot update the membership event after a profile change");
        }
    }
    Ok(())
}
