//! The fenced write: one transaction that takes positions for a batch of events
//! of one room and stores them with their state changes.
//!
//! The first statement updates the partition's lease row, checking owner,
//! epoch and expiry. If the lease moved, nothing is written ([`StoreError::Fenced`]).
//! The row lock it takes is held to commit, so a partition's commits are
//! serialized and positions are gap-free and in commit order: a reader that
//! has seen position N of a partition has seen everything before it.

use crate::{Result, Store, StoreError, conflict};
use tessera_events::room_state::RedactionReach;
use tessera_events::ruma::UserId;

/// A room being created by this batch.
pub struct NewRoom {
    pub version: String,
    pub creator: String,
    pub is_public: bool,
}

/// A change to a room's resolved state caused by an event.
#[derive(Debug, Clone, Default)]
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

/// What an accepted redaction hides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redacts {
    /// An event stored in the room, which the redaction hides.
    Stored(String),
    /// An event not seen in the room yet: hidden when it is persisted there
    /// (by this batch or a later one), if its sender is within `reach`.
    Unseen {
        target: String,
        reach: RedactionReach,
    },
}

#[derive(Debug, Clone, Default)]
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
    /// What this (accepted) redaction hides.
    pub redacts: Option<Redacts>,
    pub txn: Option<TxnKey>,
    /// State group of the state after the event, and before it.
    pub state_group: Option<String>,
    pub state_group_before: Option<String>,
    /// Passed the auth rules against its own state but not the room's current
    /// state: stored, never shown, never built on.
    pub soft_failed: bool,
    /// The server the event came from, for events received over federation.
    pub origin: Option<String>,
}

impl EventToPersist {
    /// What replication carries about this event once persisted at `pos`;
    /// `hidden` for events clients never see (rejected or soft-failed).
    pub fn entry(&self, room_id: &str, pos: i64, hidden: bool) -> crate::events::PartitionEntry {
        crate::events::PartitionEntry {
            pos,
            room_id: room_id.to_owned(),
            event_id: self.event_id.clone(),
            kind: self.kind.clone(),
            state_key: self.state_key.clone(),
            membership: self.membership.clone(),
            rejected: hidden,
        }
    }
}

/// A new state group: its parent (None for a full snapshot) and the slots
/// that differ from it (`None` event: slot removed).
#[derive(Debug, Clone)]
pub struct NewStateGroup {
    pub id: String,
    pub parent: Option<String>,
    pub chain_length: i32,
    pub entries: Vec<(String, String, Option<String>)>,
}

/// An event stored outside the timeline (fetched to check others).
#[derive(Debug, Clone)]
pub struct Outlier {
    pub event_id: String,
    pub json: String,
    pub rejected: bool,
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
    /// State groups the events refer to that do not exist yet.
    pub new_groups: Vec<NewStateGroup>,
    /// The room's current state group after the batch.
    pub state_group: Option<String>,
    /// Staged PDUs this batch processes: removed in the same transaction, so
    /// each is processed exactly once.
    pub staged_ids: Vec<i64>,
    /// Events fetched to check these, stored outside the timeline.
    pub outliers: Vec<Outlier>,
    /// Set for a membership in a room this server does not host: recorded in
    /// the history (so /sync shows it) and in `out_of_band_memberships`,
    /// never in the room's current state.
    pub out_of_band: Option<OutOfBand>,
}

/// What an out-of-band membership keeps besides its event.
#[derive(Debug, Clone)]
pub struct OutOfBand {
    pub room_version: String,
    /// The stripped state (JSON array) the inviting server sent, shown with
    /// an invite; empty for a local rejection.
    pub stripped_state: String,
}

impl Batch {
    /// An empty batch for a room, to be filled in.
    pub fn new(partition: u32, worker_id: &str, epoch: i64, room_id: &str) -> Self {
        Self {
            partition,
            worker_id: worker_id.to_owned(),
            epoch,
            room_id: room_id.to_owned(),
            new_room: None,
            events: vec![],
            depth: 0,
            extremities: vec![],
            aliases: vec![],
            new_groups: vec![],
            state_group: None,
            staged_ids: vec![],
            outliers: vec![],
            out_of_band: None,
        }
    }
}

/// The whole batch in one statement, so one round trip: the fenced lease
/// update hands out the positions (and takes the partition's row lock until
/// commit); every other part inserts `FROM lease`, so a failed fence writes
/// nothing. A unique violation anywhere (a repeated client transaction, a room
/// or alias that exists) aborts the whole statement.
const PERSIST_SQL: &str = "
WITH lease AS (
    UPDATE partition_leases SET next_pos = next_pos + $4::bigint
    WHERE partition = $1::int AND owner = $2::text AND epoch = $3::bigint AND expires_at > now()
    RETURNING next_pos - $4 AS first
), new_room AS (
    INSERT INTO rooms (room_id, partition, room_version, creator, is_public, head_pos, depth, forward_extremities,
                       state_group)
    SELECT $5::text, $1::int, $6::text, $7::text, $8::bool, lease.first + $4 - 1, $9::bigint, $10::text[], $45::text
    FROM lease WHERE $6::text IS NOT NULL
), room_head AS (
    UPDATE rooms SET head_pos = lease.first + $4 - 1, depth = $9, forward_extremities = $10,
                     state_group = COALESCE($45::text, rooms.state_group)
    FROM lease WHERE rooms.room_id = $5 AND $6::text IS NULL AND $4::bigint > 0
), new_events AS (
    INSERT INTO events (partition, pos, event_id, room_id, type, state_key, sender,
                        origin_server_ts, depth, membership, rejected, prev_state_event_id, json,
                        state_group, state_group_before, soft_failed, origin)
    SELECT $1, lease.first + e.ord - 1, e.event_id, $5, e.type, e.state_key, e.sender, e.ts, e.depth,
           e.membership, e.rejected, e.prev_state, e.json, e.grp, e.grp_before, e.soft_failed, e.origin
    FROM lease, unnest($11::text[], $12::text[], $13::text[], $14::text[], $15::bigint[], $16::bigint[],
                       $17::text[], $18::bool[], $19::text[], $20::text[], $41::text[], $42::text[],
                       $43::bool[], $44::text[])
         WITH ORDINALITY AS e(event_id, type, state_key, sender, ts, depth, membership, rejected, prev_state,
                              json, grp, grp_before, soft_failed, origin, ord)
), groups AS (
    INSERT INTO state_groups (id, room_id, parent, chain_length)
    SELECT g.id, $5, g.parent, g.chain_length
    FROM lease, unnest($34::text[], $35::text[], $36::int[]) AS g(id, parent, chain_length)
), group_entries AS (
    INSERT INTO state_group_entries (group_id, type, state_key, event_id)
    SELECT g.group_id, g.type, g.state_key, g.event_id
    FROM lease, unnest($37::text[], $38::text[], $39::text[], $40::text[]) AS g(group_id, type, state_key, event_id)
), unstaged AS (
    DELETE FROM staged_pdus USING lease WHERE staged_pdus.id = ANY($46::bigint[])
), new_outliers AS (
    INSERT INTO outliers (event_id, room_id, json, rejected)
    SELECT o.event_id, $5, o.json, o.rejected
    FROM lease, unnest($47::text[], $48::text[], $49::bool[]) AS o(event_id, json, rejected)
    ON CONFLICT DO NOTHING
), promoted AS (
    DELETE FROM outliers USING lease WHERE outliers.event_id = ANY($11::text[])
), changes AS (
    SELECT lease.first + c.ord - 1 AS pos, c.type, c.state_key, c.event_id, c.membership
    FROM lease, unnest($21::bigint[], $22::text[], $23::text[], $24::text[], $25::text[])
         AS c(ord, type, state_key, event_id, membership)
), history AS (
    INSERT INTO room_state_history (room_id, pos, type, state_key, event_id, membership)
    SELECT $5, pos, type, state_key, event_id, membership FROM changes
), latest AS (
    SELECT DISTINCT ON (type, state_key) type, state_key, event_id, membership, pos
    FROM changes ORDER BY type, state_key, pos DESC
), removed AS (
    DELETE FROM room_state s USING latest l
    WHERE s.room_id = $5 AND s.type = l.type AND s.state_key = l.state_key AND l.event_id IS NULL
      AND $50::text IS NULL
), current_state AS (
    INSERT INTO room_state (room_id, type, state_key, event_id, membership, pos)
    SELECT $5, type, state_key, event_id, membership, pos FROM latest
    WHERE event_id IS NOT NULL AND $50::text IS NULL
    ON CONFLICT (room_id, type, state_key) DO UPDATE
    SET event_id = EXCLUDED.event_id, membership = EXCLUDED.membership, pos = EXCLUDED.pos
), unseen AS (
    SELECT u.target, u.redaction, u.only_sender, u.only_server
    FROM unnest($52::text[], $53::text[], $54::text[], $55::text[])
         AS u(target, redaction, only_sender, only_server)
), waiting AS (
    SELECT p.target_event_id AS target, p.redaction_event_id AS redaction, p.only_sender, p.only_server
    FROM pending_redactions p WHERE p.room_id = $5 AND p.target_event_id = ANY($11::text[])
    UNION ALL
    SELECT * FROM unseen
), arrived AS (
    -- Redactions (earlier or in this batch) of events this batch brings, when
    -- the event's sender is within the redaction's reach.
    SELECT w.target, w.redaction
    FROM waiting w JOIN unnest($11::text[], $14::text[]) AS e(event_id, sender) ON e.event_id = w.target
    WHERE (w.only_sender IS NULL OR w.only_sender = e.sender)
      AND (w.only_server IS NULL OR w.only_server = substring(e.sender FROM position(':' IN e.sender) + 1))
), redactions AS (
    INSERT INTO event_redactions (redacted_event_id, redaction_event_id)
    SELECT r.target, r.redaction
    FROM lease, (SELECT * FROM unnest($26::text[], $27::text[]) UNION ALL SELECT * FROM arrived)
         AS r(target, redaction)
    ON CONFLICT DO NOTHING
), still_unseen AS (
    INSERT INTO pending_redactions (room_id, target_event_id, redaction_event_id, only_sender, only_server)
    SELECT $5, u.target, u.redaction, u.only_sender, u.only_server
    FROM lease, unseen u WHERE u.target <> ALL($11::text[])
    ON CONFLICT DO NOTHING
), settled AS (
    -- A target arrives once: whatever did not apply now never will.
    DELETE FROM pending_redactions USING lease
    WHERE pending_redactions.room_id = $5 AND pending_redactions.target_event_id = ANY($11::text[])
), txns AS (
    INSERT INTO event_txns (user_id, device_id, txn_id, event_id)
    SELECT t.user_id, t.device_id, t.txn_id, t.event_id
    FROM lease, unnest($28::text[], $29::text[], $30::text[], $31::text[]) AS t(user_id, device_id, txn_id, event_id)
), aliases AS (
    INSERT INTO room_aliases (alias, room_id, creator)
    SELECT a.alias, $5, a.creator FROM lease, unnest($32::text[], $33::text[]) AS a(alias, creator)
), out_of_band AS (
    INSERT INTO out_of_band_memberships (event_id, room_id, user_id, room_version, stripped_state)
    SELECT c.event_id, $5, c.state_key, $50, $51::text::jsonb FROM changes c
    WHERE $50::text IS NOT NULL AND c.type = 'm.room.member'
)
SELECT first FROM lease";

impl Store {
    /// What a redaction with `reach` hides of `target`, in `room_id`: the
    /// target when it is stored there and its sender (`sender`, when the
    /// caller knows it already) is within reach; the target once it arrives
    /// when it is not stored there yet.
    pub async fn redacts(
        &self,
        room_id: &str,
        target: &str,
        reach: RedactionReach,
        sender: Option<&UserId>,
    ) -> Result<Option<Redacts>> {
        let covered = match sender {
            Some(sender) => reach.covers(sender),
            None => match self
                .query_opt(
                    "SELECT sender FROM events WHERE event_id = $1 AND room_id = $2",
                    &[&target, &room_id],
                )
                .await?
            {
                Some(row) => {
                    UserId::parse(row.get::<_, &str>(0)).is_ok_and(|sender| reach.covers(&sender))
                }
                None => {
                    return Ok(Some(Redacts::Unseen {
                        target: target.to_owned(),
                        reach,
                    }));
                }
            },
        };
        Ok(covered.then(|| Redacts::Stored(target.to_owned())))
    }

    /// Persist a batch in one round trip. Returns the position of each event,
    /// in order.
    pub async fn persist(&self, batch: &Batch) -> Result<Vec<i64>> {
        let n = batch.events.len() as i64;
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

        // State changes, keyed by the ordinal of their event in the batch.
        let mut c_ord = Vec::new();
        let (mut c_type, mut c_key, mut c_event, mut c_membership) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (i, event) in events.iter().enumerate() {
            for change in &event.state_changes {
                c_ord.push(i as i64 + 1);
                c_type.push(change.kind.clone());
                c_key.push(change.state_key.clone());
                c_event.push(change.event_id.clone());
                c_membership.push(change.membership.clone());
            }
        }
        let (mut targets, mut redactions) = (Vec::new(), Vec::new());
        let (mut unseen_targets, mut unseen_redactions) = (Vec::new(), Vec::new());
        let (mut only_senders, mut only_servers) = (Vec::new(), Vec::new());
        for event in events {
            match &event.redacts {
                None => {}
                Some(Redacts::Stored(target)) => {
                    targets.push(target.as_str());
                    redactions.push(event.event_id.as_str());
                }
                Some(Redacts::Unseen { target, reach }) => {
                    unseen_targets.push(target.as_str());
                    unseen_redactions.push(event.event_id.as_str());
                    let (sender, server) = match reach {
                        RedactionReach::Anyone => (None, None),
                        RedactionReach::Sender(user) => (Some(user.to_string()), None),
                        RedactionReach::Server(server) => (None, Some(server.to_string())),
                    };
                    only_senders.push(sender);
                    only_servers.push(server);
                }
            }
        }
        let txns: Vec<(&TxnKey, &String)> = events
            .iter()
            .filter_map(|e| Some((e.txn.as_ref()?, &e.event_id)))
            .collect();
        let txn_users: Vec<&str> = txns.iter().map(|(t, _)| t.user_id.as_str()).collect();
        let txn_devices: Vec<&str> = txns.iter().map(|(t, _)| t.device_id.as_str()).collect();
        let txn_ids: Vec<&str> = txns.iter().map(|(t, _)| t.txn_id.as_str()).collect();
        let txn_events: Vec<&str> = txns.iter().map(|(_, e)| e.as_str()).collect();
        let (aliases, alias_creators): (Vec<&str>, Vec<&str>) = batch
            .aliases
            .iter()
            .map(|(a, c)| (a.as_str(), c.as_str()))
            .unzip();
        let room = batch.new_room.as_ref();
        let version = room.map(|r| r.version.as_str());
        let creator = room.map(|r| r.creator.as_str());
        let is_public = room.map(|r| r.is_public).unwrap_or(false);
        let partition = batch.partition as i32;
        let groups = options(|e| e.state_group.clone());
        let groups_before = options(|e| e.state_group_before.clone());
        let soft_failed: Vec<bool> = events.iter().map(|e| e.soft_failed).collect();
        let origins = options(|e| e.origin.clone());
        let group_ids: Vec<&str> = batch.new_groups.iter().map(|g| g.id.as_str()).collect();
        let group_parents: Vec<Option<&str>> = batch
            .new_groups
            .iter()
            .map(|g| g.parent.as_deref())
            .collect();
        let group_lengths: Vec<i32> = batch.new_groups.iter().map(|g| g.chain_length).collect();
        let mut entry_group = Vec::new();
        let (mut entry_type, mut entry_key, mut entry_event) = (Vec::new(), Vec::new(), Vec::new());
        for group in &batch.new_groups {
            for (kind, key, event) in &group.entries {
                entry_group.push(group.id.as_str());
                entry_type.push(kind.as_str());
                entry_key.push(key.as_str());
                entry_event.push(event.as_deref());
            }
        }
        let outlier_ids: Vec<&str> = batch.outliers.iter().map(|o| o.event_id.as_str()).collect();
        let outlier_jsons: Vec<&str> = batch.outliers.iter().map(|o| o.json.as_str()).collect();
        let outlier_rejected: Vec<bool> = batch.outliers.iter().map(|o| o.rejected).collect();
        let out_of_band_version = batch.out_of_band.as_ref().map(|o| o.room_version.as_str());
        let out_of_band_state = batch
            .out_of_band
            .as_ref()
            .map(|o| o.stripped_state.as_str())
            .unwrap_or("[]");

        let client = self.client().await?;
        let statement = client.prepare_cached(PERSIST_SQL).await?;
        let row = client
            .query_opt(
                &statement,
                &[
                    &partition,
                    &batch.worker_id,
                    &batch.epoch,
                    &n,
                    &batch.room_id,
                    &version,
                    &creator,
                    &is_public,
                    &batch.depth,
                    &batch.extremities,
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
                    &c_ord,
                    &c_type,
                    &c_key,
                    &c_event,
                    &c_membership,
                    &targets,
                    &redactions,
                    &txn_users,
                    &txn_devices,
                    &txn_ids,
                    &txn_events,
                    &aliases,
                    &alias_creators,
                    &group_ids,
                    &group_parents,
                    &group_lengths,
                    &entry_group,
                    &entry_type,
                    &entry_key,
                    &entry_event,
                    &groups,
                    &groups_before,
                    &soft_failed,
                    &origins,
                    &batch.state_group,
                    &batch.staged_ids,
                    &outlier_ids,
                    &outlier_jsons,
                    &outlier_rejected,
                    &out_of_band_version,
                    &out_of_band_state,
                    &unseen_targets,
                    &unseen_redactions,
                    &only_senders,
                    &only_servers,
                ],
            )
            .await
            .map_err(conflict)?;
        let first: i64 = match row {
            Some(row) => row.get(0),
            None => {
                return Err(StoreError::Fenced {
                    partition: batch.partition,
                    epoch: batch.epoch,
                });
            }
        };
        Ok((first..first + n).collect())
    }
}
