//! Rendering PDUs in the client-server API's event format: the PDU's
//! federation-only fields dropped, `event_id` added, `unsigned` filled in, and
//! redacted content stripped by the room version's redaction rules.

use ruma::canonical_json::{CanonicalJsonObject, CanonicalJsonValue, redact};
use ruma::room_version_rules::RoomVersionRules;
use serde_json::{Map, Value, json};

use crate::pdu::Pdu;

/// Extra information for `unsigned`, and rendering choices.
#[derive(Default)]
pub struct Unsigned<'a> {
    /// The redaction event that redacted this event, if any.
    pub redacted_because: Option<&'a Pdu>,
    /// The client's transaction ID, shown only to the device that sent the event.
    pub transaction_id: Option<&'a str>,
    /// For state events: the content and sender of the event this one replaced.
    pub prev_state: Option<&'a Pdu>,
    /// For invites and knocks: the stripped state shown with them.
    pub invite_room_state: Option<Value>,
}

/// The client format of a PDU. `now_ms` gives `unsigned.age`.
pub fn client_event(
    pdu: &Pdu,
    rules: &RoomVersionRules,
    unsigned: &Unsigned<'_>,
    now_ms: u64,
    include_room_id: bool,
) -> Value {
    let content = match unsigned.redacted_because {
        Some(_) => redacted_content(pdu, rules),
        None => pdu.content_value(),
    };
    let mut event = Map::new();
    event.insert("event_id".into(), json!(pdu.event_id()));
    event.insert("type".into(), json!(pdu.kind().to_string()));
    event.insert("sender".into(), json!(pdu.sender()));
    event.insert("origin_server_ts".into(), json!(pdu.origin_server_ts()));
    if let Some(state_key) = pdu.state_key() {
        event.insert("state_key".into(), json!(state_key));
    }
    if let Some(redacts) = pdu.redacts() {
        // Clients written before room v11 look for `redacts` at the top level.
        event.insert("redacts".into(), json!(redacts));
    }
    event.insert("content".into(), content);
    if include_room_id {
        event.insert("room_id".into(), json!(pdu.room_id()));
    }
    let mut extra = Map::new();
    extra.insert(
        "age".into(),
        json!(now_ms.saturating_sub(pdu.origin_server_ts())),
    );
    if let Some(txn) = unsigned.transaction_id {
        extra.insert("transaction_id".into(), json!(txn));
    }
    if let Some(redaction) = unsigned.redacted_because {
        extra.insert(
            "redacted_because".into(),
            client_event(
                redaction,
                rules,
                &Unsigned::default(),
                now_ms,
                include_room_id,
            ),
        );
    }
    if let Some(prev) = unsigned.prev_state {
        extra.insert("replaces_state".into(), json!(prev.event_id()));
        extra.insert("prev_content".into(), prev.content_value());
        extra.insert("prev_sender".into(), json!(prev.sender()));
    }
    if let Some(state) = &unsigned.invite_room_state {
        let key = if pdu.membership().as_deref() == Some("knock") {
            "knock_room_state"
        } else {
            "invite_room_state"
        };
        extra.insert(key.into(), state.clone());
    }
    event.insert("unsigned".into(), Value::Object(extra));
    Value::Object(event)
}

/// The stripped state form used in invite and knock sections of `/sync`.
pub fn stripped_state(pdu: &Pdu) -> Value {
    json!({
        "type": pdu.kind().to_string(),
        "state_key": pdu.state_key().unwrap_or_default(),
        "sender": pdu.sender(),
        "content": pdu.content_value(),
    })
}

/// The content left after redaction under the room version's rules.
pub fn redacted_content(pdu: &Pdu, rules: &RoomVersionRules) -> Value {
    match redact(pdu.to_object(), &rules.redaction, None) {
        Ok(object) => match object.get("content") {
            Some(CanonicalJsonValue::Object(content)) => canonical_to_value(content),
            _ => json!({}),
        },
        Err(_) => json!({}),
    }
}

fn canonical_to_value(object: &CanonicalJsonObject) -> Value {
    serde_json::to_value(object).unwrap_or_else(|_| json!({}))
}

#[cfg(test)]
mod tests;
