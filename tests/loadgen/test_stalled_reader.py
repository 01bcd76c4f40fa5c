"""Issue 10, hostile: a node that stops reading its map stream during a churn holds up no
one else, and catches up in full once it reads again.

The shared log's messages go out in one round per tick without waiting for a tick of
their own; a stream whose client stopped reading must then block on its own HTTP/2
window alone. A real ``homescale serve``, 140 simulated nodes over the real wire (past
BROADCAST_MIN, so changes for everyone go through the shared log), and one raw ts2021
client with HTTP/2's default 64 KiB window that reads its first map and then nothing.
"""

from __future__ import annotations

import secrets

import trio

from tests.e2e.conftest import connect_peer
from tests.loadgen.conftest import OneUser
from tests.loadgen.fleet import Fleet, PeerView, marker_endpoint

NODES = 140
MOVERS = 30
UPDATES_EACH = 8  # each a Hostinfo change too: whole nodes, enough to fill 64 KiB
SETTLE = 60.0


async def test_a_node_that_stops_reading_holds_up_no_one_and_catches_up(
    one_user: OneUser,
) -> None:
    server, key, server_key = one_user.server, one_user.key, one_user.server_key
    fleet = Fleet("127.0.0.1", server.port, server_key, first_index=0, count=NODES, track=True)
    with trio.fail_after(240):
        async with trio.open_nursery() as nursery:
            await nursery.start(fleet.run)
            res = await fleet.register(key, concurrency=8, timeout=120)
            assert res["missing"] == 0, res["errors"]

            stalled = await connect_peer(server, nursery, "stalled")  # a 64 KiB window
            await stalled.register(key)
            stream = await stalled.open_stream()
            view = PeerView()
            _, first = await stream.next(timeout=30)  # from here on it reads nothing
            view.apply(first)
            assert len(view.peers) == NODES

            seq = iter(range(1 << 16))

            async def move(i: int) -> None:
                n = fleet.nodes[i]
                for _ in range(UPDATES_EACH):
                    n.os_version = secrets.token_hex(100)  # no zstd makes it small
                    await n.lite_update([marker_endpoint(next(seq)), "192.0.2.99:41641"])
                    await trio.sleep(0.25)  # in a round of its own, not merged

            async with trio.open_nursery() as churn:
                for i in range(MOVERS):
                    churn.start_soon(move, i)

            movers = fleet.nodes[:MOVERS]

            def stale(views: dict[str, dict[str, tuple[tuple[str, ...], bool]]]) -> int:
                return sum(
                    1
                    for o, seen in views.items()
                    for m in movers
                    if m.node_key != o
                    and seen.get(m.node_key, ((), False))[0] != tuple(m.endpoints)
                )

            # Everyone else has every mover's last endpoints, the stalled node unread.
            for _ in range(int(SETTLE / 0.5)):
                if not stale(fleet.views()):
                    break
                await trio.sleep(0.5)
            assert stale(fleet.views()) == 0
            # ... and the server did run into the stalled node's window meanwhile.
            left = stalled.client.h2.remote_flow_control_window(stream.st.stream_id)
            assert left < 16 << 10, f"{left} bytes of window left: the stall was not tested"

            # Reading again, the stalled node catches up in full.
            with trio.fail_after(SETTLE):
                while stale({"stalled": view.by_key()}):
                    _, msg = await stream.next(timeout=SETTLE)
                    view.apply(msg)
            nursery.cancel_scope.cancel()
