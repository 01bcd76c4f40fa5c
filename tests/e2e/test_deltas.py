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


def others_in(msg: dict[str, Any], node_id: int) -> set[Any]:
    """The nodes other than ``node_id`` a delta names: a real client's own change that
    the server rightly sent in the same message (it coalesces what is due at once)."""
    ids = {p.get("ID") for p in msg.get("PeersChanged") or []}
    ids |= {p.get("NodeID") for p in msg.get("PeersChangedPatch") or []}
    ids |= set(msg.get("PeersRemoved") or [])
    ids |= {int(k) for k in (msg.get("OnlineChange") or {})}
    ids |= {int(k) for k in (msg.get("PeerSeenChange") or {})}
    return ids - {node_id}


# The real clients (nodea, nodeb) may still be settling (a netcheck under load changes
# their endpoints, a reconnect their online state); a change of theirs can land in the
# same delta as the mover's. Such a message cannot show what one node's change costs, so
# the change is made again until one reaches the watcher alone.
ATTEMPTS = 5


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
        # nodea (a real client) has been sent the mover as a new peer: from here on,
        # a change to the mover is a change to a peer it holds. (Before, the server may
        # rightly fold the change into that first PeersChanged.)
        a_id = pair.ids["nodea"]
        await server.log.wait_for(
            lambda ln: any(
                mover_id in {int(p["ID"]) for p in m.get("PeersChanged") or m.get("Peers") or []}
                for m in realclient.sent_maps([ln], a_id)
            ),
            timeout=10,
            what="the mover sent to nodea as a peer",
        )

        # 1. Endpoints + home DERP change: a PeersChangedPatch for that node only.
        since = server.log.mark()
        for attempt in range(ATTEMPTS):
            endpoints = [f"192.0.2.{11 + attempt}:41641"]
            await mover.lite_update(
                Endpoints=endpoints,
                EndpointTypes=[2],
                Hostinfo=mover.hostinfo(NetInfo={"PreferredDERP": 999}),
            )
            size, msg = await next_about(stream, mover_id)
            patches = msg.get("PeersChangedPatch") or []
            mine = [p.get("Endpoints") for p in patches if p["NodeID"] == mover_id]
            assert mine == [endpoints], msg
            assert mover_id not in {p["ID"] for p in msg.get("PeersChanged") or []}, (
                "patchable fields were sent as a full node"
            )
            if not others_in(msg, mover_id):
                break
        else:
            pytest.fail(f"no delta about the mover alone in {ATTEMPTS} changes; last: {msg}")
        assert size < SMALL, f"{size} bytes (first map {first_size}): {msg}"
        assert size * 3 < first_size
        assert set(msg) <= {"PeersChangedPatch", "PeersChanged", "ControlTime"}, msg
        assert [p["NodeID"] for p in patches] == [mover_id], msg
        assert "PeersChanged" not in msg, "patchable fields were sent as a full node"

        # The server sent the real client's stream (nodea) the same small patch: what
        # the server's debug log says it sent, not what the client did with it.
        def patch_for_mover(m: dict[str, Any]) -> bool:
            return any(
                p["NodeID"] == mover_id and p.get("Endpoints") == endpoints
                for p in m.get("PeersChangedPatch") or []
            )

        line = await server.log.wait_for(
            lambda ln: any(patch_for_mover(m) for m in realclient.sent_maps([ln], a_id)),
            since=since,
            timeout=10,
            what="the patch sent to nodea",
        )
        (sent,) = realclient.sent_maps([line], a_id)
        # (nodea's own Node may ride along: the server coalesces what is due at once.)
        assert "Peers" not in sent, "a full peer list"
        assert mover_id not in {p["ID"] for p in sent.get("PeersChanged") or []}, sent

        # 2. A Hostinfo change that no patch field carries: PeersChanged with that node only.
        for attempt in range(ATTEMPTS):
            os_version = f"delta-test-2.{attempt}"
            await mover.lite_update(
                Endpoints=endpoints,
                EndpointTypes=[2],
                Hostinfo=mover.hostinfo(NetInfo={"PreferredDERP": 999}, OSVersion=os_version),
            )
            size, msg = await next_about(stream, mover_id)
            changed = [p for p in msg.get("PeersChanged") or [] if p["ID"] == mover_id]
            assert [p["Hostinfo"]["OSVersion"] for p in changed] == [os_version], msg
            if not others_in(msg, mover_id):
                break
        else:
            pytest.fail(f"no delta about the mover alone in {ATTEMPTS} changes; last: {msg}")
        assert set(msg) <= {"PeersChangedPatch", "PeersChanged", "ControlTime"}, msg
        assert [p["ID"] for p in msg["PeersChanged"]] == [mover_id], msg
        assert size * 2 < first_size or len(first["Peers"]) <= 1, (size, first_size)
        nursery.cancel_scope.cancel()
