-- A device's waiting to-device messages go with the device (a logout, a
-- deactivation), as Synapse deletes a deleted device's inbox: they can
-- never be delivered, and would otherwise stay for ever.
DELETE FROM to_device_inbox t
WHERE NOT EXISTS (SELECT 1 FROM devices d WHERE d.user_id = t.user_id AND d.device_id = t.device_id);
ALTER TABLE to_device_inbox
    ADD CONSTRAINT to_device_inbox_device FOREIGN KEY (user_id, device_id)
    REFERENCES devices (user_id, device_id) ON DELETE CASCADE;
