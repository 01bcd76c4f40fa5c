"""Issue 9 item 3 with a real client: a database holding a poisoned row (what an older
homescale stored from `Hostinfo.RoutableIPs: ["not-a-prefix"]`) starts, serves a real
tsnet node, and `homescale doctor` lists the row; `--fix` repairs it."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from appliance.store import Store
from tests import realclient
from tests.e2e.conftest import ONLINE_WITHIN, RUNNING_WITHIN, node_by_name, wait_nodes
from tests.realclient import msg_has

pytestmark = [pytest.mark.realclient]


@pytest.mark.usefixtures("realclient_ready")  # the tier check, outside the trio run
async def test_a_poisoned_row_does_not_keep_the_server_down(tmp_path: Path) -> None:
    server = realclient.HomescaleServer(tmp_path / "server")
    client: realclient.TsnetClient | None = None
    try:
        server.start()
        await server.acli("users", "create", "alice")
        key = await trio.to_thread.run_sync(server.create_key, "alice", "--reusable")
        server.stop()
        store = Store(server.data / "db.sqlite")
        try:
            alice = store.user_by_name("alice")
            assert alice is not None
            bad = store.create_node(
                machine_key=f"mkey:{7:064x}",
                node_key=f"nodekey:{7:064x}",
                disco_key=f"discokey:{7:064x}",
                given_name="poisoned",
                ipv4="100.64.0.77",
                user_id=alice.id,
                hostinfo={"Hostname": "poisoned", "RoutableIPs": ["not-a-prefix"]},
            )
        finally:
            store.close()

        since = server.log.mark()
        server.start()
        assert server.log.find(
            msg_has(f"node {bad.id} (poisoned): Hostinfo.RoutableIPs[0]", "quarantined"), since
        ), "no warning naming the node and the field"
        client = realclient.TsnetClient(tmp_path / "clients", "healthy", server.url, auth_key=key)
        client.start()
        nodes = await wait_nodes(server, ["healthy"], timeout=ONLINE_WITHIN + 15)
        healthy = node_by_name(nodes, "healthy")
        assert healthy is not None
        assert healthy["online"] is True
        await client.wait_for_log(
            msg_has("Switching ipn state", "-> Running"), timeout=RUNNING_WITHIN
        )

        listed = await server.acli("doctor", check=False)
        assert listed.returncode == 1, listed.stderr
        assert "poisoned" in listed.stdout
        assert "Hostinfo.RoutableIPs[0]" in listed.stdout
        assert "not-a-prefix" in listed.stdout

        client.stop()
        server.stop()
        fixed = await server.acli("doctor", "--fix")
        assert f"repaired nodes: {bad.id}" in fixed.stdout
        clean = await server.acli("doctor")
        assert "every stored node can be served" in clean.stdout
        since = server.log.mark()
        server.start()
        assert not server.log.find(msg_has("quarantined"), since)
    finally:
        if client is not None:
            client.stop()
        server.stop()
