"""Shared fixtures for end-to-end tests with real Tailscale clients.

One ``homescale serve`` process (free ports, debug log) serves the whole session;
nodes that several tests only read from are started once too. Tests that change
or kill a node start their own. Everything skips unless the run is inside a
private network namespace (tests/in-netns.sh), with the reason.

Shared processes are Popen children (pytest-trio gives each test its own trio
run, so nothing started in one test's nursery could outlive it); each fixture
stops what it started, whatever happened.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytest
import trio

from protocol.keys import MachinePublic, PrivateKey
from protocol.mapframe import MapFrameDecoder
from tests import realclient
from tests.loadgen.fleet import fetch_server_key
from tests.protocol import ts2021client

# Issue 3: "online with addresses within 15 s" of the client starting.
ONLINE_WITHIN = 15.0
# A node reaches ipn state Running after netcheck (captive-portal probes and
# the UDP check take about 6 s in the namespace); allow for a busy machine.
RUNNING_WITHIN = 40.0


@pytest.fixture
def realclient_ready() -> None:
    """The realclient tier: skips locally (with the reason), fails in CI, unless real
    clients can run hermetically here."""
    realclient.require_realclient()


@pytest.fixture
def throwaway_ca(tmp_path: Path) -> realclient.ThrowawayCA:
    return realclient.make_test_ca(tmp_path / "tls")


# --- the server -------------------------------------------------------------------


@dataclass
class Tailnet:
    """The session's server with a user ``alice`` and a reusable key for her."""

    server: realclient.HomescaleServer
    dir: Path
    reusable_key: str
    clients: list[realclient.TsnetClient] = field(default_factory=list)

    def client(
        self,
        name: str,
        *,
        auth_key: str | None = None,
        ephemeral: bool = False,
        always_derp: bool = False,
        start: bool = True,
    ) -> realclient.TsnetClient:
        """A tsnet node in its own caddy process, stopped at the end of the session."""
        env = {"TS_DEBUG_ALWAYS_USE_DERP": "true"} if always_derp else {}
        c = realclient.TsnetClient(
            self.dir,
            name,
            self.server.url,
            auth_key=self.reusable_key if auth_key is None else auth_key,
            ephemeral=ephemeral,
            extra_env=env,
        )
        self.clients.append(c)
        if start:
            c.start()
        return c


def _stop_all(clients: list[realclient.TsnetClient]) -> None:
    for c in clients:
        try:
            c.stop()
        except Exception:  # stop every other one whatever this one did
            c.kill()


@pytest.fixture(scope="session")
def tailnet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tailnet]:
    realclient.require_realclient()
    d = tmp_path_factory.mktemp("tailnet")
    # A short inactivity timeout so the ephemeral test sees the deletion.
    server = realclient.HomescaleServer(d, ephemeral_timeout="4s")
    server.start()
    try:
        server.cli("users", "create", "alice")
        tn = Tailnet(server, d, server.create_key("alice", "--reusable"))
        try:
            yield tn
        finally:
            _stop_all(tn.clients)
    finally:
        server.stop()


# --- nodes shared by tests that only look -----------------------------------------


@dataclass
class Pair:
    a: realclient.TsnetClient
    b: realclient.TsnetClient
    ids: dict[str, str]
    ipv4: dict[str, str]
    online_after: float


def node_by_name(nodes: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    return next((n for n in nodes if n.get("givenName") == name), None)


def wait_nodes_sync(
    server: realclient.HomescaleServer, names: list[str], *, timeout: float, online: bool = True
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    nodes: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        nodes = server.nodes()
        found = [node_by_name(nodes, n) for n in names]
        if all(f is not None and f.get("online") is online for f in found):
            return nodes
        time.sleep(0.2)
    pytest.fail(f"nodes {names} not online={online} within {timeout} s: {json.dumps(nodes)[:2000]}")


async def wait_nodes(
    server: realclient.HomescaleServer, names: list[str], *, timeout: float, online: bool = True
) -> list[dict[str, Any]]:
    return await trio.to_thread.run_sync(
        lambda: wait_nodes_sync(server, names, timeout=timeout, online=online)
    )


def _pair(tn: Tailnet, a: str, b: str, *, always_derp: bool) -> Pair:
    t0 = time.monotonic()
    ca = tn.client(a, always_derp=always_derp)
    cb = tn.client(b, always_derp=always_derp)
    nodes = wait_nodes_sync(tn.server, [a, b], timeout=ONLINE_WITHIN + 15)
    online_after = time.monotonic() - t0
    for c in (ca, cb):
        c.log.wait_for_sync(
            realclient.msg_has("Switching ipn state", "-> Running"),
            timeout=RUNNING_WITHIN,
            what=f"{c.name} Running",
        )
    found = {n: node_by_name(nodes, n) for n in (a, b)}
    return Pair(
        ca,
        cb,
        ids={n: str(f["id"]) for n, f in found.items() if f},
        ipv4={n: f["ipAddresses"][0] for n, f in found.items() if f},
        online_after=online_after,
    )


@pytest.fixture(scope="session")
def pair(tailnet: Tailnet) -> Pair:
    """nodea and nodeb, registered with the reusable key; direct paths allowed."""
    return _pair(tailnet, "nodea", "nodeb", always_derp=False)


async def fetch_until(via: realclient.TsnetClient, target: str, *, timeout: float = 30.0) -> bytes:
    """GET / from ``target`` through ``via``, retrying until a 200 (paths take a moment)."""
    last: object = None
    with trio.move_on_after(timeout):
        while True:
            try:
                status, body = await via.fetch(target, timeout=8)
                if status == 200:
                    return body
                last = (status, body[:200])
            except (OSError, trio.TooSlowError) as e:
                last = e
            await trio.sleep(0.5)
    pytest.fail(
        f"no page from {target} through {via.name} within {timeout} s (last: {last!r}); "
        f"{via.name} log:\n{via.log.tail(30)}"
    )


# --- our own ts2021 peer ------------------------------------------------------------


class Listening(Protocol):
    """A control server on 127.0.0.1: a `homescale serve` process, or an in-process site."""

    @property
    def port(self) -> int: ...


async def server_public_key(server: Listening) -> MachinePublic:
    return await fetch_server_key("127.0.0.1", server.port)


@dataclass
class ControlPeer:
    """A node driven by the test over real ts2021 (tests/protocol/ts2021client.py)."""

    client: ts2021client.TS2021Client
    machine: PrivateKey
    node: PrivateKey
    disco: PrivateKey
    hostname: str

    @property
    def node_key(self) -> str:
        return str(self.node.node_public())

    async def post(self, path: str, obj: Any) -> tuple[int, bytes]:
        body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        return await self.client.request("POST", path, body)

    async def register(self, auth_key: str) -> dict[str, Any]:
        status, body = await self.post(
            "/machine/register",
            {
                "Version": 130,
                "NodeKey": self.node_key,
                "OldNodeKey": "nodekey:" + "0" * 64,
                "Auth": {"AuthKey": auth_key},
                "Hostinfo": self.hostinfo(),
            },
        )
        assert status == 200, body
        out: dict[str, Any] = json.loads(body)
        return out

    def hostinfo(self, **extra: Any) -> dict[str, Any]:
        return {"Hostname": self.hostname, "OS": "linux", "IPNVersion": "1.90.9-test", **extra}

    def map_request(
        self, *, stream: bool, omit_peers: bool = False, **extra: Any
    ) -> dict[str, Any]:
        return {
            "Version": 130,
            "Compress": "zstd",
            "KeepAlive": True,
            "NodeKey": self.node_key,
            "DiscoKey": str(self.disco.disco_public()),
            "Stream": stream,
            "OmitPeers": omit_peers,
            "Hostinfo": self.hostinfo(),
            **extra,
        }

    async def open_stream(self, **extra: Any) -> MapStream:
        st = await self.client.open(
            "POST", "/machine/map", json.dumps(self.map_request(stream=True, **extra)).encode()
        )
        with trio.fail_after(10):
            await st.headers_ready.wait()
        assert st.status == 200, st.status
        return MapStream(self, st)

    async def lite_update(self, **extra: Any) -> None:
        status, body = await self.post(
            "/machine/map", self.map_request(stream=False, omit_peers=True, **extra)
        )
        assert status == 200, body


@dataclass
class MapStream:
    peer: ControlPeer
    st: ts2021client.ClientStream
    decoder: MapFrameDecoder = field(default_factory=MapFrameDecoder)

    async def next(
        self, *, timeout: float = 10.0, skip_keepalive: bool = True
    ) -> tuple[int, dict[str, Any]]:
        """The next message as (JSON size in bytes, decoded object)."""
        with trio.fail_after(timeout):
            while True:
                raw = self.decoder.next_message()
                if raw is not None:
                    obj = json.loads(raw)
                    if skip_keepalive and obj.get("KeepAlive"):
                        continue
                    return len(raw), obj
                chunk = await self.peer.client.read(self.st)
                if not chunk:
                    raise EOFError("map stream ended")
                self.decoder.receive_data(chunk)


async def connect_peer(
    server: Listening,
    nursery: trio.Nursery,
    hostname: str,
    *,
    machine: PrivateKey | None = None,
    window: int = 65535,
) -> ControlPeer:
    """A ts2021 connection to the real server (plain TCP, as the Go client's http:// dial),
    with HTTP/2 stream window `window`."""
    key = await server_public_key(server)
    raw = await trio.open_tcp_stream("127.0.0.1", server.port)
    machine = machine or PrivateKey.generate()
    client = await ts2021client.connect(raw, key, machine=machine, window=window)
    await nursery.start(client.run)
    return ControlPeer(client, machine, PrivateKey.generate(), PrivateKey.generate(), hostname)
