//! Rooms: metadata, current and historical state, members, aliases.

use std::sync::Arc;

use tessera_events::Pdu;
use tessera_events::restricted_join;
use tessera_events::room_state::RoomState;
use tessera_events::ruma::{
    EventId, OwnedEventId, OwnedUserId, RoomId, RoomVersionId, ServerName, UserId,
};

use crate::events::{EVENT_COLUMNS, EVENT_JOINS, StoredEvent};
use crate::{Result, Store, StoreError, conflict};

/// Which member events a read of a room's state returns.
#[derive(Debug, Clone, Copy)]
pub enum Members<'a> {
    All,
    /// Only these users' (a client's lazy-loaded members); the rest of the
    /// state all the same.
    Only(&'a [String]),
}

impl<'a> Members<'a> {
    fn only(self) -> Option<&'a [String]> {
        match self {
            Members::All => None,
            Members::Only(users) => Some(users),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RoomRow {
    pub room_id: String,
    pub partition: u32,
    pub room_version: String,
    pub creator: String,
    pub is_public: bool,
    pub head_pos: i64,
    pub depth: i64,
    pub forward_extremities: Vec<String>,
    /// The current state's group and its chain length from a snapshot.
    pub state_group: Option<(String, i32)>,
}

/// A user's membership in a room as of some position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembershipRow {
    pub room_id: String,
    pub pos: i64,
    pub membership: String,
    pub event_id: String,
}

impl Store {
    pub async fn room(&self, room_id: &str) -> Result<Option<RoomRow>> {
        let row = self.query_opt(
                "SELECT r.room_id, r.partition, r.room_version, r.creator, r.is_public, r.head_pos, r.depth,
                        r.forward_extremities, r.state_group, g.chain_length
                 FROM rooms r LEFT JOIN state_groups g ON g.id = r.state_group WHERE r.room_id = $1",
                &[&room_id],
            )
            .await?;
        Ok(row.map(|r| RoomRow {
            room_id: r.get(0),
            partition: r.get::<_, i32>(1) as u32,
            room_version: r.get(2),
            creator: r.get(3),
            is_public: r.get(4),
            head_pos: r.get(5),
            depth: r.get(6),
            forward_extremities: r.get(7),
            state_group: r
                .get::<_, Option<String>>(8)
                .zip(r.get::<_, Option<i32>>(9)),
        }))
    }

    /// The room's current state events.
    pub async fn current_state(&self, room_id: &str) -> Result<Vec<StoredEvent>> {
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM room_state s JOIN events e ON e.event_id = s.event_id {EVENT_JOINS}
             WHERE s.room_id = $1 ORDER BY s.pos"
        );
        let rows = self.query(&sql, &[&room_id]).await?;
        Ok(rows.iter().map(StoredEvent::from_row).collect())
    }

    /// A room's current state as its owner keeps it in memory (state
    /// events, forward extremities, depth, state group); `None` for a room
    /// we do not have.
    pub async fn room_state(&self, room_id: &RoomId) -> Result<Option<RoomState>> {
        let Some((room, version, extremities)) = self.room_parts(room_id).await? else {
            return Ok(None);
        };
        let mut state = Vec::new();
        for stored in self.current_state(room_id.as_str()).await? {
            state.push(stored.pdu()?);
        }
        let group = room
            .state_group
            .map(|(id, chain)| (id, chain.max(0) as u32));
        in_memory(room_id, version, state, extremities, room.depth, group).map(Some)
    }

    /// A room's row, with its version and forward extremities parsed.
    async fn room_parts(
        &self,
        room_id: &RoomId,
    ) -> Result<Option<(RoomRow, RoomVersionId, Vec<OwnedEventId>)>> {
        let Some(room) = self.room(room_id.as_str()).await? else {
            return Ok(None);
        };
        let version = RoomVersionId::try_from(room.room_version.as_str())
            .map_err(|e| StoreError::Corrupt(format!("room {room_id}: {e}")))?;
        let extremities = room
            .forward_extremities
            .iter()
            .map(|id| EventId::parse(id.as_str()).map_err(|e| StoreError::Corrupt(e.to_string())))
            .collect::<Result<Vec<_>>>()?;
        Ok(Some((room, version, extremities)))
    }

    /// The part of a room's current state a membership decision reads
    /// (`make_join`, `make_leave`, `make_knock`, a local join into a
    /// restricted room): the create, power levels and join rules events,
    /// `user_id`'s membership, and, when the join needs one of our members to
    /// vouch for it, the memberships of those of `server_name`'s users who
    /// could (see [`restricted_join::vouching_candidates`]), with the room's
    /// forward extremities and depth. A room with 20,000 members is a few
    /// rows here, not 20,000 parsed events.
    pub async fn membership_state(
        &self,
        room_id: &RoomId,
        user_id: &UserId,
        server_name: &ServerName,
    ) -> Result<Option<RoomState>> {
        let Some((room, version, extremities)) = self.room_parts(room_id).await? else {
            return Ok(None);
        };
        let build = |events: Vec<Arc<Pdu>>| {
            in_memory(
                room_id,
                version.clone(),
                events,
                extremities.clone(),
                room.depth,
                None,
            )
        };
        let mut keys: Vec<(&str, &str)> = vec![
            ("m.room.create", ""),
            ("m.room.power_levels", ""),
            ("m.room.join_rules", ""),
            ("m.room.member", user_id.as_str()),
        ];
        let mut events = self.state_events(room_id.as_str(), &keys).await?;
        let state = build(events.clone())?;
        if !restricted_join::needs_authoriser(&state, user_id) {
            return Ok(Some(state));
        }
        let (candidates, default_enough) =
            restricted_join::vouching_candidates(&state, server_name);
        keys = candidates
            .iter()
            .map(|c| ("m.room.member", c.as_str()))
            .collect();
        events.extend(self.state_events(room_id.as_str(), &keys).await?);
        if default_enough {
            events.extend(
                self.first_joined_member(room_id.as_str(), server_name.as_str())
                    .await?,
            );
        }
        build(events).map(Some)
    }

    /// Current state events by (type, state key); absent slots are skipped.
    pub async fn state_events(
        &self,
        room_id: &str,
        keys: &[(&str, &str)],
    ) -> Result<Vec<Arc<Pdu>>> {
        let (kinds, state_keys): (Vec<&str>, Vec<&str>) = keys.iter().copied().unzip();
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM room_state s JOIN events e ON e.event_id = s.event_id {EVENT_JOINS}
             WHERE s.room_id = $1 AND (s.type, s.state_key) IN (SELECT * FROM unnest($2::text[], $3::text[]))"
        );
        let rows = self.query(&sql, &[&room_id, &kinds, &state_keys]).await?;
        rows.iter()
            .map(|r| StoredEvent::from_row(r).pdu())
            .collect()
    }

    /// The joined member of `server_name` with the smallest user ID, with
    /// their membership event.
    async fn first_joined_member(
        &self,
        room_id: &str,
        server_name: &str,
    ) -> Result<Option<Arc<Pdu>>> {
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM room_state s JOIN events e ON e.event_id = s.event_id {EVENT_JOINS}
             WHERE s.room_id = $1 AND s.type = 'm.room.member' AND s.membership = 'join'
               AND s.state_key LIKE '@%:' || $2
             ORDER BY s.state_key LIMIT 1"
        );
        let row = self.query_opt(&sql, &[&room_id, &server_name]).await?;
        row.as_ref()
            .map(|r| StoredEvent::from_row(r).pdu())
            .transpose()
    }

    /// One current state event.
    pub async fn state_event(
        &self,
        room_id: &str,
        kind: &str,
        state_key: &str,
    ) -> Result<Option<StoredEvent>> {
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM room_state s JOIN events e ON e.event_id = s.event_id {EVENT_JOINS}
             WHERE s.room_id = $1 AND s.type = $2 AND s.state_key = $3"
        );
        let row = self.query_opt(&sql, &[&room_id, &kind, &state_key]).await?;
        Ok(row.as_ref().map(StoredEvent::from_row))
    }

    /// The content of the room's current `m.room.server_acl`, if it has one
    /// (what `tessera_events::server_acl::allows` takes).
    pub async fn server_acl(&self, room_id: &str) -> Result<Option<serde_json::Value>> {
        let acl = self.state_event(room_id, "m.room.server_acl", "").await?;
        Ok(acl
            .and_then(|event| event.pdu().ok())
            .map(|pdu| pdu.content_value()))
    }

    /// The room state right after position `pos`: the newest history row per
    /// slot at or before it.
    pub async fn state_at(&self, room_id: &str, pos: i64) -> Result<Vec<StoredEvent>> {
        self.state_at_with(room_id, pos, Members::All).await
    }

    /// [`Store::state_at`], with only some of the member events.
    pub async fn state_at_with(
        &self,
        room_id: &str,
        pos: i64,
        members: Members<'_>,
    ) -> Result<Vec<StoredEvent>> {
        let sql = format!(
            "WITH slots AS (
                 SELECT DISTINCT ON (type, state_key) event_id FROM room_state_history
                 WHERE room_id = $1 AND pos <= $2
                   AND ($3::text[] IS NULL OR type <> 'm.room.member' OR state_key = ANY($3))
                 ORDER BY type, state_key, pos DESC
             )
             SELECT {EVENT_COLUMNS} FROM slots s JOIN events e ON e.event_id = s.event_id {EVENT_JOINS}
             ORDER BY e.pos"
        );
        let rows = self.query(&sql, &[&room_id, &pos, &members.only()]).await?;
        Ok(rows.iter().map(StoredEvent::from_row).collect())
    }

    /// Slots whose state changed in (after, upto], each with its value at `upto`.
    pub async fn state_changes(
        &self,
        room_id: &str,
        after: i64,
        upto: i64,
    ) -> Result<Vec<StoredEvent>> {
        self.state_changes_with(room_id, after, upto, Members::All)
            .await
    }

    /// [`Store::state_changes`], with only some of the member events.
    pub async fn state_changes_with(
        &self,
        room_id: &str,
        after: i64,
        upto: i64,
        members: Members<'_>,
    ) -> Result<Vec<StoredEvent>> {
        let sql = format!(
            "WITH slots AS (
                 SELECT DISTINCT ON (type, state_key) event_id FROM room_state_history
                 WHERE room_id = $1 AND pos > $2 AND pos <= $3
                   AND ($4::text[] IS NULL OR type <> 'm.room.member' OR state_key = ANY($4))
                 ORDER BY type, state_key, pos DESC
             )
             SELECT {EVENT_COLUMNS} FROM slots s JOIN events e ON e.event_id = s.event_id {EVENT_JOINS}
             ORDER BY e.pos"
        );
        let rows = self
            .query(&sql, &[&room_id, &after, &upto, &members.only()])
            .await?;
        Ok(rows.iter().map(StoredEvent::from_row).collect())
    }

    /// Some users' member events in the room's state at `pos` (those who
    /// have one), read by their slots alone however large the room.
    pub async fn members_at(
        &self,
        room_id: &str,
        pos: i64,
        users: &[String],
    ) -> Result<Vec<StoredEvent>> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let sql = format!(
            "WITH slots AS (
                 SELECT DISTINCT ON (state_key) event_id FROM room_state_history
                 WHERE room_id = $1 AND type = 'm.room.member' AND state_key = ANY($3) AND pos <= $2
                 ORDER BY state_key, pos DESC
             )
             SELECT {EVENT_COLUMNS} FROM slots s JOIN events e ON e.event_id = s.event_id {EVENT_JOINS}
             ORDER BY e.pos"
        );
        let rows = self.query(&sql, &[&room_id, &pos, &users]).await?;
        Ok(rows.iter().map(StoredEvent::from_row).collect())
    }

    /// Current members with a given membership: (user ID, member event JSON).
    pub async fn members(
        &self,
        room_id: &str,
        membership: Option<&str>,
    ) -> Result<Vec<StoredEvent>> {
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM room_state s JOIN events e ON e.event_id = s.event_id {EVENT_JOINS}
             WHERE s.room_id = $1 AND s.type = 'm.room.member' AND ($2::text IS NULL OR s.membership = $2)
             ORDER BY s.state_key"
        );
        let rows = self.query(&sql, &[&room_id, &membership]).await?;
        Ok(rows.iter().map(StoredEvent::from_row).collect())
    }

    /// A user's current membership in a room.
    pub async fn membership(&self, room_id: &str, user_id: &str) -> Result<Option<String>> {
        let row = self.query_opt(
                "SELECT membership FROM room_state WHERE room_id = $1 AND type = 'm.room.member' AND state_key = $2",
                &[&room_id, &user_id],
            )
            .await?;
        Ok(row.and_then(|r| r.get(0)))
    }

    /// The member of `server_name`'s who vouches for `user`'s join into a
    /// restricted room (one that [`restricted_join::needs_authoriser`]), once
    /// our view of the rooms its join rule allows lets the user join; or why
    /// we cannot vouch.
    pub async fn vouching_member(
        &self,
        state: &RoomState,
        user: &UserId,
        server_name: &ServerName,
    ) -> Result<Result<OwnedUserId, restricted_join::RestrictedJoinError>> {
        let allowed = restricted_join::allowed_rooms(state).unwrap_or_default();
        let views = self
            .allowed_room_views(&allowed, user.as_str(), server_name.as_str())
            .await?;
        Ok(restricted_join::authorise(state, user, server_name, &views))
    }

    /// What we see of `user_id` in each of `rooms` (those a restricted join
    /// rule allows): whether a user of `server_name` is joined there, and the
    /// user's membership. One round trip; rooms we never knew come back as
    /// not resident.
    pub async fn allowed_room_views(
        &self,
        rooms: &[tessera_events::ruma::OwnedRoomId],
        user_id: &str,
        server_name: &str,
    ) -> Result<Vec<tessera_events::restricted_join::AllowedRoomView>> {
        let ids: Vec<&str> = rooms.iter().map(|r| r.as_str()).collect();
        let rows = self
            .query(
                "SELECT r.room_id,
                        EXISTS (SELECT 1 FROM room_state s
                                WHERE s.room_id = r.room_id AND s.type = 'm.room.member'
                                  AND s.membership = 'join' AND s.state_key LIKE '@%:' || $3),
                        (SELECT s.membership FROM room_state s
                         WHERE s.room_id = r.room_id AND s.type = 'm.room.member' AND s.state_key = $2)
                 FROM unnest($1::text[]) WITH ORDINALITY AS r(room_id, n) ORDER BY r.n",
                &[&ids, &user_id, &server_name],
            )
            .await?;
        Ok(rows
            .iter()
            .zip(rooms)
            .map(
                |(row, room_id)| tessera_events::restricted_join::AllowedRoomView {
                    room_id: room_id.clone(),
                    resident: row.get(1),
                    membership: row.get(2),
                },
            )
            .collect())
    }

    /// Rooms the user is currently in with the given membership.
    pub async fn rooms_with_membership(
        &self,
        user_id: &str,
        membership: &str,
    ) -> Result<Vec<String>> {
        let rows = self.query(
                "SELECT room_id FROM room_state WHERE type = 'm.room.member' AND state_key = $1 AND membership = $2
                 ORDER BY room_id",
                &[&user_id, &membership],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Every membership change of a user, in each room's order.
    pub async fn membership_history(&self, user_id: &str) -> Result<Vec<MembershipRow>> {
        let rows = self
            .query(
                "SELECT room_id, pos, membership, event_id FROM room_state_history
                 WHERE type = 'm.room.member' AND state_key = $1 AND event_id IS NOT NULL
                 ORDER BY room_id, pos",
                &[&user_id],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| MembershipRow {
                room_id: r.get(0),
                pos: r.get(1),
                membership: r.get::<_, Option<String>>(2).unwrap_or_default(),
                event_id: r.get(3),
            })
            .collect())
    }

    /// A user's membership changes in one room: (position, membership).
    pub async fn room_membership_history(
        &self,
        room_id: &str,
        user_id: &str,
    ) -> Result<Vec<(i64, String)>> {
        let rows = self
            .query(
                "SELECT pos, membership FROM room_state_history
                 WHERE room_id = $1 AND type = 'm.room.member' AND state_key = $2 ORDER BY pos",
                &[&room_id, &user_id],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get::<_, Option<String>>(1).unwrap_or_default()))
            .collect())
    }

    /// History visibility changes of a room: (position, visibility).
    pub async fn history_visibility_changes(&self, room_id: &str) -> Result<Vec<(i64, String)>> {
        let rows = self
            .query(
                "SELECT h.pos, e.json::jsonb -> 'content' ->> 'history_visibility'
                 FROM room_state_history h JOIN events e ON e.event_id = h.event_id
                 WHERE h.room_id = $1 AND h.type = 'm.room.history_visibility' AND h.state_key = ''
                 ORDER BY h.pos",
                &[&room_id],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get(0),
                    r.get::<_, Option<String>>(1)
                        .unwrap_or_else(|| "shared".to_owned()),
                )
            })
            .collect())
    }

    pub async fn alias_room(&self, alias: &str) -> Result<Option<String>> {
        let row = self
            .query_opt(
                "SELECT room_id FROM room_aliases WHERE alias = $1",
                &[&alias],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    pub async fn alias_creator(&self, alias: &str) -> Result<Option<String>> {
        let row = self
            .query_opt(
                "SELECT creator FROM room_aliases WHERE alias = $1",
                &[&alias],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    pub async fn room_aliases(&self, room_id: &str) -> Result<Vec<String>> {
        let rows = self
            .query(
                "SELECT alias FROM room_aliases WHERE room_id = $1 ORDER BY alias",
                &[&room_id],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Create an alias; [`StoreError::Conflict`] if it is taken.
    pub async fn create_alias(&self, alias: &str, room_id: &str, creator: &str) -> Result<()> {
        self.execute(
            "INSERT INTO room_aliases (alias, room_id, creator) VALUES ($1, $2, $3)",
            &[&alias, &room_id, &creator],
        )
        .await
        .map_err(conflict)?;
        Ok(())
    }

    pub async fn delete_alias(&self, alias: &str) -> Result<bool> {
        let n = self
            .execute("DELETE FROM room_aliases WHERE alias = $1", &[&alias])
            .await?;
        Ok(n == 1)
    }

    pub async fn set_room_public(&self, room_id: &str, public: bool) -> Result<bool> {
        let n = self
            .execute(
                "UPDATE rooms SET is_public = $2 WHERE room_id = $1",
                &[&room_id, &public],
            )
            .await?;
        Ok(n == 1)
    }

    /// Public rooms with their joined member counts, most members first.
    pub async fn public_rooms(&self, limit: i64, offset: i64) -> Result<(Vec<(String, i64)>, i64)> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT r.room_id, count(s.state_key) AS members FROM rooms r
                 LEFT JOIN room_state s ON s.room_id = r.room_id AND s.type = 'm.room.member' AND s.membership = 'join'
                 WHERE r.is_public GROUP BY r.room_id ORDER BY members DESC, r.room_id LIMIT $1 OFFSET $2",
                &[&limit, &offset],
            )
            .await?;
        let total: i64 = client
            .query_one("SELECT count(*) FROM rooms WHERE is_public", &[])
            .await?
            .get(0);
        Ok((rows.iter().map(|r| (r.get(0), r.get(1))).collect(), total))
    }

    /// (joined, invited) member counts, for room summaries.
    pub async fn member_counts(&self, room_id: &str) -> Result<(i64, i64)> {
        let row = self
            .query_one(
                "SELECT coalesce(max(joined), 0), coalesce(max(invited), 0)
                 FROM room_member_counts WHERE room_id = $1",
                &[&room_id],
            )
            .await?;
        Ok((row.get(0), row.get(1)))
    }

    /// Up to `limit` joined or invited members other than `exclude`, oldest
    /// first: the "heroes" clients name unnamed rooms after.
    pub async fn heroes(&self, room_id: &str, exclude: &str, limit: i64) -> Result<Vec<String>> {
        let rows = self.query(
                "SELECT state_key FROM room_state
                 WHERE room_id = $1 AND type = 'm.room.member' AND membership IN ('join', 'invite') AND state_key <> $2
                 ORDER BY pos LIMIT $3",
                &[&room_id, &exclude, &limit],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Room heads (latest positions) of many rooms.
    pub async fn room_heads(&self, room_ids: &[String]) -> Result<Vec<(String, i64)>> {
        let rows = self
            .query(
                "SELECT room_id, head_pos FROM rooms WHERE room_id = ANY($1)",
                &[&room_ids],
            )
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }
}

impl Store {
    /// The full state of a state group: its chain of deltas walked back to a
    /// snapshot, the nearest entry per slot winning. (type, state_key) → event ID.
    pub async fn state_group_map(&self, group_id: &str) -> Result<Vec<(String, String, String)>> {
        Ok(self.state_group_with_chain(group_id).await?.0)
    }

    /// A state group's slots (as `state_group_map`) and how many deltas lead
    /// to it from its snapshot (None: no such group), in one query: the
    /// chain is walked anyway, so its length is counted, not read from the
    /// group's row.
    pub async fn state_group_with_chain(
        &self,
        group_id: &str,
    ) -> Result<(Vec<(String, String, String)>, Option<i32>)> {
        let rows = self
            .query(
                "WITH RECURSIVE chain AS (
                     SELECT id, parent, 0 AS distance FROM state_groups WHERE id = $1
                     UNION ALL
                     SELECT g.id, g.parent, c.distance + 1 FROM state_groups g JOIN chain c ON g.id = c.parent
                 ), entries AS (
                     SELECT DISTINCT ON (e.type, e.state_key) e.type, e.state_key, e.event_id
                     FROM chain c JOIN state_group_entries e ON e.group_id = c.id
                     ORDER BY e.type, e.state_key, c.distance
                 )
                 SELECT type, state_key, event_id, (SELECT max(distance) FROM chain)
                 FROM entries WHERE event_id IS NOT NULL",
                &[&group_id],
            )
            .await?;
        let chain = rows.first().and_then(|r| r.get::<_, Option<i32>>(3));
        let slots = rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        Ok((slots, chain))
    }

    /// The state groups before and after an event in the timeline.
    pub async fn event_state_groups(
        &self,
        event_id: &str,
    ) -> Result<Option<(Option<String>, Option<String>)>> {
        let row = self
            .query_opt(
                "SELECT state_group_before, state_group FROM events WHERE event_id = $1",
                &[&event_id],
            )
            .await?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }
}

/// A [`RoomState`] from stored parts.
fn in_memory(
    room_id: &RoomId,
    version: RoomVersionId,
    events: Vec<Arc<Pdu>>,
    extremities: Vec<OwnedEventId>,
    depth: i64,
    group: Option<(String, u32)>,
) -> Result<RoomState> {
    RoomState::from_parts(
        room_id.to_owned(),
        version.clone(),
        events,
        extremities,
        depth as u64,
        group,
    )
    .ok_or_else(|| StoreError::Corrupt(format!("room {room_id} has unsupported version {version}")))
}
