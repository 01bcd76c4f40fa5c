"""Issue 9: the adversarial suite against a running server with real tsnet clients.

One ``homescale serve`` (embedded DERP, STUN, verify_clients on) with two real
tsnet nodes (the session's ``pair``). Each hostile input below goes to it as an
attacker would send it, and after each: the server is alive, the stored rows
are unchanged, both real nodes still hold their map sessions, and the server's
log has one line for that input (naming the peer address, or the machine key
for requests inside Noise) and no traceback. After each class, a real node
still fetches a page from the other through the tailnet, and (for the ts2021
class) still receives the deltas of a peer's change.

Inputs that work by stalling (slowloris head, half a body, half a Noise record,
half an HTTP/2 frame) run side by side, so the file stays well under 90 s.
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
from collections.abc import Awaitable, Callable
from typing import Any

import nacl.public
import pytest
import trio

from derp.codec import FrameType, encode_frame
from protocol.keys import PrivateKey
from tests import realclient
from tests.derp.test_derp_hostile import sealed_client_info
from tests.e2e.conftest import (
    ControlPeer,
    Pair,
    Tailnet,
    fetch_until,
    server_public_key,
)
from tests.protocol import ts2021client

pytestmark = [pytest.mark.realclient]

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FAILURE_WORDS = ("refused", "dropped", "error", "failed", "malformed", "closed", "invalid")


# --- what must hold after every input ---------------------------------------------


def snapshot(server: realclient.HomescaleServer) -> dict[str, Any]:
    """What is stored, without what merely moves (last seen, a node's own reports)."""
    db = sqlite3.connect(f"file:{server.data / 'db.sqlite'}?mode=ro", uri=True, timeout=10)
    try:
        q = db.execute
        return {
            "users": q("SELECT id, name, display_name, email FROM users ORDER BY id").fetchall(),
            "keys": q(
                "SELECT id, prefix, user_id, reusable, ephemeral, used, tags, expiration "
                "FROM pre_auth_keys ORDER BY id"
            ).fetchall(),
            "apikeys": q("SELECT id, prefix, expiration FROM api_keys ORDER BY id").fetchall(),
            "nodes": q(
                "SELECT id, machine_key, node_key, given_name, ipv4, ipv6, user_id, tags, "
                "expiry, approved_routes FROM nodes ORDER BY id"
            ).fetchall(),
            "policies": q("SELECT COUNT(*) FROM policies").fetchall(),
            # Values no Go client could decode must never be stored anywhere.
            "poison": q(
                "SELECT id FROM nodes WHERE hostinfo LIKE '%not-a-prefix%' OR endpoints LIKE "
                "'%not-an-endpoint%' OR endpoints LIKE '%:70000%' OR hostinfo LIKE "
                "'%1180591620717411303424%'"
            ).fetchall(),
        }
    finally:
        db.close()


async def http_exchange(
    server: realclient.HomescaleServer, data: bytes, *, timeout: float = 10
) -> tuple[bytes, int]:
    """Send ``data`` on a fresh connection; (all the server answered until it closed, our port)."""
    out = b""
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        port = stream.socket.getsockname()[1]
        async with stream:
            try:
                await stream.send_all(data)
                while chunk := await stream.receive_some(65536):
                    out += chunk
            except trio.BrokenResourceError:
                pass
    return out, port


class Checks:
    """The invariants, checked after each input (`after`) and after each class (`unharmed`)."""

    def __init__(self, tailnet: Tailnet, pair: Pair) -> None:
        self.tn = tailnet
        self.server = tailnet.server
        self.pair = pair
        self.before = snapshot(self.server)
        self.start = self.server.log.mark()

    def rebase(self) -> None:
        """Take the stored state as it is now (after the test's own, legitimate writes)."""
        self.before = snapshot(self.server)

    async def after(self, what: str, since: int, needle: str) -> None:
        reply, _ = await http_exchange(
            self.server, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert reply.startswith(b"HTTP/1.1 200"), (what, reply[:200])
        assert self.server.running, what
        assert snapshot(self.server) == self.before, f"{what}: something was stored"
        online = self.server.metrics().get("homescale_nodes_online", 0)
        assert online >= 2, f"{what}: the real nodes lost their map sessions ({online} online)"

        def is_its_line(ln: dict[str, Any]) -> bool:
            m = str(ln.get("msg", ""))
            return (
                needle in m
                and " DEBUG " not in m
                and any(w in m.lower() for w in FAILURE_WORDS)
                and "handshake ok" not in m
            )

        await self.server.log.wait_for(is_its_line, since=since, timeout=10, what=f"{what}'s line")
        lines = [ln for ln in self.server.log.lines[since:] if is_its_line(ln)]
        assert len(lines) == 1, (what, [ln["msg"][:300] for ln in lines])

    async def unharmed(self) -> None:
        a, b = self.pair.a, self.pair.b
        await fetch_until(a, f"{self.pair.ipv4[b.name]}:80", timeout=20)
        assert self.server.log.find(realclient.msg_has("Traceback"), self.start) is None, (
            self.server.log.tail(60)
        )
        assert a.running
        assert b.running


async def each(checks: Checks, what: str, needle_of: Callable[[], Awaitable[str]]) -> None:
    since = checks.server.log.mark()
    needle = await needle_of()
    await checks.after(what, since, needle)


def upgrade_head(extra: str = "", handshake: str | None = None) -> bytes:
    hs = handshake if handshake is not None else base64.b64encode(os.urandom(101)).decode()
    return (
        "POST /ts2021 HTTP/1.1\r\nHost: x\r\nUpgrade: tailscale-control-protocol\r\n"
        f"Connection: upgrade\r\nX-Tailscale-Handshake: {hs}\r\n{extra}\r\n"
    ).encode()


def websocket_head(
    method: str = "GET", protocol: str = "tailscale-control-protocol", handshake: bool = True
) -> bytes:
    """A browser/WASM client's /ts2021 opening handshake (controlhttp client_js.go)."""
    from urllib.parse import quote

    hs = "?X-Tailscale-Handshake=" + quote(base64.b64encode(os.urandom(101)).decode())
    return (
        f"{method} /ts2021{hs if handshake else ''} HTTP/1.1\r\nHost: x\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
        f"Sec-WebSocket-Protocol: {protocol}\r\n\r\n"
    ).encode()


# --- 1. the HTTP/1 front: anyone can send these ------------------------------------

CLOSE = b"Connection: close\r\n\r\n"
FRONT: list[tuple[str, bytes, bytes | None]] = [
    ("CONNECT", b"CONNECT /health HTTP/1.1\r\nHost: x\r\n\r\n", b"405"),
    (
        "huge Content-Length",
        b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n",
        b"413",
    ),
    (
        "oversize body",
        b"POST /api/v1/user HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000\r\n\r\n" + b"x" * 65536,
        b"413",
    ),
    ("oversize head", b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\n\r\n", b"431"),
    ("header flood", b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X: y\r\n" * 20000 + b"\r\n", b"431"),
    ("not HTTP", b"\x00\x01\x02 hello\r\n\r\n", b"400"),
    (
        "two Content-Lengths",
        b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx",
        b"400",
    ),
    (
        "pipelined junk",
        b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n\x16junk\x00 after it\r\n\r\n",
        b"200",
    ),
    ("/key superscript", b"GET /key?v=%C2%B2 HTTP/1.1\r\nHost: x\r\n" + CLOSE, b"400"),
    (
        "/key 5000 digits",
        b"GET /key?v=" + b"9" * 5000 + b" HTTP/1.1\r\nHost: x\r\n" + CLOSE,
        b"400",
    ),
    ("bad Upgrade", upgrade_head().replace(b"tailscale-control-protocol", b"h2c"), b"400"),
    ("handshake not base64", upgrade_head(handshake="!!not base64!!"), b"400"),
    ("garbage handshake", upgrade_head(), None),
    # WebSocket /ts2021 (browser and WASM clients) is served; a bad one is refused.
    (
        "half a WebSocket upgrade",
        upgrade_head().replace(b"tailscale-control-protocol", b"websocket"),
        b"400",
    ),
    ("WebSocket by POST", websocket_head(method="POST"), b"400"),
    ("WebSocket, other subprotocol", websocket_head(protocol="chat"), b"400"),
    ("WebSocket, no Noise initiation", websocket_head(handshake=False), b"400"),
    ("WebSocket, garbage handshake", websocket_head(), None),
    ("TLS junk", b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00", None),
]


async def test_http_front(tailnet: Tailnet, pair: Pair) -> None:
    checks = Checks(tailnet, pair)
    server = tailnet.server
    async with trio.open_nursery() as nursery:
        # The stalling inputs run alongside: each must be dropped within its deadline.
        stalls: dict[str, tuple[int, float]] = {}

        async def stall(what: str, data: bytes) -> None:
            t0 = trio.current_time()
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            port = stream.socket.getsockname()[1]
            async with stream:
                await stream.send_all(data)
                with trio.fail_after(40):
                    try:
                        while await stream.receive_some(65536):
                            pass
                    except trio.BrokenResourceError:
                        pass
            stalls[what] = (port, trio.current_time() - t0)

        slow_since = server.log.mark()
        nursery.start_soon(stall, "slowloris head", b"GET /health HTTP/1.1\r\nHost: x\r\nX-a: ")
        nursery.start_soon(
            stall,
            "half a body",
            b"POST /api/v1/user HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{",
        )

        for what, data, status in FRONT:
            since = server.log.mark()
            try:
                reply, port = await http_exchange(server, data)
            except trio.TooSlowError:
                pytest.fail(f"{what}: no answer and no close within 10 s")
            if status is None:
                assert not reply.startswith(b"HTTP/1.1 2"), (what, reply[:200])
            elif status == b"200":  # pipelined junk: the first answer, then the refusal
                assert reply.startswith(b"HTTP/1.1 200"), (what, reply[:200])
                assert b"HTTP/1.1 400" in reply, (what, reply[:400])
            else:
                assert reply.startswith(b"HTTP/1.1 " + status), (what, reply[:200])
            await checks.after(what, since, f"127.0.0.1:{port}")
    assert set(stalls) == {"slowloris head", "half a body"}, stalls
    for what, (port, took) in stalls.items():
        assert took < 35, (what, took)
        await checks.after(what, slow_since, f"127.0.0.1:{port}")
    await checks.unharmed()


# --- 2. ts2021: Noise records, HTTP/2 frames, request bodies, wire types ----------------


async def noise_session(server: realclient.HomescaleServer) -> tuple[Any, trio.SocketStream, int]:
    key = await server_public_key(server)
    raw = await trio.open_tcp_stream("127.0.0.1", server.port)
    port = raw.socket.getsockname()[1]
    ns, _, _, _ = await ts2021client.upgrade(raw, key)
    return ns, raw, port


async def until_closed(raw: trio.abc.Stream, timeout: float) -> None:
    with trio.fail_after(timeout):
        try:
            while await raw.receive_some(65536):
                pass
        except trio.BrokenResourceError:
            pass


def frame_header(length: int, ftype: int, stream: int = 0) -> bytes:
    return length.to_bytes(3, "big") + bytes([ftype, 0]) + stream.to_bytes(4, "big")


async def test_ts2021(tailnet: Tailnet, pair: Pair) -> None:
    server = tailnet.server
    key = await server_public_key(server)
    async with trio.open_nursery() as nursery:
        # A registered node of our own: its changes are what the real nodes must keep
        # receiving as deltas between the hostile inputs.
        raw = await trio.open_tcp_stream("127.0.0.1", server.port)
        machine = PrivateKey.generate()
        client = await ts2021client.connect(raw, key, machine=machine)
        await nursery.start(client.run)
        probe = ControlPeer(
            client, machine, PrivateKey.generate(), PrivateKey.generate(), "advprobe"
        )
        with trio.fail_after(20):
            await probe.register(tailnet.reusable_key)
            await probe.lite_update(Endpoints=["192.0.2.1:41641"], EndpointTypes=[1])
        checks = Checks(tailnet, pair)
        a_id = pair.ids[pair.a.name]
        mkey = str(machine.machine_public())
        n = 1

        async def delta_reaches_real_node() -> None:
            nonlocal n
            n += 1
            endpoint = f"192.0.2.{n}:41641"
            since = server.log.mark()
            with trio.fail_after(10):
                await probe.lite_update(Endpoints=[endpoint], EndpointTypes=[1])
            await server.log.wait_for(
                lambda ln: any(endpoint in json.dumps(m) for m in realclient.sent_maps([ln], a_id)),
                since=since,
                timeout=10,
                what=f"the delta with {endpoint} sent to the real node",
            )
            checks.rebase()  # the probe's endpoint moved: that one is meant to be stored

        # Stalls inside Noise run side by side with everything else; this nursery waits
        # for each of them to be dropped by the server.
        async with trio.open_nursery() as stall_nursery:
            # Stalls inside Noise, side by side.
            stall_since = server.log.mark()
            stalled: dict[str, int] = {}

            async def stall(what: str, plaintext: bytes | None, raw_bytes: bytes = b"") -> None:
                ns, sraw, port = await noise_session(server)
                if plaintext is not None:
                    await ns.send_all(plaintext)
                if raw_bytes:
                    await sraw.send_all(raw_bytes)
                await until_closed(sraw, 30)
                stalled[what] = port

            stall_nursery.start_soon(
                stall, "half a Noise record", None, b"\x04\x00\x40" + b"\x00" * 10
            )
            stall_nursery.start_soon(
                stall,
                "half an HTTP/2 frame",
                H2_PREFACE + frame_header(0, 4) + frame_header(900, 1, 1),
            )

            # Records and frames: the connection is closed at once.
            for what, plaintext, raw_bytes in [
                ("Noise record over 4096 bytes", None, b"\x04\xff\xff" + os.urandom(4096)),
                ("Noise record that fails to decrypt", None, b"\x04\x00\x20" + b"\x00" * 32),
                ("Noise record of the wrong type", None, b"\x07\x00\x05hello"),
                (
                    "HTTP/2 frame announcing 16 MiB",
                    H2_PREFACE + frame_header((1 << 24) - 1, 0, 1),
                    b"",
                ),
                ("no HTTP/2 preface", b"GET / HTTP/1.1\r\n\r\n" + b"x" * 30, b""),
            ]:
                since = server.log.mark()
                ns, sraw, port = await noise_session(server)
                if plaintext is not None:
                    await ns.send_all(plaintext)
                if raw_bytes:
                    await sraw.send_all(raw_bytes)
                await until_closed(sraw, 10)
                await checks.after(what, since, f"127.0.0.1:{port}")
            await delta_reaches_real_node()

            # Bodies a registered node could send: a 4xx each, the connection lives on.
            bad_hostinfo = probe.hostinfo()
            for what, path, body in [
                ("register: invalid UTF-8", "/machine/register", b'{"Version": 130, "x": "\xff"}'),
                ("register: 100k-deep nesting", "/machine/register", b"[" * 100_000),
                (
                    "register: 5000-digit number",
                    "/machine/register",
                    b'{"Version": ' + b"9" * 5000 + b"}",
                ),
                ("register: NaN", "/machine/register", b'{"Version": NaN}'),
                ("map: invalid UTF-8", "/machine/map", b"\xff\xfe garbage"),
                ("map: 100k-deep nesting", "/machine/map", b'{"Hostinfo": ' + b"[" * 100_000),
                ("map: Infinity", "/machine/map", b'{"Version": 130, "Hostinfo": {"X": Infinity}}'),
                (
                    "map: RoutableIPs not a prefix",
                    "/machine/map",
                    probe.map_request(
                        stream=False,
                        omit_peers=True,
                        Hostinfo={**bad_hostinfo, "RoutableIPs": ["not-a-prefix"]},
                    ),
                ),
                (
                    "map: endpoints Go cannot parse",
                    "/machine/map",
                    probe.map_request(
                        stream=False,
                        omit_peers=True,
                        Endpoints=["not-an-endpoint", "1.2.3.4:70000", "[::1]"],
                    ),
                ),
                (
                    "map: PreferredDERP 2**70",
                    "/machine/map",
                    probe.map_request(
                        stream=False,
                        omit_peers=True,
                        Hostinfo={**bad_hostinfo, "NetInfo": {"PreferredDERP": 2**70}},
                    ),
                ),
                (
                    "map: a node key of zeros",
                    "/machine/map",
                    {"Version": 130, "NodeKey": "nodekey:" + "0" * 64},
                ),
            ]:
                since = server.log.mark()
                with trio.fail_after(10):
                    status, reply = await probe.post(path, body)
                assert 400 <= status < 500, (what, status, reply[:300])
                await checks.after(what, since, mkey)
            await delta_reaches_real_node()
        nursery.cancel_scope.cancel()

    assert set(stalled) == {"half a Noise record", "half an HTTP/2 frame"}, stalled
    for what, port in stalled.items():
        await checks.after(what, stall_since, f"127.0.0.1:{port}")
    await checks.unharmed()


# --- 3. DERP: anyone who can reach /derp ------------------------------------------------

DERP_UPGRADE = b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n"


async def derp_session(server: realclient.HomescaleServer, frames: Callable[[bytes], bytes]) -> int:
    """Upgrade to DERP, read the server key, send ``frames(server_key)``; until closed."""
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    port = stream.socket.getsockname()[1]
    async with stream:
        await stream.send_all(DERP_UPGRADE)
        buf = b""
        with trio.fail_after(10):
            while b"\r\n\r\n" not in buf or len(buf.partition(b"\r\n\r\n")[2]) < 5 + 40:
                chunk = await stream.receive_some(65536)
                assert chunk, buf
                buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        server_key = rest[5 + 8 : 5 + 40]  # frame header, magic, key
        await stream.send_all(frames(server_key))
        await until_closed(stream, 15)
    return port


async def test_derp(tailnet: Tailnet, pair: Pair) -> None:
    checks = Checks(tailnet, pair)
    server = tailnet.server
    client_key = bytes(nacl.public.PrivateKey.generate())
    for what, frames in [
        ("ClientInfo of 100k '['", lambda sk: sealed_client_info(sk, client_key, b"[" * 100_000)),
        (
            "ClientInfo from the all-zero node key",
            lambda sk: encode_frame(FrameType.CLIENT_INFO, b"\x00" * 32 + os.urandom(64)),
        ),
        ("ClientInfo not JSON", lambda sk: sealed_client_info(sk, client_key, b"\xff\x00")),
        ("frame of 1 GiB announced", lambda sk: b"\x02" + (1 << 30).to_bytes(4, "big")),
    ]:
        since = server.log.mark()
        port = await derp_session(server, frames)
        await checks.after(what, since, f"127.0.0.1:{port}")
    await checks.unharmed()


# --- 4. the REST API, with a valid API key: typed fields, IDs, times ---------------------


async def test_rest(tailnet: Tailnet, pair: Pair) -> None:
    import httpx

    from tests.appliance.test_app_rest_strict import BAD_BODIES

    server = tailnet.server
    api_key = (await server.acli("apikeys", "create", "-e", "1h")).stdout.strip().splitlines()[-1]
    checks = Checks(tailnet, pair)
    node_id = pair.ids[pair.a.name]
    headers = {"Authorization": f"Bearer {api_key}"}
    async with httpx.AsyncClient(base_url=server.url, headers=headers) as http:
        for method, path, body, says in BAD_BODIES:
            r = await http.request(method, path.format(nid=node_id), json=body)
            assert r.status_code == 400, (path, body, r.text)
            assert says in r.json()["detail"]
        for raw in [b'{"name": NaN}', b'{"name": "\xff"}', b"[" * 100_000, b"9" * 5000]:
            r = await http.post("/api/v1/user", content=raw)
            assert r.status_code == 400, (raw[:30], r.text)
        for path in [
            "/api/v1/node/9223372036854775808",
            "/api/v1/node/%C2%B2",
            "/api/v1/node/" + "9" * 5000,
        ]:
            assert (await http.get(path)).status_code == 400, path
        # Go's zero time: accepted with headscale's meaning, and every list still reads.
        zero = "0001-01-01T00:00:00Z"
        r = await http.post("/api/v1/apikey", json={"expiration": zero})
        assert r.status_code == 200, r.text
        assert (await http.get("/api/v1/apikey")).status_code == 200
        assert (await http.get("/api/v1/node")).status_code == 200
    # Without a credential, nothing of it gets past the door.
    reply, _ = await http_exchange(
        server,
        b"POST /api/v1/user HTTP/1.1\r\nHost: x\r\nContent-Length: 13\r\nConnection: close"
        b'\r\n\r\n{"name": NaN}',
    )
    assert reply.startswith(b"HTTP/1.1 401"), reply[:200]
    checks.rebase()  # the two API keys created above are legitimate rows
    assert server.log.find(realclient.msg_has("Traceback"), checks.start) is None
    await checks.unharmed()


# --- 5. more connections from one IP than limits.max_connections_per_ip ------------------


async def test_connection_flood_from_one_ip(tailnet: Tailnet, pair: Pair) -> None:
    checks = Checks(tailnet, pair)
    server = tailnet.server
    since = server.log.mark()
    held: list[trio.SocketStream] = []
    try:
        # The real nodes hold a few connections from this address too; 300 is past the
        # cap of 256 (tests/realclient.py sets it) either way. Each flood connection stays open, sending nothing.
        refused = 0
        for _ in range(300):
            s = await trio.open_tcp_stream("127.0.0.1", server.port)
            held.append(s)
        await trio.sleep(0.5)
        with trio.fail_after(20):
            for s in held:
                with trio.move_on_after(0.01):
                    try:
                        if await s.receive_some(1) == b"":
                            refused += 1
                    except trio.BrokenResourceError:
                        refused += 1
        assert refused >= 300 - 256, refused
        await server.log.wait_for(
            realclient.msg_has("refused", "limits.max_connections_per_ip"), since=since, timeout=5
        )
        # One line for the whole flood, not one per connection.
        lines = [
            ln for ln in server.log.lines[since:] if "max_connections_per_ip" in str(ln["msg"])
        ]
        assert len(lines) == 1, lines
        # The real nodes' sessions, opened before, are untouched.
        assert server.metrics().get("homescale_nodes_online", 0) >= 2
    finally:
        for s in held:
            await s.aclose()
    await trio.sleep(0.5)
    assert server.metrics().get("homescale_connections_refused_total", 0) >= 300 - 256
    reply, _ = await http_exchange(
        server, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert reply.startswith(b"HTTP/1.1 200")
    assert snapshot(server) == checks.before
    await checks.unharmed()
