"""Issue 3, bad input over the real server: each is refused with a log line, the
server keeps serving, and nothing stored changes."""

from __future__ import annotations

import base64
import json
import os
from typing import Any

import pytest
import trio

from protocol.keys import PrivateKey
from tests import realclient
from tests.e2e.conftest import Pair, Tailnet, connect_peer, server_public_key
from tests.protocol import ts2021client
from tests.realclient import msg_has

pytestmark = [pytest.mark.realclient]

STABLE = ("id", "machineKey", "nodeKey", "discoKey", "givenName", "ipAddresses", "tags", "expiry")


def stored(nodes: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """What a node's record holds, without what merely moves (online, last seen)."""
    return sorted(
        (*(json.dumps(n.get(k), sort_keys=True) for k in STABLE), (n.get("user") or {}).get("name"))
        for n in nodes
    )


async def raw_exchange(
    server: realclient.HomescaleServer, data: bytes, *, timeout: float = 10
) -> bytes:
    """Send ``data`` on a fresh connection; everything the server answers until it closes."""
    out = b""
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            await stream.send_all(data)
            try:
                while chunk := await stream.receive_some(65536):
                    out += chunk
            except trio.BrokenResourceError:
                pass
    return out


def upgrade_request(handshake_b64: str) -> bytes:
    return (
        "POST /ts2021 HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: tailscale-control-protocol\r\n"
        f"Connection: upgrade\r\nContent-Length: 0\r\nX-Tailscale-Handshake: {handshake_b64}"
        "\r\n\r\n"
    ).encode()


async def health_ok(server: realclient.HomescaleServer) -> bool:
    reply = await raw_exchange(
        server, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    return reply.startswith(b"HTTP/1.1 200")


async def test_bad_input_is_refused_and_changes_nothing(tailnet: Tailnet, pair: Pair) -> None:
    server = tailnet.server
    before = stored(await server.anodes())
    victim = next(n for n in await server.anodes() if n["givenName"] == "nodea")

    # 1. A handshake header that is not base64: a 400 that says what is wrong.
    since = server.log.mark()
    reply = await raw_exchange(server, upgrade_request("!!not base64!!"))
    assert reply.startswith(b"HTTP/1.1 400"), reply[:200]
    assert b"X-Tailscale-Handshake" in reply
    await server.log.wait_for(msg_has("ts2021", "refused (400)"), since=since, timeout=5)

    # 2. Base64 of garbage where the Noise initiation belongs: refused, connection closed.
    since = server.log.mark()
    reply = await raw_exchange(server, upgrade_request(base64.b64encode(os.urandom(101)).decode()))
    assert b"HTTP/1.1 200" not in reply
    await server.log.wait_for(msg_has("ts2021", "handshake"), since=since, timeout=5)

    # 3. After a good handshake, a record longer than Noise's 4096-byte maximum.
    since = server.log.mark()
    key = await server_public_key(server)
    with trio.fail_after(10):
        raw = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with raw:
            await ts2021client.upgrade(raw, key)
            await raw.send_all(b"\x04\xff\xff" + os.urandom(4096))
            try:
                while await raw.receive_some(65536):
                    pass  # the server must hang up
            except trio.BrokenResourceError:
                pass
    await server.log.wait_for(
        msg_has("ts2021", "exceeds 4096"),
        since=since,
        timeout=5,
        what="the oversized record refused",
    )

    async with trio.open_nursery() as nursery:
        intruder = await connect_peer(server, nursery, "intruder", machine=PrivateKey.generate())
        with trio.fail_after(20):
            # 4. A MapRequest (and a RegisterRequest) for nodea's node key from another machine.
            since = server.log.mark()
            req = intruder.map_request(stream=True)
            req["NodeKey"] = victim["nodeKey"]
            status, body = await intruder.post("/machine/map", req)
            assert status == 403, (status, body)
            assert b"another machine" in body
            await server.log.wait_for(
                msg_has("/machine/map", "refused", "another machine"), since=since, timeout=5
            )
            status, body = await intruder.post(
                "/machine/register",
                {
                    "Version": 130,
                    "NodeKey": victim["nodeKey"],
                    "Auth": {"AuthKey": tailnet.reusable_key},
                    "Hostinfo": intruder.hostinfo(),
                },
            )
            assert status == 403, (status, body)

            # 5. Malformed JSON and JSON of the wrong shape, on both endpoints.
            since = server.log.mark()
            for path, body_in in [
                ("/machine/register", b"{not json"),
                ("/machine/map", b"\xff\xfe garbage"),
                ("/machine/register", b"[1, 2, 3]"),
                ("/machine/map", b'{"NodeKey": "nodekey:zz", "Version": "x"}'),
            ]:
                status, body = await intruder.post(path, body_in)
                assert status == 400, (path, body_in, status, body)
                assert b"malformed" in body
            await server.log.wait_for(msg_has("refused", "malformed"), since=since, timeout=5)

            # 6. A body over the 1 MiB limit.
            since = server.log.mark()
            status, body = await intruder.post("/machine/register", b"{" + b" " * (2 << 20) + b"}")
            assert status == 413, (status, body[:200])
            await server.log.wait_for(msg_has("refused"), since=since, timeout=5)

            # The connection survived all of it: a good request still works on it.
            peer_status, _ = await intruder.post("/machine/map", intruder.map_request(stream=False))
            assert peer_status == 404  # unknown node key: register first
        nursery.cancel_scope.cancel()

    assert await health_ok(server)
    assert server.running
    assert stored(await server.anodes()) == before
    server.log.assert_absent(
        msg_has("Traceback"),
        what="a traceback",
        proof=server.render_log("handler failed", with_traceback=True),
    )
