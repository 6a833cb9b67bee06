"""End-to-end chat driven by matrix-nio, a client library we did not write.

Usage: chat_nio.py BASE_URL SERVER_NAME

Alice and Bob (created beforehand with passwords "<name>-password") log in;
Alice creates a room and invites Bob; Bob joins; they exchange 100 messages
while both follow /sync. Halfway, the script prints HALFWAY and waits for a
line on stdin (the Rust test changes the room-workers meanwhile). At the end
both must have seen every message exactly once, in order, through /sync, and
paging back through /messages must return the whole history. The last line is
RESULT <json>.
"""
import asyncio
import json
import sys

from nio import AsyncClient, AsyncClientConfig, JoinResponse, LoginResponse, RoomCreateResponse, RoomMessagesResponse, RoomSendResponse, SyncResponse

TOTAL = 100
FILTER = {"room": {"timeline": {"limit": 500}}}


def fail(message):
    print(f"FAIL {message}", flush=True)
    sys.exit(1)


class Follower:
    """Follows /sync for one client and records the room's message bodies."""

    def __init__(self, client):
        self.client = client
        self.bodies = []
        self.limited = 0
        self.task = None
        self.room_id = None
        self.stop = False

    async def run(self):
        since = self.client.next_batch
        while not self.stop:
            response = await self.client.sync(timeout=1000, since=since, sync_filter=FILTER)
            if not isinstance(response, SyncResponse):
                print(f"sync error for {self.client.user_id}: {response}", flush=True)
                await asyncio.sleep(0.5)
                continue
            since = response.next_batch
            room = response.rooms.join.get(self.room_id)
            if room is None:
                continue
            if room.timeline.limited:
                self.limited += 1
            for event in room.timeline.events:
                body = getattr(event, "body", None)
                if body is not None and body.startswith("msg "):
                    self.bodies.append(body)


async def login(base, server, name):
    client = AsyncClient(base, f"@{name}:{server}", config=AsyncClientConfig(request_timeout=120, max_timeouts=5))
    response = await client.login(f"{name}-password", device_name=f"{name}-e2e")
    if not isinstance(response, LoginResponse):
        fail(f"login {name}: {response}")
    first = await client.sync(timeout=0, sync_filter=FILTER)
    if not isinstance(first, SyncResponse):
        fail(f"first sync {name}: {first}")
    return client


async def wait_for(predicate, what, seconds=120):
    for _ in range(seconds * 10):
        if predicate():
            return
        await asyncio.sleep(0.1)
    fail(f"timed out waiting for {what}")


async def main():
    base, server = sys.argv[1], sys.argv[2]
    alice = await login(base, server, "alice")
    bob = await login(base, server, "bob")

    created = await alice.room_create(name="nio e2e", invite=[bob.user_id])
    if not isinstance(created, RoomCreateResponse):
        fail(f"room_create: {created}")
    room_id = created.room_id

    # Bob sees the invite through /sync, then joins.
    for _ in range(100):
        response = await bob.sync(timeout=1000, since=bob.next_batch, sync_filter=FILTER)
        if isinstance(response, SyncResponse) and room_id in response.rooms.invite:
            break
    else:
        fail("Bob never saw the invite")
    joined = await bob.join(room_id)
    if not isinstance(joined, JoinResponse):
        fail(f"join: {joined}")
    await bob.sync(timeout=0, since=bob.next_batch, sync_filter=FILTER)

    followers = [Follower(alice), Follower(bob)]
    for follower in followers:
        follower.room_id = room_id
        follower.task = asyncio.create_task(follower.run())

    loop = asyncio.get_running_loop()
    for i in range(TOTAL):
        if i == TOTAL // 2:
            print("HALFWAY", flush=True)
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if line.strip() != "CONTINUE":
                fail(f"expected CONTINUE, got {line!r}")
        sender = alice if i % 2 == 0 else bob
        response = await sender.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": f"msg {i}"}, tx_id=f"e2e-{i}")
        if not isinstance(response, RoomSendResponse):
            fail(f"send {i}: {response}")

    expected = [f"msg {i}" for i in range(TOTAL)]
    for follower in followers:
        await wait_for(lambda f=follower: len(f.bodies) >= TOTAL, f"{follower.client.user_id} to sync every message")
    await asyncio.sleep(1.5)  # one more long-poll round: anything extra would be a repeat
    for follower in followers:
        follower.stop = True
    await asyncio.gather(*(f.task for f in followers))
    for follower in followers:
        if follower.bodies != expected:
            fail(f"{follower.client.user_id} saw {len(follower.bodies)} messages, not exactly once in order: {follower.bodies}")

    # Page back through history from the newest position, 20 at a time.
    paged = []
    start = alice.next_batch
    for _ in range(50):
        page = await alice.room_messages(room_id, start=start, limit=20)
        if not isinstance(page, RoomMessagesResponse):
            fail(f"room_messages: {page}")
        paged.extend(getattr(e, "body", None) for e in page.chunk)
        if not page.end or not page.chunk:
            break
        start = page.end
    paged = [b for b in paged if b and b.startswith("msg ")]
    if list(reversed(paged)) != expected:
        fail(f"paging back returned {len(paged)} messages, not the history: {paged[:10]}...")

    result = {"messages": TOTAL, "alice_seen": len(followers[0].bodies), "bob_seen": len(followers[1].bodies),
              "paged": len(paged), "limited_syncs": [f.limited for f in followers]}
    await alice.close()
    await bob.close()
    print("RESULT " + json.dumps(result), flush=True)


asyncio.run(main())
