-- EDUs that were kept as they came in received_edus, which grew with every
-- one, now each go where the feature that will read them wants them, kept
-- only while they mean something:

-- Remote users' device list updates: the newest (by the sender's stream_id)
-- of each user and device. When end-to-end encryption support reads them it
-- resyncs a user's device list from the user's server anyway (the chain of
-- prev_ids is not kept).
CREATE TABLE remote_device_list_updates (
    user_id text NOT NULL,
    device_id text NOT NULL,
    stream_id bigint NOT NULL,
    -- The EDU's content as sent (keys, display name, deleted, prev_id).
    content jsonb NOT NULL,
    origin text NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, device_id)
);

-- Remote users' cross-signing keys (m.signing_key_update): the latest of
-- each key of each user.
CREATE TABLE remote_signing_keys (
    user_id text PRIMARY KEY,
    -- {"master_key": ..., "self_signing_key": ...}, merged over updates.
    keys jsonb NOT NULL,
    origin text NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);

-- To-device messages from other servers for our users' devices, one row per
-- device ("*" stored as each of the user's devices), each once per origin,
-- message_id and device however often it comes. What /sync's to_device
-- section will hand out (and then delete).
CREATE TABLE to_device_inbox (
    id bigserial PRIMARY KEY,
    user_id text NOT NULL,
    device_id text NOT NULL,
    sender text NOT NULL,
    event_type text NOT NULL,
    content jsonb NOT NULL,
    origin text NOT NULL,
    message_id text NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (origin, message_id, user_id, device_id)
);
CREATE INDEX to_device_inbox_by_device ON to_device_inbox (user_id, device_id, id);

-- What received_edus already holds of these types moves over, by the same
-- rules as new EDUs (the receiver checks that the users are the origin's,
-- and that a device list or signing key update's user is in a room here).
INSERT INTO remote_device_list_updates (user_id, device_id, stream_id, content, origin, received_at)
SELECT DISTINCT ON (content->>'user_id', content->>'device_id')
       content->>'user_id', content->>'device_id', (content->>'stream_id')::bigint, content, origin,
       received_at
FROM received_edus
WHERE edu_type = 'm.device_list_update'
  AND jsonb_typeof(content->'user_id') = 'string'
  AND jsonb_typeof(content->'device_id') = 'string'
  AND jsonb_typeof(content->'stream_id') = 'number'
  AND (content->>'stream_id') ~ '^[0-9]{1,18}$'
  AND substring(content->>'user_id' FROM position(':' IN content->>'user_id') + 1) = origin
  AND EXISTS (SELECT 1 FROM room_state s WHERE s.type = 'm.room.member'
              AND s.state_key = content->>'user_id' AND s.membership = 'join')
ORDER BY content->>'user_id', content->>'device_id', (content->>'stream_id')::bigint DESC, id DESC;

INSERT INTO remote_signing_keys (user_id, keys, origin, received_at)
SELECT DISTINCT ON (content->>'user_id')
       content->>'user_id',
       jsonb_strip_nulls(jsonb_build_object('master_key', content->'master_key',
                                            'self_signing_key', content->'self_signing_key')),
       origin, received_at
FROM received_edus
WHERE edu_type = 'm.signing_key_update'
  AND jsonb_typeof(content->'user_id') = 'string'
  AND substring(content->>'user_id' FROM position(':' IN content->>'user_id') + 1) = origin
  AND EXISTS (SELECT 1 FROM room_state s WHERE s.type = 'm.room.member'
              AND s.state_key = content->>'user_id' AND s.membership = 'join')
ORDER BY content->>'user_id', id DESC;

INSERT INTO to_device_inbox (user_id, device_id, sender, event_type, content, origin, message_id, received_at)
SELECT d.user_id, d.device_id, e.content->>'sender', e.content->>'type', m.content, e.origin,
       e.content->>'message_id', e.received_at
FROM received_edus e
-- (jsonb_each of anything but an object fails: malformed parts become {}.)
CROSS JOIN LATERAL jsonb_each(CASE jsonb_typeof(e.content->'messages')
                              WHEN 'object' THEN e.content->'messages' ELSE '{}' END) AS u(user_id, by_device)
CROSS JOIN LATERAL jsonb_each(CASE jsonb_typeof(u.by_device)
                              WHEN 'object' THEN u.by_device ELSE '{}' END) AS m(device_id, content)
JOIN devices d ON d.user_id = u.user_id AND (m.device_id = '*' OR d.device_id = m.device_id)
WHERE e.edu_type = 'm.direct_to_device'
  AND jsonb_typeof(e.content->'sender') = 'string'
  AND jsonb_typeof(e.content->'type') = 'string'
  AND jsonb_typeof(e.content->'message_id') = 'string'
  AND substring(e.content->>'sender' FROM position(':' IN e.content->>'sender') + 1) = e.origin
  AND jsonb_typeof(m.content) = 'object'
ON CONFLICT DO NOTHING;

-- received_edus keeps only what is pruned after an hour (typing, presence);
-- other types are no longer kept at all (Synapse ignores them too).
DELETE FROM received_edus WHERE edu_type NOT IN ('m.typing', 'm.presence');
