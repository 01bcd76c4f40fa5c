"""Issue 3: addresses and names stay unique when many nodes register at the same moment.

Twenty ts2021 clients, each on its own Noise connection to the real server, send
their RegisterRequest concurrently with one reusable key and the same hostname.
"""

from __future__ import annotations

import ipaddress

import pytest
import trio

from tests.e2e.conftest import Tailnet, connect_peer

pytestmark = [pytest.mark.realclient]

CLIENTS = 20


async def test_concurrent_registrations_get_unique_addresses_and_names(tailnet: Tailnet) -> None:
    server = tailnet.server
    results: list[dict[str, object]] = []
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            peers = [await connect_peer(server, nursery, "racer") for _ in range(CLIENTS)]

            async def register(i: int) -> None:
                results.append(await peers[i].register(tailnet.reusable_key))

            async with trio.open_nursery() as racers:
                for i in range(CLIENTS):
                    racers.start_soon(register, i)
            nursery.cancel_scope.cancel()

    assert len(results) == CLIENTS
    assert all(r.get("MachineAuthorized") is True and not r.get("Error") for r in results)
    mine = {p.node_key for p in peers}
    nodes = [n for n in await server.anodes() if n["nodeKey"] in mine]
    assert len(nodes) == CLIENTS
    v4 = [a for n in nodes for a in n["ipAddresses"] if ipaddress.ip_address(a).version == 4]
    v6 = [a for n in nodes for a in n["ipAddresses"] if ipaddress.ip_address(a).version == 6]
    assert len(set(v4)) == len(v4) == CLIENTS
    assert len(set(v6)) == len(v6) == CLIENTS
    names = sorted(n["givenName"] for n in nodes)
    # One keeps the hostname, the others get Tailscale-style -1, -2, ... suffixes.
    assert len(set(names)) == CLIENTS
    assert "racer" in names
    assert {n for n in names if n != "racer"} <= {f"racer-{i}" for i in range(1, CLIENTS)}
