-- Redactions whose target had not reached the room when they were accepted.
-- When the target is persisted in the same room, a redaction whose reach
-- covers the target's sender moves to event_redactions; the rows for that
-- target are then deleted (a target arrives once). Keyed by (target,
-- redaction) within the room, so no redaction pre-empts another, nor one in
-- another room.
CREATE TABLE pending_redactions (
    room_id text NOT NULL,
    target_event_id text NOT NULL,
    redaction_event_id text NOT NULL,
    -- Set when the redaction may hide only this user's events (a local
    -- redactor without the room's redact level).
    only_sender text,
    -- Set when it may hide only events of this server's users (a remote
    -- redactor without the room's redact level).
    only_server text,
    PRIMARY KEY (room_id, target_event_id, redaction_event_id)
);
