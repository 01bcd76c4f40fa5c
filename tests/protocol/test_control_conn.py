"""serve_ts2021 end to end in memory: our initiator + an h2 client over memory streams.

The server side goes through the lead's HttpServer front end, so the request
head parsing and the hand-over of the raw stream are exercised too.
"""

from __future__ import annotations

import base64
import json
import logging
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
from trio.testing import memory_stream_pair

from appliance.control_conn import ControlRequest, ControlResponse, serve_ts2021
from appliance.httpserver import HttpServer
from protocol import noise
from protocol.keys import PrivateKey
from protocol.mapframe import MapFrameDecoder, MapFrameEncoder
from tests.protocol import ts2021client

LOG = logging.getLogger("test.control_conn")


class Recorder:
    """A handler that records what it saw and offers a few behaviours by path."""

    def __init__(self) -> None:
        self.requests: list[ControlRequest] = []
        self.cancelled: list[str] = []
        self.any_cancelled = trio.Event()
        self.started: dict[str, trio.Event] = {}
        self.big = b""
        self.parts: list[bytes] = []
        self.sent_now = 0  # /now: parts send_now took
        self.waited = 0  # /now: parts it refused, sent by send_data

    def started_event(self, path: str) -> trio.Event:
        return self.started.setdefault(path, trio.Event())

    async def __call__(self, req: ControlRequest, resp: ControlResponse) -> None:
        self.requests.append(req)
        self.started_event(req.path).set()
        if req.path == "/echo":
            await resp.respond(200, req.body, [("content-type", "application/octet-stream")])
        elif req.path == "/big":
            await resp.send_headers(200)
            await resp.send_data(self.big)
            await resp.end()
        elif req.path == "/parts":
            await resp.send_headers(200)
            await resp.send_data(self.parts)
            await resp.end()
        elif req.path == "/now":
            await resp.send_headers(200)
            for part in self.parts:
                if resp.send_now([part]):
                    self.sent_now += 1
                else:
                    self.waited += 1
                    await resp.send_data(part)
            await resp.end()
        elif req.path == "/forever":
            await resp.send_headers(200)
            enc = MapFrameEncoder()
            try:
                while True:
                    await resp.send_data(enc.keepalive())
                    await trio.sleep(0.01)
            except trio.Cancelled:
                self.cancelled.append(req.path)
                self.any_cancelled.set()
                raise
        elif req.path == "/boom":
            raise RuntimeError("handler bug")
        elif req.path == "/silent":
            return
        else:
            await resp.respond(404, b"not found\n")


StreamPair = Callable[[], tuple[trio.abc.Stream, trio.abc.Stream]]


def socket_pair(sndbuf: int | None = None) -> tuple[trio.abc.Stream, trio.abc.Stream]:
    """Client and server ends of a real socket pair (the server's send buffer `sndbuf`)."""
    a, b = trio.socket.socketpair()
    if sndbuf is not None:
        b.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    return trio.SocketStream(a), trio.SocketStream(b)


@asynccontextmanager
async def served(
    handler: Recorder, server_key: PrivateKey, pair: StreamPair = memory_stream_pair
) -> AsyncIterator[trio.abc.Stream]:
    """A client-side raw stream connected to HttpServer + serve_ts2021."""
    client_raw, server_raw = pair()
    http = HttpServer(
        routes={},
        upgrades={
            "/ts2021": partial(
                serve_ts2021, server_private_key=server_key, handler=handler, logger=LOG
            )
        },
        logger=LOG,
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(http.handle_connection, server_raw)
        yield client_raw
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def client_for(
    handler: Recorder,
    *,
    window: int = 65535,
    version: int = 130,
    machine: PrivateKey | None = None,
    pair: StreamPair = memory_stream_pair,
):
    key = PrivateKey.generate()
    async with served(handler, key, pair) as raw, trio.open_nursery() as nursery:
        c = await ts2021client.connect(
            raw, key.machine_public(), window=window, version=version, machine=machine
        )
        await nursery.start(c.run)
        yield c
        nursery.cancel_scope.cancel()


async def test_handshake_early_payload_and_request_identity() -> None:
    rec = Recorder()
    machine = PrivateKey.generate()
    with trio.fail_after(10):
        async with client_for(rec, machine=machine, version=130) as c:
            assert c.early is not None
            assert c.early.node_key_challenge is not None
            status, body = await c.request(
                "POST", "/echo", b'{"Version":130}', [("ts-lb", "nodekey:" + "0" * 64)]
            )
    assert (status, body) == (200, b'{"Version":130}')
    req = rec.requests[0]
    assert req.method == "POST"
    assert req.path == "/echo"
    assert req.machine_key == machine.machine_public()
    assert req.version == 130
    assert req.header("TS-LB") == "nodekey:" + "0" * 64


async def test_old_client_gets_no_early_payload() -> None:
    rec = Recorder()
    with trio.fail_after(10):
        async with client_for(rec, version=40) as c:
            assert c.early is None
            status, _ = await c.request("POST", "/echo", b"x")
    assert status == 200
    assert rec.requests[0].version == 40


async def test_long_streamed_response_needs_flow_control() -> None:
    """6 MB through a 64 KiB client window: completes only if the server waits for updates."""
    rec = Recorder()
    rec.big = bytes(range(251)) * (6_000_000 // 251)
    with trio.fail_after(60):
        async with client_for(rec, window=65535) as c:
            st = await c.open("POST", "/big")
            await st.headers_ready.wait()
            got = await c.read_all(st)
    assert st.status == 200
    assert len(got) == len(rec.big)
    assert got == rec.big


async def test_parts_arrive_in_order_beside_another_stream_in_one_window() -> None:
    """A message sent as parts (a first map's shared pieces: empty, tiny, and bigger than
    a frame) arrives whole and in order while another big stream shares the
    connection's 64 KiB window: the h2 client refuses any DATA past a window."""
    rec = Recorder()
    rec.big = bytes(range(256)) * 4000
    rec.parts = [b"", b"x", bytes(range(200)) * 300, b"", b"yz" * 9000, b"end"]
    with trio.fail_after(60):
        async with client_for(rec, window=65535) as c:
            got: dict[str, bytes] = {}

            async def fetch(path: str) -> None:
                st = await c.open("POST", path)
                await st.headers_ready.wait()
                got[path] = await c.read_all(st)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(fetch, "/big")
                nursery.start_soon(fetch, "/parts")
    assert got["/parts"] == b"".join(rec.parts)
    assert got["/big"] == rec.big


@pytest.mark.parametrize(
    "pair",
    [memory_stream_pair, socket_pair, partial(socket_pair, 4096)],
    ids=["memory", "socket", "socket-small-buffer"],
)
async def test_sent_at_once_in_order_and_refused_whole_by_a_full_window(pair) -> None:
    """`send_now` (how the broadcaster sends a map stream's message) writes from the
    caller's task: through a real socket directly, what the socket does not take (a
    small send buffer) and what is not a socket (memory) by the writer. A message the
    client's window cannot take whole is refused with nothing queued, and send_data then
    waits for the window. The client gets every byte, in order."""
    rec = Recorder()
    rec.parts = [bytes([i]) * 20_000 for i in range(12)]
    with trio.fail_after(30):
        async with client_for(rec, window=65535, pair=pair) as c:
            st = await c.open("POST", "/now")
            await st.headers_ready.wait()
            got = await c.read_all(st)
    assert st.status == 200
    assert got == b"".join(rec.parts)
    assert rec.sent_now >= 3  # the first three fit the window
    assert rec.waited >= 1  # the fourth did not


async def test_large_upload_is_acknowledged() -> None:
    """Uploads over the default connection window work: the server acks DATA."""
    rec = Recorder()
    payload = b"u" * 3_000_000
    with trio.fail_after(60):
        async with client_for(rec) as c:
            # Several uploads in a row: a server that never acks stalls on the 2nd.
            for _ in range(2):
                status, body = await c.request("POST", "/echo", payload[:1_000_000])
                assert status == 200
                assert len(body) == 1_000_000


async def test_concurrent_streams_while_long_poll_runs() -> None:
    rec = Recorder()
    with trio.fail_after(30):
        async with client_for(rec) as c:
            poll = await c.open("POST", "/forever")
            await poll.headers_ready.wait()
            results: list[tuple[int, bytes]] = []

            async def one(i: int) -> None:
                results.append(await c.request("POST", "/echo", str(i).encode()))

            async with trio.open_nursery() as n:
                for i in range(30):
                    n.start_soon(one, i)
            # The long poll is still delivering map frames.
            dec = MapFrameDecoder()
            while (msg := dec.next_message()) is None:
                dec.receive_data(await c.read(poll))
            assert json.loads(msg) == {"KeepAlive": True}
    assert sorted(results) == sorted((200, str(i).encode()) for i in range(30))


async def test_client_reset_cancels_only_that_handler() -> None:
    rec = Recorder()
    with trio.fail_after(20):
        async with client_for(rec) as c:
            poll = await c.open("POST", "/forever")
            await poll.headers_ready.wait()
            await c.reset(poll)
            await rec.any_cancelled.wait()
            status, body = await c.request("POST", "/echo", b"still alive")
    assert rec.cancelled == ["/forever"]
    assert (status, body) == (200, b"still alive")


async def test_connection_drop_cancels_long_poll() -> None:
    rec = Recorder()
    key = PrivateKey.generate()
    with trio.fail_after(20):
        async with served(rec, key) as raw:
            c = await ts2021client.connect(raw, key.machine_public())
            async with trio.open_nursery() as n:
                await n.start(c.run)
                await c.open("POST", "/forever")
                await rec.started_event("/forever").wait()
                n.cancel_scope.cancel()
            await raw.aclose()
            await rec.any_cancelled.wait()
    assert rec.cancelled == ["/forever"]


async def test_handler_crash_is_a_500_not_a_dead_connection() -> None:
    rec = Recorder()
    with trio.fail_after(10):
        async with client_for(rec) as c:
            status, _ = await c.request("POST", "/boom")
            assert status == 500
            status, _ = await c.request("POST", "/silent")
            assert status == 200
            status, body = await c.request("POST", "/echo", b"ok")
    assert (status, body) == (200, b"ok")


async def test_body_limit_refuses_with_413() -> None:
    rec = Recorder()
    key = PrivateKey.generate()
    client_raw, server_raw = memory_stream_pair()

    async def serve(upgrade) -> None:
        await serve_ts2021(upgrade, key, rec, logger=LOG, max_body=1000)

    http = HttpServer(routes={}, upgrades={"/ts2021": serve}, logger=LOG)
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(http.handle_connection, server_raw)
            c = await ts2021client.connect(client_raw, key.machine_public())
            await n.start(c.run)
            status, _ = await c.request("POST", "/echo", b"x" * 2000)
            assert status == 413
            status, body = await c.request("POST", "/echo", b"x" * 10)
            assert (status, body) == (200, b"x" * 10)
            n.cancel_scope.cancel()
    assert [r.body for r in rec.requests] == [b"x" * 10]


async def test_get_is_accepted_too() -> None:
    rec = Recorder()
    key = PrivateKey.generate()
    with trio.fail_after(10):
        async with served(rec, key) as raw, trio.open_nursery() as n:
            c = await ts2021client.connect(raw, key.machine_public(), method="GET")
            await n.start(c.run)
            assert (await c.request("POST", "/echo", b"g"))[0] == 200
            n.cancel_scope.cancel()


async def _raw_upgrade(raw: trio.abc.Stream, headers: list[tuple[str, str]]) -> bytes:
    head = "POST /ts2021 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    await raw.send_all(head.encode())
    out = b""
    while chunk := await raw.receive_some(65536):
        out += chunk
    return out


@pytest.mark.parametrize(
    ("headers", "status", "says"),
    [
        ([("Upgrade", "tailscale-control-protocol")], b"400", b"X-Tailscale-Handshake"),
        (
            [("Upgrade", "tailscale-control-protocol"), ("X-Tailscale-Handshake", "%%%garbage")],
            b"400",
            b"X-Tailscale-Handshake",
        ),
        ([("Upgrade", "h2c"), ("X-Tailscale-Handshake", "AAAA")], b"400", b"Upgrade"),
    ],
)
async def test_bad_upgrade_requests_get_400(headers, status: bytes, says: bytes) -> None:
    rec = Recorder()
    with trio.fail_after(10):
        async with served(rec, PrivateKey.generate()) as raw:
            out = await _raw_upgrade(raw, headers)
    assert out.startswith(b"HTTP/1.1 " + status)
    assert says in out
    assert rec.requests == []


async def test_upgrade_header_is_case_insensitive() -> None:
    key = PrivateKey.generate()
    ini = noise.Initiator(PrivateKey.generate(), key.machine_public(), 130)
    rec = Recorder()
    with trio.fail_after(10):
        async with served(rec, key) as raw:
            hdrs = [
                ("Upgrade", "Tailscale-Control-Protocol"),
                ("Connection", "upgrade"),
                ("X-Tailscale-Handshake", base64.b64encode(ini.initiation).decode()),
            ]
            head = "POST /ts2021 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
            head += "".join(f"{k}: {v}\r\n" for k, v in hdrs) + "\r\n"
            await raw.send_all(head.encode())
            got = b""
            while b"\r\n\r\n" not in got:
                got += await raw.receive_some(65536)
    assert got.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"\r\nUpgrade: tailscale-control-protocol\r\n" in got
    assert b"\r\nConnection: upgrade\r\n" in got


async def test_garbage_initiation_gets_noise_error_frame_after_101() -> None:
    rec = Recorder()
    bad = base64.b64encode(b"\x00\x82\x01\x00\x60" + b"\x00" * 50).decode()  # too short
    with trio.fail_after(10):
        async with served(rec, PrivateKey.generate()) as raw:
            out = await _raw_upgrade(
                raw, [("Upgrade", "tailscale-control-protocol"), ("X-Tailscale-Handshake", bad)]
            )
    head, _, rest = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101")
    assert rest == noise.error_frame("wrong handshake initiation size")


async def test_wrong_server_key_just_closes() -> None:
    rec = Recorder()
    key = PrivateKey.generate()
    with trio.fail_after(10):
        async with served(rec, key) as raw:
            with pytest.raises(noise.RemoteNoiseError):
                await ts2021client.connect(raw, PrivateKey.generate().machine_public())
    assert rec.requests == []


async def test_garbage_after_handshake_closes_connection_quietly() -> None:
    rec = Recorder()
    key = PrivateKey.generate()
    with trio.fail_after(10):
        async with served(rec, key) as raw:
            ns, _, _, _ = await ts2021client.upgrade(raw, key.machine_public())
            await raw.send_all(b"\x04\x00\x20" + b"\x00" * 32)  # a record that fails to decrypt
            while await raw.receive_some(65536):
                pass
    assert rec.requests == []
    del ns


# ---------------------------------------------------------------- over WebSocket


async def ws_connect(
    nursery: trio.Nursery, raw: trio.abc.Stream, key: PrivateKey, machine: PrivateKey, **kw: object
) -> ts2021client.TS2021Client:
    """A browser/WASM client's /ts2021 (controlhttp client_js.go): the Noise initiation
    in the URL, subprotocol tailscale-control-protocol, binary messages after."""
    from urllib.parse import quote

    from trio_websocket import ConnectionClosed, wrap_client_stream

    from appliance.noise_stream import NoiseStream
    from derp.server import WebSocketByteStream

    ini = noise.Initiator(machine, key.machine_public(), 130)
    resource = "/ts2021?X-Tailscale-Handshake=" + quote(base64.b64encode(ini.initiation).decode())
    ws = await wrap_client_stream(nursery, raw, "127.0.0.1", resource, **kw)  # type: ignore[arg-type]
    stream = WebSocketByteStream(ws, ConnectionClosed)
    data, transport = b"", None
    while transport is None:
        data += await stream.receive_some()
        transport = ini.receive_data(data)
    return ts2021client.TS2021Client(NoiseStream(stream, transport), None, b"", 65535)


async def test_websocket_ts2021_serves_http2_over_noise() -> None:
    rec = Recorder()
    key, machine = PrivateKey.generate(), PrivateKey.generate()
    with trio.fail_after(10):
        async with served(rec, key) as raw, trio.open_nursery() as nursery:
            c = await ws_connect(
                nursery, raw, key, machine, subprotocols=["tailscale-control-protocol"]
            )
            await nursery.start(c.run)
            status, body = await c.request("POST", "/echo", b'{"Version":130}')
            assert (status, body) == (200, b'{"Version":130}')
            nursery.cancel_scope.cancel()
    assert rec.requests[0].machine_key == machine.machine_public()
    assert rec.requests[0].version == 130


def _leaves(e: BaseException) -> list[BaseException]:
    if isinstance(e, BaseExceptionGroup):
        return [leaf for sub in e.exceptions for leaf in _leaves(sub)]
    return [e]


async def test_websocket_ts2021_needs_the_subprotocol_and_the_handshake() -> None:
    from trio_websocket import ConnectionRejected

    key, machine = PrivateKey.generate(), PrivateKey.generate()
    rejected: list[ConnectionRejected] = []
    with trio.fail_after(10):
        try:
            async with served(Recorder(), key) as raw, trio.open_nursery() as nursery:
                await ws_connect(nursery, raw, key, machine, subprotocols=["derp"])
        except* ConnectionRejected as eg:
            rejected = [e for e in _leaves(eg) if isinstance(e, ConnectionRejected)]
    assert [r.status_code for r in rejected] == [400]
    assert rejected[0].body == (
        b"bad WebSocket upgrade: client must speak the tailscale-control-protocol subprotocol\n"
    )


async def test_malformed_websocket_upgrade_is_refused_at_once() -> None:
    """A request that says ``Upgrade: websocket`` but is no valid opening handshake gets
    a refusal naming the problem and the close right away (not after the handshake
    timeout)."""
    key = PrivateKey.generate()
    get, post = "GET /ts2021 HTTP/1.1\r\nHost: x\r\n", "POST /ts2021 HTTP/1.1\r\nHost: x\r\n"
    ws = "Upgrade: websocket\r\nConnection: Upgrade\r\n"
    wskey = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    proto = "Sec-WebSocket-Protocol: tailscale-control-protocol\r\n"
    v13 = "Sec-WebSocket-Version: 13\r\n"
    cases = [
        (post + ws + wskey + proto + v13, 400, b"method must be GET"),
        (get + ws + wskey + proto + "Sec-WebSocket-Version: 8\r\n", 426, b"Sec-WebSocket-Version"),
        (get + ws + proto + v13, 400, b"Sec-WebSocket-Key"),
        (get + ws + wskey + proto + v13, 400, b"X-Tailscale-Handshake"),  # no initiation
    ]
    for head, status, why in cases:
        reply = b""
        with trio.fail_after(2):
            async with served(Recorder(), key) as raw:
                await raw.send_all((head + "\r\n").encode())
                while chunk := await raw.receive_some(65536):
                    reply += chunk
        assert reply.startswith(f"HTTP/1.1 {status} ".encode()), (head, reply)
        assert why in reply, (head, reply)
