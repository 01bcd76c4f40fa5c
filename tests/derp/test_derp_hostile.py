"""Hostile DERP clients: each one ends only its own connection, with one log line and a count.

In memory (trio.testing streams): the relay and its clients run in this process.
"""

from __future__ import annotations

import json
import logging

import pytest
import trio
import trio.testing
from nacl.public import Box, PrivateKey, PublicKey
from trio_websocket import ConnectionClosed, wrap_client_stream

from derp.client import DerpClient
from derp.codec import (
    MAGIC,
    FrameType,
    KeepAlive,
    RecvPacket,
    encode_frame,
)
from derp.server import DerpServer, WebSocketByteStream, WebSocketFrameTracker
from tests.derp.derp_harness import front_end, memory_client

UPGRADE = b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nDerp-Fast-Start: 1\r\n\r\n"


def new_key() -> bytes:
    return bytes(PrivateKey.generate())


def sealed_client_info(server_pub: bytes, client_priv: bytes, plaintext: bytes) -> bytes:
    """A ClientInfo frame whose sealed body is ``plaintext`` (any bytes, JSON or not)."""
    priv = PrivateKey(client_priv)
    sealed = bytes(Box(priv, PublicKey(server_pub)).encrypt(plaintext))
    return encode_frame(FrameType.CLIENT_INFO, bytes(priv.public_key) + sealed)


class Verifier:
    def __init__(self) -> None:
        self.asked: list[bytes] = []

    async def __call__(self, key: bytes) -> bool:
        self.asked.append(key)
        return True


@pytest.fixture
def verifier() -> Verifier:
    return Verifier()


@pytest.fixture
def server(verifier: Verifier) -> DerpServer:
    return DerpServer(new_key(), logger=logging.getLogger("test.derp"), verify_client=verifier)


async def raw_session(nursery: trio.Nursery, server: DerpServer, frames: bytes) -> bytes:
    """Send an upgrade and ``frames``; return everything the server sent until it hung up."""
    client_end, server_end = trio.testing.memory_stream_pair()
    nursery.start_soon(front_end, server_end, "192.0.2.7:4242", server.handle_upgrade)
    await client_end.send_all(UPGRADE + frames)
    data = b""
    while chunk := await client_end.receive_some():
        data += chunk
    return data


async def assert_relay_still_serves(nursery: trio.Nursery, server: DerpServer) -> None:
    a = await memory_client(nursery, server, new_key())
    b = await memory_client(nursery, server, new_key())
    await a.send_packet(b.public_key, b"still here")
    while not isinstance(ev := await b.recv(), RecvPacket):
        assert isinstance(ev, KeepAlive)
    assert ev == RecvPacket(a.public_key, b"still here")


async def until_closed(client: DerpClient) -> None:
    """Read (keep-alives, whatever) until the server hangs up on ``client``."""
    with pytest.raises(trio.EndOfChannel):  # noqa: PT012 - reading until the end is the point
        while True:
            await client.recv()


HOSTILE_CLIENT_INFO = [
    pytest.param(b"[" * 100_000, "nested deeper than", id="deep-json"),
    pytest.param(b'{"version": ' + b"9" * 5000 + b"}", "number literal", id="5000-digit-number"),
    pytest.param(
        b'{"version": 1180591620717411303424}', "out of Go's int range", id="int-overflow"
    ),
    pytest.param(b'{"version": NaN}', "NaN is not JSON", id="nan"),
    pytest.param(
        b'{"version": 2, "CanAckPings": "yes"}', "CanAckPings must be true", id="bool-str"
    ),
    pytest.param(b'{"meshKey": {"a": 1}}', "meshKey must be a hex string", id="meshkey-object"),
    pytest.param(b'{"meshKey": "zz"}', "meshKey is not hex", id="meshkey-not-hex"),
    pytest.param(b"\xff\xfe", "invalid UTF-8", id="not-utf8"),
    pytest.param(b"[]", "not an object", id="not-object"),
]


@pytest.mark.parametrize(("plaintext", "reason"), HOSTILE_CLIENT_INFO)
async def test_bad_client_info_ends_only_that_connection_before_verification(
    server: DerpServer,
    verifier: Verifier,
    caplog: pytest.LogCaptureFixture,
    plaintext: bytes,
    reason: str,
) -> None:
    caplog.set_level(logging.INFO, "test.derp")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            frame = sealed_client_info(server.public_key, new_key(), plaintext)
            sent = await raw_session(nursery, server, frame)
            assert sent.startswith(encode_frame(FrameType.SERVER_KEY, MAGIC + server.public_key))
            assert verifier.asked == []  # refused before verify_clients was asked
            await assert_relay_still_serves(nursery, server)
            server.close()
    assert server.stats.protocol_errors == 1
    lines = [r.getMessage() for r in caplog.records if "192.0.2.7:4242" in r.getMessage()]
    assert len(lines) == 1, lines
    assert reason in lines[0]


async def test_all_zero_node_key_ends_only_that_connection(
    server: DerpServer, verifier: Verifier, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "test.derp")
    # The body cannot be sealed for the zero key; any 24+ bytes do.
    frame = encode_frame(FrameType.CLIENT_INFO, bytes(32) + bytes(24) + b"x" * 40)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await raw_session(nursery, server, frame)
            assert verifier.asked == []
            await assert_relay_still_serves(nursery, server)
            server.close()
    assert server.stats.protocol_errors == 1
    assert any("all-zero key" in r.getMessage() for r in caplog.records)


async def test_small_order_node_key_ends_only_that_connection(server: DerpServer) -> None:
    # A point of order 8 on Curve25519: libsodium refuses it just as the zero key.
    small = bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")
    frame = encode_frame(FrameType.CLIENT_INFO, small + bytes(24) + b"x" * 40)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await raw_session(nursery, server, frame)
            await assert_relay_still_serves(nursery, server)
            server.close()
    assert server.stats.protocol_errors == 1


async def test_internal_error_in_one_client_ends_only_it(
    server: DerpServer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug reached by one client's input (simulated) is contained like a protocol error."""
    caplog.set_level(logging.INFO, "test.derp")
    real_route = server._route

    def route(sender, src, dst, data, clients):
        if data == b"boom":
            raise KeyError("simulated bug")
        real_route(sender, src, dst, data, clients)

    monkeypatch.setattr(server, "_route", route)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            bad = await memory_client(nursery, server, new_key(), peer="192.0.2.9:1")
            await bad.send_packet(bytes(32), b"boom")
            await until_closed(bad)
            await assert_relay_still_serves(nursery, server)
            server.close()
    assert server.stats.internal_errors == 1
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "192.0.2.9:1" in errors[0].getMessage()
    assert "simulated bug" in errors[0].getMessage()


async def test_partial_frame_then_silence_times_out(autojump_clock: trio.abc.Clock) -> None:
    server = DerpServer(new_key(), logger=logging.getLogger("test.derp"), frame_timeout=15)
    with trio.fail_after(300):
        async with trio.open_nursery() as nursery:
            idle = await memory_client(nursery, server, new_key())
            stalled = await memory_client(nursery, server, new_key())
            # A SendPacket header announcing 1000 bytes, 40 of them, then nothing.
            await stalled.send(
                bytes([FrameType.SEND_PACKET]) + (1000).to_bytes(4, "big") + bytes(40)
            )
            start = trio.current_time()
            await until_closed(stalled)
            assert 15 <= trio.current_time() - start < 16
            assert server.stats.frame_timeouts == 1
            # A client with no partial frame may stay silent: it still gets keep-alives.
            await trio.sleep(120)
            assert server.is_connected(idle.public_key)
            server.close()


async def test_slow_but_steady_frames_are_not_cut(autojump_clock: trio.abc.Clock) -> None:
    server = DerpServer(new_key(), logger=logging.getLogger("test.derp"), frame_timeout=15)
    with trio.fail_after(300):
        async with trio.open_nursery() as nursery:
            a = await memory_client(nursery, server, new_key())
            b = await memory_client(nursery, server, new_key())
            frame = a.conn.send_packet(b.public_key, b"y" * 100)
            # Every frame completes within the timeout, though bytes stay pending all along.
            for _ in range(6):
                await a.send(frame[:50])
                await trio.sleep(10)
                await a.send(frame[50:])
            await trio.sleep(1)
            assert server.is_connected(a.public_key)
            assert server.stats.frame_timeouts == 0
            server.close()


async def websocket_client(
    nursery: trio.Nursery, server: DerpServer
) -> tuple[trio.abc.Stream, DerpClient]:
    client_end, server_end = trio.testing.memory_stream_pair()
    nursery.start_soon(front_end, server_end, "192.0.2.8:1", server.handle_upgrade)
    ws = await wrap_client_stream(
        nursery,
        client_end,  # type: ignore[arg-type]  # any trio Stream works; the hint is narrow
        "x",
        "/derp",
        subprotocols=["derp"],
    )
    return client_end, await DerpClient.connect(
        WebSocketByteStream(ws, ConnectionClosed), new_key(), upgrade=False
    )


async def test_websocket_frame_header_then_silence_times_out(
    autojump_clock: trio.abc.Clock,
) -> None:
    server = DerpServer(new_key(), logger=logging.getLogger("test.derp"), frame_timeout=15)
    with trio.fail_after(300):
        async with trio.open_nursery() as nursery:
            raw, client = await websocket_client(nursery, server)
            _idle_raw, idle = await websocket_client(nursery, server)
            # A masked binary frame announcing 100 bytes; 5 arrive, then nothing.
            start = trio.current_time()
            await raw.send_all(b"\x82\xe4" + bytes(4) + b"12345")
            await until_closed(client)
            assert 15 <= trio.current_time() - start < 16
            assert server.stats.frame_timeouts == 1
            await trio.sleep(120)  # an idle WebSocket client stays
            assert server.is_connected(idle.public_key)
            server.close()
            nursery.cancel_scope.cancel()


def test_websocket_tracker_follows_frames() -> None:
    t = WebSocketFrameTracker(skip=3)
    t.feed(b"GET")
    assert not t.busy
    t.feed(b"\x82\x85" + bytes(4) + b"abc")  # masked, 5 bytes, 3 arrived
    assert (t.busy, t.frames) == (True, 0)
    t.feed(b"de")
    assert (t.busy, t.frames) == (False, 1)
    t.feed(b"\x02\x01x")  # unmasked, no FIN: a fragmented message is in progress
    assert (t.busy, t.frames) == (True, 2)
    t.feed(b"\x89\x00")  # a ping in between
    assert t.busy
    t.feed(b"\x80\x7e\x00\x02zz")  # final continuation, 16-bit length
    assert (t.busy, t.frames) == (False, 4)
    t.feed(b"\x82\x7f" + (3).to_bytes(8, "big") + b"abc")  # 64-bit length
    assert (t.busy, t.frames) == (False, 5)


def test_client_info_json_is_go_shaped() -> None:
    """The hostile ClientInfo bodies above differ from a real one only in content."""
    assert json.loads(b'{"version":2,"CanAckPings":true}') == {"version": 2, "CanAckPings": True}
