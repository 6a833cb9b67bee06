-- Federation: remote keys, inbound transactions, staged PDUs, outliers,
-- per-event state (state groups) and received EDUs. Compatible with
-- compat_version 1 binaries (only additions), so the version stays.

-- Remote servers' signing keys, as fetched and verified.
CREATE TABLE remote_server_keys (
    server_name text NOT NULL,
    key_id text NOT NULL,
    public_key text NOT NULL,
    -- Until when the key may sign (for old_verify_keys: when it expired).
    valid_until_ts bigint NOT NULL,
    fetched_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (server_name, key_id)
);

-- Inbound transactions, answered once per (origin, txn_id).
CREATE TABLE federation_transactions (
    origin text NOT NULL,
    txn_id text NOT NULL,
    response jsonb NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (origin, txn_id)
);

-- PDUs accepted from federation, waiting for their room's owner (processed
-- in the order V3 gives); the backlog lives here, not in memory.
CREATE TABLE staged_pdus (
    id bigserial PRIMARY KEY,
    room_id text NOT NULL,
    partition integer NOT NULL,
    origin text NOT NULL,
    event_id text NOT NULL,
    json text NOT NULL,
    staged_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (room_id, event_id)
);
CREATE INDEX staged_pdus_by_partition ON staged_pdus (partition, room_id, id);

-- Events known but not in a room's timeline: auth and state events fetched
-- to check others.
CREATE TABLE outliers (
    event_id text PRIMARY KEY,
    room_id text NOT NULL,
    json text NOT NULL,
    rejected boolean NOT NULL DEFAULT false,
    received_at timestamptz NOT NULL DEFAULT now()
);

-- The state after (and, where it differs, before) each event, as groups:
-- a group is its parent plus the changed slots, or a full snapshot when it
-- has no parent. A group is named after the event that defined it.
CREATE TABLE state_groups (
    id text PRIMARY KEY,
    room_id text NOT NULL,
    parent text,
    chain_length integer NOT NULL
);
CREATE TABLE state_group_entries (
    group_id text NOT NULL,
    type text NOT NULL,
    state_key text NOT NULL,
    -- NULL: the slot is removed relative to the parent.
    event_id text,
    PRIMARY KEY (group_id, type, state_key)
);

ALTER TABLE events ADD COLUMN state_group text;
ALTER TABLE events ADD COLUMN state_group_before text;
ALTER TABLE events ADD COLUMN soft_failed boolean NOT NULL DEFAULT false;
ALTER TABLE events ADD COLUMN origin text;
ALTER TABLE rooms ADD COLUMN state_group text;

-- EDUs received over federation, kept until the client-side feature that
-- consumes each type exists (typing, receipts, presence, device lists,
-- to-device).
CREATE TABLE received_edus (
    id bigserial PRIMARY KEY,
    origin text NOT NULL,
    edu_type text NOT NULL,
    content jsonb NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX received_edus_by_type ON received_edus (edu_type, id);
