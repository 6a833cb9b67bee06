-- Staged PDUs are processed per room in (depth, arrival) order, not arrival
-- order alone: with several transactions in flight, a PDU often arrives
-- before its prev_events, and processing by depth takes the parents first.
ALTER TABLE staged_pdus ADD COLUMN depth bigint NOT NULL DEFAULT 0;
CREATE INDEX staged_pdus_by_room_depth ON staged_pdus (room_id, depth, id);
