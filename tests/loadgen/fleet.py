"""Many simulated nodes in one trio loop, each a real ts2021 client of the server.

Light on client CPU: after the first map a node only decompresses each message and
scans it for the marker endpoints of the churn phase (``198.18.0.0/15``, the
benchmarking range, one address per change) and for a ``PacketFilter``; nothing is
JSON-parsed unless the fleet tracks views (``track=True``, for correctness tests),
then every message is applied to a peer table as the Go client does.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio

from protocol.keys import MachinePublic, PrivateKey
from protocol.mapframe import KEEPALIVE_JSON, MapFrameDecoder
from tests.protocol import ts2021client

# Go's HTTP/2 client's receive windows (x/net/http2 transportDefaultStreamFlow and
# transportDefaultConnFlow), which every Tailscale client uses: a first map of a
# megabyte then needs no window round trips.
GO_STREAM_WINDOW = 4 << 20
GO_CONN_WINDOW = 1 << 30

CAPVER = 130
MARKER_BASE = int(ipaddress.IPv4Address("198.18.0.0"))  # RFC 2544: never routed
MARKER_PORT = 41641
_MARKER = re.compile(rb'"198\.1([89])\.(\d{1,3})\.(\d{1,3}):41641"')
CONNECT_TIMEOUT = 60.0  # TCP + /key + Noise + HTTP/2 preface
REQUEST_TIMEOUT = 60.0  # a register or lite update answered
# A compressed message this small may be a keep-alive: inflated to tell (not counted).
SMALL_MESSAGE = 64


class LoadgenError(Exception):
    """A simulated node could not do its part (refused, timed out, wrong answer)."""


def now() -> float:
    """CLOCK_MONOTONIC: one clock for every process on the machine."""
    return time.monotonic()


async def sleep_until(t: float) -> None:
    """Sleep until ``now() == t`` (trio's own clock has a per-run offset)."""
    await trio.sleep(max(0.0, t - now()))


def marker_endpoint(seq: int) -> str:
    """The endpoint that carries change number ``seq`` of a churn phase."""
    return f"{ipaddress.IPv4Address(MARKER_BASE + seq)}:{MARKER_PORT}"


def _marker_seqs(raw: bytes) -> list[int]:
    return [((int(a) - 8) << 16) | (int(b) << 8) | int(c) for a, b, c in _MARKER.findall(raw)]


async def fetch_server_key(host: str, port: int) -> MachinePublic:
    """``GET /key?v=130``: the server's Noise public key, as a client's first request."""
    with trio.fail_after(CONNECT_TIMEOUT):
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            await stream.send_all(
                f"GET /key?v={CAPVER} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
            )
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise LoadgenError(f"/key answered {head[:60]!r}")
    return MachinePublic.parse(json.loads(body)["publicKey"])


@dataclass
class PeerView:
    """A client's peer table, updated from each MapResponse as controlclient does."""

    peers: dict[int, dict[str, Any]] = field(default_factory=dict)

    def apply(self, msg: dict[str, Any]) -> None:
        if msg.get("Peers") is not None:
            self.peers = {int(p["ID"]): _peer(p) for p in msg["Peers"]}
        for p in msg.get("PeersChanged") or []:
            self.peers[int(p["ID"])] = _peer(p)
        for pid in msg.get("PeersRemoved") or []:
            self.peers.pop(int(pid), None)
        for patch in msg.get("PeersChangedPatch") or []:
            peer = self.peers.get(int(patch["NodeID"]))
            if peer is None:
                continue
            for k in ("Key", "DiscoKey", "Endpoints", "Online"):
                if k in patch:
                    peer[k] = patch[k]
        for pid, online in (msg.get("OnlineChange") or {}).items():
            if int(pid) in self.peers:
                self.peers[int(pid)]["Online"] = online

    def by_key(self) -> dict[str, tuple[tuple[str, ...], bool]]:
        """node key -> (endpoints, online): what a test compares."""
        return {
            p["Key"]: (tuple(p.get("Endpoints") or ()), bool(p.get("Online")))
            for p in self.peers.values()
        }


def _peer(p: dict[str, Any]) -> dict[str, Any]:
    return {k: p.get(k) for k in ("Key", "DiscoKey", "Endpoints", "Online")}


@dataclass
class Churn:
    """The churn schedule every process shares: change ``seq`` happens at
    ``t0 + seq / rate``, made by node ``seq % total``."""

    t0: float
    rate: float
    total: int
    hist_ms: dict[int, int] = field(default_factory=dict)  # latency (ms) -> count
    max_s: float = 0.0

    def due(self, seq: int) -> float:
        return self.t0 + seq / self.rate

    def record(self, latency: float) -> None:
        ms = max(0, int(latency * 1000))
        self.hist_ms[ms] = self.hist_ms.get(ms, 0) + 1
        self.max_s = max(self.max_s, latency)


class SimNode:
    """One simulated node: its keys, its endpoint, and what it has seen."""

    def __init__(self, index: int, hostname: str, *, track: bool, measured: bool = True) -> None:
        self.index = index
        self.hostname = hostname
        # A node not measured reads every byte (the server's work is the same) but does
        # not inflate and parse its messages: at 5,000 nodes, checking every delivery
        # of a churn would take the CPU the server shares.
        self.measured = measured
        self.machine = PrivateKey.generate()
        self.node = PrivateKey.generate()
        self.disco = PrivateKey.generate()
        self.node_key = str(self.node.node_public())
        self.endpoints = [f"192.0.2.{1 + index % 250}:{10000 + index % 50000}"]
        # Its own loopback source address, as real nodes each have their own IP (the
        # server caps connections per IP).
        self.source_ip = str(ipaddress.IPv4Address("127.100.0.0") + 1 + index)
        self.os_version = ""  # a Hostinfo detail no patch carries: set it to force a full node
        self.view = PeerView() if track else None
        self.received: list[dict[str, Any]] | None = None  # set to [] to keep every message
        self.client: ts2021client.TS2021Client | None = None
        self.scope: trio.CancelScope | None = None
        self.done = trio.Event()  # the current session ended
        self.done.set()
        self.first = trio.Event()  # the current session's first map arrived
        self.first_at = 0.0
        self.handshake_s = 0.0
        self.register_s = 0.0
        self.messages = 0
        self.latest: dict[int, int] = {}  # peer index -> newest churn seq seen
        self.policy_armed = False
        self.policy_seen = trio.Event()
        self.policy_seen_at = 0.0
        self.error = ""

    def hostinfo(self) -> dict[str, Any]:
        hi = {"Hostname": self.hostname, "OS": "linux", "IPNVersion": "1.90.9-loadgen"}
        return hi | ({"OSVersion": self.os_version} if self.os_version else {})

    def map_request(self, *, stream: bool) -> bytes:
        return json.dumps(
            {
                "Version": CAPVER,
                "Compress": "zstd",
                "KeepAlive": True,
                "NodeKey": self.node_key,
                "DiscoKey": str(self.disco.disco_public()),
                "Endpoints": self.endpoints,
                "Stream": stream,
                "OmitPeers": not stream,
                "Hostinfo": self.hostinfo(),
            }
        ).encode()

    async def session(
        self,
        fleet: Fleet,
        auth_key: str | None,
        limiter: trio.CapacityLimiter | None = None,
    ) -> None:
        """One control connection: connect, (register,) stream the map until cancelled.

        ``Fleet._start`` resets ``first`` and ``done`` before starting it."""
        self.error = ""
        raw: trio.SocketStream | None = None
        try:
            with trio.CancelScope() as self.scope:
                async with trio.open_nursery() as nursery:
                    async with limiter if limiter is not None else _nothing():
                        with trio.fail_after(CONNECT_TIMEOUT):
                            t = now()
                            raw = await trio.open_tcp_stream(
                                fleet.host, fleet.port, local_address=self.source_ip
                            )
                            client = await ts2021client.connect(
                                raw,
                                fleet.server_key,
                                machine=self.machine,
                                window=GO_STREAM_WINDOW,
                                conn_window=GO_CONN_WINDOW,
                            )
                            self.handshake_s = now() - t
                            await nursery.start(client.run)
                        self.client = client
                        if auth_key is not None:
                            t = now()
                            await self._register(client, auth_key)
                            self.register_s = now() - t
                        st = await client.open(
                            "POST", "/machine/map", self.map_request(stream=True)
                        )
                        with trio.fail_after(CONNECT_TIMEOUT):
                            await st.headers_ready.wait()
                        if st.status != 200:
                            raise LoadgenError(f"map stream answered {st.status}")
                        decoder = MapFrameDecoder()
                        with trio.fail_after(CONNECT_TIMEOUT):
                            while not self.first.is_set():
                                await self._read(client, st, decoder, fleet)
                    await client.consume(st, partial(self._feed, decoder, fleet))
                    raise EOFError("map stream ended")
        except Exception as e:  # any failure ends this node's session only; counted
            leaf: BaseException = e
            while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
                leaf = leaf.exceptions[0]
            self.error = f"{type(leaf).__name__}: {leaf}"
            fleet.errors.append(f"{self.hostname}: {self.error}")
        finally:
            self.client = None
            if raw is not None:
                await trio.aclose_forcefully(raw)
            self.done.set()

    async def _register(self, client: ts2021client.TS2021Client, auth_key: str) -> None:
        body = {
            "Version": CAPVER,
            "NodeKey": self.node_key,
            "OldNodeKey": "nodekey:" + "0" * 64,
            "Auth": {"AuthKey": auth_key},
            "Hostinfo": self.hostinfo(),
        }
        with trio.fail_after(REQUEST_TIMEOUT):
            status, data = await client.request(
                "POST", "/machine/register", json.dumps(body).encode()
            )
        answer = json.loads(data) if status == 200 else {}
        if status != 200 or answer.get("Error") or not answer.get("MachineAuthorized"):
            raise LoadgenError(f"register answered {status}: {data[:200]!r}")

    async def _read(
        self,
        client: ts2021client.TS2021Client,
        st: ts2021client.ClientStream,
        decoder: MapFrameDecoder,
        fleet: Fleet,
    ) -> None:
        chunk = await client.read(st)
        if not chunk:
            raise EOFError("map stream ended")
        self._feed(decoder, fleet, chunk)

    def _feed(self, decoder: MapFrameDecoder, fleet: Fleet, chunk: bytes) -> None:
        decoder.receive_data(chunk)
        while True:
            if self._reads_contents():
                if (raw := decoder.next_message()) is None:
                    return
                self._on_message(raw, fleet)
            elif (body := decoder.next_frames()) is not None:
                # Counted only (frames checked). An untracked node's first map is a
                # megabyte at 5,000 nodes; inflating it would take CPU the server shares.
                if not self.first.is_set():
                    self._first_map(now())
                elif len(body) > SMALL_MESSAGE or decoder.inflate(body) != KEEPALIVE_JSON:
                    self.messages += 1
            else:
                return

    def _reads_contents(self) -> bool:
        if self.view is not None or self.received is not None:
            return True
        return self.first.is_set() and (self.measured or self.policy_armed)

    def _first_map(self, t: float) -> None:
        self.messages += 1
        self.first_at = t
        self.first.set()

    def _on_message(self, raw: bytes, fleet: Fleet) -> None:
        t = now()
        if raw == KEEPALIVE_JSON:
            return
        if self.view is not None or self.received is not None:
            msg = json.loads(raw)
            if self.view is not None:
                self.view.apply(msg)
            if self.received is not None:
                self.received.append(msg)
        if not self.first.is_set():
            self._first_map(t)
            return
        self.messages += 1
        if self.policy_armed and b'"PacketFilter"' in raw:
            self.policy_armed = False
            self.policy_seen_at = t
            self.policy_seen.set()
        churn = fleet.churn
        if churn is not None:
            for seq in _marker_seqs(raw):
                peer = seq % churn.total
                if peer != self.index and seq > self.latest.get(peer, -1):
                    self.latest[peer] = seq
                    churn.record(t - churn.due(seq))

    async def lite_update(self, endpoints: list[str]) -> None:
        """Report new endpoints on a short request, as a client does between polls."""
        client = self.client
        if client is None:
            raise LoadgenError(f"{self.hostname} is not connected")
        self.endpoints = endpoints
        with trio.fail_after(REQUEST_TIMEOUT):
            status, data = await client.request(
                "POST", "/machine/map", self.map_request(stream=False)
            )
        if status != 200:
            raise LoadgenError(f"lite update answered {status}: {data[:200]!r}")


class _nothing:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


class Fleet:
    """Nodes ``first_index .. first_index+count-1`` of a load test, in this trio loop."""

    def __init__(
        self,
        host: str,
        port: int,
        server_key: MachinePublic,
        *,
        first_index: int,
        count: int,
        track: bool = False,
        prefix: str = "sim",
        measure_every: int = 1,
    ) -> None:
        self.host, self.port, self.server_key = host, port, server_key
        self.nodes = [
            SimNode(i, f"{prefix}{i}", track=track, measured=i % measure_every == 0)
            for i in range(first_index, first_index + count)
        ]
        self.errors: list[str] = []
        self.churn: Churn | None = None
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the nodes' sessions until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def _start(self, nodes: list[SimNode], auth_key: str | None, concurrency: int) -> None:
        assert self._nursery is not None, "Fleet.run first"
        limiter = trio.CapacityLimiter(concurrency) if concurrency else None
        for n in nodes:
            n.first, n.done = trio.Event(), trio.Event()
            self._nursery.start_soon(n.session, self, auth_key, limiter)

    async def _first_maps(self, nodes: list[SimNode], timeout: float) -> None:
        with trio.move_on_after(timeout):
            for n in nodes:
                while not n.first.is_set():
                    if n.done.is_set():
                        break  # failed: counted in errors
                    with trio.move_on_after(0.5):
                        await n.first.wait()

    async def register(
        self, auth_key: str, *, concurrency: int = 16, timeout: float = 600.0
    ) -> dict[str, Any]:
        """Register every node and open its map stream; per-node figures."""
        t0 = now()
        self._start(self.nodes, auth_key, concurrency)
        await self._first_maps(self.nodes, timeout)
        ok = [n for n in self.nodes if n.first.is_set()]
        return {
            "register_s": [n.register_s for n in ok],
            "first_map_s": [n.first_at - t0 for n in ok],
            "missing": len(self.nodes) - len(ok),
            "errors": self.errors[-5:],
            "messages": self.messages(),
        }

    def messages(self) -> int:
        """Map messages (not keep-alives) received so far by this fleet's nodes."""
        return sum(n.messages for n in self.nodes)

    async def drop(self, nodes: list[SimNode] | None = None, timeout: float = 60.0) -> None:
        """Hang up abruptly (as a crash or a network loss would)."""
        nodes = self.nodes if nodes is None else nodes
        for n in nodes:
            if n.scope is not None:
                n.scope.cancel()
        with trio.move_on_after(timeout):
            for n in nodes:
                await n.done.wait()

    async def reconnect(
        self, t0: float, nodes: list[SimNode] | None = None, timeout: float = 600.0
    ) -> dict[str, Any]:
        """All at once: a new connection and map stream each (already registered)."""
        nodes = self.nodes if nodes is None else nodes
        self.errors.clear()
        self._start(nodes, None, 0)
        await self._first_maps(nodes, timeout)
        ok = [n for n in nodes if n.first.is_set()]
        return {
            "first_map_s": [n.first_at - t0 for n in ok],
            "handshake_s": [n.handshake_s for n in ok],
            "missing": len(nodes) - len(ok),
            "errors": self.errors[-5:],
            "messages": self.messages(),
        }

    async def churn_phase(self, churn: Churn, duration: float, grace: float) -> dict[str, Any]:
        """Make this fleet's share of the scheduled changes; measure what the measured
        nodes see of everyone's."""
        self.churn = churn
        mine = {n.index: n for n in self.nodes}
        count = int(duration * churn.rate)
        lag = 0.0
        failed = 0
        answered: list[float] = []  # from each change's due time to the server's answer
        async with trio.open_nursery() as nursery:
            for seq in range(count):
                node = mine.get(seq % churn.total)
                if node is None:
                    continue
                await sleep_until(churn.due(seq))
                lag = max(lag, now() - churn.due(seq))

                async def change(node: SimNode = node, seq: int = seq) -> None:
                    nonlocal failed
                    try:
                        await node.lite_update([marker_endpoint(seq)])
                        answered.append(now() - churn.due(seq))
                    except (LoadgenError, trio.TooSlowError, trio.BrokenResourceError):
                        failed += 1

                nursery.start_soon(change)
        # Let the last changes arrive, then compare every node's newest with the last made.
        await sleep_until(churn.due(count) + grace)
        final = {}
        for seq in range(count):
            final[seq % churn.total] = seq
        # Measured nodes whose stream is up (the others are reported missing by
        # register/storm).
        live = [n for n in self.nodes if n.measured and n.first.is_set() and not n.done.is_set()]
        lost = sum(
            1
            for n in live
            for peer, seq in final.items()
            if peer != n.index and n.latest.get(peer, -1) != seq
        )
        self.churn = None
        return {
            "hist_ms": churn.hist_ms,
            "max_s": churn.max_s,
            "lost": lost,
            "failed": failed,
            "sender_lag_s": lag,
            "answered_s": answered,
        }

    def arm_policy(self) -> None:
        for n in self.nodes:
            n.policy_armed, n.policy_seen_at, n.policy_seen = True, 0.0, trio.Event()

    async def policy_seen(self, deadline: float) -> list[float]:
        """When each node got a new PacketFilter (absolute), waiting until ``deadline``."""
        with trio.move_on_after(max(0.0, deadline - now())):
            for n in self.nodes:
                if n.first.is_set() and not n.done.is_set():  # a live stream
                    await n.policy_seen.wait()
        return [n.policy_seen_at for n in self.nodes if not n.policy_armed]

    def views(self) -> dict[str, dict[str, tuple[tuple[str, ...], bool]]]:
        """node key -> its peers (node key -> (endpoints, online)), for a tracking fleet;
        only nodes whose map stream is up."""
        return {
            n.node_key: n.view.by_key()
            for n in self.nodes
            if n.view is not None and n.first.is_set() and not n.done.is_set()
        }


def percentiles(values: list[float]) -> tuple[float, float, float]:
    """(p50, p99, max) of ``values``; NaN for none."""
    if not values:
        return math.nan, math.nan, math.nan
    s = sorted(values)
    return s[len(s) // 2], s[min(len(s) - 1, math.ceil(len(s) * 0.99) - 1)], s[-1]


def hist_percentiles(hist_ms: dict[int, int]) -> tuple[float, float, int]:
    """(p50, p99) in seconds and the count, from a latency histogram in ms."""
    total = sum(hist_ms.values())
    if not total:
        return math.nan, math.nan, 0
    out = []
    for q in (0.5, 0.99):
        want, acc = q * total, 0
        for ms in sorted(hist_ms):
            acc += hist_ms[ms]
            if acc >= want:
                out.append(ms / 1000)
                break
    return out[0], out[1], total
