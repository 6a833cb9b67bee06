-- Inbound transaction records are kept only long enough to answer an
-- origin's retries (`federation.transaction_retention_hours`); receivers
-- delete older ones by age.
CREATE INDEX federation_transactions_by_age ON federation_transactions (received_at);
