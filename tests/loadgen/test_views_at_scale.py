"""Issue 10: at 200 nodes, with churn, coalescing and reconnects, every node ends up
seeing exactly its visible peers, each with its latest endpoints and online state.

A real ``homescale serve`` (policy in the database: each team sees its own nodes, ops
sees and is seen by everyone) and 200 simulated nodes over the real wire
(tests/loadgen), each applying every MapResponse to a peer table as the Go client does.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import trio

from tests.loadgen.fleet import Fleet, SimNode, fetch_server_key, marker_endpoint
from tests.realclient import HomescaleServer

TEAMS = {"ops": 20, "team1": 45, "team2": 45, "team3": 45, "team4": 45}  # 200 nodes
POLICY = {
    "acls": [
        {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]},
        {"action": "accept", "src": ["ops@"], "dst": ["*:*"]},
    ]
}
MOVERS = 40  # nodes that change endpoints 5 times back to back (their peers coalesce)
UPDATES_EACH = 5
DROPPED = 20  # nodes that hang up; half of them come back with new endpoints
SETTLE = 45.0  # bound for every view to converge


def _expected(
    observer: SimNode, team: dict[str, str], nodes: list[SimNode], up: set[str]
) -> dict[str, tuple[tuple[str, ...], bool]]:
    mine = team[observer.node_key]
    return {
        p.node_key: (tuple(p.endpoints), p.node_key in up)
        for p in nodes
        if p is not observer
        and (mine == "ops" or team[p.node_key] == "ops" or team[p.node_key] == mine)
    }


async def test_every_final_view_is_exactly_the_visible_peers_with_their_latest_state(
    tmp_path: Path,
) -> None:
    server = HomescaleServer(tmp_path, log_level="info")
    server.config.write_text(
        server.config.read_text().replace("  mode: file\n", "  mode: database\n", 1)
    )
    server.start()
    try:
        keys = {}
        for name in TEAMS:
            await server.acli("users", "create", name)
            keys[name] = await trio.to_thread.run_sync(server.create_key, name, "--reusable")
        policy = tmp_path / "policy.json"
        policy.write_text(json.dumps(POLICY))
        await server.acli("policy", "set", "--file", str(policy))

        server_key = await fetch_server_key("127.0.0.1", server.port)
        fleets: dict[str, Fleet] = {}
        first = 0
        for name, count in TEAMS.items():
            fleets[name] = Fleet(
                "127.0.0.1",
                server.port,
                server_key,
                first_index=first,
                count=count,
                track=True,
                prefix=name,
            )
            first += count
        nodes = [n for f in fleets.values() for n in f.nodes]
        team = {n.node_key: name for name, f in fleets.items() for n in f.nodes}
        fleet_of = {n.node_key: f for f in fleets.values() for n in f.nodes}
        rng = random.Random(10)

        with trio.fail_after(240):
            async with trio.open_nursery() as nursery:
                for f in fleets.values():
                    await nursery.start(f.run)

                async def register(name: str) -> None:
                    res = await fleets[name].register(keys[name], concurrency=8, timeout=120)
                    assert res["missing"] == 0, res["errors"]

                async with trio.open_nursery() as joins:
                    for name in fleets:
                        joins.start_soon(register, name)

                # Churn: movers change endpoints back to back while others hang up and return.
                shuffled = rng.sample(nodes, len(nodes))
                movers = shuffled[:MOVERS]
                dropped = shuffled[MOVERS : MOVERS + DROPPED]
                returning = dropped[: DROPPED // 2]
                seq = iter(range(1 << 16))

                async def move(n: SimNode) -> None:
                    for _ in range(UPDATES_EACH):
                        await n.lite_update([marker_endpoint(next(seq)), "192.0.2.99:41641"])

                async with trio.open_nursery() as churn:
                    for n in movers:
                        churn.start_soon(move, n)
                    for n in dropped:
                        churn.start_soon(fleet_of[n.node_key].drop, [n])
                await trio.sleep(0.5)  # the server has seen the hang-ups
                # The returning nodes report new endpoints on the map request itself, while
                # some movers change once more.
                for n in returning:
                    n.endpoints = [marker_endpoint(next(seq))]
                async with trio.open_nursery() as back:
                    for n in returning:
                        back.start_soon(fleet_of[n.node_key].reconnect, 0.0, [n])
                    for n in movers[:10]:
                        back.start_soon(n.lite_update, [marker_endpoint(next(seq))])

                gone = {n.node_key for n in dropped[DROPPED // 2 :]}
                up = {n.node_key for n in nodes} - gone
                observers = [n for n in nodes if n.node_key in up]

                def mismatches() -> list[str]:
                    views: dict[str, dict[str, tuple[tuple[str, ...], bool]]] = {}
                    for f in fleets.values():
                        views.update(f.views())
                    out = []
                    for o in observers:
                        want = _expected(o, team, nodes, up)
                        got = views.get(o.node_key)
                        if got != want:
                            out.append(_diff(o, got, want))
                    return out

                for _ in range(int(SETTLE / 0.5)):
                    bad = mismatches()
                    if not bad:
                        break
                    await trio.sleep(0.5)
                assert not bad, f"{len(bad)} nodes' views are wrong, e.g.:\n" + "\n".join(bad[:5])
                nursery.cancel_scope.cancel()
    finally:
        server.stop()


def _diff(
    o: SimNode,
    got: dict[str, tuple[tuple[str, ...], bool]] | None,
    want: dict[str, tuple[tuple[str, ...], bool]],
) -> str:
    if got is None:
        return f"{o.hostname}: no live map stream ({o.error})"
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    stale = {k: (got[k], want[k]) for k in set(got) & set(want) if got[k] != want[k]}
    return (
        f"{o.hostname}: {len(missing)} missing, {len(extra)} not visible but shown, "
        f"{len(stale)} stale, e.g. {list(stale.items())[:2]}"
    )
