//! Stored events rendered for a client: the client event format with
//! redactions applied, `unsigned.transaction_id` for the sending device only,
//! and `prev_content` for state events.

use serde_json::Value;
use tessera_events::client::{Unsigned, client_event};
use tessera_events::room_version;
use tessera_storage::events::StoredEvent;

/// Who is looking.
#[derive(Debug, Clone, Copy)]
pub struct Viewer<'a> {
    pub user_id: &'a str,
    pub device_id: &'a str,
}

pub fn now_ms() -> u64 {
    tessera_runtime::now_ms()
}

/// Render one stored event; `None` (and a log line) if it does not parse.
pub fn render(
    stored: &StoredEvent,
    viewer: Viewer<'_>,
    now: u64,
    include_room_id: bool,
) -> Option<Value> {
    let result = (|| {
        let pdu = stored.pdu()?;
        let redaction = stored.redaction_pdu()?;
        let prev = stored.prev_state_pdu()?;
        Ok::<_, tessera_storage::StoreError>((pdu, redaction, prev))
    })();
    let (pdu, redaction, prev) = match result {
        Ok(parts) => parts,
        Err(error) => {
            tracing::error!(event_id = %stored.event_id, %error, "cannot render a stored event");
            return None;
        }
    };
    let version = stored.room_version_id();
    let rules = room_version::rules(&version).or_else(|| version.rules())?;
    let transaction_id = match &stored.txn {
        Some((device, txn))
            if device == viewer.device_id && pdu.sender().as_str() == viewer.user_id =>
        {
            Some(txn.as_str())
        }
        _ => None,
    };
    let unsigned = Unsigned {
        redacted_because: redaction.as_deref(),
        transaction_id,
        prev_state: prev.as_deref(),
        invite_room_state: None,
    };
    Some(client_event(&pdu, &rules, &unsigned, now, include_room_id))
}

/// Render many, skipping any that fail to parse.
pub fn render_all(events: &[StoredEvent], viewer: Viewer<'_>, include_room_id: bool) -> Vec<Value> {
    let now = now_ms();
    events
        .iter()
        .filter_map(|e| render(e, viewer, now, include_room_id))
        .collect()
}
