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

const LEASE_SQL: &str = "UPDATE partition_leases SET next_pos = next_pos + $4
     WHERE partition = $1 AND owner = $2 AND epoch = $3 AND expires_at > now()
     RETURNING next_pos - $4";

const NEW_ROOM_SQL: &str = "INSERT INTO rooms (room_id, partition, room_version, creator, is_public, head_pos, depth, forward_extremities)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";

const ROOM_HEAD_SQL: &str =
    "UPDATE rooms SET head_pos = $2, depth = $3, forward_extremities = $4 WHERE room_id = $1";

const EVENTS_SQL: &str = "INSERT INTO events (partition, pos, event_id, room_id, type, state_key, sender,
                         origin_server_ts, depth, membership, rejected, prev_state_event_id, json)
     SELECT $1, e.pos, e.event_id, $2, e.type, e.state_key, e.sender, e.ts, e.depth,
            e.membership, e.rejected, e.prev_state, e.json
     FROM unnest($3::bigint[], $4::text[], $5::text[], $6::text[], $7::text[], $8::bigint[],
                 $9::bigint[], $10::text[], $11::bool[], $12::text[], $13::text[])
          AS e(pos, event_id, type, state_key, sender, ts, depth, membership, rejected, prev_state, json)";

const HISTORY_SQL: &str =
    "INSERT INTO room_state_history (room_id, pos, type, state_key, event_id, membership)
     SELECT $1, * FROM unnest($2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[])";

// Newest change per slot wins; DISTINCT ON keeps the last position.
const CURRENT_STATE_SQL: &str = "WITH latest AS (
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
     SET event_id = EXCLUDED.event_id, membership = EXCLUDED.membership, pos = EXCLUDED.pos";

const REDACTIONS_SQL: &str = "INSERT INTO event_redactions (redacted_event_id, redaction_event_id)
     SELECT * FROM unnest($1::text[], $2::text[]) ON CONFLICT DO NOTHING";

const TXNS_SQL: &str = "INSERT INTO event_txns (user_id, device_id, txn_id, event_id)
     SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])";

const ALIAS_SQL: &str = "INSERT INTO room_aliases (alias, room_id, creator) VALUES ($1, $2, $3)";

type Pending<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<u64>> + Send + 'a>>;

fn pending_execute<'a, 't: 'a>(
    tx: &'a deadpool_postgres::Transaction<'t>,
    statement: &'a tokio_postgres::Statement,
    params: Vec<&'a (dyn tokio_postgres::types::ToSql + Sync)>,
) -> Pending<'a> {
    Box::pin(async move { tx.execute(statement, &params).await.map_err(conflict) })
}

impl Store {
    /// Persist a batch. Returns the position of each event, in order.
    ///
    /// Four round trips whatever the batch size: BEGIN, the fenced lease
    /// update that hands out positions, every insert pipelined together, COMMIT.
    pub async fn persist(&self, batch: &Batch) -> Result<Vec<i64>> {
        let n = batch.events.len() as i64;
        if n == 0 {
            return Ok(vec![]);
        }
        let mut client = self.client().await?;
        let lease = client.prepare_cached(LEASE_SQL).await?;
        let room_sql = client
            .prepare_cached(if batch.new_room.is_some() {
                NEW_ROOM_SQL
            } else {
                ROOM_HEAD_SQL
            })
            .await?;
        let events_sql = client.prepare_cached(EVENTS_SQL).await?;
        let history_sql = client.prepare_cached(HISTORY_SQL).await?;
        let state_sql = client.prepare_cached(CURRENT_STATE_SQL).await?;
        let redactions_sql = client.prepare_cached(REDACTIONS_SQL).await?;
        let txns_sql = client.prepare_cached(TXNS_SQL).await?;
        let alias_sql = client.prepare_cached(ALIAS_SQL).await?;

        let tx = client.transaction().await?;
        let partition = batch.partition as i32;
        let first: i64 = match tx
            .query_opt(&lease, &[&partition, &batch.worker_id, &batch.epoch, &n])
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

        let events = &batch.events;
        let strings = |f: fn(&EventToPersist) -> String| events.iter().map(f).collect::<Vec<_>>();
        let options =
            |f: fn(&EventToPersist) -> Option<String>| events.iter().map(f).collect::<Vec<_>>();
        let (event_ids, kinds, senders, jsons) = (
            strings(|e| e.event_id.clone()),
            strings(|e| e.kind.clone()),
            strings(|e| e.sender.clone()),
            strings(|e| e.json.clone()),
        );
        let (state_keys, memberships, prev_states) = (
            options(|e| e.state_key.clone()),
            options(|e| e.membership.clone()),
            options(|e| e.prev_state_event_id.clone()),
        );
        let timestamps: Vec<i64> = events.iter().map(|e| e.origin_server_ts).collect();
        let depths: Vec<i64> = events.iter().map(|e| e.depth).collect();
        let rejected: Vec<bool> = events.iter().map(|e| e.rejected).collect();

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
        let (redacted, redactions): (Vec<String>, Vec<String>) = events
            .iter()
            .filter_map(|e| Some((e.redacts.clone()?, e.event_id.clone())))
            .unzip();
        let txns: Vec<(&TxnKey, &String)> = events
            .iter()
            .filter_map(|e| Some((e.txn.as_ref()?, &e.event_id)))
            .collect();
        let txn_users: Vec<&str> = txns.iter().map(|(t, _)| t.user_id.as_str()).collect();
        let txn_devices: Vec<&str> = txns.iter().map(|(t, _)| t.device_id.as_str()).collect();
        let txn_ids: Vec<&str> = txns.iter().map(|(t, _)| t.txn_id.as_str()).collect();
        let txn_events: Vec<&str> = txns.iter().map(|(_, e)| e.as_str()).collect();

        // Everything below is sent at once: tokio-postgres pipelines
        // concurrent queries on one connection.
        let run = |statement, params| pending_execute(&tx, statement, params);
        let mut pending: Vec<Pending<'_>> = Vec::new();
        if let Some(room) = &batch.new_room {
            pending.push(run(
                &room_sql,
                vec![
                    &batch.room_id,
                    &partition,
                    &room.version,
                    &room.creator,
                    &room.is_public,
                    &last,
                    &batch.depth,
                    &batch.extremities,
                ],
            ));
        } else {
            pending.push(run(
                &room_sql,
                vec![&batch.room_id, &last, &batch.depth, &batch.extremities],
            ));
        }
        pending.push(run(
            &events_sql,
            vec![
                &partition,
                &batch.room_id,
                &positions,
                &event_ids,
                &kinds,
                &state_keys,
                &senders,
                &timestamps,
                &depths,
                &memberships,
                &rejected,
                &prev_states,
                &jsons,
            ],
        ));
        if !h_pos.is_empty() {
            pending.push(run(
                &history_sql,
                vec![
                    &batch.room_id,
                    &h_pos,
                    &h_type,
                    &h_key,
                    &h_event,
                    &h_membership,
                ],
            ));
            pending.push(run(
                &state_sql,
                vec![
                    &batch.room_id,
                    &h_pos,
                    &h_type,
                    &h_key,
                    &h_event,
                    &h_membership,
                ],
            ));
        }
        if !redacted.is_empty() {
            pending.push(run(&redactions_sql, vec![&redacted, &redactions]));
        }
        if !txns.is_empty() {
            pending.push(run(
                &txns_sql,
                vec![&txn_users, &txn_devices, &txn_ids, &txn_events],
            ));
        }
        for (alias, creator) in &batch.aliases {
            pending.push(run(&alias_sql, vec![alias, &batch.room_id, creator]));
        }
        let results = futures::future::join_all(pending).await;
        for result in results {
            result?;
        }
        tx.commit().await?;
        Ok(positions)
    }
}
