"""The main listener (h11): /health, /key, /version, 404, malformed and slow clients; /metrics."""

from __future__ import annotations

import re
import stat

import h11
import httpx
import pytest
import trio

from appliance import httpserver
from appliance.serve import Server
from protocol.keys import read_private_key_file

from .conftest import CALL_TIMEOUT, Site


async def get(site: Site, path: str, port: int | None = None) -> httpx.Response:
    with trio.fail_after(CALL_TIMEOUT):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port or site.port}") as client:
            return await client.get(path)


async def raw_exchange(site: Site, data: bytes) -> bytes:
    """Send raw bytes, read until the server closes the connection."""
    with trio.fail_after(CALL_TIMEOUT):
        stream = await trio.open_tcp_stream("127.0.0.1", site.port)
        async with stream:
            await stream.send_all(data)
            out = bytearray()
            while chunk := await stream.receive_some(65536):
                out += chunk
            return bytes(out)


async def test_health(site: Site, server: Server) -> None:
    r = await get(site, "/health")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert r.json()["databaseConnectivity"] is True


async def test_key_matches_the_key_file(site: Site, server: Server) -> None:
    r = await get(site, "/key?v=130")
    assert r.status_code == 200
    body = r.json()
    assert body["legacyPublicKey"] == "mkey:" + "0" * 64
    assert re.fullmatch(r"mkey:[0-9a-f]{64}", body["publicKey"])
    assert body["publicKey"] == str(read_private_key_file(site.key_path).machine_public())


@pytest.mark.parametrize("query", ["", "?v=", "?v=abc", "?x=130", "?v=38", "?v=81"])
async def test_key_without_capability_version_400(site: Site, server: Server, query: str) -> None:
    r = await get(site, "/key" + query)
    assert r.status_code == 400


async def test_admin_socket_has_the_configured_permissions(site: Site, server: Server) -> None:
    # unix_socket_permission: "0770" in the site config
    assert stat.S_IMODE(site.socket.stat().st_mode) == 0o770


async def test_version(site: Site, server: Server) -> None:
    r = await get(site, "/version")
    assert r.status_code == 200
    assert set(r.json()) == {"version", "commit"}


async def test_unknown_path_404(site: Site, server: Server) -> None:
    for path in ("/", "/nope", "/health/x", "/keys"):
        assert (await get(site, path)).status_code == 404, path


async def test_keep_alive_serves_several_requests(site: Site, server: Server) -> None:
    with trio.fail_after(CALL_TIMEOUT):
        async with httpx.AsyncClient(base_url=site.url) as client:
            for path in ("/health", "/version", "/nope", "/health"):
                r = await client.get(path)
                assert r.status_code in (200, 404)
            assert r.status_code == 200


async def test_pipelined_requests(site: Site, server: Server) -> None:
    out = await raw_exchange(
        site,
        b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    assert out.count(b"HTTP/1.1 200 ") == 2
    assert b'"databaseConnectivity": true' in out


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\x01\x02 garbage \xff\r\n\r\n",
        b"GET /health HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
        b"GET /health HTTP/1.1\r\nHost: x\r\nbad header line\r\n\r\n",
        b"POST /api/v1/user HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
    ],
)
async def test_malformed_http_gets_400_and_server_keeps_serving(
    site: Site, server: Server, garbage: bytes
) -> None:
    out = await raw_exchange(site, garbage)
    assert out.startswith(b"HTTP/1.1 400 "), out
    assert (await get(site, "/health")).status_code == 200


async def test_head_that_stalls_is_dropped(
    site: Site, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(httpserver, "HEAD_TIMEOUT", 0.5)
    with trio.fail_after(CALL_TIMEOUT):
        stream = await trio.open_tcp_stream("127.0.0.1", site.port)
        async with stream:
            await stream.send_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Sl")
            # the server gives up: end of stream, no response
            assert await stream.receive_some(65536) == b""
    assert (await get(site, "/health")).status_code == 200


async def test_body_that_stalls_is_dropped(
    site: Site, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(httpserver, "BODY_TIMEOUT", 0.5)
    with trio.fail_after(CALL_TIMEOUT):
        stream = await trio.open_tcp_stream("127.0.0.1", site.port)
        async with stream:
            await stream.send_all(
                b'POST /api/v1/user HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"na'
            )
            assert await stream.receive_some(65536) == b""


async def test_too_large_body_413(
    site: Site, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(httpserver, "MAX_BODY", 1000)
    body = b"x" * 5000
    out = await raw_exchange(
        site,
        b"POST /api/v1/user HTTP/1.1\r\nHost: x\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body,
    )
    assert out.startswith(b"HTTP/1.1 413 "), out


async def test_head_request_has_no_body(site: Site, server: Server) -> None:
    out = await raw_exchange(site, b"HEAD /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="HEAD", target="/health", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(out)
    response = conn.next_event()
    assert isinstance(response, h11.Response)
    assert response.status_code == 200
    assert isinstance(conn.next_event(), h11.EndOfMessage)


async def test_metrics_in_prometheus_text(site: Site, server: Server) -> None:
    r = await get(site, "/metrics", port=site.metrics_port)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    lines = r.text.splitlines()
    assert "# TYPE homescale_nodes gauge" in lines
    assert "homescale_nodes 0" in lines
    # every sample line is `name{labels} value`
    for line in lines:
        if not line.startswith("#"):
            assert re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*(\{[^}]*\})? -?[0-9.e+-]+|NaN", line), (
                line
            )
    # metrics are not served on the main listener
    assert (await get(site, "/metrics")).status_code == 404
