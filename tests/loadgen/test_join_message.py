"""Issue 10: a node joining reaches each peer already online as one message, with the
node already online (not a PeersChanged saying offline followed by an Online patch).

A real ``homescale serve`` and simulated nodes over the real wire (tests/loadgen).
"""

from __future__ import annotations

from typing import Any

import trio

from tests.loadgen.conftest import OneUser
from tests.loadgen.fleet import Fleet


def _about(msg: dict[str, Any], node_id: int) -> bool:
    ids = {int(p["ID"]) for p in msg.get("PeersChanged") or []}
    ids |= {int(p["NodeID"]) for p in msg.get("PeersChangedPatch") or []}
    ids |= {int(i) for i in msg.get("PeersRemoved") or []}
    ids |= {int(i) for i in msg.get("OnlineChange") or {}}
    return node_id in ids


async def test_a_join_reaches_each_online_peer_as_one_message_with_the_node_online(
    one_user: OneUser,
) -> None:
    server, key, server_key = one_user.server, one_user.key, one_user.server_key

    def fleet(first: int, count: int, prefix: str) -> Fleet:
        return Fleet(
            "127.0.0.1",
            server.port,
            server_key,
            first_index=first,
            count=count,
            track=True,
            prefix=prefix,
        )

    watchers, joiners = fleet(0, 3, "watch"), fleet(3, 3, "join")
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for f in (watchers, joiners):
                await nursery.start(f.run)
            assert (await watchers.register(key, timeout=30))["missing"] == 0
            for w in watchers.nodes:
                w.received = []
            assert (await joiners.register(key, timeout=30))["missing"] == 0
            nodes = {n["nodeKey"]: int(n["id"]) for n in await server.anodes()}

            def all_seen() -> bool:
                return all(
                    j.node_key in w.view.by_key()
                    for w in watchers.nodes
                    if w.view is not None
                    for j in joiners.nodes
                )

            for _ in range(200):  # 20 s
                if all_seen():
                    break
                await trio.sleep(0.1)
            assert all_seen()
            await trio.sleep(1.0)  # room for a second message about a joiner, if any
            for j in joiners.nodes:
                jid = nodes[j.node_key]
                for w in watchers.nodes:
                    assert w.received is not None
                    about = [m for m in w.received if _about(m, jid)]
                    assert len(about) == 1, (w.hostname, j.hostname, about)
                    (peer,) = [p for p in about[0]["PeersChanged"] if int(p["ID"]) == jid]
                    assert peer["Online"] is True, peer
            nursery.cancel_scope.cancel()
