-- Read receipts from other servers, one row per room, receipt type, user and
-- thread: the newest (by its `ts`) replaces the one before, so a steady
-- stream of receipts keeps the table at one row per reader instead of
-- growing like received_edus. What /sync will show of remote receipts.
CREATE TABLE remote_receipts (
    room_id text NOT NULL,
    receipt_type text NOT NULL,
    user_id text NOT NULL,
    -- '' for an unthreaded receipt.
    thread_id text NOT NULL,
    event_ids jsonb NOT NULL,
    data jsonb NOT NULL,
    ts bigint NOT NULL,
    origin text NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (room_id, receipt_type, user_id, thread_id)
);
