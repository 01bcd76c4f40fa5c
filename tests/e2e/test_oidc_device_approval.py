"""Issue 13 item 3, device approval: with node.require_approval a node that logged in
waits (Tailscale's NeedsMachineAuth) outside the tailnet until an admin approves it.

Real tsnet 1.90.9 clients: the waiting one says so in its own log, its peers are not
sent it, and `nodes approve` brings it up and reachable.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trio.lowlevel

from tests import realclient
from tests.e2e.conftest import RUNNING_WITHIN, fetch_until, node_by_name, wait_nodes
from tests.realclient import msg_has

pytestmark = [pytest.mark.realclient]


@dataclass
class ApprovalNet:
    server: realclient.HomescaleServer
    dir: Path
    key: str


@pytest.fixture(scope="module")
def approvals(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApprovalNet]:
    realclient.require_realclient()
    d = tmp_path_factory.mktemp("approval")
    server = realclient.HomescaleServer(d)
    text = server.config.read_text()
    assert "  require_approval: false\n" in text
    server.config.write_text(
        text.replace("  require_approval: false\n", "  require_approval: true\n")
    )
    server.start()
    try:
        server.cli("users", "create", "alice")
        yield ApprovalNet(server, d, server.create_key("alice", "--reusable"))
    finally:
        server.stop()


async def test_node_waits_for_approval_then_joins(approvals: ApprovalNet) -> None:
    server = approvals.server
    first = realclient.TsnetClient(approvals.dir, "appr1", server.url, auth_key=approvals.key)
    second = realclient.TsnetClient(approvals.dir, "appr2", server.url, auth_key=approvals.key)
    first.start()
    second.start()
    try:
        nodes = await wait_nodes(server, ["appr1", "appr2"], timeout=30)
        n1, n2 = node_by_name(nodes, "appr1"), node_by_name(nodes, "appr2")
        assert n1 is not None
        assert n2 is not None
        assert (n1["approved"], n2["approved"]) == (False, False)  # visible as pending
        listed = (await server.acli("nodes", "list")).stdout
        assert "Approved" in listed
        pending = json.loads((await server.acli("auth", "list", "-o", "json")).stdout)
        waiting = {p["hostname"]: p for p in pending if p["kind"] == "device-approval"}
        assert waiting["appr1"]["user"] == "alice"
        assert waiting["appr1"]["nodeId"] == n1["id"]
        assert waiting["appr1"]["createdAt"]
        await first.wait_for_log(
            msg_has("Switching ipn state", "-> NeedsMachineAuth"),
            timeout=30,
            what="appr1 waiting for approval",
        )
        # The second node is approved; the first, still waiting, is not its peer.
        since = server.log.mark()
        await server.acli("nodes", "approve", "-i", n2["id"])
        await second.wait_for_log(
            msg_has("Switching ipn state", "-> Running"), timeout=RUNNING_WITHIN, what="appr2 up"
        )
        for msg in realclient.sent_maps(server.log.refresh()[since:], n2["id"]):
            ids = [p.get("ID") for p in msg.get("Peers") or []] + [
                p.get("ID") for p in msg.get("PeersChanged") or []
            ]
            assert int(n1["id"]) not in ids, msg
        assert realclient.sent_maps(server.log.refresh()[since:], n2["id"]), "appr2 got no map"
        # Approving the first reaches its waiting client at once, and it joins.
        since1 = first.log.mark()
        await server.acli("nodes", "approve", "-i", n1["id"])
        await first.wait_for_log(
            msg_has("Switching ipn state", "-> Running"),
            since=since1,
            timeout=RUNNING_WITHIN,
            what="appr1 up after approval",
        )
        body = await fetch_until(second, f"{n1['ipAddresses'][0]}:80")
        assert body == b"hello from appr1"
        nodes = await server.anodes()
        assert node_by_name(nodes, "appr1")["approved"] is True  # type: ignore[index]
        # Approving twice is an error that says so.
        again = await server.acli("nodes", "approve", "-i", n1["id"], check=False)
        assert again.returncode != 0
        assert "already approved" in again.stderr
    finally:
        first.stop()
        second.stop()


async def test_rejected_node_is_removed(approvals: ApprovalNet) -> None:
    server = approvals.server
    c = realclient.TsnetClient(approvals.dir, "appr3", server.url, auth_key=approvals.key)
    c.start()
    try:
        nodes = await wait_nodes(server, ["appr3"], timeout=30)
        n = node_by_name(nodes, "appr3")
        assert n is not None
        assert n["approved"] is False
        await server.acli("nodes", "reject", "-i", n["id"])
        assert node_by_name(await server.anodes(), "appr3") is None
        await trio.lowlevel.checkpoint()
    finally:
        c.stop()
