"""Issue 10: the load generator's simulated nodes see the tailnet as a real client does.

A real tsnet node and BROADCAST_MIN + 2 simulated nodes (tests/loadgen) join the
session's tailnet: enough that a change for everyone goes through the shared log, and
the broadcaster writes each stream's message itself (`ControlService._deliver`). The
tsnet node's own log says which peers it holds (its WireGuard peer count and its
netmap diffs); each simulated node's peer table, built from the map stream it decoded,
must agree: the same peers (with each other and the tsnet node in them), and an
endpoint change reaches the tsnet node and every simulated node alike.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import trio

from appliance.sessions import BROADCAST_MIN
from tests import realclient
from tests.e2e.conftest import RUNNING_WITHIN, Tailnet
from tests.e2e.test_policy_realclient import netmap_diff_signs, wireguard_peers
from tests.loadgen.fleet import Fleet, fetch_server_key, marker_endpoint

pytestmark = [pytest.mark.realclient]

SIMULATED = BROADCAST_MIN + 2


def _diff_lines(client: realclient.TsnetClient, since: int, ipv4: str) -> list[str]:
    """The client's netmap diff entries about the peer with address ``ipv4``."""
    out = []
    for line in client.log.refresh()[since:]:
        m = realclient.tailscale_msg(line)
        if m.startswith("[v1] netmap diff:"):
            out += [e for e in m.splitlines()[1:] if ipv4 in e.split()]
    return out


async def test_simulated_nodes_see_what_a_real_client_sees(tailnet: Tailnet) -> None:
    server = tailnet.server
    viewer = tailnet.client("lgview")
    await viewer.wait_for_log(
        realclient.msg_has("Switching ipn state", "-> Running"),
        timeout=RUNNING_WITHIN,
        what="lgview Running",
    )
    since = viewer.log.mark()
    key = await fetch_server_key("127.0.0.1", server.port)
    fleet = Fleet(
        "127.0.0.1", server.port, key, first_index=0, count=SIMULATED, track=True, prefix="lg"
    )
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            await nursery.start(fleet.run)
            res = await fleet.register(tailnet.reusable_key, concurrency=32, timeout=60)
            assert res["missing"] == 0, res["errors"]

            nodes = {n["nodeKey"]: n for n in await server.anodes()}
            viewer_key = next(k for k, n in nodes.items() if n["givenName"] == "lgview")
            sims = {s.node_key: nodes[s.node_key]["ipAddresses"][0] for s in fleet.nodes}

            async def agree() -> str:
                """ "" when the real client and every simulated node hold the same peers."""
                wg = wireguard_peers(viewer)
                signs = netmap_diff_signs(viewer, since)
                if any(signs.get(ip) != "+" for ip in sims.values()):
                    return f"lgview's netmap lacks simulated nodes: {signs}"
                views = fleet.views()
                for s in fleet.nodes:
                    view = views.get(s.node_key)
                    if view is None:
                        return f"{s.hostname} has no live map stream"
                    if viewer_key not in view:
                        return f"{s.hostname} does not see lgview"
                    if len(view) != wg:
                        # Everyone sees everyone (no policy): the same number of peers.
                        return f"{s.hostname} sees {len(view)} peers, lgview {wg}"
                    others = set(sims) - {s.node_key}
                    if not others <= set(view):
                        return f"{s.hostname} misses simulated peers"
                return ""

            async def until(check: Callable[[], Awaitable[str]], what: str) -> None:
                problem = "not checked"
                for _ in range(100):  # 30 s
                    problem = await check()
                    if not problem:
                        break
                    await trio.sleep(0.3)
                assert not problem, f"{what}: {problem}; lgview log {viewer.log.path}"

            await until(agree, "after the joins")

            # One simulated node moves (and updates its OS, so that the change goes out
            # as a whole node: tsnet logs no netmap diff for a patch-only change): the
            # real client and the other simulated nodes learn the same new endpoint.
            mover = fleet.nodes[0]
            new = marker_endpoint(4242)
            moved_since = viewer.log.mark()
            mover.os_version = "6.1.0-moved"
            await mover.lite_update([new])

            async def moved() -> str:
                lines = _diff_lines(viewer, moved_since, sims[mover.node_key])
                if not any(e.startswith("+") and new in e for e in lines):
                    return f"lgview has not got {new} for {mover.hostname}: {lines}"
                views = fleet.views()
                for s in fleet.nodes[1:]:
                    if views[s.node_key][mover.node_key][0] != (new,):
                        return f"{s.hostname} has {views[s.node_key][mover.node_key]}"
                return ""

            await until(moved, "after an endpoint change")
            nursery.cancel_scope.cancel()


async def test_a_real_client_decodes_a_first_map_sent_in_pieces(tailnet: Tailnet) -> None:
    """Issue 10 (storms): a first map of SEGMENT_MIN_PEERS or more peers goes out as
    several zstd frames, each a span of peers compressed once for every map that holds
    it (protocol.mapframe.Segmented). A real tsnet node that joins a tailnet of that
    many simulated nodes decodes it whole: its first WireGuard config holds every peer
    that the simulated nodes see (they are all each other's peers: no policy)."""
    from netmap.mapsession import SEGMENT_MIN_PEERS

    server = tailnet.server
    key = await fetch_server_key("127.0.0.1", server.port)
    fleet = Fleet(
        "127.0.0.1",
        server.port,
        key,
        first_index=100,
        count=SEGMENT_MIN_PEERS + 12,
        track=True,
        prefix="seg",
    )
    with trio.fail_after(180):
        async with trio.open_nursery() as nursery:
            await nursery.start(fleet.run)
            res = await fleet.register(tailnet.reusable_key, concurrency=16, timeout=120)
            assert res["missing"] == 0, res["errors"]
            viewer = tailnet.client("segview")
            await viewer.wait_for_log(
                realclient.msg_has("Switching ipn state", "-> Running"),
                timeout=RUNNING_WITHIN,
                what="segview Running",
            )
            nodes = {n["nodeKey"]: n for n in await server.anodes()}
            viewer_key = next(k for k, n in nodes.items() if n["givenName"] == "segview")
            problem = "not checked"
            for _ in range(100):  # 30 s
                wg = wireguard_peers(viewer)
                views = fleet.views()
                sample = views.get(fleet.nodes[-1].node_key) or {}
                if wg is None or wg < SEGMENT_MIN_PEERS:
                    problem = f"segview configured WireGuard with {wg} peers"
                elif viewer_key not in sample:
                    problem = "the simulated nodes do not see segview yet"
                elif len(sample) != wg:
                    problem = f"segview holds {wg} peers, a simulated node {len(sample)}"
                else:
                    problem = ""
                    break
                await trio.sleep(0.3)
            assert not problem, f"{problem}; segview log {viewer.log.path}"
            nursery.cancel_scope.cancel()
