"""HA subnet router probes (issue 12): a primary that stays connected but stops
answering PingRequests hands its routes to the next router; answering again makes it
healthy, without taking the routes back while the other one is up."""

from __future__ import annotations

import json
import logging
from typing import Any

import trio

from appliance.changes import NodeOnline
from appliance.haprobe import HAProber
from appliance.httpserver import Request
from tests.appliance.test_tailnet_support import compose, connect, make_tailnet, node, user

R1, R2, V = 1, 2, 3
ROUTE = "10.5.0.0/24"


def setup() -> Any:
    routers = [
        node(n, hostinfo={"Hostname": f"r{n}", "RoutableIPs": [ROUTE]}, approved_routes=[ROUTE])
        for n in (R1, R2)
    ]
    tn = make_tailnet([user(1, "alice")], [*routers, node(V)])
    handles = {n: connect(tn, n)[0] for n in (R1, R2, V)}
    tn.apply([NodeOnline(n, True) for n in (R1, R2, V)])
    return tn, handles


def head(url: str) -> Request:
    query = url.split("?", 1)[1]
    return Request("HEAD", url, "/machine/ping-response", {"id": [query[3:]]}, {}, b"", "x")


async def test_hung_primary_fails_over(autojump_clock: trio.testing.MockClock) -> None:
    tn, h = setup()
    assert tn.primaries == {ROUTE: R1}
    assert tn.ha_routers() == {R1, R2}
    prober = HAProber(tn, "http://127.0.0.1:1", 10.0, 5.0, logging.getLogger("test.ha"))

    async def answer(node_id: int) -> None:
        """The client: take the PingRequest from its stream and answer it."""
        while True:
            await trio.sleep(0.1)
            msg = compose(tn, h[node_id])
            if msg and "PingRequest" in msg:
                resp = await prober.ping_response(head(msg["PingRequest"]["URL"]))
                assert resp.status == 200
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer, R2)  # R1 hangs: connected, silent
        await prober.probe_once()
    assert tn.unhealthy == {R1}
    assert tn.primaries == {ROUTE: R2}
    # The viewer hears that R2 now serves the route.
    msg = compose(tn, h[V])
    assert msg is not None
    changed = {p["ID"]: p for p in msg.get("PeersChanged") or []}
    assert changed[R2]["PrimaryRoutes"] == [ROUTE]

    # R1 answers again: healthy, but R2 keeps the route (no flapping).
    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer, R1)
        nursery.start_soon(answer, R2)
        await prober.probe_once()
    assert tn.unhealthy == set()
    assert tn.primaries == {ROUTE: R2}
    # R2 goes away: R1 takes the route again.
    tn.apply([NodeOnline(R2, False)])
    assert tn.primaries == {ROUTE: R1}


async def test_answers_are_checked() -> None:
    tn, _ = setup()
    prober = HAProber(tn, "http://127.0.0.1:1", 10.0, 5.0, logging.getLogger("test.ha"))
    assert (await prober.ping_response(head("/x?id=unknown"))).status == 404
    get = Request("GET", "/", "/machine/ping-response", {"id": ["x"]}, {}, b"", "x")
    assert (await prober.ping_response(get)).status == 405
    none = Request("HEAD", "/", "/machine/ping-response", {}, {}, b"", "x")
    assert (await prober.ping_response(none)).status == 400
    json.dumps(tn.primaries)
