"""Issue 11: two real clients that cannot reach each other directly connect through the
embedded relay, with the unmodified default config (only server_url and listen_addr
set, as `homescale init` writes them).

Each client runs in a network namespace of its own, joined to the test's namespace
by a veth pair; the test's namespace does not forward, so a client reaches the
server (on an address of the test's namespace) and nothing else -- the two clients
are as two devices behind different NATs. Only the DERP relay can carry their
traffic.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from tests import realclient
from tests.e2e.conftest import ONLINE_WITHIN, fetch_until, node_by_name, wait_nodes
from tests.realclient import HOMESCALE, LogFile, msg_has

pytestmark = [pytest.mark.realclient]

SERVER_ADDR = "10.88.0.1"  # on the test namespace's loopback: reachable from both sides


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def isolated_namespaces() -> Iterator[dict[str, str]]:
    """Two namespaces, each with a route to SERVER_ADDR only; name -> client address."""
    realclient.require_realclient()
    tag = secrets.token_hex(3)
    made: list[str] = []
    out: dict[str, str] = {}
    try:
        ip("addr", "add", f"{SERVER_ADDR}/32", "dev", "lo")
        for i, side in enumerate(("a", "b"), start=1):
            ns, host_if, ns_if = f"hs{side}-{tag}", f"hv{side}{tag}", f"nv{side}{tag}"
            ip("netns", "add", ns)
            made.append(ns)
            ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if, "netns", ns)
            ip("addr", "add", f"10.88.{i}.1/24", "dev", host_if)
            ip("link", "set", host_if, "up")
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "addr", "add", f"10.88.{i}.2/24", "dev", ns_if)
            ip("-n", ns, "link", "set", ns_if, "up")
            ip("-n", ns, "route", "add", "default", "via", f"10.88.{i}.1")
            out[ns] = f"10.88.{i}.2"
        forwarding = Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()
        assert forwarding == "0", "the test namespace must not route between the clients"
        yield out
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        subprocess.run(
            ["ip", "addr", "del", f"{SERVER_ADDR}/32", "dev", "lo"], capture_output=True, timeout=10
        )


@dataclass
class DefaultServer:
    """`homescale serve` with the config `init` writes, untouched."""

    url: str
    config: Path

    def cli(self, *args: str) -> str:
        return subprocess.run(
            [str(HOMESCALE), "-c", str(self.config), *args],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout

    def nodes(self) -> list[dict[str, Any]]:
        return list(json.loads(self.cli("nodes", "list", "-o", "json")))


@pytest.fixture
def default_server(tmp_path: Path, isolated_namespaces: dict[str, str]) -> Iterator[DefaultServer]:
    port = realclient.free_port()
    data = tmp_path / "data"
    url = f"http://{SERVER_ADDR}:{port}"
    subprocess.run(
        [str(HOMESCALE), "init", "--data-dir", str(data), "--server-url", url],
        check=True,
        capture_output=True,
        timeout=60,
    )
    config = data / "config.yaml"
    text = config.read_text()
    assert f"server_url: {url}" in text
    assert f"listen_addr: 0.0.0.0:{port}" in text
    assert "    enabled: true\n" in text  # the relay, as shipped
    log = LogFile(tmp_path / "server.log")
    with log.path.open("ab") as out:
        proc = subprocess.Popen(
            [str(HOMESCALE), "-c", str(config), "serve"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    try:
        deadline = time.monotonic() + 20
        while not log.find(msg_has("listening on", "server_url")):
            assert proc.poll() is None, log.tail()
            assert time.monotonic() < deadline, log.tail()
            time.sleep(0.1)
        yield DefaultServer(url, config)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


async def test_two_clients_behind_separate_nats_talk_through_the_default_relay(
    tmp_path: Path, isolated_namespaces: dict[str, str], default_server: DefaultServer
) -> None:
    server = default_server
    await trio.to_thread.run_sync(server.cli, "users", "create", "alice")
    out = await trio.to_thread.run_sync(
        server.cli, "preauthkeys", "create", "-u", "alice", "--reusable"
    )
    key = out.strip().splitlines()[-1]
    clients: list[realclient.TsnetClient] = []
    try:
        for name, (ns, addr) in zip(("nodea", "nodeb"), isolated_namespaces.items(), strict=True):
            c = realclient.TsnetClient(
                tmp_path, name, server.url, auth_key=key, netns=ns, proxy_host=addr
            )
            c.start()
            clients.append(c)
        nodes = await wait_nodes(server, ["nodea", "nodeb"], timeout=ONLINE_WITHIN + 15)  # type: ignore[arg-type]
        a = node_by_name(nodes, "nodea")
        assert a is not None
        body = await fetch_until(clients[1], f"{a['ipAddresses'][0]}:80", timeout=60)
        assert body == b"hello from nodea"
        # Through the relay: both clients connected to it, and it carried their packets.
        metrics = dict(line.rsplit(" ", 1) for line in await trio.to_thread.run_sync(_metrics))
        assert float(metrics["homescale_derp_accepts_total"]) >= 2
        assert float(metrics["homescale_derp_packets_sent_total"]) > 0
    finally:
        for c in clients:
            c.stop()


def _metrics() -> list[str]:
    """/metrics on the default metrics_listen_addr (127.0.0.1:9090, the test's namespace)."""
    import urllib.request

    with urllib.request.urlopen("http://127.0.0.1:9090/metrics", timeout=10) as r:
        return [x for x in r.read().decode().splitlines() if x and not x.startswith("#")]
