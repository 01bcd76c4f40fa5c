"""Issue 12 with real clients: `--advertise-tags` on an interactive login; Taildrop.

A tsnet 1.90.9 node started with tags and no key asks for them in its
RegisterRequest (Hostinfo.RequestTags). When the admin completes the login for a
user who owns the tags per tagOwners, the node joins owned by its tags (as
headscale); for a user who does not, the admin's command fails naming the tags and
the waiting client is told why.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests import realclient
from tests.e2e.conftest import ONLINE_WITHIN, RUNNING_WITHIN, node_by_name, wait_nodes
from tests.realclient import msg_has

pytestmark = [pytest.mark.realclient]

POLICY = """{
  "tagOwners": {"tag:web": ["alice@"]},
  "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
}
"""


@pytest.fixture
def server(tmp_path: Path, realclient_ready: None) -> Iterator[realclient.HomescaleServer]:
    policy = tmp_path / "policy.hujson"
    policy.write_text(POLICY)
    srv = realclient.HomescaleServer(tmp_path)
    srv.set_policy_mode("file", policy)
    srv.start()
    try:
        srv.cli("users", "create", "alice")
        srv.cli("users", "create", "bob")
        yield srv
    finally:
        srv.stop()


async def auth_id_of(c: realclient.TsnetClient, server: realclient.HomescaleServer) -> str:
    line = await c.log.wait_for(msg_has("/register/"), timeout=20, what="the AuthURL")
    msg = str(line["msg"])
    return msg[msg.index(server.url) :].split()[0].rsplit("/", 1)[-1]


async def test_owner_gets_a_tagged_node(server: realclient.HomescaleServer, tmp_path: Path) -> None:
    c = realclient.TsnetClient(tmp_path, "webby", server.url, tags=("tag:web",))
    c.start()
    try:
        auth_id = await auth_id_of(c, server)
        await server.acli("auth", "register", "-u", "alice", "--auth-id", auth_id)
        nodes = await wait_nodes(server, ["webby"], timeout=ONLINE_WITHIN)
        node = node_by_name(nodes, "webby")
        assert node is not None
        assert node["tags"] == ["tag:web"]
        assert node["user"]["name"] == "tagged-devices"
        # The client sees itself owned by its tag, not by alice.
        await c.log.wait_for(msg_has("netmap: self:", "u=tagged-devices"), timeout=20)
    finally:
        c.stop()


async def test_non_owner_is_refused_with_the_reason(
    server: realclient.HomescaleServer, tmp_path: Path
) -> None:
    c = realclient.TsnetClient(tmp_path, "sneaky", server.url, tags=("tag:web",))
    c.start()
    try:
        auth_id = await auth_id_of(c, server)
        since = c.log.mark()
        r = await server.acli("auth", "register", "-u", "bob", "--auth-id", auth_id, check=False)
        assert r.returncode != 0
        assert "bob does not own tag:web" in r.stderr
        await c.log.wait_for(
            msg_has("bob does not own tag:web"),
            since=since,
            timeout=20,
            what="the client reporting the refusal",
        )
        assert node_by_name(await server.anodes(), "sneaky") is None
    finally:
        c.stop()


async def test_taildrop_capability_in_the_clients_netmap(
    server: realclient.HomescaleServer, tmp_path: Path
) -> None:
    """taildrop.enabled (the default): the node's own netmap carries the file-sharing
    capability the client needs to offer Taildrop; the client takes the map (Running)."""
    key = await trio.to_thread.run_sync(server.create_key, "alice")
    c = realclient.TsnetClient(tmp_path, "drop", server.url, auth_key=key)
    c.start()
    try:
        nodes = await wait_nodes(server, ["drop"], timeout=ONLINE_WITHIN)
        node = node_by_name(nodes, "drop")
        assert node is not None
        await c.log.wait_for(msg_has("Switching ipn state", "-> Running"), timeout=RUNNING_WITHIN)
        full = [m for m in realclient.sent_maps(server.log.refresh(), node["id"]) if "Node" in m]
        assert full, "no full map in the server's debug log"
        assert full[0]["Node"]["CapMap"]["https://tailscale.com/cap/file-sharing"] == []
        # headscale's metric names, which its dashboards graph, count this session too.
        metrics = await trio.to_thread.run_sync(server.metrics)
        assert metrics['headscale_mapresponse_endpoint_updates_total{status="ok"}'] >= 1
        assert metrics["headscale_nodestore_nodes"] == 1
    finally:
        c.stop()
    ended = 'headscale_mapresponse_ended_total{reason="done"}'
    with trio.fail_after(15):
        while True:  # the server notices the client's departure (polled: another process)
            if (await trio.to_thread.run_sync(server.metrics)).get(ended, 0) >= 1:
                break
            await trio.sleep(0.2)


async def test_extra_records_file_edit_reaches_the_client(tmp_path: Path) -> None:
    """dns.extra_records_path is watched: an edit reaches a connected real client as a new
    DNSConfig, and the client applies it (its DNS then holds the new host)."""
    realclient.require_realclient()
    records = tmp_path / "records.json"
    records.write_text('[{"name": "old.example.internal", "type": "A", "value": "100.64.0.50"}]')
    srv = realclient.HomescaleServer(tmp_path)
    text = srv.config.read_text()
    assert "  extra_records: []\n" in text
    srv.config.write_text(
        text.replace(
            "  extra_records: []\n", f"  extra_records: []\n  extra_records_path: {records}\n"
        )
    )
    srv.start()
    try:
        srv.cli("users", "create", "alice")
        key = await trio.to_thread.run_sync(srv.create_key, "alice")
        c = realclient.TsnetClient(tmp_path, "dnsy", srv.url, auth_key=key)
        c.start()
        try:
            node = node_by_name(await wait_nodes(srv, ["dnsy"], timeout=ONLINE_WITHIN), "dnsy")
            assert node is not None
            await c.log.wait_for(
                msg_has("Switching ipn state", "-> Running"), timeout=RUNNING_WITHIN
            )
            server_mark, client_mark = srv.log.mark(), c.log.mark()
            # One record more: the client's DNS then holds one host more (itself, old, new).
            records.write_text(
                '[{"name": "old.example.internal", "type": "A", "value": "100.64.0.50"},'
                ' {"name": "grafana.example.internal", "type": "A", "value": "100.64.0.3"}]'
            )

            def dns_delta(line: dict[str, object]) -> bool:
                return any(
                    "grafana.example.internal" in json.dumps(m.get("DNSConfig"))
                    for m in realclient.sent_maps([line], node["id"])
                )

            await srv.log.wait_for(dns_delta, since=server_mark, timeout=10, what="the DNS delta")
            await c.log.wait_for(
                msg_has("dns: Set:", "Hosts:3"),
                since=client_mark,
                timeout=10,
                what="the client's DNS holding the new record",
            )
        finally:
            c.stop()
    finally:
        srv.stop()


def http(method: str, url: str, body: bytes | None = None) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


async def test_verify_and_bootstrap_dns(server: realclient.HomescaleServer, tmp_path: Path) -> None:
    """`POST /verify` (an external derper's --verify-client-url) admits a real client's
    node key and no other; `/bootstrap-dns` gives the DERP map's hostnames' addresses."""
    key = await trio.to_thread.run_sync(server.create_key, "alice")
    c = realclient.TsnetClient(tmp_path, "verified", server.url, auth_key=key)
    c.start()
    try:
        node = node_by_name(
            await wait_nodes(server, ["verified"], timeout=ONLINE_WITHIN), "verified"
        )
        assert node is not None

        async def verify(body: bytes) -> tuple[int, bytes]:
            return await trio.to_thread.run_sync(http, "POST", f"{server.url}/verify", body)

        ok = json.dumps({"NodePublic": node["nodeKey"], "Source": "127.0.0.1"}).encode()
        assert await verify(ok) == (200, b'{"Allow": true}')
        other = json.dumps({"NodePublic": "nodekey:" + "ab" * 32}).encode()
        assert await verify(other) == (200, b'{"Allow": false}')
        assert (await verify(b'{"NodePublic": 5}'))[0] == 400
        assert (await verify(b"{" * 5000))[0] == 413
        get = await trio.to_thread.run_sync(http, "GET", f"{server.url}/verify")
        assert get[0] == 405
    finally:
        c.stop()
    status, body = await trio.to_thread.run_sync(
        http, "GET", f"{server.url}/bootstrap-dns?q=127.0.0.1"
    )
    assert status == 200
    assert json.loads(body) == {"127.0.0.1": ["127.0.0.1"]}


async def test_ping_request_answered_then_a_hung_client_does_not(
    server: realclient.HomescaleServer, tmp_path: Path
) -> None:
    """The HA probe's PingRequest (/debug/ping sends the same one): a real client answers
    with HEAD /machine/ping-response; frozen (SIGSTOP) it stays connected but does not
    answer -- the case HA probing fails a primary router over for."""
    import signal

    key = await trio.to_thread.run_sync(server.create_key, "alice")
    c = realclient.TsnetClient(tmp_path, "pingy", server.url, auth_key=key)
    c.start()
    try:
        node = node_by_name(await wait_nodes(server, ["pingy"], timeout=ONLINE_WITHIN), "pingy")
        assert node is not None
        await c.log.wait_for(msg_has("Switching ipn state", "-> Running"), timeout=RUNNING_WITHIN)
        url = f"http://127.0.0.1:{server.metrics_port}/debug/ping?node={node['id']}"
        status, body = await trio.to_thread.run_sync(http, "GET", url)
        answer = json.loads(body)
        assert status == 200
        assert answer["connected"] is True
        assert answer["latency"] is not None
        assert c.proc is not None
        c.proc.send_signal(signal.SIGSTOP)
        try:
            status, body = await trio.to_thread.run_sync(http, "GET", url)
            answer = json.loads(body)
            assert (answer["connected"], answer["latency"]) == (True, None)
        finally:
            c.proc.send_signal(signal.SIGCONT)
    finally:
        c.stop()
