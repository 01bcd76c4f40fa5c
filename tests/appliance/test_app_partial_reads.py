"""Issue 9 item 4: every partial read has a deadline and a cap (in memory, over the real front end).

A hostile peer that starts something and stops -- a Noise record, an HTTP/2
frame, a request on a stream -- loses its connection (or that stream) after a
bounded time, and one announcing a frame over our limit is refused at once.
"""

from __future__ import annotations

import logging
from functools import partial

import h2.connection
import h2.exceptions
import pytest
import trio
import trio.testing
from trio.testing import memory_stream_pair

from appliance import control_conn, noise_stream
from appliance.boundary import Boundary
from appliance.control_conn import FrameTracker
from appliance.httpserver import HttpServer
from appliance.metrics import Metrics
from protocol.keys import PrivateKey
from tests.protocol import ts2021client
from tests.protocol.test_control_conn import Recorder, client_for, served

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def frame_header(length: int, ftype: int = 4, flags: int = 0, stream: int = 0) -> bytes:
    return length.to_bytes(3, "big") + bytes([ftype, flags]) + stream.to_bytes(4, "big")


def test_frame_tracker_refuses_an_oversized_frame_from_its_header_alone() -> None:
    t = FrameTracker(16384)
    t.feed(PREFACE[:10])
    assert t.partial
    t.feed(PREFACE[10:])
    assert not t.partial
    t.feed(frame_header(6)[:4])
    assert t.partial
    t.feed(frame_header(6)[4:] + b"\x00" * 5)
    assert t.partial
    t.feed(b"\x00")
    assert not t.partial
    with pytest.raises(h2.exceptions.FrameTooLargeError, match="16777215"):
        t.feed(frame_header((1 << 24) - 1))


async def until_closed(raw: trio.abc.Stream) -> None:
    try:
        while await raw.receive_some(65536):
            pass
    except trio.BrokenResourceError:
        pass


async def test_h2_frame_header_announcing_16_mib_is_refused_at_once() -> None:
    key = PrivateKey.generate()
    with trio.fail_after(5):  # no timeout involved: the header alone is refused
        async with served(Recorder(), key) as raw:
            ns, _, _, _ = await ts2021client.upgrade(raw, key.machine_public())
            await ns.send_all(PREFACE + frame_header((1 << 24) - 1, ftype=0, stream=1))
            await until_closed(raw)


async def test_h2_frame_begun_then_silence_is_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(control_conn, "PARTIAL_FRAME_TIMEOUT", 0.3)
    key = PrivateKey.generate()
    with trio.fail_after(5):
        async with served(Recorder(), key) as raw:
            ns, _, _, _ = await ts2021client.upgrade(raw, key.machine_public())
            await ns.send_all(PREFACE + frame_header(0) + frame_header(16000, ftype=0, stream=1))
            await until_closed(raw)


async def test_noise_record_begun_then_silence_is_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(noise_stream, "PARTIAL_RECORD_TIMEOUT", 0.3)
    key = PrivateKey.generate()
    with trio.fail_after(5):
        async with served(Recorder(), key) as raw:
            await ts2021client.upgrade(raw, key.machine_public())
            await raw.send_all(b"\x04\x00\x40" + b"\x00" * 10)  # 64 bytes announced, 10 sent
            await until_closed(raw)


async def test_request_never_finished_is_reset_and_the_connection_lives(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(control_conn, "REQUEST_TIMEOUT", 0.3)
    rec = Recorder()
    with trio.fail_after(10):
        async with client_for(rec) as c:
            sid = c.h2.get_next_available_stream_id()
            c.h2.send_headers(
                sid,
                [(":method", "POST"), (":path", "/echo"), (":scheme", "http"), (":authority", "x")],
            )
            c.h2.send_data(sid, b"half a body")  # and never END_STREAM
            await c._flush()
            await trio.sleep(1.0)
            status, body = await c.request("POST", "/echo", b"whole")
    assert (status, body) == (200, b"whole")
    assert [r.body for r in rec.requests] == [b"whole"]


async def test_buffered_bodies_are_capped_per_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(control_conn, "MAX_BUFFERED_BODIES", 100_000)
    rec = Recorder()
    with trio.fail_after(10):
        async with client_for(rec, window=1 << 20) as c:
            assert (await c.request("POST", "/echo", b"settings known"))[0] == 200
            for _ in range(3):  # 3 x 60 KB open at once: the third is refused
                sid = c.h2.get_next_available_stream_id()
                c.h2.send_headers(
                    sid,
                    [
                        (":method", "POST"),
                        (":path", "/echo"),
                        (":scheme", "http"),
                        (":authority", "x"),
                    ],
                )
                for _ in range(4):
                    c.h2.send_data(sid, b"x" * 15000)
            await c._flush()
            await trio.sleep(0.3)
            status, body = await c.request("POST", "/echo", b"still here")
    assert (status, body) == (200, b"still here")


async def test_handler_crash_is_counted_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    boundary = Boundary(logging.getLogger("test.boundary"), metrics)
    rec = Recorder()
    key = PrivateKey.generate()
    client_raw, server_raw = memory_stream_pair()
    http = HttpServer(
        routes={},
        upgrades={
            "/ts2021": partial(
                control_conn.serve_ts2021,
                server_private_key=key,
                handler=rec,
                logger=logging.getLogger("test.cc"),
                boundary=boundary,
            )
        },
        logger=logging.getLogger("test.http"),
        boundary=boundary,
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(http.handle_connection, server_raw)
            c = await ts2021client.connect(client_raw, key.machine_public())
            await nursery.start(c.run)
            status, _ = await c.request("POST", "/boom", b"")
            assert status == 500
            status, _ = await c.request("POST", "/echo", b"ok")
            assert status == 200
            nursery.cancel_scope.cancel()
    assert metrics.counters == {
        'homescale_isolated_errors_total{kind="ts2021-request",cause="internal"}': 1.0
    }
    lines = [r for r in caplog.records if r.name == "test.boundary"]
    assert len(lines) == 1
    assert "handler bug" in lines[0].getMessage()


def test_h2_connection_defaults_are_what_the_tracker_assumes() -> None:
    cfg = h2.config.H2Configuration(client_side=False)
    assert h2.connection.H2Connection(config=cfg).max_inbound_frame_size == 16384


async def test_peer_that_floods_pings_and_never_reads_is_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Our answers are written before we read more: a flooder gets one read's worth, then out."""
    monkeypatch.setattr(control_conn, "WRITE_BACKLOG_TIMEOUT", 0.5)
    key = PrivateKey.generate()
    client_raw, server_raw = trio.testing.lockstep_stream_pair()  # writes wait for the reader
    http = HttpServer(
        routes={},
        upgrades={
            "/ts2021": partial(
                control_conn.serve_ts2021,
                server_private_key=key,
                handler=Recorder(),
                logger=logging.getLogger("test.cc"),
            )
        },
        logger=logging.getLogger("test.http"),
    )
    ping = frame_header(8, ftype=6) + b"12345678"
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(http.handle_connection, server_raw)
            ns, _, _, _ = await ts2021client.upgrade(client_raw, key.machine_public())
            with pytest.raises(trio.BrokenResourceError):
                await flood(ns, PREFACE + frame_header(0), ping * 100)
            nursery.cancel_scope.cancel()


async def flood(stream: trio.abc.Stream, first: bytes, again: bytes) -> None:
    """Send `first`, then `again` forever, never reading: until the peer hangs up."""
    await stream.send_all(first)
    while True:
        await stream.send_all(again)
