//! The checks on receipt of a PDU that need no room state (the server-server
//! API's list, steps 1 and 2): a PDU that breaks the format or size limits,
//! or whose signatures do not verify, is dropped; one whose content hash does
//! not match is redacted and goes on as the redacted event. Auth rules come
//! later, at the room's owner.

use ruma::canonical_json::{CanonicalJsonObject, CanonicalJsonValue, redact};
use ruma::room_version_rules::RoomVersionRules;
use ruma::signatures::{PublicKeyMap, Verified};
use ruma::{OwnedEventId, OwnedServerName, RoomId, ServerName};
use tessera_events::Pdu;

use crate::keys::KeyRing;

#[derive(Debug, Clone, thiserror::Error)]
pub enum PduDrop {
    #[error("invalid PDU: {0}")]
    Format(String),
    #[error("signature check failed: {0}")]
    Signature(String),
}

/// A PDU that passed; `redacted` when its content hash did not match.
pub struct Checked {
    pub pdu: Pdu,
    pub redacted: bool,
}

/// The (server, key ID) pairs whose signatures must be checked.
fn wanted_keys(
    object: &CanonicalJsonObject,
    rules: &RoomVersionRules,
) -> Result<Vec<(OwnedServerName, String)>, PduDrop> {
    let servers =
        ruma::signatures::required_server_signatures_to_verify_event(object, &rules.signatures)
            .map_err(|e| PduDrop::Signature(e.to_string()))?;
    let signatures = match object.get("signatures") {
        Some(CanonicalJsonValue::Object(s)) => s,
        _ => return Err(PduDrop::Signature("no signatures".to_owned())),
    };
    let mut wanted = Vec::new();
    for server in servers {
        let Some(CanonicalJsonValue::Object(keys)) = signatures.get(server.as_str()) else {
            return Err(PduDrop::Signature(format!("not signed by {server}")));
        };
        for key_id in keys.keys() {
            wanted.push((server.to_owned(), key_id.clone()));
        }
    }
    Ok(wanted)
}

/// A PDU whose format passed, with the keys its signatures need.
pub struct Prepared {
    pub object: CanonicalJsonObject,
    /// (server, key ID) pairs to look up.
    pub wanted: Vec<(OwnedServerName, String)>,
    /// The time the keys must be valid at (ms; 0 when the room version does
    /// not enforce key validity).
    pub valid_at: u64,
}

/// The cheap first step: format and which keys are needed.
pub fn prepare(object: CanonicalJsonObject, rules: &RoomVersionRules) -> Result<Prepared, PduDrop> {
    ruma::state_res::check_pdu_format(&object, &rules.event_format).map_err(PduDrop::Format)?;
    let wanted = wanted_keys(&object, rules)?;
    let valid_at = if rules.enforce_key_validity {
        match object.get("origin_server_ts") {
            Some(CanonicalJsonValue::Integer(ts)) => i64::from(*ts).max(0) as u64,
            _ => return Err(PduDrop::Format("origin_server_ts is missing".to_owned())),
        }
    } else {
        0
    };
    Ok(Prepared {
        object,
        wanted,
        valid_at,
    })
}

/// The keys a prepared PDU needs, from the key ring (fetched if unknown).
pub async fn keys_for(keyring: &KeyRing, prepared: &Prepared) -> Result<PublicKeyMap, PduDrop> {
    keyring
        .public_key_map(&prepared.wanted, prepared.valid_at)
        .await
        .map_err(|e| PduDrop::Signature(e.to_string()))
}

/// Format, signatures and content hash; keys fetched as needed.
pub async fn check(
    keyring: &KeyRing,
    object: CanonicalJsonObject,
    rules: &RoomVersionRules,
    room_id: Option<&RoomId>,
) -> Result<Checked, PduDrop> {
    let prepared = prepare(object, rules)?;
    let keys = keys_for(keyring, &prepared).await?;
    verify(prepared.object, &keys, rules, room_id)
}

/// The CPU-heavy step, with every key at hand: signatures, content hash
/// (redacting on a mismatch), event ID.
pub fn verify(
    object: CanonicalJsonObject,
    keys: &PublicKeyMap,
    rules: &RoomVersionRules,
    room_id: Option<&RoomId>,
) -> Result<Checked, PduDrop> {
    verify_reporting(object, keys, rules, room_id).map_err(|(_, drop)| drop)
}

/// As [`verify`]; a dropped PDU comes with its event ID when that can be
/// computed, for the transaction's answer.
pub fn verify_reporting(
    object: CanonicalJsonObject,
    keys: &PublicKeyMap,
    rules: &RoomVersionRules,
    room_id: Option<&RoomId>,
) -> Result<Checked, (Option<OwnedEventId>, PduDrop)> {
    let verified = match ruma::signatures::verify_event(keys, &object, rules) {
        Ok(verified) => verified,
        Err(error) => {
            let event_id = tessera_events::pdu::event_id_of(&object, rules).ok();
            return Err((event_id, PduDrop::Signature(error.to_string())));
        }
    };
    let format = |e: String| (None, PduDrop::Format(e));
    let (object, redacted) = match verified {
        Verified::All => (object, false),
        Verified::Signatures => {
            metrics::counter!("tessera_federation_pdus_redacted_total").increment(1);
            (
                redact(object, &rules.redaction, None).map_err(|e| format(e.to_string()))?,
                true,
            )
        }
    };
    let pdu = Pdu::from_json(object, rules, room_id).map_err(|e| format(e.to_string()))?;
    Ok(Checked { pdu, redacted })
}

/// The sending server of a PDU (its sender's server name).
pub fn sender_server(pdu: &Pdu) -> &ServerName {
    pdu.sender().server_name()
}
