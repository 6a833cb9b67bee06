-- Invites (and their local rejections) to rooms this server does not host,
-- received through the federation invite API. The events are stored in
-- `events` and their membership in `room_state_history`, so that /sync
-- shows them like any other membership change, but never in `room_state`:
-- we know nothing of the room but what the invite told us. The stripped
-- state the inviting server sent is kept here for the invitee's /sync.
CREATE TABLE out_of_band_memberships (
    event_id text PRIMARY KEY,
    room_id text NOT NULL,
    user_id text NOT NULL,
    room_version text NOT NULL,
    stripped_state jsonb NOT NULL DEFAULT '[]',
    received_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX out_of_band_memberships_by_user ON out_of_band_memberships (user_id, room_id);
