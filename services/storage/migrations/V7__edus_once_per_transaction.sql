-- A transaction's EDUs are kept even when its PDUs are refused (a room's
-- backlog, an unavailable owner), so the origin's retry of the same
-- transaction brings them again: each is kept once, by its origin,
-- transaction ID and place in the transaction.
ALTER TABLE received_edus ADD COLUMN txn_id text, ADD COLUMN position int;
CREATE UNIQUE INDEX received_edus_once ON received_edus (origin, txn_id, position);
