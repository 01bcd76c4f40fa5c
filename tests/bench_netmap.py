"""Netmap benchmark: what one node's change costs, next to rebuilding every node's map.

headscale's FAQ names whole-world map recomputation as its bottleneck; homescale
encodes a changed node once and composes small per-session deltas. This measures
both on an in-memory tailnet (no sockets): N nodes under an allow-all policy (the
worst case: everyone sees everyone).
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

from appliance.changes import NodeChanged, PolicyChanged
from appliance.config import load_config
from appliance.setup import render_config
from appliance.store import NodeRow, UserRow, utcnow
from appliance.tailnet import Tailnet

NODES = 1000


def _tailnet(n: int) -> Tailnet:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(render_config("http://127.0.0.1:8080"))
        config = load_config(path, {})
    import logging

    tn = Tailnet(config=config, log=logging.getLogger("bench"))
    now = utcnow()
    users = [UserRow(id=1, name="alice", created_at=now)]
    users += [UserRow(id=u, name=f"user{u}", created_at=now) for u in range(2, 11)]
    nodes = [
        NodeRow(
            id=i,
            machine_key=f"mkey:{i:064x}",
            node_key=f"nodekey:{i:064x}",
            given_name=f"node{i}",
            hostname=f"node{i}",
            disco_key=f"discokey:{i:064x}",
            endpoints=[f"192.0.2.{i % 250}:41641"],
            user_id=i % 10 + 1,
            ipv4=f"100.64.{i // 250}.{i % 250 + 1}",
            created_at=now,
            hostinfo={"Hostname": f"node{i}", "NetInfo": {"PreferredDERP": 999}},
        )
        for i in range(1, n + 1)
    ]
    tn.load(users, nodes, None)
    tn.set_derp_map({"Regions": {}})
    return tn


async def bench_netmap_deltas() -> list:
    """One endpoint change vs rebuilding every node's map; a node joining (in memory, N nodes)."""
    from tests.bench import Figure

    tn = _tailnet(NODES)
    handles = [tn.sessions.open(nid) for nid in tn.nodes]
    t0 = time.perf_counter()
    full_bytes = 0
    for h in handles:
        msg = h.state.next_message(tn, utcnow())
        full_bytes += len(msg or b"")
    full = time.perf_counter() - t0

    rounds = 20
    delta_bytes = 0
    t0 = time.perf_counter()
    for r in range(rounds):
        row = dataclasses.replace(tn.nodes[1], endpoints=[f"198.51.100.{r + 1}:41641"])
        tn.apply([NodeChanged(row)])
        for h in handles:
            if h.wake.is_set():
                msg = h.state.next_message(tn, utcnow())
                delta_bytes += len(msg or b"")
                h.wake = type(h.wake)()
    per_change = (time.perf_counter() - t0) / rounds

    # A node joining under a policy where users see only their own nodes (10 users):
    # the policy re-resolves, but only the joining user's sessions are woken.
    tn.apply(
        [
            PolicyChanged(
                '{"acls":[{"action":"accept","src":["autogroup:member"],"dst":["autogroup:self:*"]}]}'
            )
        ]
    )
    for h in handles:
        h.state.next_message(tn, utcnow())
        h.wake = type(h.wake)()
    t0 = time.perf_counter()
    joined = NodeRow(
        id=NODES + 1,
        machine_key=f"mkey:{NODES + 1:064x}",
        node_key=f"nodekey:{NODES + 1:064x}",
        given_name="joined",
        user_id=1,
        disco_key=f"discokey:{NODES + 1:064x}",
        ipv4="100.64.200.1",
        created_at=utcnow(),
    )
    tn.apply([NodeChanged(joined)])
    woken = [h for h in handles if h.wake.is_set()]
    for h in woken:
        h.state.next_message(tn, utcnow())
    join = time.perf_counter() - t0
    return [
        Figure(
            f"full maps for all {NODES} nodes (what a whole-world rebuild sends)", full * 1000, "ms"
        ),
        Figure("  bytes of all full maps", full_bytes / 1e6, "MB"),
        Figure(f"one endpoint change -> deltas to its {NODES - 1} peers", per_change * 1000, "ms"),
        Figure("  bytes of those deltas", delta_bytes / rounds / 1e3, "KB"),
        Figure("  delta bytes per peer", delta_bytes / rounds / (NODES - 1), "B"),
        Figure("speed-up of a delta over a rebuild", full / per_change, "x"),
        Figure(
            f"a node joins (own-user policy): re-resolve + deltas to the {len(woken)} woken",
            join * 1000,
            "ms",
        ),
    ]
