"""Issue 3: after the first full map, one node's change reaches its peers as a small delta.

Two nodes are driven by the test over real ts2021 to the real server (so what the
server sent can be decoded frame by frame); a real tsnet peer (nodea) watches too,
and the server's debug log shows what the server sent it.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

from tests import realclient
from tests.e2e.conftest import MapStream, Pair, Tailnet, connect_peer

pytestmark = [pytest.mark.realclient]

# A patch naming one node and a few fields is ~100-200 bytes of JSON; a full
# map with a handful of peers is several KB. Anything near the full size would
# mean the server rebuilt the map.
SMALL = 600


async def next_about(
    stream: MapStream, node_id: int, *, timeout: float = 10.0
) -> tuple[int, dict[str, Any]]:
    """The next message that mentions ``node_id`` (others' changes may interleave);
    every message on the way must be a delta too."""
    with trio.fail_after(timeout):
        while True:
            size, msg = await stream.next()
            assert "Peers" not in msg, f"a full peer list after the first map: {msg}"
            ids = {p.get("ID") for p in msg.get("PeersChanged") or []}
            ids |= {p.get("NodeID") for p in msg.get("PeersChangedPatch") or []}
            ids |= set(msg.get("PeersRemoved") or [])
            ids |= {int(k) for k in (msg.get("OnlineChange") or {})}
            if node_id in ids:
                return size, msg


async def test_endpoint_and_hostinfo_changes_are_small_deltas(tailnet: Tailnet, pair: Pair) -> None:
    server = tailnet.server
    async with trio.open_nursery() as nursery:
        watcher = await connect_peer(server, nursery, "deltawatch")
        mover = await connect_peer(server, nursery, "deltamove")
        with trio.fail_after(30):
            await watcher.register(tailnet.reusable_key)
            await mover.register(tailnet.reusable_key)
            # A node without a disco key is not shown to peers (it cannot be reached).
            await mover.lite_update(Endpoints=["192.0.2.10:41641"], EndpointTypes=[1])
            stream = await watcher.open_stream()
            first_size, first = await stream.next()
        assert "Node" in first
        assert first["Node"]["Key"] == watcher.node_key
        peer = next((p for p in first["Peers"] if p["Key"] == mover.node_key), None)
        assert peer is not None, f"mover not in the first map: {json.dumps(first)[:2000]}"
        mover_id = int(peer["ID"])
        assert peer["Endpoints"] == ["192.0.2.10:41641"]

        # 1. Endpoints + home DERP change: a PeersChangedPatch for that node only.
        since = server.log.mark()
        await mover.lite_update(
            Endpoints=["192.0.2.11:41641"],
            EndpointTypes=[2],
            Hostinfo=mover.hostinfo(NetInfo={"PreferredDERP": 999}),
        )
        size, msg = await next_about(stream, mover_id)
        assert size < SMALL, f"{size} bytes (first map {first_size}): {msg}"
        assert size * 3 < first_size
        assert set(msg) <= {"PeersChangedPatch", "PeersChanged", "ControlTime"}, msg
        patches = msg.get("PeersChangedPatch") or []
        assert [p["NodeID"] for p in patches] == [mover_id], msg
        assert patches[0]["Endpoints"] == ["192.0.2.11:41641"]
        assert "PeersChanged" not in msg, "patchable fields were sent as a full node"

        # The server sent the real client's stream (nodea) the same small patch: what
        # the server's debug log says it sent, not what the client did with it.
        a_id = pair.ids["nodea"]
        await server.log.wait_for(
            lambda ln: any("PeersChangedPatch" in m for m in realclient.sent_maps([ln], a_id)),
            since=since,
            timeout=10,
            what="the patch sent to nodea",
        )
        sent = [m for m in realclient.sent_maps(server.log.lines[since:], a_id) if m]
        assert all("Peers" not in m and "Node" not in m for m in sent), sent
        patched = [p["NodeID"] for m in sent for p in m.get("PeersChangedPatch") or []]
        assert patched == [mover_id], sent

        # 2. A Hostinfo change that no patch field carries: PeersChanged with that node only.
        await mover.lite_update(
            Endpoints=["192.0.2.11:41641"],
            EndpointTypes=[2],
            Hostinfo=mover.hostinfo(NetInfo={"PreferredDERP": 999}, OSVersion="delta-test-2"),
        )
        size, msg = await next_about(stream, mover_id)
        assert set(msg) <= {"PeersChangedPatch", "PeersChanged", "ControlTime"}, msg
        changed = msg.get("PeersChanged") or []
        assert [p["ID"] for p in changed] == [mover_id], msg
        assert changed[0]["Hostinfo"]["OSVersion"] == "delta-test-2"
        assert size * 2 < first_size or len(first["Peers"]) <= 1, (size, first_size)
        nursery.cancel_scope.cancel()
