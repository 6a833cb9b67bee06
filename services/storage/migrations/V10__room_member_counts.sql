-- What a room's member list comes to, kept up to date as room_state changes
-- instead of counted over the room's members on every read: a /sync that
-- sees a membership change sends the room's summary (member counts and
-- heroes), and a join is answered with the servers in the room; in a room
-- of 20,000 members each of those read every member (5-7 ms), on every
-- sync of every member during a wave of joins.

-- Joined and invited members per room.
CREATE TABLE room_member_counts (
    room_id text PRIMARY KEY,
    joined bigint NOT NULL,
    invited bigint NOT NULL
);

-- Joined members per room and server; a row at 0 is deleted.
CREATE TABLE room_joined_servers (
    room_id text NOT NULL,
    server_name text NOT NULL,
    joined bigint NOT NULL,
    PRIMARY KEY (room_id, server_name)
);

-- The first joined or invited members of a room by position (its heroes,
-- the members clients name an unnamed room after) without reading the rest.
CREATE INDEX room_state_heroes ON room_state (room_id, pos)
    WHERE type = 'm.room.member' AND membership IN ('join', 'invite');

-- Applies a statement's changes of room_state to both tables, from its
-- transition tables: +1 for each member row written, -1 for each replaced
-- or deleted. Once per statement (a persist statement writes a batch), and
-- at no cost beyond the call when no member row changed.
CREATE FUNCTION room_members_changed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    added room_state[];
    gone room_state[];
    rooms text[];
    servers text[];
    joined int[];
    invited int[];
BEGIN
    -- (Each statement is planned when first run, so a trigger without one
    -- of the transition tables never reads it.)
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        SELECT array_agg(n) INTO added FROM new_rows n WHERE n.type = 'm.room.member';
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        SELECT array_agg(o) INTO gone FROM old_rows o WHERE o.type = 'm.room.member';
    END IF;
    SELECT array_agg(room_id), array_agg(substring(state_key FROM position(':' IN state_key) + 1)),
           array_agg(sign * (membership IS NOT DISTINCT FROM 'join')::int),
           array_agg(sign * (membership IS NOT DISTINCT FROM 'invite')::int)
    INTO rooms, servers, joined, invited
    FROM (SELECT *, 1 AS sign FROM unnest(added)
          UNION ALL
          SELECT *, -1 FROM unnest(gone)) d;
    IF rooms IS NULL THEN
        RETURN NULL;
    END IF;

    INSERT INTO room_member_counts AS c (room_id, joined, invited)
    SELECT d.room_id, sum(d.j), sum(d.i)
    FROM unnest(rooms, joined, invited) AS d(room_id, j, i)
    GROUP BY d.room_id
    HAVING sum(d.j) <> 0 OR sum(d.i) <> 0
    ON CONFLICT (room_id) DO UPDATE
    SET joined = c.joined + EXCLUDED.joined, invited = c.invited + EXCLUDED.invited;

    INSERT INTO room_joined_servers AS s (room_id, server_name, joined)
    SELECT d.room_id, d.server, sum(d.j)
    FROM unnest(rooms, servers, joined) AS d(room_id, server, j)
    GROUP BY d.room_id, d.server
    HAVING sum(d.j) <> 0
    ON CONFLICT (room_id, server_name) DO UPDATE SET joined = s.joined + EXCLUDED.joined;
    DELETE FROM room_joined_servers s
    USING unnest(rooms, servers) AS d(room_id, server)
    WHERE s.room_id = d.room_id AND s.server_name = d.server AND s.joined <= 0;
    RETURN NULL;
END
$$;

-- The triggers first: CREATE TRIGGER locks room_state against writes until
-- this migration commits, so no write falls between them and the count below.
CREATE TRIGGER room_members_inserted AFTER INSERT ON room_state
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION room_members_changed();
CREATE TRIGGER room_members_updated AFTER UPDATE ON room_state
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION room_members_changed();
CREATE TRIGGER room_members_deleted AFTER DELETE ON room_state
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION room_members_changed();

INSERT INTO room_member_counts (room_id, joined, invited)
SELECT room_id, count(*) FILTER (WHERE membership = 'join'), count(*) FILTER (WHERE membership = 'invite')
FROM room_state WHERE type = 'm.room.member'
GROUP BY room_id
HAVING count(*) FILTER (WHERE membership IN ('join', 'invite')) > 0;

INSERT INTO room_joined_servers (room_id, server_name, joined)
SELECT room_id, substring(state_key FROM position(':' IN state_key) + 1), count(*)
FROM room_state WHERE type = 'm.room.member' AND membership = 'join'
GROUP BY 1, 2;
