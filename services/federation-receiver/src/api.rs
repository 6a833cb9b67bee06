//! Routes of the server-server API and the key API.

mod edus;
mod invite;
mod keys;
mod membership;
mod query;
mod reads;
mod transactions;

use axum::Router;
use axum::routing::{get, post, put};
use tessera_matrix_http::{MatrixError, layers};

use crate::state::AppState;

pub fn router(state: AppState, admin: Option<Router>) -> Router {
    Router::new()
        .route("/_matrix/key/v2/server", get(keys::server))
        .route("/_matrix/key/v2/server/{key_id}", get(keys::server))
        .route("/_matrix/key/v2/query", post(keys::query))
        .route("/_matrix/key/v2/query/{server}", get(keys::query_one))
        .route("/_matrix/federation/v1/version", get(query::version))
        .route(
            "/_matrix/federation/v1/send/{txn}",
            put(transactions::send)
                .route_layer(axum::middleware::from_fn_with_state(
                    state.clone(),
                    transactions::large_transactions_at_low_priority,
                ))
                .route_layer(axum::middleware::from_fn_with_state(
                    state.clone(),
                    transactions::refuse_throttled_origin,
                )),
        )
        .route(
            "/_matrix/federation/v1/make_join/{room}/{user}",
            get(membership::make_join),
        )
        .route(
            "/_matrix/federation/v1/make_leave/{room}/{user}",
            get(membership::make_leave),
        )
        .route(
            "/_matrix/federation/v1/make_knock/{room}/{user}",
            get(membership::make_knock),
        )
        .route(
            "/_matrix/federation/v2/send_join/{room}/{event}",
            put(membership::send_join),
        )
        .route(
            "/_matrix/federation/v1/send_join/{room}/{event}",
            put(membership::send_join_v1),
        )
        .route(
            "/_matrix/federation/v2/send_leave/{room}/{event}",
            put(membership::send_leave),
        )
        .route(
            "/_matrix/federation/v1/send_leave/{room}/{event}",
            put(membership::send_leave_v1),
        )
        .route(
            "/_matrix/federation/v1/send_knock/{room}/{event}",
            put(membership::send_knock),
        )
        .route(
            "/_matrix/federation/v2/invite/{room}/{event}",
            put(invite::invite),
        )
        .route("/_matrix/federation/v1/event/{event}", get(reads::event))
        .route("/_matrix/federation/v1/state/{room}", get(reads::state))
        .route(
            "/_matrix/federation/v1/state_ids/{room}",
            get(reads::state_ids),
        )
        .route(
            "/_matrix/federation/v1/event_auth/{room}/{event}",
            get(reads::event_auth),
        )
        .route(
            "/_matrix/federation/v1/backfill/{room}",
            get(reads::backfill),
        )
        .route(
            "/_matrix/federation/v1/get_missing_events/{room}",
            post(reads::get_missing_events),
        )
        .route("/_matrix/federation/v1/query/profile", get(query::profile))
        .route(
            "/_matrix/federation/v1/query/directory",
            get(query::directory),
        )
        .fallback(layers::unrecognized)
        .method_not_allowed_fallback(layers::method_not_allowed)
        .with_state(state)
        .layer(axum::middleware::from_fn(layers::metrics))
        .merge(admin.unwrap_or_default())
}

/// A room ID from a path segment.
pub fn room_id(room: &str) -> Result<tessera_events::ruma::OwnedRoomId, MatrixError> {
    tessera_events::ruma::RoomId::parse(room)
        .map_err(|e| MatrixError::invalid_param(format!("invalid room ID: {e}")))
}

/// The room must be one we know, its ACL must admit the origin.
pub async fn room_for(
    state: &AppState,
    room: &str,
    origin: &str,
) -> Result<tessera_events::ruma::RoomVersionId, MatrixError> {
    let room_id = room_id(room)?;
    let version = state
        .room_version(room_id.as_str())
        .await?
        .ok_or_else(|| MatrixError::not_found(format!("room {room_id} is not known here")))?;
    if !state.acl_allows(room_id.as_str(), origin).await? {
        return Err(MatrixError::forbidden(format!(
            "the room's server ACL denies {origin}"
        )));
    }
    Ok(version)
}

/// An event sent whole in a request about `event` (send_join and friends,
/// invites): format, signatures and content hash checked (a bad signature
/// is `M_FORBIDDEN`; a bad hash gives the redacted event), and its ID must
/// be the path's.
pub async fn checked_event(
    state: &AppState,
    object: tessera_events::ruma::CanonicalJsonObject,
    rules: &tessera_events::ruma::room_version_rules::RoomVersionRules,
    room_id: &tessera_events::ruma::RoomId,
    event: &str,
) -> Result<tessera_federation::pdu::Checked, MatrixError> {
    let checked = tessera_federation::pdu::check(&state.keyring, object, rules, Some(room_id))
        .await
        .map_err(|e| MatrixError::forbidden(e.to_string()))?;
    if checked.pdu.event_id().as_str() != event {
        return Err(MatrixError::bad_json(format!(
            "the event's ID is {}, not {event}",
            checked.pdu.event_id()
        )));
    }
    Ok(checked)
}

/// An event reduced to the stripped state the spec shows with invites and
/// knocks: type, state key, sender and content.
pub fn stripped_event(event: &serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "type": event["type"],
        "state_key": event["state_key"],
        "sender": event["sender"],
        "content": event["content"],
    })
}
