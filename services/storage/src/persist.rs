//! The fenced write: one transaction that takes positions for a batch of events
//! of one room and stores them with their state changes.
//!
//! The first statement updates the partition's lease row, checking owner,
//! epoch and expiry. If the lease moved, nothing is written ([`StoreError::Fenced`]).
//! The row lock it takes is held to commit, so a partition's commits are
//! serialized and positions are gap-free and in commit order: a reader that
//! has seen position N of a partition has seen everything before it.

use crate::{Result, Store, StoreError, conflict};

/// A room being created by this batch.
pub struct NewRoom {
    pub version: String,
    pub creator: String,
    pub is_public: bool,
}

/// A change to a room's resolved state caused by an event.
#[derive(Debug, Clone)]
pub struct StateChange {
    pub kind: String,
    pub state_key: String,
    /// `None` when resolution removed the slot.
    pub event_id: Option<String>,
    pub membership: Option<String>,
}

/// (user, device, transaction ID) of a client send.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TxnKey {
    pub user_id: String,
    pub device_id: String,
    pub txn_id: String,
}

pub struct EventToPersist {
    pub event_id: String,
    pub kind: String,
    pub state_key: Option<String>,
    pub sender: String,
    pub origin_server_ts: i64,
    pub depth: i64,
    pub membership: Option<String>,
    pub rejected: bool,
    pub prev_state_event_id: Option<String>,
    /// Canonical JSON of the PDU.
    pub json: String,
    pub state_changes: Vec<StateChange>,
    /// The event this (valid) redaction redacts.
    pub redacts: Option<String>,
    pub txn: Option<TxnKey>,
}

pub struct Batch {
    pub partition: u32,
    pub worker_id: String,
    pub epoch: i64,
    pub room_id: String,
    pub new_room: Option<NewRoom>,
    pub events: Vec<EventToPersist>,
    /// The room's depth and forward extremities after the batch.
    pub depth: i64,
    pub extremities: Vec<String>,
    /// Aliases to create for the room: (alias, creator).
    pub aliases: Vec<(String, String)>,
}

impl Store {
    /// Persist a batch. Returns the position of each event, in order.
    pub async fn persist(&self, batch: &Batch) -> Result<Vec<i64>> {
        let n = batch.events.len() as i64;
        if n == 0 {
            return Ok(vec![]);
        }
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let partition = batch.partition as i32;
        let first: i64 = match tx
            .query_opt(
                "UPDATE partition_leases SET next_pos = next_pos + $4
                 WHERE partition = $1 AND owner = $2 AND epoch = $3 AND expires_at > now()
                 RETURNING next_pos - $4",
                &[&partition, &batch.worker_id, &batch.epoch, &n],
            )
            .await?
        {
            Some(row) => row.get(0),
            None => {
                return Err(StoreError::Fenced {
                    partition: batch.partition,
                    epoch: batch.epoch,
                });
            }
        };
        let positions: Vec<i64> = (first..first + n).collect();
        let last = first + n - 1;

        if let Some(room) = &batch.new_room {
            tx.execute(
                "INSERT INTO rooms (room_id, partition, room_version, creator, is_public, head_pos, depth, forward_extremities)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                &[&batch.room_id, &partition, &room.version, &room.creator, &room.is_public, &last, &batch.depth, &batch.extremities],
            )
            .await
            .map_err(conflict)?;
        } else {
            tx.execute(
                "UPDATE rooms SET head_pos = $2, depth = $3, forward_extremities = $4 WHERE room_id = $1",
                &[&batch.room_id, &last, &batch.depth, &batch.extremities],
            )
            .await?;
        }

        let events = &batch.events;
        let col =
            |f: fn(&EventToPersist) -> Option<String>| events.iter().map(f).collect::<Vec<_>>();
        tx.execute(
            "INSERT INTO events (partition, pos, event_id, room_id, type, state_key, sender,
                                 origin_server_ts, depth, membership, rejected, prev_state_event_id, json)
             SELECT $1, e.pos, e.event_id, $2, e.type, e.state_key, e.sender, e.ts, e.depth,
                    e.membership, e.rejected, e.prev_state, e.json
             FROM unnest($3::bigint[], $4::text[], $5::text[], $6::text[], $7::text[], $8::bigint[],
                         $9::bigint[], $10::text[], $11::bool[], $12::text[], $13::text[])
                  AS e(pos, event_id, type, state_key, sender, ts, depth, membership, rejected, prev_state, json)",
            &[
                &partition,
                &batch.room_id,
                &positions,
                &events.iter().map(|e| e.event_id.clone()).collect::<Vec<_>>(),
                &events.iter().map(|e| e.kind.clone()).collect::<Vec<_>>(),
                &col(|e| e.state_key.clone()),
                &events.iter().map(|e| e.sender.clone()).collect::<Vec<_>>(),
                &events.iter().map(|e| e.origin_server_ts).collect::<Vec<_>>(),
                &events.iter().map(|e| e.depth).collect::<Vec<_>>(),
                &col(|e| e.membership.clone()),
                &events.iter().map(|e| e.rejected).collect::<Vec<_>>(),
                &col(|e| e.prev_state_event_id.clone()),
                &events.iter().map(|e| e.json.clone()).collect::<Vec<_>>(),
            ],
        )
        .await
        .map_err(conflict)?;

        // State: the history gets every change; the current state only the last per slot.
        let mut h_pos = Vec::new();
        let (mut h_type, mut h_key, mut h_event, mut h_membership) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (event, pos) in events.iter().zip(&positions) {
            for change in &event.state_changes {
                h_pos.push(*pos);
                h_type.push(change.kind.clone());
                h_key.push(change.state_key.clone());
                h_event.push(change.event_id.clone());
                h_membership.push(change.membership.clone());
            }
        }
        if !h_pos.is_empty() {
            tx.execute(
                "INSERT INTO room_state_history (room_id, pos, type, state_key, event_id, membership)
                 SELECT $1, * FROM unnest($2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[])",
                &[&batch.room_id, &h_pos, &h_type, &h_key, &h_event, &h_membership],
            )
            .await?;
            // Newest change per slot wins; DISTINCT ON keeps the last position.
            tx.execute(
                "WITH latest AS (
                     SELECT DISTINCT ON (c.type, c.state_key) c.type, c.state_key, c.event_id, c.membership, c.pos
                     FROM unnest($2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[])
                          AS c(pos, type, state_key, event_id, membership)
                     ORDER BY c.type, c.state_key, c.pos DESC
                 ), removed AS (
                     DELETE FROM room_state s USING latest l
                     WHERE s.room_id = $1 AND s.type = l.type AND s.state_key = l.state_key AND l.event_id IS NULL
                 )
                 INSERT INTO room_state (room_id, type, state_key, event_id, membership, pos)
                 SELECT $1, type, state_key, event_id, membership, pos FROM latest WHERE event_id IS NOT NULL
                 ON CONFLICT (room_id, type, state_key) DO UPDATE
                 SET event_id = EXCLUDED.event_id, membership = EXCLUDED.membership, pos = EXCLUDED.pos",
                &[&batch.room_id, &h_pos, &h_type, &h_key, &h_event, &h_membership],
            )
            .await?;
        }

        for event in events {
            if let Some(target) = &event.redacts {
                tx.execute(
                    "INSERT INTO event_redactions (redacted_event_id, redaction_event_id) VALUES ($1, $2)
                     ON CONFLICT DO NOTHING",
                    &[target, &event.event_id],
                )
                .await?;
            }
            if let Some(txn) = &event.txn {
                tx.execute(
                    "INSERT INTO event_txns (user_id, device_id, txn_id, event_id) VALUES ($1, $2, $3, $4)",
                    &[&txn.user_id, &txn.device_id, &txn.txn_id, &event.event_id],
                )
                .await
                .map_err(conflict)?;
            }
        }
        for (alias, creator) in &batch.aliases {
            tx.execute(
                "INSERT INTO room_aliases (alias, room_id, creator) VALUES ($1, $2, $3)",
                &[alias, &batch.room_id, creator],
            )
            .await
            .map_err(conflict)?;
        }
        tx.commit().await?;
        Ok(positions)
    }
}
