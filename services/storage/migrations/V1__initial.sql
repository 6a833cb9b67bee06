-- Tessera schema, version 1.
--
-- Positions: every room belongs to one partition (see docs/architecture.md);
-- events are numbered per partition, gap-free, in commit order, by
-- partition_leases.next_pos under the lease row lock.

-- The compatibility version. Migrations that existing binaries can run against
-- (added tables, nullable columns) leave it alone; breaking ones bump it. Each
-- binary states the range it supports and refuses to start outside it.
CREATE TABLE schema_compat (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    compat_version integer NOT NULL
);
INSERT INTO schema_compat (compat_version) VALUES (1);

CREATE TABLE cluster_settings (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    server_name text NOT NULL,
    partitions integer NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE server_signing_keys (
    key_id text PRIMARY KEY,
    pkcs8 bytea NOT NULL,
    public_key text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    -- When the key stopped being used (NULL: the current key).
    expired_ts bigint
);

CREATE TABLE room_workers (
    worker_id text PRIMARY KEY,
    grpc_addr text NOT NULL,
    heartbeat_at timestamptz NOT NULL,
    draining boolean NOT NULL DEFAULT false,
    started_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE partition_leases (
    partition integer PRIMARY KEY,
    owner text,
    epoch bigint NOT NULL DEFAULT 0,
    expires_at timestamptz NOT NULL DEFAULT '-infinity',
    -- The position the next event of this partition gets.
    next_pos bigint NOT NULL DEFAULT 1
);

CREATE TABLE rooms (
    room_id text PRIMARY KEY,
    partition integer NOT NULL,
    room_version text NOT NULL,
    creator text NOT NULL,
    is_public boolean NOT NULL DEFAULT false,
    head_pos bigint NOT NULL,
    depth bigint NOT NULL,
    forward_extremities text[] NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE events (
    partition integer NOT NULL,
    pos bigint NOT NULL,
    event_id text NOT NULL UNIQUE,
    room_id text NOT NULL,
    type text NOT NULL,
    state_key text,
    sender text NOT NULL,
    origin_server_ts bigint NOT NULL,
    depth bigint NOT NULL,
    membership text,
    rejected boolean NOT NULL DEFAULT false,
    -- For state events: the event this one replaced in the room state.
    prev_state_event_id text,
    -- The PDU as canonical JSON text, exactly as signed.
    json text NOT NULL,
    PRIMARY KEY (partition, pos)
);
CREATE INDEX events_room_pos ON events (room_id, pos);

CREATE TABLE event_redactions (
    redacted_event_id text PRIMARY KEY,
    redaction_event_id text NOT NULL
);

-- The current (resolved) state of each room.
CREATE TABLE room_state (
    room_id text NOT NULL,
    type text NOT NULL,
    state_key text NOT NULL,
    event_id text NOT NULL,
    membership text,
    pos bigint NOT NULL,
    PRIMARY KEY (room_id, type, state_key)
);
CREATE INDEX room_state_members_by_user ON room_state (state_key, room_id)
    WHERE type = 'm.room.member';

-- Every change of a room's resolved state, by position: the state at any
-- position is the newest row per (type, state_key) at or before it.
CREATE TABLE room_state_history (
    room_id text NOT NULL,
    pos bigint NOT NULL,
    type text NOT NULL,
    state_key text NOT NULL,
    event_id text,
    membership text,
    PRIMARY KEY (room_id, type, state_key, pos)
);
CREATE INDEX room_state_history_by_pos ON room_state_history (room_id, pos);
CREATE INDEX room_state_history_members_by_user ON room_state_history (state_key, room_id, pos)
    WHERE type = 'm.room.member';

CREATE TABLE room_aliases (
    alias text PRIMARY KEY,
    room_id text NOT NULL,
    creator text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX room_aliases_room ON room_aliases (room_id);

CREATE TABLE users (
    user_id text PRIMARY KEY,
    password_hash text,
    admin boolean NOT NULL DEFAULT false,
    user_type text,
    deactivated boolean NOT NULL DEFAULT false,
    displayname text,
    avatar_url text,
    -- Position of this user's own data stream (account data); see sync tokens.
    stream_pos bigint NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE devices (
    user_id text NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    device_id text NOT NULL,
    display_name text,
    created_at timestamptz NOT NULL DEFAULT now(),
    last_seen_at timestamptz,
    PRIMARY KEY (user_id, device_id)
);

-- Access tokens are stored only as SHA-256 hashes.
CREATE TABLE access_tokens (
    token_hash bytea PRIMARY KEY,
    user_id text NOT NULL,
    device_id text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (user_id, device_id) REFERENCES devices (user_id, device_id) ON DELETE CASCADE
);

CREATE TABLE event_txns (
    user_id text NOT NULL,
    device_id text NOT NULL,
    txn_id text NOT NULL,
    event_id text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, device_id, txn_id)
);
CREATE INDEX event_txns_event ON event_txns (event_id);

CREATE TABLE account_data (
    user_id text NOT NULL,
    room_id text NOT NULL DEFAULT '',
    type text NOT NULL,
    content jsonb NOT NULL,
    stream_pos bigint NOT NULL,
    PRIMARY KEY (user_id, room_id, type)
);
CREATE INDEX account_data_stream ON account_data (user_id, stream_pos);

CREATE TABLE filters (
    user_id text NOT NULL,
    filter_id bigint NOT NULL,
    filter jsonb NOT NULL,
    PRIMARY KEY (user_id, filter_id)
);

CREATE TABLE registration_tokens (
    token text PRIMARY KEY,
    uses_allowed integer,
    pending integer NOT NULL DEFAULT 0,
    completed integer NOT NULL DEFAULT 0,
    expiry_time bigint,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE shared_secret_nonces (
    nonce text PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- User-interactive authentication sessions (registration), shared by every
-- client-api process.
CREATE TABLE uia_sessions (
    session_id text PRIMARY KEY,
    completed text[] NOT NULL DEFAULT '{}',
    registration_token text,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Sync token checkpoints: a full vector of partition positions that tokens are
-- encoded against (see docs/architecture.md, "Sync tokens").
CREATE TABLE sync_checkpoints (
    id bigserial PRIMARY KEY,
    positions bigint[] NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
