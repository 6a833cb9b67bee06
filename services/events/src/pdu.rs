//! [`Pdu`]: a persistent data unit as its canonical JSON text and the fields
//! parsed from it once, readable by ruma's auth and state resolution code
//! through the `ruma::state_res::Event` trait.

use std::sync::Arc;

use ruma::canonical_json::{CanonicalJsonObject, CanonicalJsonValue};
use ruma::events::TimelineEventType;
use ruma::room_version_rules::RoomVersionRules;
use ruma::serde::Raw;
use ruma::{
    EventId, MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, UInt,
    UserId,
};
use serde_json::value::RawValue as RawJsonValue;

/// Why a JSON object is not a usable PDU.
#[derive(Debug, thiserror::Error)]
pub enum PduError {
    #[error("PDU field `{0}` is missing or has the wrong type")]
    Field(&'static str),
    #[error("PDU field `{field}` is invalid: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("cannot compute the event ID: {0}")]
    Hash(String),
}

/// A parsed PDU. Cheap to share behind an [`Arc`]; ruma's traits are implemented
/// for `Arc<Pdu>` too.
#[derive(Debug, Clone)]
pub struct Pdu {
    event_id: OwnedEventId,
    room_id: OwnedRoomId,
    /// Whether `room_id` appears in the JSON (room v12 create events have none).
    room_id_in_json: bool,
    sender: OwnedUserId,
    origin_server_ts: MilliSecondsSinceUnixEpoch,
    kind: TimelineEventType,
    content: Box<RawJsonValue>,
    state_key: Option<String>,
    prev_events: Vec<OwnedEventId>,
    auth_events: Vec<OwnedEventId>,
    redacts: Option<OwnedEventId>,
    depth: u64,
    rejected: bool,
    /// The PDU's canonical JSON text. Kept as text, not as a parsed object:
    /// a room's state holds every state event, and a parsed member event
    /// takes about ten times the memory of its text (7 KB against 700 bytes).
    json: Box<str>,
}

pub type SharedPdu = Arc<Pdu>;

impl Pdu {
    /// Parse a PDU whose event ID is already known (read back from storage).
    /// `room_id` is needed for room v12 create events, which do not carry one.
    pub fn from_parts(
        event_id: OwnedEventId,
        room_id: &RoomId,
        json: CanonicalJsonObject,
        rejected: bool,
    ) -> Result<Self, PduError> {
        // A BTreeMap of canonical values serializes sorted and compact: canonical JSON.
        let text = serde_json::to_string(&json).map_err(|e| PduError::Invalid {
            field: "json",
            reason: e.to_string(),
        })?;
        Self::from_object_and_text(event_id, room_id, &json, text.into_boxed_str(), rejected)
    }

    /// Parse a PDU stored as canonical JSON text (as [`Pdu::canonical_json`]
    /// gave it), keeping that text instead of writing it again.
    pub fn from_canonical_text(
        event_id: OwnedEventId,
        room_id: &RoomId,
        text: &str,
        rejected: bool,
    ) -> Result<Self, PduError> {
        let json: CanonicalJsonObject =
            serde_json::from_str(text).map_err(|e| PduError::Invalid {
                field: "json",
                reason: e.to_string(),
            })?;
        Self::from_object_and_text(event_id, room_id, &json, text.into(), rejected)
    }

    fn from_object_and_text(
        event_id: OwnedEventId,
        room_id: &RoomId,
        json: &CanonicalJsonObject,
        text: Box<str>,
        rejected: bool,
    ) -> Result<Self, PduError> {
        let room_id_in_json = json.contains_key("room_id");
        let room_id = match json.get("room_id") {
            Some(CanonicalJsonValue::String(s)) => {
                RoomId::parse(s.as_str()).map_err(|e| PduError::Invalid {
                    field: "room_id",
                    reason: e.to_string(),
                })?
            }
            Some(_) => return Err(PduError::Field("room_id")),
            None => room_id.to_owned(),
        };
        let sender = UserId::parse(str_field(json, "sender")?).map_err(|e| PduError::Invalid {
            field: "sender",
            reason: e.to_string(),
        })?;
        let kind = TimelineEventType::from(str_field(json, "type")?);
        let origin_server_ts = match json.get("origin_server_ts") {
            Some(CanonicalJsonValue::Integer(i)) => MilliSecondsSinceUnixEpoch(
                UInt::try_from(i64::from(*i)).map_err(|_| PduError::Field("origin_server_ts"))?,
            ),
            _ => return Err(PduError::Field("origin_server_ts")),
        };
        let depth = match json.get("depth") {
            Some(CanonicalJsonValue::Integer(i)) => {
                u64::try_from(i64::from(*i)).map_err(|_| PduError::Field("depth"))?
            }
            _ => return Err(PduError::Field("depth")),
        };
        let state_key = match json.get("state_key") {
            Some(CanonicalJsonValue::String(s)) => Some(s.clone()),
            Some(_) => return Err(PduError::Field("state_key")),
            None => None,
        };
        let content_value = match json.get("content") {
            Some(v @ CanonicalJsonValue::Object(_)) => v,
            _ => return Err(PduError::Field("content")),
        };
        let content =
            serde_json::value::to_raw_value(content_value).map_err(|e| PduError::Invalid {
                field: "content",
                reason: e.to_string(),
            })?;
        let prev_events = id_list(json, "prev_events")?;
        let auth_events = id_list(json, "auth_events")?;
        let redacts = redacts_of(json, &kind)?;
        Ok(Self {
            event_id,
            room_id,
            room_id_in_json,
            sender,
            origin_server_ts,
            kind,
            content,
            state_key,
            prev_events,
            auth_events,
            redacts,
            depth,
            rejected,
            json: text,
        })
    }

    /// Parse a PDU received without its event ID, computing the ID from the
    /// reference hash as room versions 4 and later define it.
    pub fn from_json(
        json: CanonicalJsonObject,
        rules: &RoomVersionRules,
        room_id_hint: Option<&RoomId>,
    ) -> Result<Self, PduError> {
        let event_id = event_id_of(&json, rules)?;
        let room_id = match (json.get("room_id"), room_id_hint) {
            (Some(_), _) => None,
            (None, Some(hint)) => Some(hint.to_owned()),
            (None, None) => {
                // Room v12 create event: the room ID is the create event's reference hash.
                let hash = event_id.as_str().trim_start_matches('$');
                Some(RoomId::new_v2(hash).map_err(|e| PduError::Invalid {
                    field: "room_id",
                    reason: e.to_string(),
                })?)
            }
        };
        let placeholder;
        let room_ref: &RoomId = match &room_id {
            Some(r) => r,
            None => {
                placeholder =
                    RoomId::parse(str_field(&json, "room_id")?).map_err(|e| PduError::Invalid {
                        field: "room_id",
                        reason: e.to_string(),
                    })?;
                &placeholder
            }
        };
        Self::from_parts(event_id, room_ref, json, false)
    }

    pub fn event_id(&self) -> &EventId {
        &self.event_id
    }
    pub fn room_id(&self) -> &RoomId {
        &self.room_id
    }
    pub fn sender(&self) -> &UserId {
        &self.sender
    }
    pub fn kind(&self) -> &TimelineEventType {
        &self.kind
    }
    pub fn state_key(&self) -> Option<&str> {
        self.state_key.as_deref()
    }
    pub fn is_state(&self) -> bool {
        self.state_key.is_some()
    }
    pub fn content(&self) -> &RawJsonValue {
        &self.content
    }
    /// The content as a JSON value (a copy).
    pub fn content_value(&self) -> serde_json::Value {
        serde_json::from_str(self.content.get()).unwrap_or(serde_json::Value::Null)
    }
    pub fn origin_server_ts(&self) -> u64 {
        self.origin_server_ts.0.into()
    }
    pub fn depth(&self) -> u64 {
        self.depth
    }
    pub fn prev_events(&self) -> &[OwnedEventId] {
        &self.prev_events
    }
    pub fn auth_events(&self) -> &[OwnedEventId] {
        &self.auth_events
    }
    pub fn redacts(&self) -> Option<&EventId> {
        self.redacts.as_deref()
    }
    pub fn rejected(&self) -> bool {
        self.rejected
    }
    pub fn room_id_in_json(&self) -> bool {
        self.room_id_in_json
    }
    /// The PDU exactly as it goes over federation (no `event_id` field), as
    /// an object: parsed from the text on every call.
    pub fn to_object(&self) -> CanonicalJsonObject {
        serde_json::from_str(&self.json).expect("a PDU's own canonical JSON parses")
    }
    /// Canonical JSON text of the PDU, as stored and sent over federation.
    pub fn canonical_json(&self) -> &str {
        &self.json
    }
    /// `content.membership` of a member event.
    pub fn membership(&self) -> Option<String> {
        if self.kind != TimelineEventType::RoomMember {
            return None;
        }
        #[derive(serde::Deserialize)]
        struct M {
            membership: String,
        }
        serde_json::from_str::<M>(self.content.get())
            .ok()
            .map(|m| m.membership)
    }
    /// A field of the content, as a JSON value.
    pub fn content_field(&self, field: &str) -> Option<serde_json::Value> {
        let value: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(self.content.get()).ok()?;
        value.get(field).cloned()
    }
    /// The content as a ruma raw value, for typed deserialization.
    pub fn content_raw<T>(&self) -> Raw<T> {
        Raw::from_json(self.content.clone())
    }
}

/// The event ID of a PDU in room versions 4 and later: `$` + the URL-safe
/// base64 reference hash.
pub fn event_id_of(
    json: &CanonicalJsonObject,
    rules: &RoomVersionRules,
) -> Result<OwnedEventId, PduError> {
    let hash =
        ruma::signatures::reference_hash(json, rules).map_err(|e| PduError::Hash(e.to_string()))?;
    EventId::parse(format!("${hash}")).map_err(|e| PduError::Hash(e.to_string()))
}

fn str_field<'a>(json: &'a CanonicalJsonObject, field: &'static str) -> Result<&'a str, PduError> {
    match json.get(field) {
        Some(CanonicalJsonValue::String(s)) => Ok(s),
        _ => Err(PduError::Field(field)),
    }
}

fn id_list(json: &CanonicalJsonObject, field: &'static str) -> Result<Vec<OwnedEventId>, PduError> {
    match json.get(field) {
        Some(CanonicalJsonValue::Array(items)) => items
            .iter()
            .map(|item| match item {
                CanonicalJsonValue::String(s) => {
                    EventId::parse(s.as_str()).map_err(|e| PduError::Invalid {
                        field,
                        reason: e.to_string(),
                    })
                }
                _ => Err(PduError::Field(field)),
            })
            .collect(),
        _ => Err(PduError::Field(field)),
    }
}

/// Room v11 moved `redacts` into the content; accept it in either place.
fn redacts_of(
    json: &CanonicalJsonObject,
    kind: &TimelineEventType,
) -> Result<Option<OwnedEventId>, PduError> {
    if *kind != TimelineEventType::RoomRedaction {
        return Ok(None);
    }
    let from_content = match json.get("content") {
        Some(CanonicalJsonValue::Object(c)) => c.get("redacts"),
        _ => None,
    };
    match from_content.or_else(|| json.get("redacts")) {
        Some(CanonicalJsonValue::String(s)) => {
            EventId::parse(s.as_str())
                .map(Some)
                .map_err(|e| PduError::Invalid {
                    field: "redacts",
                    reason: e.to_string(),
                })
        }
        _ => Ok(None),
    }
}

impl ruma::state_res::Event for Pdu {
    type Id = OwnedEventId;

    fn event_id(&self) -> &Self::Id {
        &self.event_id
    }
    fn room_id(&self) -> Option<&RoomId> {
        self.room_id_in_json.then_some(&*self.room_id)
    }
    fn sender(&self) -> &UserId {
        &self.sender
    }
    fn origin_server_ts(&self) -> MilliSecondsSinceUnixEpoch {
        self.origin_server_ts
    }
    fn event_type(&self) -> &TimelineEventType {
        &self.kind
    }
    fn content(&self) -> &RawJsonValue {
        &self.content
    }
    fn state_key(&self) -> Option<&str> {
        self.state_key.as_deref()
    }
    fn prev_events(&self) -> Box<dyn DoubleEndedIterator<Item = &Self::Id> + '_> {
        Box::new(self.prev_events.iter())
    }
    fn auth_events(&self) -> Box<dyn DoubleEndedIterator<Item = &Self::Id> + '_> {
        Box::new(self.auth_events.iter())
    }
    fn redacts(&self) -> Option<&Self::Id> {
        self.redacts.as_ref()
    }
    fn rejected(&self) -> bool {
        self.rejected
    }
}

#[cfg(test)]
mod tests {
    use ruma::RoomVersionId;
    use serde_json::json;

    use super::*;
    use crate::room_setup::Preset;
    use crate::room_state::tests::{create_room, setup};
    use crate::test_support::{key, server, template};

    /// An event our room made: its text, its object and its ID agree, and
    /// reading the text back keeps the same text and fields.
    #[test]
    fn a_pdu_is_kept_as_its_canonical_text() {
        let (room, _) = create_room(&setup(RoomVersionId::V11, Preset::PrivateChat, &[]));
        let pdu = room
            .create_event(
                &template(
                    "alice",
                    "m.room.message",
                    None,
                    json!({"body": "é ☃", "n": 2}),
                ),
                key(),
                server(),
            )
            .unwrap();
        let object = pdu.to_object();
        assert_eq!(
            pdu.canonical_json(),
            serde_json::to_string(&object).unwrap(),
            "sorted and compact"
        );
        assert!(!pdu.canonical_json().contains(": "));
        assert_eq!(&event_id_of(&object, room.rules()).unwrap(), pdu.event_id());

        let read = Pdu::from_canonical_text(
            pdu.event_id().to_owned(),
            pdu.room_id(),
            pdu.canonical_json(),
            true,
        )
        .unwrap();
        assert_eq!(read.canonical_json(), pdu.canonical_json());
        assert_eq!(read.content().get(), pdu.content().get());
        assert_eq!(read.sender(), pdu.sender());
        assert_eq!(read.prev_events(), pdu.prev_events());
        assert!(read.rejected());

        let err = Pdu::from_canonical_text(pdu.event_id().to_owned(), pdu.room_id(), "{", false);
        assert!(
            matches!(err, Err(PduError::Invalid { field: "json", .. })),
            "{err:?}"
        );
    }
}
