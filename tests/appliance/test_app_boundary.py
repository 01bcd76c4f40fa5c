"""Issue 9 item 1: no request a peer sends ends more than its own connection.

Each hostile input goes to the real `serve` (in process) and gets its 4xx or a
closed connection; the server keeps answering, and the failure is one log line
and a counter in /metrics.
"""

from __future__ import annotations

import ipaddress
import logging

import httpx
import pytest
import trio

from appliance import httpserver
from appliance.boundary import Boundary, classify
from appliance.httpserver import HttpServer, Request, Response, Upgrade
from appliance.metrics import Metrics
from appliance.serve import Server

from .conftest import CALL_TIMEOUT, Site
from .test_app_listener import get, raw_exchange


async def exchange(site: Site, data: bytes) -> bytes:
    """Send `data`; what the server answers within 3 s (or until it closes)."""
    out = bytearray()
    with trio.move_on_after(3):
        stream = await trio.open_tcp_stream("127.0.0.1", site.port)
        async with stream:
            await stream.send_all(data)
            try:
                while chunk := await stream.receive_some(65536):
                    out += chunk
            except trio.BrokenResourceError:
                pass
    return bytes(out)


async def still_serving(site: Site) -> None:
    assert (await get(site, "/health")).status_code == 200


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"CONNECT /health HTTP/1.1\r\nHost: x\r\n\r\n", b"405"),
        (b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: x\r\n\r\n", b"405"),
        (
            b"GET /health HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\nConnection: upgrade, close\r\n\r\n",
            b"200",
        ),
        (
            b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n",
            b"413",
        ),
        (b"POST /api/v1/user HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000\r\n\r\n", b"413"),
        (b"GET /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", b"501"),
        (
            b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"400",
        ),
        (b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n\x00\x01junk after a request\r\n\r\n", b"200"),
        (b"\x16\x03\x01\x00\x05hello", None),  # a TLS record on a plain listener: closed
        (b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\n\r\n", b"431"),
        (b"GET /key?v=%C2%B2 HTTP/1.1\r\nHost: x\r\n\r\n", b"400"),
        (b"GET /key?v=" + b"9" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", b"400"),
        (b"GET /register/%ff%fe HTTP/1.1\r\nHost: x\r\n\r\n", b"404"),
        (b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X: y\r\n" * 20000 + b"\r\n", b"431"),
    ],
)
async def test_hostile_request_gets_4xx_or_close_and_server_lives(
    site: Site, server: Server, request_bytes: bytes, status: bytes | None
) -> None:
    out = await exchange(site, request_bytes)
    if status is None:
        assert not out.startswith(b"HTTP/1.1 2"), out[:200]
    else:
        assert out.startswith(b"HTTP/1.1 " + status), out[:300]
    await still_serving(site)


async def test_connect_is_counted_and_logged_once(
    site: Site, server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="homescale")
    out = await raw_exchange(site, b"CONNECT /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 405")
    lines = [r.getMessage() for r in caplog.records if "CONNECT" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "127.0.0.1:" in lines[0]
    assert "Traceback" not in caplog.text
    assert server.metrics.counters['homescale_isolated_errors_total{kind="http",cause="peer"}'] == 1
    await still_serving(site)


async def test_slow_head_is_dropped_with_one_line(
    site: Site, server: Server, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="homescale")
    monkeypatch.setattr(httpserver, "HEAD_TIMEOUT", 0.5)
    with trio.fail_after(CALL_TIMEOUT):
        stream = await trio.open_tcp_stream("127.0.0.1", site.port)
        async with stream:
            await stream.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            assert await stream.receive_some(65536) == b""
    assert [r for r in caplog.records if "no whole request head" in r.getMessage()]
    await still_serving(site)


def test_classify_sorts_causes() -> None:
    import h11

    assert classify(trio.BrokenResourceError()) == "disconnect"
    assert classify(trio.TooSlowError()) == "timeout"
    assert classify(h11.RemoteProtocolError("x", 400)) == "peer"
    assert classify(RuntimeError("bug")) == "internal"
    assert classify(ExceptionGroup("g", [trio.BrokenResourceError(), KeyError()])) == "internal"


async def test_guard_keeps_cancellation_flowing() -> None:
    boundary = Boundary(logging.getLogger("test.boundary"))
    with trio.CancelScope() as scope:
        with boundary.guard("x", "peer"):
            scope.cancel()
            await trio.sleep(1)
        pytest.fail("the guard swallowed the cancellation")
    assert scope.cancelled_caught


async def test_guard_ends_only_its_task() -> None:
    metrics = Metrics()
    boundary = Boundary(logging.getLogger("test.boundary"), metrics)
    done = []

    async def bad() -> None:
        raise RuntimeError("one bad item")

    async def good() -> None:
        await trio.sleep(0.05)
        done.append("good")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(boundary.run, "change", "node 7", bad)
        nursery.start_soon(boundary.run, "change", "node 8", good)
    assert done == ["good"]
    assert metrics.counters == {
        'homescale_isolated_errors_total{kind="change",cause="internal"}': 1
    }


async def test_per_ip_cap_refuses_the_excess_and_frees_on_close() -> None:
    async def hello(req: Request) -> Response:
        return Response.text("hi\n")

    http = HttpServer(
        routes={"/": hello},
        upgrades={},
        logger=logging.getLogger("test.http"),
        max_connections_per_ip=3,
    )
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    with trio.fail_after(CALL_TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(http.serve, listeners)
            held = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(3)]
            await trio.sleep(0.1)
            extra = await trio.open_tcp_stream("127.0.0.1", port)
            try:
                await extra.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                assert await extra.receive_some(100) == b""  # closed without an answer
            except trio.BrokenResourceError:
                pass
            assert http.conn_cap.refused == 1
            for s in held:
                await s.aclose()
            await trio.sleep(0.1)
            async with httpx.AsyncClient() as client:
                r = await client.get(f"http://127.0.0.1:{port}/")
            assert r.status_code == 200
            nursery.cancel_scope.cancel()


async def test_trusted_proxy_is_not_capped() -> None:
    """trusted_proxies: a reverse proxy carries every client's connection from one IP."""
    http = HttpServer(
        routes={},
        upgrades={},
        logger=logging.getLogger("test.http"),
        max_connections_per_ip=1,
        upgrade_caps={"/derp": (1, "limits.max_derp_connections_per_ip")},
        trusted_proxies=[ipaddress.ip_network("127.0.0.0/8")],
    )
    assert all(http.conn_cap.acquire("127.0.0.1") for _ in range(5))
    assert all(http.upgrade_caps["/derp"].acquire("127.0.0.2") for _ in range(5))
    assert http.conn_cap.acquire("192.0.2.1")
    assert not http.conn_cap.acquire("192.0.2.1")  # others keep their cap
    assert http.conn_cap.refused == 1


def test_trusted_proxies_in_the_config(site: Site) -> None:
    from appliance.config import load_config
    from appliance.errors import ConfigError

    env = {"HOMESCALE_TRUSTED_PROXIES": "127.0.0.1,10.0.0.0/8"}
    config = load_config(site.config_path, environ=env)
    assert [str(n) for n in config.trusted_proxies] == ["127.0.0.1/32", "10.0.0.0/8"]
    with pytest.raises(ConfigError, match=r"trusted_proxies.*10\.0\.0\.1/8"):
        load_config(site.config_path, environ={"HOMESCALE_TRUSTED_PROXIES": "10.0.0.1/8"})


def test_limits_are_in_the_config(site: Site) -> None:
    from appliance.config import load_config

    config = load_config(site.config_path, environ={})
    assert config.max_connections_per_ip == 1024
    assert config.max_derp_connections_per_ip == 512
    env = {"HOMESCALE_LIMITS_MAX_CONNECTIONS_PER_IP": "10"}
    assert load_config(site.config_path, environ=env).max_connections_per_ip == 10


async def test_derp_cap_answers_429_and_frees_on_close() -> None:
    """limits.max_derp_connections_per_ip: a long-held upgrade gets a cap of its own."""
    release = trio.Event()

    async def hold(up: Upgrade) -> None:
        await up.stream.send_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\n\r\n")
        await release.wait()

    http = HttpServer(
        routes={},
        upgrades={"/derp": hold},
        logger=logging.getLogger("test.http"),
        upgrade_caps={"/derp": (2, "limits.max_derp_connections_per_ip")},
    )
    up = b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n"
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    with trio.fail_after(CALL_TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(http.serve, listeners)
            held = []
            for _ in range(2):
                s = await trio.open_tcp_stream("127.0.0.1", port)
                await s.send_all(up)
                assert (await s.receive_some(100)).startswith(b"HTTP/1.1 101")
                held.append(s)
            extra = await trio.open_tcp_stream("127.0.0.1", port)
            await extra.send_all(up)
            assert (await extra.receive_some(100)).startswith(b"HTTP/1.1 429")
            release.set()
            for s in held:
                await s.aclose()
            await trio.sleep(0.1)
            again = await trio.open_tcp_stream("127.0.0.1", port)
            await again.send_all(up)
            assert (await again.receive_some(100)).startswith(b"HTTP/1.1 101")
            nursery.cancel_scope.cancel()


def test_metrics_name_each_family_once() -> None:
    """Prometheus refuses a second TYPE line for a family: labelled samples share one."""
    metrics = Metrics()
    boundary = Boundary(logging.getLogger("test.boundary"), metrics)
    boundary.record("http", "192.0.2.1:1", trio.TooSlowError())
    boundary.record("derp", "192.0.2.1:2", RuntimeError("bug"))
    text = metrics.render()
    assert text.count("# TYPE homescale_isolated_errors_total counter") == 1
    assert text.count("# HELP homescale_isolated_errors_total") == 1
    assert 'homescale_isolated_errors_total{kind="derp",cause="internal"} 1' in text
    assert 'homescale_isolated_errors_total{kind="http",cause="timeout"} 1' in text
