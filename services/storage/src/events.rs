//! Reading events back, with what a client sees around them: the redaction
//! that redacted an event, the sender's transaction ID, and the state event a
//! state event replaced.

use std::sync::Arc;

use tessera_events::Pdu;
use tessera_events::ruma::canonical_json::CanonicalJsonObject;
use tessera_events::ruma::{EventId, RoomId, RoomVersionId};
use tokio_postgres::Row;
use tokio_postgres::types::Type;

use crate::{Result, Store, StoreError};

/// An event as stored, with its neighbours for rendering.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub partition: u32,
    pub pos: i64,
    pub event_id: String,
    pub room_id: String,
    pub room_version: String,
    pub rejected: bool,
    /// Passed its auth events but not the room's current state: kept in the
    /// graph, never shown to clients.
    pub soft_failed: bool,
    pub json: String,
    /// JSON of the redaction event that redacted this one.
    pub redaction_json: Option<String>,
    /// JSON of the state event this one replaced.
    pub prev_state_json: Option<String>,
    /// (device ID, transaction ID) when sent by a local client with a txnId.
    pub txn: Option<(String, String)>,
}

/// The columns every event read selects, in [`StoredEvent::from_row`] order.
pub(crate) const EVENT_COLUMNS: &str = "
    e.partition, e.pos, e.event_id, e.room_id, rm.room_version, e.rejected, e.json,
    r.json AS redaction_json, p.json AS prev_json, t.device_id, t.txn_id, e.soft_failed";

/// Joins for [`EVENT_COLUMNS`]; the events table is aliased `e`.
pub(crate) const EVENT_JOINS: &str = "
    JOIN rooms rm ON rm.room_id = e.room_id
    LEFT JOIN event_redactions er ON er.redacted_event_id = e.event_id
    LEFT JOIN events r ON r.event_id = er.redaction_event_id AND r.room_id = e.room_id
    LEFT JOIN events p ON p.event_id = e.prev_state_event_id
    LEFT JOIN event_txns t ON t.event_id = e.event_id";

impl StoredEvent {
    pub(crate) fn from_row(row: &Row) -> Self {
        let device: Option<String> = row.get(9);
        let txn: Option<String> = row.get(10);
        Self {
            partition: row.get::<_, i32>(0) as u32,
            pos: row.get(1),
            event_id: row.get(2),
            room_id: row.get(3),
            room_version: row.get(4),
            rejected: row.get(5),
            soft_failed: row.get(11),
            json: row.get(6),
            redaction_json: row.get(7),
            prev_state_json: row.get(8),
            txn: device.zip(txn),
        }
    }

    /// Rejected or soft-failed: clients never see it.
    pub fn hidden_from_clients(&self) -> bool {
        self.rejected || self.soft_failed
    }

    /// Parse the stored PDU.
    pub fn pdu(&self) -> Result<Arc<Pdu>> {
        parse_pdu(&self.event_id, &self.room_id, &self.json, self.rejected)
    }

    /// Parse the redaction that redacted this event, if any.
    pub fn redaction_pdu(&self) -> Result<Option<Arc<Pdu>>> {
        self.redaction_json
            .as_deref()
            .map(|json| parse_unknown_id(&self.room_id, json, &self.room_version))
            .transpose()
    }

    /// Parse the replaced state event, if any.
    pub fn prev_state_pdu(&self) -> Result<Option<Arc<Pdu>>> {
        self.prev_state_json
            .as_deref()
            .map(|json| parse_unknown_id(&self.room_id, json, &self.room_version))
            .transpose()
    }

    pub fn room_version_id(&self) -> RoomVersionId {
        RoomVersionId::try_from(self.room_version.as_str()).unwrap_or(RoomVersionId::V12)
    }
}

pub(crate) fn parse_pdu(
    event_id: &str,
    room_id: &str,
    json: &str,
    rejected: bool,
) -> Result<Arc<Pdu>> {
    let id = EventId::parse(event_id).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let room_id = RoomId::parse(room_id).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    Pdu::from_canonical_text(id, &room_id, json, rejected)
        .map(Arc::new)
        .map_err(|e| StoreError::Corrupt(format!("event {event_id}: {e}")))
}

/// Neighbour events are joined by JSON only; recompute their IDs.
fn parse_unknown_id(room_id: &str, json: &str, version: &str) -> Result<Arc<Pdu>> {
    let object: CanonicalJsonObject =
        serde_json::from_str(json).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let version =
        RoomVersionId::try_from(version).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let rules = version
        .rules()
        .ok_or_else(|| StoreError::Corrupt(format!("unknown room version {version}")))?;
    let room_id = RoomId::parse(room_id).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    Pdu::from_json(object, &rules, Some(&room_id))
        .map(Arc::new)
        .map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// Direction of a paginated read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Forward,
    Backward,
}

impl Store {
    pub async fn event(&self, event_id: &str) -> Result<Option<StoredEvent>> {
        let sql =
            format!("SELECT {EVENT_COLUMNS} FROM events e {EVENT_JOINS} WHERE e.event_id = $1");
        let row = self.query_opt(&sql, &[&event_id]).await?;
        Ok(row.as_ref().map(StoredEvent::from_row))
    }

    pub async fn events_by_ids(&self, event_ids: &[String]) -> Result<Vec<StoredEvent>> {
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM events e {EVENT_JOINS} WHERE e.event_id = ANY($1)"
        );
        let rows = self
            .query_planned_now(&sql, &[(&event_ids, Type::TEXT_ARRAY)])
            .await?;
        Ok(rows.iter().map(StoredEvent::from_row).collect())
    }

    /// A room's events strictly after `after` and at most `upto`, newest first
    /// when `dir` is backward, at most `limit`; rejected events never appear.
    pub async fn room_events(
        &self,
        room_id: &str,
        after: i64,
        upto: i64,
        dir: Direction,
        limit: i64,
    ) -> Result<Vec<StoredEvent>> {
        let order = match dir {
            Direction::Forward => "ASC",
            Direction::Backward => "DESC",
        };
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM events e {EVENT_JOINS}
             WHERE e.room_id = $1 AND e.pos > $2 AND e.pos <= $3 AND NOT e.rejected AND NOT e.soft_failed
             ORDER BY e.pos {order} LIMIT $4"
        );
        let rows = self.query(&sql, &[&room_id, &after, &upto, &limit]).await?;
        Ok(rows.iter().map(StoredEvent::from_row).collect())
    }

    /// Lightweight stream entries of one partition in a position range, for
    /// readers filling a gap in the Redis stream.
    pub async fn partition_entries(
        &self,
        partition: u32,
        after: i64,
        upto: i64,
        limit: i64,
    ) -> Result<Vec<PartitionEntry>> {
        let rows = self
            .query(
                "SELECT pos, room_id, event_id, type, state_key, membership, rejected OR soft_failed FROM events
                 WHERE partition = $1 AND pos > $2 AND pos <= $3 ORDER BY pos LIMIT $4",
                &[&(partition as i32), &after, &upto, &limit],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| PartitionEntry {
                pos: r.get(0),
                room_id: r.get(1),
                event_id: r.get(2),
                kind: r.get(3),
                state_key: r.get(4),
                membership: r.get(5),
                rejected: r.get(6),
            })
            .collect())
    }

    /// Which of these client transactions already produced an event.
    pub async fn txn_events(
        &self,
        keys: &[crate::persist::TxnKey],
    ) -> Result<std::collections::HashMap<crate::persist::TxnKey, String>> {
        if keys.is_empty() {
            return Ok(Default::default());
        }
        let users: Vec<&str> = keys.iter().map(|k| k.user_id.as_str()).collect();
        let devices: Vec<&str> = keys.iter().map(|k| k.device_id.as_str()).collect();
        let txns: Vec<&str> = keys.iter().map(|k| k.txn_id.as_str()).collect();
        let rows = self
            .query(
                "SELECT t.user_id, t.device_id, t.txn_id, t.event_id FROM event_txns t
                 JOIN unnest($1::text[], $2::text[], $3::text[]) AS k(user_id, device_id, txn_id)
                   ON t.user_id = k.user_id AND t.device_id = k.device_id AND t.txn_id = k.txn_id",
                &[&users, &devices, &txns],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                let key = crate::persist::TxnKey {
                    user_id: r.get(0),
                    device_id: r.get(1),
                    txn_id: r.get(2),
                };
                (key, r.get(3))
            })
            .collect())
    }

    /// The transaction ID already used by (user, device, txn), if any.
    pub async fn txn_event(
        &self,
        user_id: &str,
        device_id: &str,
        txn_id: &str,
    ) -> Result<Option<String>> {
        let row = self.query_opt(
                "SELECT event_id FROM event_txns WHERE user_id = $1 AND device_id = $2 AND txn_id = $3",
                &[&user_id, &device_id, &txn_id],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }
}

/// What replication carries about one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionEntry {
    pub pos: i64,
    pub room_id: String,
    pub event_id: String,
    pub kind: String,
    pub state_key: Option<String>,
    pub membership: Option<String>,
    pub rejected: bool,
}
