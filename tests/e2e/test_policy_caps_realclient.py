"""Issue 14 with real clients: capability grants and node attributes reach tsnet.

A tagged server ``web`` and alice's ``alicepc`` are real tsnet clients; the
policy grants alice ``example.com/cap/webapp`` (JSON values) on web and gives
web two node attributes. The evidence comes from the clients: with
``TS_DEBUG_MAP=1`` tsnet logs every MapResponse as it decoded it ("MapResponse: {...}"),
so the test reads from web's own log that its self node's CapMap carries the
attributes and that its packet filter carries the CapGrant with the values as
written -- what tsnet turns into peer capabilities for alice's address -- and
that traffic the same grant allows flows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import trio

from tests import realclient
from tests.e2e.conftest import fetch_until, wait_nodes

pytestmark = realclient.tier_mark()

POLICY = Path(__file__).resolve().parent.parent / "fixtures" / "policy_e2e" / "capabilities.hujson"
ONLINE_WITHIN = 30.0
RUNNING_WITHIN = 40.0
CAP = "example.com/cap/webapp"
VALUES = [{"role": "admin", "paths": ["/a", "/b"]}, 7]


def debug_maps(client: realclient.TsnetClient) -> list[dict[str, Any]]:
    """The MapResponses the client logged (TS_DEBUG_MAP), decoded by the client."""
    out = []
    for line in client.log.refresh():
        msg = str(line.get("msg", ""))  # tsnet writes these without a logger name
        start = msg.find("{")
        if msg.startswith("MapResponse:") and start >= 0:
            try:
                out.append(json.loads(msg[start:]))
            except ValueError:
                continue
    return out


async def wait_for_map(
    client: realclient.TsnetClient, pred: Any, what: str, timeout: float = 20.0
) -> dict[str, Any]:
    with trio.move_on_after(timeout):
        while True:
            for m in debug_maps(client):
                if pred(m):
                    return m
            await trio.sleep(0.3)
    raise AssertionError(f"{client.name} never logged a map with {what}; log {client.log.path}")


async def test_capability_grant_and_node_attrs_reach_tsnet(tmp_path: Path) -> None:
    server = realclient.HomescaleServer(tmp_path / "server")
    server.set_policy_mode("database")
    clients: dict[str, realclient.TsnetClient] = {}
    try:
        await trio.to_thread.run_sync(server.start)
        await server.acli("users", "create", "alice")
        await server.acli("policy", "set", "--file", str(POLICY))
        keys = {
            "web": server.create_key("alice", "--tags", "tag:server"),
            "alicepc": server.create_key("alice"),
        }
        for name, key in keys.items():
            c = realclient.TsnetClient(
                tmp_path, name, server.url, auth_key=key, extra_env={"TS_DEBUG_MAP": "1"}
            )
            clients[name] = c
            c.start()
        nodes = await wait_nodes(server, list(keys), timeout=ONLINE_WITHIN)
        ip = {n["givenName"]: n["ipAddresses"][0] for n in nodes}
        for c in clients.values():
            await c.wait_for_log(
                realclient.msg_has("Switching ipn state", "-> Running"),
                timeout=RUNNING_WITHIN,
                what=f"{c.name} Running",
            )

        web = clients["web"]
        self_map = await wait_for_map(
            web,
            lambda m: "magicdns-aaaa" in ((m.get("Node") or {}).get("CapMap") or {}),
            "magicdns-aaaa in its own CapMap",
        )
        caps = self_map["Node"]["CapMap"]
        assert "nextdns:abc123" in caps, caps

        def has_grant(m: dict[str, Any]) -> bool:
            return any(r.get("CapGrant") for r in m.get("PacketFilter") or [])

        def grants_of(m: dict[str, Any]) -> list[tuple[list[str], dict[str, Any]]]:
            filt = m.get("PacketFilter") or []
            return [(r["SrcIPs"], g) for r in filt for g in r.get("CapGrant") or []]

        # When web registers before alicepc, its first filter already carries the
        # grant with no sources yet (as Tailscale sends it, grant-h6); the one to
        # check is the filter web gets once alicepc's address is a source.
        grants = grants_of(
            await wait_for_map(
                web,
                lambda m: any(ip["alicepc"] in srcs for srcs, _ in grants_of(m)),
                "a CapGrant from alicepc's address in its packet filter",
            )
        )
        assert any(
            ip["alicepc"] in srcs and g["CapMap"].get(CAP) == VALUES for srcs, g in grants
        ), grants
        assert any(ip["web"] + "/32" in g["Dsts"] for _, g in grants), grants
        # alicepc is not a destination of the grant: no CapGrant there.
        assert not any(has_grant(m) for m in debug_maps(clients["alicepc"]))
        # alicepc's view of web carries none of web's own attributes.
        for m in debug_maps(clients["alicepc"]):
            for p in m.get("Peers") or []:
                assert "magicdns-aaaa" not in (p.get("CapMap") or {}), p

        body = await fetch_until(clients["alicepc"], f"{ip['web']}:80", timeout=30)
        assert body.startswith(b"hello from web")
    finally:
        for c in clients.values():
            try:
                c.stop()
            except Exception:
                c.kill()
        server.stop()
