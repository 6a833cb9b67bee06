//! Federation state: remote servers' keys, inbound transactions, the staging
//! queue of PDUs waiting for their room's owner, outliers, received EDUs and
//! remote read receipts.

use std::collections::HashMap;

use tokio_postgres::types::Type;

use crate::{Result, Store, conflict};

/// A remote user's read receipt in a room, from an `m.receipt` EDU.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteReceipt {
    pub room_id: String,
    pub receipt_type: String,
    pub user_id: String,
    /// Empty for an unthreaded receipt.
    pub thread_id: String,
    pub event_ids: Vec<String>,
    /// The receipt's `data` (its `ts`, and `thread_id` when threaded).
    pub data: serde_json::Value,
    /// `data.ts`; 0 when absent.
    pub ts: i64,
    pub origin: String,
}

/// A remote user's device, from an `m.device_list_update` EDU.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceListUpdate {
    pub user_id: String,
    pub device_id: String,
    pub stream_id: i64,
    /// The EDU's content as sent.
    pub content: serde_json::Value,
}

/// A remote user's cross-signing keys, from an `m.signing_key_update` EDU.
#[derive(Debug, Clone, PartialEq)]
pub struct SigningKeyUpdate {
    pub user_id: String,
    /// `master_key` and/or `self_signing_key`, as sent.
    pub keys: serde_json::Map<String, serde_json::Value>,
}

/// A to-device message for one of our devices (or `*`: each of the user's
/// devices), from an `m.direct_to_device` EDU.
#[derive(Debug, Clone, PartialEq)]
pub struct ToDeviceMessage {
    pub sender: String,
    pub event_type: String,
    pub message_id: String,
    pub user_id: String,
    pub device_id: String,
    pub content: serde_json::Value,
}

/// A PDU waiting in staging.
#[derive(Debug, Clone)]
pub struct StagedPdu {
    pub id: i64,
    pub room_id: String,
    pub origin: String,
    pub event_id: String,
    pub json: String,
    /// When it was staged, in ms since the epoch.
    pub staged_at_ms: i64,
}

/// A PDU to stage.
#[derive(Debug, Clone)]
pub struct NewStagedPdu<'a> {
    pub room_id: &'a str,
    pub partition: u32,
    pub origin: &'a str,
    pub event_id: &'a str,
    pub json: &'a str,
    pub depth: i64,
}

/// An event by ID from the timeline or the outliers.
#[derive(Debug, Clone)]
pub struct KnownEvent {
    pub event_id: String,
    pub room_id: String,
    pub json: String,
    pub rejected: bool,
    pub outlier: bool,
    pub soft_failed: bool,
    pub state_group: Option<String>,
}

impl Store {
    /// A remote key: (public key, valid until ms).
    pub async fn remote_key(&self, server: &str, key_id: &str) -> Result<Option<(String, i64)>> {
        let row = self
            .query_opt(
                "SELECT public_key, valid_until_ts FROM remote_server_keys WHERE server_name = $1 AND key_id = $2",
                &[&server, &key_id],
            )
            .await?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }

    /// Store verified keys of a server: (key ID, public key, valid until ms).
    pub async fn store_remote_keys(
        &self,
        server: &str,
        keys: &[(String, String, i64)],
    ) -> Result<()> {
        let ids: Vec<&str> = keys.iter().map(|k| k.0.as_str()).collect();
        let publics: Vec<&str> = keys.iter().map(|k| k.1.as_str()).collect();
        let valid: Vec<i64> = keys.iter().map(|k| k.2).collect();
        self.execute(
            "INSERT INTO remote_server_keys (server_name, key_id, public_key, valid_until_ts, fetched_at)
             SELECT $1, * , now() FROM unnest($2::text[], $3::text[], $4::bigint[])
             ON CONFLICT (server_name, key_id) DO UPDATE
             SET public_key = EXCLUDED.public_key,
                 valid_until_ts = GREATEST(remote_server_keys.valid_until_ts, EXCLUDED.valid_until_ts),
                 fetched_at = now()",
            &[&server, &ids, &publics, &valid],
        )
        .await?;
        Ok(())
    }

    /// Our answer to a transaction we already processed.
    pub async fn federation_txn(
        &self,
        origin: &str,
        txn_id: &str,
    ) -> Result<Option<serde_json::Value>> {
        let row = self
            .query_opt(
                "SELECT response FROM federation_transactions WHERE origin = $1 AND txn_id = $2",
                &[&origin, &txn_id],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    pub async fn store_federation_txn(
        &self,
        origin: &str,
        txn_id: &str,
        response: &serde_json::Value,
    ) -> Result<()> {
        self.execute(
            "INSERT INTO federation_transactions (origin, txn_id, response) VALUES ($1, $2, $3)
             ON CONFLICT DO NOTHING",
            &[&origin, &txn_id, response],
        )
        .await?;
        Ok(())
    }

    /// Delete the records of transactions received more than `age` ago, at
    /// most `batch` at a time (so no delete holds its locks for long);
    /// returns how many went. An origin that retries so old a transaction
    /// gets it processed again, which changes nothing: its PDUs are known.
    pub async fn prune_federation_txns(&self, age: std::time::Duration, batch: i64) -> Result<u64> {
        let batch = batch.max(1);
        self.delete_in_batches(
            "DELETE FROM federation_transactions WHERE ctid IN (
                 SELECT ctid FROM federation_transactions
                 WHERE received_at < now() - make_interval(secs => $1::float8)
                 LIMIT $2)",
            &[&age.as_secs_f64(), &batch],
            batch,
        )
        .await
    }

    /// Delete kept EDUs of the given types received more than `age` ago,
    /// `batch` rows a statement; how many went.
    pub async fn prune_received_edus(
        &self,
        edu_types: &[&str],
        age: std::time::Duration,
        batch: i64,
    ) -> Result<u64> {
        let batch = batch.max(1);
        self.delete_in_batches(
            "DELETE FROM received_edus WHERE id IN (
                 SELECT id FROM received_edus
                 WHERE edu_type = ANY($3) AND received_at < now() - make_interval(secs => $1::float8)
                 LIMIT $2)",
            &[&age.as_secs_f64(), &batch, &edu_types],
            batch,
        )
        .await
    }

    /// Run a delete of at most `batch` rows until it deletes fewer: short
    /// statements, so a large backlog of old rows never holds locks long.
    async fn delete_in_batches(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
        batch: i64,
    ) -> Result<u64> {
        let mut deleted = 0;
        loop {
            let n = self.execute(sql, params).await?;
            deleted += n;
            if n < batch as u64 {
                return Ok(deleted);
            }
        }
    }

    /// Stage PDUs (already checked for format, hashes and signatures). A PDU
    /// already staged or already known is skipped. Returns how many were new.
    pub async fn stage_pdus(&self, pdus: &[NewStagedPdu<'_>]) -> Result<u64> {
        let rooms: Vec<&str> = pdus.iter().map(|p| p.room_id).collect();
        let partitions: Vec<i32> = pdus.iter().map(|p| p.partition as i32).collect();
        let origins: Vec<&str> = pdus.iter().map(|p| p.origin).collect();
        let ids: Vec<&str> = pdus.iter().map(|p| p.event_id).collect();
        let jsons: Vec<&str> = pdus.iter().map(|p| p.json).collect();
        let depths: Vec<i64> = pdus.iter().map(|p| p.depth).collect();
        self.execute(
            "INSERT INTO staged_pdus (room_id, partition, origin, event_id, json, depth)
             SELECT s.room_id, s.partition, s.origin, s.event_id, s.json, s.depth
             FROM unnest($1::text[], $2::int[], $3::text[], $4::text[], $5::text[], $6::bigint[])
                  WITH ORDINALITY AS s(room_id, partition, origin, event_id, json, depth, ord)
             WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.event_id = s.event_id)
             ORDER BY s.ord
             ON CONFLICT (room_id, event_id) DO NOTHING",
            &[&rooms, &partitions, &origins, &ids, &jsons, &depths],
        )
        .await
        .map_err(conflict)
    }

    /// How many PDUs a room has waiting.
    pub async fn staged_count(&self, room_id: &str) -> Result<i64> {
        Ok(self
            .query_one(
                "SELECT count(*) FROM staged_pdus WHERE room_id = $1",
                &[&room_id],
            )
            .await?
            .get(0))
    }

    /// Rooms of a partition with staged PDUs, oldest first.
    pub async fn rooms_with_staged(&self, partition: u32) -> Result<Vec<String>> {
        let rows = self
            .query(
                "SELECT room_id FROM staged_pdus WHERE partition = $1 GROUP BY room_id ORDER BY min(id)",
                &[&(partition as i32)],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// A room's next staged PDUs: lowest depth first (parents before
    /// children, whatever order their transactions arrived in), then by
    /// arrival.
    pub async fn staged_for_room(&self, room_id: &str, limit: i64) -> Result<Vec<StagedPdu>> {
        let rows = self
            .query_planned_now(
                "SELECT id, room_id, origin, event_id, json, (EXTRACT(EPOCH FROM staged_at) * 1000)::bigint
                 FROM staged_pdus WHERE room_id = $1 ORDER BY depth, id LIMIT $2",
                &[(&room_id, Type::TEXT), (&limit, Type::INT8)],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| StagedPdu {
                id: r.get(0),
                room_id: r.get(1),
                origin: r.get(2),
                event_id: r.get(3),
                json: r.get(4),
                staged_at_ms: r.get(5),
            })
            .collect())
    }

    /// Whether these events are staged for the room (on their way).
    pub async fn staged_event_ids(
        &self,
        room_id: &str,
        event_ids: &[String],
    ) -> Result<Vec<String>> {
        let rows = self
            .query_planned_now(
                "SELECT event_id FROM staged_pdus WHERE room_id = $1 AND event_id = ANY($2)",
                &[(&room_id, Type::TEXT), (&event_ids, Type::TEXT_ARRAY)],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Staged PDU counts and oldest ages (seconds) per partition, for metrics.
    pub async fn staging_stats(&self) -> Result<Vec<(u32, i64, f64)>> {
        let rows = self
            .query(
                "SELECT partition, count(*), EXTRACT(EPOCH FROM now() - min(staged_at))::float8
                 FROM staged_pdus GROUP BY partition",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<_, i32>(0) as u32, r.get(1), r.get(2)))
            .collect())
    }

    /// The rooms with the most staged PDUs among `partitions`: (room, count,
    /// age of the oldest in seconds), largest first.
    pub async fn top_staged_rooms(
        &self,
        partitions: &[u32],
        limit: i64,
    ) -> Result<Vec<(String, i64, f64)>> {
        let partitions: Vec<i32> = partitions.iter().map(|p| *p as i32).collect();
        let rows = self
            .query(
                "SELECT room_id, count(*), EXTRACT(EPOCH FROM now() - min(staged_at))::float8
                 FROM staged_pdus WHERE partition = ANY($1)
                 GROUP BY room_id ORDER BY count(*) DESC LIMIT $2",
                &[&partitions, &limit],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
    }

    /// Events by ID, from the timeline or the outliers.
    pub async fn known_events(&self, event_ids: &[String]) -> Result<Vec<KnownEvent>> {
        let rows = self
            .query_planned_now(
                // A join with unnest rather than `= ANY($1)`: one unique-index
                // probe per ID, where a plan of `= ANY` can cost milliseconds
                // for a few hundred IDs.
                "SELECT e.event_id, e.room_id, e.json, e.rejected, false, e.soft_failed, e.state_group
                 FROM unnest($1::text[]) AS w(id) JOIN events e ON e.event_id = w.id
                 UNION ALL
                 SELECT o.event_id, o.room_id, o.json, o.rejected, true, false, NULL
                 FROM unnest($1::text[]) AS w(id) JOIN outliers o ON o.event_id = w.id
                 WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.event_id = o.event_id)",
                &[(&event_ids, Type::TEXT_ARRAY)],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| KnownEvent {
                event_id: r.get(0),
                room_id: r.get(1),
                json: r.get(2),
                rejected: r.get(3),
                outlier: r.get(4),
                soft_failed: r.get(5),
                state_group: r.get(6),
            })
            .collect())
    }

    /// Keep remote users' receipts, the newest (by `ts`) of each room,
    /// receipt type, user and thread replacing the one before.
    pub async fn store_receipts(&self, receipts: &[RemoteReceipt]) -> Result<()> {
        let rows = newest_per_key(
            receipts,
            |r| {
                (
                    r.room_id.as_str(),
                    r.receipt_type.as_str(),
                    r.user_id.as_str(),
                    r.thread_id.as_str(),
                )
            },
            |r| r.ts,
        );
        if rows.is_empty() {
            return Ok(());
        }
        let column = |f: fn(&RemoteReceipt) -> &str| rows.iter().map(|r| f(r)).collect::<Vec<_>>();
        let event_ids: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| serde_json::json!(r.event_ids))
            .collect();
        let data: Vec<&serde_json::Value> = rows.iter().map(|r| &r.data).collect();
        let ts: Vec<i64> = rows.iter().map(|r| r.ts).collect();
        self.execute(
            "INSERT INTO remote_receipts (room_id, receipt_type, user_id, thread_id, event_ids, data, ts, origin)
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::jsonb[], $6::jsonb[],
                                  $7::bigint[], $8::text[])
             ON CONFLICT (room_id, receipt_type, user_id, thread_id) DO UPDATE
             SET event_ids = EXCLUDED.event_ids, data = EXCLUDED.data, ts = EXCLUDED.ts,
                 origin = EXCLUDED.origin, received_at = now()
             WHERE remote_receipts.ts <= EXCLUDED.ts",
            &[
                &column(|r| r.room_id.as_str()),
                &column(|r| r.receipt_type.as_str()),
                &column(|r| r.user_id.as_str()),
                &column(|r| r.thread_id.as_str()),
                &event_ids,
                &data,
                &ts,
                &column(|r| r.origin.as_str()),
            ],
        )
        .await?;
        Ok(())
    }

    /// Keep remote users' device list updates whose user is joined to a
    /// room here (Synapse ignores the others too): the newest (by
    /// `stream_id`) of each user and device replaces the one before.
    pub async fn store_device_list_updates(
        &self,
        origin: &str,
        updates: &[DeviceListUpdate],
    ) -> Result<()> {
        let rows = newest_per_key(
            updates,
            |u| (u.user_id.as_str(), u.device_id.as_str()),
            |u| u.stream_id,
        );
        if rows.is_empty() {
            return Ok(());
        }
        let users: Vec<&str> = rows.iter().map(|u| u.user_id.as_str()).collect();
        let devices: Vec<&str> = rows.iter().map(|u| u.device_id.as_str()).collect();
        let stream_ids: Vec<i64> = rows.iter().map(|u| u.stream_id).collect();
        let contents: Vec<&serde_json::Value> = rows.iter().map(|u| &u.content).collect();
        self.execute(
            "INSERT INTO remote_device_list_updates (user_id, device_id, stream_id, content, origin)
             SELECT u.user_id, u.device_id, u.stream_id, u.content, $5
             FROM unnest($1::text[], $2::text[], $3::bigint[], $4::jsonb[])
                  AS u(user_id, device_id, stream_id, content)
             WHERE EXISTS (SELECT 1 FROM room_state s WHERE s.type = 'm.room.member'
                           AND s.state_key = u.user_id AND s.membership = 'join')
             ON CONFLICT (user_id, device_id) DO UPDATE
             SET stream_id = EXCLUDED.stream_id, content = EXCLUDED.content,
                 origin = EXCLUDED.origin, received_at = now()
             WHERE remote_device_list_updates.stream_id <= EXCLUDED.stream_id",
            &[&users, &devices, &stream_ids, &contents, &origin],
        )
        .await?;
        Ok(())
    }

    /// Keep remote users' cross-signing keys, for users joined to a room
    /// here: each key sent replaces that key, the others stay.
    pub async fn store_signing_key_updates(
        &self,
        origin: &str,
        updates: &[SigningKeyUpdate],
    ) -> Result<()> {
        // One row per user in a statement: later updates win, key by key.
        let mut merged: HashMap<&str, serde_json::Map<String, serde_json::Value>> = HashMap::new();
        for u in updates {
            merged
                .entry(u.user_id.as_str())
                .or_default()
                .extend(u.keys.clone());
        }
        if merged.is_empty() {
            return Ok(());
        }
        let (users, keys): (Vec<&str>, Vec<serde_json::Value>) = merged
            .into_iter()
            .map(|(user, keys)| (user, serde_json::Value::Object(keys)))
            .unzip();
        self.execute(
            "INSERT INTO remote_signing_keys (user_id, keys, origin)
             SELECT u.user_id, u.keys, $3
             FROM unnest($1::text[], $2::jsonb[]) AS u(user_id, keys)
             WHERE EXISTS (SELECT 1 FROM room_state s WHERE s.type = 'm.room.member'
                           AND s.state_key = u.user_id AND s.membership = 'join')
             ON CONFLICT (user_id) DO UPDATE
             SET keys = remote_signing_keys.keys || EXCLUDED.keys, origin = EXCLUDED.origin,
                 received_at = now()",
            &[&users, &keys, &origin],
        )
        .await?;
        Ok(())
    }

    /// Keep to-device messages for our users' devices that exist (`*` as
    /// each of the user's devices, except one the message also names itself;
    /// others are dropped, as Synapse drops them), each once per origin,
    /// message ID and device however often the origin sends it.
    pub async fn store_to_device(&self, origin: &str, messages: &[ToDeviceMessage]) -> Result<()> {
        if messages.is_empty() {
            return Ok(());
        }
        let column =
            |f: fn(&ToDeviceMessage) -> &str| messages.iter().map(f).collect::<Vec<&str>>();
        let contents: Vec<&serde_json::Value> = messages.iter().map(|m| &m.content).collect();
        self.execute(
            "INSERT INTO to_device_inbox (user_id, device_id, sender, event_type, content, origin, message_id)
             SELECT d.user_id, d.device_id, m.sender, m.event_type, m.content, $7, m.message_id
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::jsonb[])
                  AS m(sender, event_type, message_id, user_id, device_id, content)
             JOIN devices d ON d.user_id = m.user_id AND (m.device_id = '*' OR d.device_id = m.device_id)
             -- Rows go in in this order and the first for a device stays:
             -- a message for the device itself wins over one for '*'.
             ORDER BY m.device_id = '*'
             ON CONFLICT DO NOTHING",
            &[
                &column(|m| m.sender.as_str()),
                &column(|m| m.event_type.as_str()),
                &column(|m| m.message_id.as_str()),
                &column(|m| m.user_id.as_str()),
                &column(|m| m.device_id.as_str()),
                &contents,
                &origin,
            ],
        )
        .await?;
        Ok(())
    }

    /// Keep a transaction's ephemeral EDUs (place in the transaction, type,
    /// content: typing, presence) until the features that consume them
    /// exist; an EDU of a transaction seen before (the same origin,
    /// transaction ID and place in it) is kept once.
    pub async fn store_edus(
        &self,
        origin: &str,
        txn_id: &str,
        edus: &[(i32, String, serde_json::Value)],
    ) -> Result<()> {
        if edus.is_empty() {
            return Ok(());
        }
        let positions: Vec<i32> = edus.iter().map(|e| e.0).collect();
        let kinds: Vec<&str> = edus.iter().map(|e| e.1.as_str()).collect();
        let contents: Vec<&serde_json::Value> = edus.iter().map(|e| &e.2).collect();
        self.execute(
            "INSERT INTO received_edus (origin, txn_id, position, edu_type, content)
             SELECT $1, $2, e.position, e.edu_type, e.content
             FROM unnest($3::int[], $4::text[], $5::jsonb[]) AS e(position, edu_type, content)
             ON CONFLICT DO NOTHING",
            &[&origin, &txn_id, &positions, &kinds, &contents],
        )
        .await?;
        Ok(())
    }
}

impl Store {
    /// Whether a server has a joined member in a room.
    pub async fn server_in_room(&self, room_id: &str, server: &str) -> Result<bool> {
        let row = self
            .query_opt(
                "SELECT 1 FROM room_joined_servers WHERE room_id = $1 AND server_name = $2 AND joined > 0",
                &[&room_id, &server],
            )
            .await?;
        Ok(row.is_some())
    }

    /// The servers with joined members in a room.
    pub async fn servers_in_room(&self, room_id: &str) -> Result<Vec<String>> {
        let rows = self
            .query(
                "SELECT server_name FROM room_joined_servers WHERE room_id = $1 AND joined > 0",
                &[&room_id],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }
}

/// The newest (by `order`) of `items` for each key; of equals, the later.
/// An upsert statement may touch each row once, so a batch keeps one per
/// key, as the table's `WHERE old <= new` would.
fn newest_per_key<'a, T, K: std::hash::Hash + Eq>(
    items: &'a [T],
    key: impl Fn(&'a T) -> K,
    order: impl Fn(&T) -> i64,
) -> Vec<&'a T> {
    let mut newest: HashMap<K, &'a T> = HashMap::new();
    for item in items {
        let slot = newest.entry(key(item)).or_insert(item);
        if order(slot) <= order(item) {
            *slot = item;
        }
    }
    newest.into_values().collect()
}
