//! The Synapse-compatible user admin API an operator needs in a spam wave:
//! listing accounts (newest first, to review recent signups) and
//! deactivating one (it can no longer log in, loses every access token, and
//! leaves its rooms). Server admins only.

use axum::Json;
use axum::extract::{Path, Query, State};
use ruma::{RoomId, UserId};
use serde::Deserialize;
use serde_json::{Value, json};
use tessera_matrix_http::auth::Authed;
use tessera_matrix_http::{MatrixError, MatrixJson, MatrixResult};

use super::register::require_admin;
use crate::rooms::{send, template};
use crate::state::AppState;

#[derive(Deserialize)]
pub struct ListQuery {
    from: Option<String>,
    limit: Option<i64>,
    order_by: Option<String>,
    dir: Option<String>,
    deactivated: Option<bool>,
}

/// `GET /_synapse/admin/v2/users`: `from` (an offset), `limit` (at most
/// 1000), `order_by=creation_ts` (the only order; `name` is accepted and
/// sorts by creation too), `dir=b` for newest first, `deactivated=true` to
/// include deactivated accounts.
pub async fn list_users(
    State(state): State<AppState>,
    auth: Authed,
    Query(query): Query<ListQuery>,
) -> MatrixResult<Json<Value>> {
    require_admin(&auth)?;
    let offset: i64 = match query.from.as_deref() {
        None => 0,
        Some(from) => from
            .parse()
            .ok()
            .filter(|n| *n >= 0)
            .ok_or_else(|| MatrixError::invalid_param("from must be a non-negative integer"))?,
    };
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(MatrixError::invalid_param(
            "limit must be between 1 and 1000",
        ));
    }
    if !matches!(
        query.order_by.as_deref(),
        None | Some("creation_ts" | "name")
    ) {
        return Err(MatrixError::invalid_param(
            "order_by must be creation_ts (or name)",
        ));
    }
    let newest_first = match query.dir.as_deref() {
        None | Some("f") => false,
        Some("b") => true,
        Some(_) => return Err(MatrixError::invalid_param("dir must be f or b")),
    };
    let (users, total) = state
        .store
        .list_users(
            offset,
            limit,
            newest_first,
            query.deactivated.unwrap_or(false),
        )
        .await?;
    let next = offset + users.len() as i64;
    let mut body = json!({
        "users": users.iter().map(|u| json!({
            "name": u.user_id,
            "admin": u.admin,
            "deactivated": u.deactivated,
            "user_type": u.user_type,
            "displayname": u.displayname,
            "avatar_url": u.avatar_url,
            "creation_ts": u.created_ms,
        })).collect::<Vec<_>>(),
        "total": total,
    });
    if next < total {
        body["next_token"] = json!(next.to_string());
    }
    Ok(Json(body))
}

#[derive(Deserialize, Default)]
pub struct DeactivateBody {
    #[serde(default)]
    erase: bool,
}

/// `POST /_synapse/admin/v1/deactivate/{user_id}`: a local account is
/// deactivated, its tokens revoked, and it leaves every room it is joined,
/// invited or knocking in (rooms where the leave fails are logged and
/// skipped). `erase` is accepted; there is no media or profile data to erase
/// beyond what deactivation stops serving.
pub async fn deactivate(
    State(state): State<AppState>,
    auth: Authed,
    Path(user): Path<String>,
    MatrixJson(body): MatrixJson<DeactivateBody>,
) -> MatrixResult<Json<Value>> {
    require_admin(&auth)?;
    let user_id = UserId::parse(user.as_str())
        .map_err(|e| MatrixError::invalid_param(format!("Invalid user ID: {e}")))?;
    if !state.is_local(&user_id) {
        return Err(MatrixError::invalid_param(
            "Can only deactivate local users",
        ));
    }
    if !state.store.deactivate_user(user_id.as_str()).await? {
        return Err(MatrixError::not_found(format!("User {user_id} not found")));
    }
    let mut rooms = Vec::new();
    for membership in ["join", "invite", "knock"] {
        rooms.extend(
            state
                .store
                .rooms_with_membership(user_id.as_str(), membership)
                .await?,
        );
    }
    let mut left = 0;
    for room in &rooms {
        let Ok(room_id) = RoomId::parse(room.as_str()) else {
            continue;
        };
        let leave = template(
            &user_id,
            "m.room.member",
            Some(user_id.as_str()),
            &json!({ "membership": "leave", "reason": "deactivated" }),
        );
        match send(&state, &room_id, leave).await {
            Ok(_) => left += 1,
            Err(error) => {
                tracing::warn!(%user_id, room = %room_id, ?error, "a deactivated user could not leave a room")
            }
        }
    }
    tracing::info!(%user_id, by = %auth.user_id, rooms = rooms.len(), left, erase = body.erase, "deactivated a user");
    Ok(Json(json!({ "id_server_unbind_result": "success" })))
}
