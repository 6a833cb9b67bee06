//! Building new local events: from an [`EventTemplate`] (what a client asked
//! for) to a hashed, signed [`Pdu`] whose auth events are chosen from the room's
//! current state, as the server-server API's "auth events selection" says.

use ruma::canonical_json::{CanonicalJsonObject, CanonicalJsonValue, to_canonical_value};
use ruma::events::{StateEventType, TimelineEventType};
use ruma::room_version_rules::RoomVersionRules;
use ruma::{OwnedEventId, OwnedUserId, RoomId, ServerName};

use crate::keys::SigningKey;
use crate::limits::MAX_PDU_BYTES;
use crate::pdu::{Pdu, PduError, event_id_of};

/// What a client (or the server on a client's behalf) wants to send.
#[derive(Debug, Clone, PartialEq)]
pub struct EventTemplate {
    pub kind: String,
    pub state_key: Option<String>,
    pub content: serde_json::Value,
    pub sender: OwnedUserId,
    pub origin_server_ts: u64,
    /// The event a redaction redacts.
    pub redacts: Option<OwnedEventId>,
}

/// Where in the room DAG a new event goes.
pub struct Placement<'a> {
    pub room_id: &'a RoomId,
    pub rules: &'a RoomVersionRules,
    /// The room's forward extremities: the new event's `prev_events`.
    pub prev_events: &'a [OwnedEventId],
    /// Depth of the deepest prev event (the new event gets one more).
    pub prev_depth: u64,
}

/// Why an event could not be built. Each maps to a client error in one place
/// (the HTTP layer): bad content is `M_BAD_JSON`, size is `M_TOO_LARGE`.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("event content must be a JSON object")]
    ContentNotObject,
    #[error("event content is not valid canonical JSON: {0}")]
    NonCanonicalContent(String),
    #[error("event content is invalid for its type: {0}")]
    InvalidContent(String),
    #[error("event is {0} bytes, over the 65536-byte limit")]
    TooLarge(usize),
    #[error("cannot sign the event: {0}")]
    Signing(String),
    #[error(transparent)]
    Pdu(#[from] PduError),
}

/// Build a non-create event in an existing room. `state` answers which event
/// currently holds a (type, state_key) slot.
pub fn build_event(
    template: &EventTemplate,
    placement: &Placement<'_>,
    state: impl Fn(&StateEventType, &str) -> Option<OwnedEventId>,
    key: &SigningKey,
    server_name: &ServerName,
) -> Result<Pdu, BuildError> {
    let content = content_object(&template.content)?;
    let kind = TimelineEventType::from(template.kind.as_str());
    let content_raw = serde_json::value::to_raw_value(&template.content)
        .map_err(|e| BuildError::NonCanonicalContent(e.to_string()))?;
    let auth_types = ruma::state_res::auth_types_for_event(
        &kind,
        &template.sender,
        template.state_key.as_deref(),
        &content_raw,
        &placement.rules.authorization,
    )
    .map_err(BuildError::InvalidContent)?;
    let mut auth_events: Vec<OwnedEventId> =
        auth_types.iter().filter_map(|(t, k)| state(t, k)).collect();
    auth_events.dedup();

    let mut object = base_object(template, content);
    object.insert(
        "room_id".to_owned(),
        CanonicalJsonValue::String(placement.room_id.to_string()),
    );
    object.insert("auth_events".to_owned(), id_array(&auth_events));
    object.insert("prev_events".to_owned(), id_array(placement.prev_events));
    object.insert(
        "depth".to_owned(),
        int(placement.prev_depth.saturating_add(1)),
    );
    if let Some(redacts) = &template.redacts {
        // Room v11 moved `redacts` into the content; older versions keep it at the top.
        if !placement.rules.redaction.content_field_redacts {
            object.insert(
                "redacts".to_owned(),
                CanonicalJsonValue::String(redacts.to_string()),
            );
        }
    }
    finish(
        object,
        placement.rules,
        key,
        server_name,
        Some(placement.room_id),
    )
}

/// Build the `m.room.create` event of a new room. For room versions whose room
/// ID is the create event's reference hash (v12), pass `room_id: None`; the ID
/// is then `Pdu::room_id()` of the result.
pub fn build_create_event(
    template: &EventTemplate,
    rules: &RoomVersionRules,
    room_id: Option<&RoomId>,
    key: &SigningKey,
    server_name: &ServerName,
) -> Result<Pdu, BuildError> {
    let content = content_object(&template.content)?;
    let mut object = base_object(template, content);
    if let Some(room_id) = room_id {
        object.insert(
            "room_id".to_owned(),
            CanonicalJsonValue::String(room_id.to_string()),
        );
    }
    object.insert("auth_events".to_owned(), CanonicalJsonValue::Array(vec![]));
    object.insert("prev_events".to_owned(), CanonicalJsonValue::Array(vec![]));
    object.insert("depth".to_owned(), int(1));
    finish(object, rules, key, server_name, room_id)
}

/// The room ID a room v12 create event will give its room, computed without
/// the signing key (the reference hash leaves signatures out). Lets a caller
/// route a new room to its partition's owner before the owner builds it.
pub fn v12_room_id(
    template: &EventTemplate,
    rules: &RoomVersionRules,
) -> Result<ruma::OwnedRoomId, BuildError> {
    let content = content_object(&template.content)?;
    let mut object = base_object(template, content);
    object.insert("auth_events".to_owned(), CanonicalJsonValue::Array(vec![]));
    object.insert("prev_events".to_owned(), CanonicalJsonValue::Array(vec![]));
    object.insert("depth".to_owned(), int(1));
    ruma::signatures::add_content_hash_to_event(&mut object)
        .map_err(|e| BuildError::Signing(e.to_string()))?;
    let event_id = event_id_of(&object, rules)?;
    RoomId::new_v2(event_id.as_str().trim_start_matches('$'))
        .map_err(|e| BuildError::Signing(e.to_string()))
}

fn content_object(content: &serde_json::Value) -> Result<CanonicalJsonObject, BuildError> {
    if !content.is_object() {
        return Err(BuildError::ContentNotObject);
    }
    match to_canonical_value(content) {
        Ok(CanonicalJsonValue::Object(object)) => Ok(object),
        Ok(_) => Err(BuildError::ContentNotObject),
        Err(e) => Err(BuildError::NonCanonicalContent(e.to_string())),
    }
}

fn base_object(template: &EventTemplate, content: CanonicalJsonObject) -> CanonicalJsonObject {
    let mut object = CanonicalJsonObject::new();
    object.insert(
        "type".to_owned(),
        CanonicalJsonValue::String(template.kind.clone()),
    );
    object.insert(
        "sender".to_owned(),
        CanonicalJsonValue::String(template.sender.to_string()),
    );
    object.insert(
        "origin_server_ts".to_owned(),
        int(template.origin_server_ts),
    );
    if let Some(state_key) = &template.state_key {
        object.insert(
            "state_key".to_owned(),
            CanonicalJsonValue::String(state_key.clone()),
        );
    }
    object.insert("content".to_owned(), CanonicalJsonValue::Object(content));
    object
}

fn finish(
    mut object: CanonicalJsonObject,
    rules: &RoomVersionRules,
    key: &SigningKey,
    server_name: &ServerName,
    room_id: Option<&RoomId>,
) -> Result<Pdu, BuildError> {
    ruma::signatures::hash_and_sign_event(
        server_name.as_str(),
        key.pair(),
        &mut object,
        &rules.redaction,
    )
    .map_err(|e| match e {
        ruma::signatures::JsonError::PduTooLarge => BuildError::TooLarge(
            serde_json::to_string(&object)
                .map(|s| s.len())
                .unwrap_or(usize::MAX),
        ),
        e => BuildError::Signing(e.to_string()),
    })?;
    let size = serde_json::to_string(&object)
        .map(|s| s.len())
        .unwrap_or(usize::MAX);
    if size > MAX_PDU_BYTES {
        return Err(BuildError::TooLarge(size));
    }
    let event_id = event_id_of(&object, rules)?;
    let room_id = match room_id {
        Some(room_id) => room_id.to_owned(),
        None => RoomId::new_v2(event_id.as_str().trim_start_matches('$'))
            .map_err(|e| BuildError::Signing(e.to_string()))?,
    };
    Ok(Pdu::from_parts(event_id, &room_id, object, false)?)
}

fn id_array(ids: &[OwnedEventId]) -> CanonicalJsonValue {
    CanonicalJsonValue::Array(
        ids.iter()
            .map(|id| CanonicalJsonValue::String(id.to_string()))
            .collect(),
    )
}

fn int(value: u64) -> CanonicalJsonValue {
    let max = i64::from(ruma::Int::MAX) as u64;
    CanonicalJsonValue::Integer(
        ruma::Int::try_from(value.min(max)).expect("clamped to the JSON range"),
    )
}

#[cfg(test)]
mod tests;
