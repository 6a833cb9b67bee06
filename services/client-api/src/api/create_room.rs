//! `POST /createRoom`.
//!
//! The client-api turns the request into the list of events the spec orders
//! (through `tessera_events::room_setup`), picks the room ID (random before
//! room v12, the create event's reference hash from v12) and hands everything
//! to the owner of the room's partition, which builds and commits it all in
//! one transaction.

use axum::Json;
use axum::extract::State;
use rand::Rng;
use ruma::api::client::room::Visibility;
use ruma::api::client::room::create_room::v3::{Request, RoomPreset};
use ruma::{OwnedRoomAliasId, RoomAliasId, RoomId};
use serde_json::{Map, Value, json};
use tessera_events::build::{EventTemplate, v12_room_id};
use tessera_events::room_setup::{self, Preset, RoomSetup};
use tessera_events::room_version;
use tessera_matrix_http::auth::Authed;
use tessera_matrix_http::{MatrixError, MatrixResult, Ruma};
use tessera_proto::room_worker::{CreateRoomRequest, create_room_response};

use crate::rooms::{now_ms, route_error};
use crate::state::AppState;

fn raw_object<T>(raw: &ruma::serde::Raw<T>, what: &str) -> MatrixResult<Map<String, Value>> {
    match serde_json::from_str::<Value>(raw.json().get()) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(MatrixError::bad_json(format!(
            "{what} must be a JSON object"
        ))),
    }
}

pub fn proto_template(t: &EventTemplate) -> tessera_proto::room_worker::EventTemplate {
    tessera_proto::room_worker::EventTemplate {
        r#type: t.kind.clone(),
        state_key: t.state_key.clone(),
        content_json: t.content.to_string(),
        sender: t.sender.to_string(),
        origin_server_ts: t.origin_server_ts,
        redacts: t.redacts.as_ref().map(|r| r.to_string()),
        txn: None,
    }
}

pub async fn create_room(
    State(state): State<AppState>,
    auth: Authed,
    Ruma(request): Ruma<Request>,
) -> MatrixResult<Json<Value>> {
    let version = request
        .room_version
        .clone()
        .unwrap_or(room_version::DEFAULT_ROOM_VERSION);
    let Some(rules) = room_version::rules(&version) else {
        return Err(MatrixError::unsupported_room_version(format!(
            "Room version {version} is not supported"
        )));
    };

    let alias: Option<OwnedRoomAliasId> = match &request.room_alias_name {
        Some(name) => {
            if name.is_empty() || name.contains(':') || name.chars().any(char::is_whitespace) {
                return Err(MatrixError::invalid_param(
                    "room_alias_name must be a non-empty localpart without ':' or spaces",
                ));
            }
            let alias = RoomAliasId::parse(format!("#{name}:{}", state.server_name()))
                .map_err(|e| MatrixError::invalid_param(format!("Invalid alias: {e}")))?;
            if state.store.alias_room(alias.as_str()).await?.is_some() {
                return Err(MatrixError::room_in_use("Room alias already taken"));
            }
            Some(alias)
        }
        None => None,
    };

    for invitee in &request.invite {
        if !state.is_local(invitee) {
            return Err(MatrixError::forbidden(format!(
                "Cannot invite {invitee}: inviting users on other servers needs federation, which this server does not do yet"
            )));
        }
        if state.store.user(invitee.as_str()).await?.is_none() {
            return Err(MatrixError::not_found(format!("Unknown user {invitee}")));
        }
    }

    let mut initial_state = Vec::new();
    for raw in &request.initial_state {
        let event = raw_object(raw, "initial_state event")?;
        let kind = event
            .get("type")
            .and_then(Value::as_str)
            .ok_or_else(|| MatrixError::bad_json("initial_state event needs a type"))?;
        let state_key = event.get("state_key").and_then(Value::as_str).unwrap_or("");
        let content = event.get("content").cloned().unwrap_or(json!({}));
        if !content.is_object() {
            return Err(MatrixError::bad_json(
                "initial_state content must be an object",
            ));
        }
        if kind == "m.room.create" || kind == "m.room.member" {
            return Err(MatrixError::bad_json(format!(
                "{kind} cannot be set through initial_state"
            )));
        }
        initial_state.push((kind.to_owned(), state_key.to_owned(), content));
    }
    let mut creation_content = match &request.creation_content {
        Some(raw) => raw_object(raw, "creation_content")?,
        None => Map::new(),
    };
    creation_content.remove("creator");
    creation_content.remove("room_version");
    let power_level_override = match &request.power_level_content_override {
        Some(raw) => Some(raw_object(raw, "power_level_content_override")?),
        None => None,
    };
    let preset = match &request.preset {
        Some(RoomPreset::PrivateChat) => Some(Preset::PrivateChat),
        Some(RoomPreset::TrustedPrivateChat) => Some(Preset::TrustedPrivateChat),
        Some(RoomPreset::PublicChat) => Some(Preset::PublicChat),
        Some(other) => return Err(MatrixError::bad_json(format!("Unknown preset {other:?}"))),
        None => None,
    };
    let public = request.visibility == Visibility::Public;
    let profile = state.store.user(auth.user_id.as_str()).await?;
    let setup = RoomSetup {
        creator: auth.user_id.clone(),
        version: version.clone(),
        preset,
        public,
        name: request.name.clone(),
        topic: request.topic.clone(),
        alias: alias.clone(),
        invite: request.invite.clone(),
        is_direct: request.is_direct,
        initial_state,
        creation_content,
        power_level_override,
        creator_displayname: profile.as_ref().and_then(|p| p.displayname.clone()),
        creator_avatar_url: profile.as_ref().and_then(|p| p.avatar_url.clone()),
        origin_server_ts: now_ms(),
    };
    let (create, events) = room_setup::templates(&setup);
    let room_id = if rules.authorization.room_create_event_id_as_room_id {
        v12_room_id(&create, &rules).map_err(|e| MatrixError::bad_json(e.to_string()))?
    } else {
        let random: String = rand::thread_rng()
            .sample_iter(&rand::distributions::Alphanumeric)
            .take(18)
            .map(char::from)
            .collect();
        RoomId::parse(format!("!{random}:{}", state.server_name()))
            .map_err(|e| MatrixError::internal(e.to_string()))?
    };

    let response = state
        .router
        .create_room(
            room_id.as_str(),
            CreateRoomRequest {
                room_version: version.to_string(),
                create: Some(proto_template(&create)),
                room_id: room_id.to_string(),
                events: events.iter().map(proto_template).collect(),
                is_public: public,
                alias: alias.as_ref().map(|a| a.to_string()),
            },
        )
        .await
        .map_err(route_error)?;
    match response.outcome {
        Some(create_room_response::Outcome::RoomId(id)) => {
            metrics::counter!("tessera_rooms_created_total").increment(1);
            let mut body = json!({ "room_id": id });
            if let Some(alias) = alias {
                body["room_alias"] = json!(alias);
            }
            Ok(Json(body))
        }
        Some(create_room_response::Outcome::Refusal(r)) => {
            Err(MatrixError::from_errcode(&r.errcode, r.message))
        }
        None => Err(MatrixError::internal("room-worker returned no outcome")),
    }
}
