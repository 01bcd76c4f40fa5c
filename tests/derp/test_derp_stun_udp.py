"""The STUN task over real UDP on loopback: answers binding requests, ignores junk."""

from __future__ import annotations

import socket

import pytest
import trio

from derp import stun
from derp.errors import DerpConfigError
from derp.server import DerpServer, open_stun_socket


async def _exchange(listen: str, family: int, host: str) -> None:
    server = DerpServer(bytes(range(32)))
    sock = await open_stun_socket(listen)
    port = sock.getsockname()[1]
    client = trio.socket.socket(family, socket.SOCK_DGRAM)
    with sock, client, trio.fail_after(5):
        await client.bind((host, 0))
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve_stun, sock)
            await client.sendto(b"\x00\x01junk that is not stun at all", (host, port))
            txid = bytes(range(12))
            await client.sendto(stun.binding_request(txid), (host, port))
            data, _ = await client.recvfrom(2048)
            reply = stun.parse_binding_response(data)
            assert reply is not None
            assert reply.txid == txid
            assert (str(reply.ip), reply.port) == (host, client.getsockname()[1])
            assert server.stats.stun_requests == 2
            assert server.stats.stun_answered == 1
            nursery.cancel_scope.cancel()


async def test_stun_answers_over_ipv4_loopback() -> None:
    await _exchange("127.0.0.1:0", socket.AF_INET, "127.0.0.1")


async def test_stun_answers_over_ipv6_loopback() -> None:
    try:
        probe = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        pytest.skip("no IPv6 loopback in this network namespace")
    await _exchange("[::1]:0", socket.AF_INET6, "::1")


async def test_bad_listen_address_names_the_setting() -> None:
    with pytest.raises(DerpConfigError, match="stun_listen_addr"):
        await open_stun_socket("3478")
