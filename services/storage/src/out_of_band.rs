//! Memberships in rooms this server does not host: invites received over
//! federation and their local rejections. Their events live in `events` and
//! their membership rows in `room_state_history` (so /sync sees them), but
//! ordinary event reads skip them, as those join the `rooms` table.

use serde_json::Value;

use crate::{Result, Store};

/// An out-of-band membership event with what the invite told us.
#[derive(Debug, Clone)]
pub struct OutOfBandMembership {
    pub event_id: String,
    pub room_id: String,
    pub user_id: String,
    pub room_version: String,
    pub membership: Option<String>,
    /// The PDU as canonical JSON.
    pub json: String,
    /// Stripped state events (a JSON array) sent with the invite.
    pub stripped_state: Value,
}

const COLUMNS: &str =
    "o.event_id, o.room_id, o.user_id, o.room_version, e.membership, e.json, o.stripped_state";

fn from_row(row: &tokio_postgres::Row) -> OutOfBandMembership {
    OutOfBandMembership {
        event_id: row.get(0),
        room_id: row.get(1),
        user_id: row.get(2),
        room_version: row.get(3),
        membership: row.get(4),
        json: row.get(5),
        stripped_state: row.get(6),
    }
}

impl OutOfBandMembership {
    /// Parse the stored PDU.
    pub fn pdu(&self) -> Result<std::sync::Arc<tessera_events::Pdu>> {
        crate::events::parse_pdu(&self.event_id, &self.room_id, &self.json, false)
    }
}

impl Store {
    /// The out-of-band membership event with this ID, if it is one.
    pub async fn out_of_band_membership(
        &self,
        event_id: &str,
    ) -> Result<Option<OutOfBandMembership>> {
        let sql = format!(
            "SELECT {COLUMNS} FROM out_of_band_memberships o JOIN events e ON e.event_id = o.event_id
             WHERE o.event_id = $1"
        );
        Ok(self
            .query_opt(&sql, &[&event_id])
            .await?
            .as_ref()
            .map(from_row))
    }

    /// The user's latest membership in a room we do not host, when it is an
    /// out-of-band one (an invite we received, or its rejection).
    pub async fn latest_out_of_band(
        &self,
        room_id: &str,
        user_id: &str,
    ) -> Result<Option<OutOfBandMembership>> {
        let sql = format!(
            "SELECT {COLUMNS} FROM (
                 SELECT event_id FROM room_state_history
                 WHERE room_id = $1 AND type = 'm.room.member' AND state_key = $2
                 ORDER BY pos DESC LIMIT 1
             ) latest
             JOIN out_of_band_memberships o ON o.event_id = latest.event_id
             JOIN events e ON e.event_id = o.event_id"
        );
        Ok(self
            .query_opt(&sql, &[&room_id, &user_id])
            .await?
            .as_ref()
            .map(from_row))
    }
}
