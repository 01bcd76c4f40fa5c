"""The trio DERP relay, in memory and over TCP+TLS/WebSocket on 127.0.0.1."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio
import trio.testing
from nacl.public import PrivateKey
from trio_websocket import ConnectionClosed, open_websocket

from derp.client import DerpClient
from derp.codec import (
    Health,
    KeepAlive,
    PeerGone,
    PeerGoneReason,
    PeerPresent,
    Pong,
    RecvPacket,
)
from derp.errors import DerpConfigError
from derp.server import DerpServer, WebSocketByteStream, load_or_create_server_key
from tests.derp.derp_harness import make_tls, memory_client, serve_loopback, tcp_client

MESH = bytes([9]) * 32


def new_key() -> bytes:
    return bytes(PrivateKey.generate())


def pub(priv: bytes) -> bytes:
    return bytes(PrivateKey(priv).public_key)


def disco(n: int = 0) -> bytes:
    """A packet that looks like a disco message (magic + key + nonce + body)."""
    return "TS💬".encode() + bytes(32) + bytes(24) + bytes([n])


@pytest.fixture
def server() -> DerpServer:
    return DerpServer(new_key(), logger=logging.getLogger("test.derp"), mesh_key=MESH)


async def recv_type(client: DerpClient, kind: type, *, skip=(KeepAlive,)):
    """The next event of ``kind``, skipping keep-alives; fails on anything else."""
    while True:
        ev = await client.recv()
        if isinstance(ev, kind):
            return ev
        assert isinstance(ev, skip), f"unexpected {ev!r} while waiting for {kind.__name__}"


async def test_a_sends_to_b_and_b_receives(server: DerpServer) -> None:
    a, b = new_key(), new_key()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            ca = await memory_client(nursery, server, a)
            cb = await memory_client(nursery, server, b)
            await ca.send_packet(pub(b), b"hello b")
            assert await recv_type(cb, RecvPacket) == RecvPacket(pub(a), b"hello b")
            await cb.send_packet(pub(a), b"hello a")
            assert await recv_type(ca, RecvPacket) == RecvPacket(pub(b), b"hello a")
            assert server.stats.packets_sent == 2
            assert server.stats.current_connections == 2
            server.close()
    assert server.stats.current_connections == 0


async def test_peer_gone_reaches_those_it_sent_to(server: DerpServer) -> None:
    a, b, c = new_key(), new_key(), new_key()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            ca = await memory_client(nursery, server, a)
            cb = await memory_client(nursery, server, b)
            cc = await memory_client(nursery, server, c)
            await ca.send_packet(pub(b), b"x")
            await recv_type(cb, RecvPacket)
            await ca.aclose()
            assert await recv_type(cb, PeerGone) == PeerGone(pub(a), PeerGoneReason.DISCONNECTED)
            # C never heard from A: nothing for C.
            await cb.send_packet(pub(c), b"ping c")
            assert await recv_type(cc, RecvPacket) == RecvPacket(pub(b), b"ping c")
            assert cc.pending() == []
            server.close()


async def test_unknown_destination_disco_gets_not_here(server: DerpServer) -> None:
    a, nobody = new_key(), pub(new_key())
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            ca = await memory_client(nursery, server, a)
            await ca.send_packet(nobody, b"plain wireguard")  # not disco: silent drop
            await ca.send_packet(nobody, disco())
            assert await recv_type(ca, PeerGone) == PeerGone(nobody, PeerGoneReason.NOT_HERE)
            assert server.stats.packets_dropped["unknown_dest"] == 2
            server.close()


async def test_newest_connection_wins(server: DerpServer) -> None:
    a, b = new_key(), new_key()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            cb = await memory_client(nursery, server, b)
            old = await memory_client(nursery, server, a, peer="127.0.0.1:1111")
            await old.send_packet(pub(b), b"from old")
            await recv_type(cb, RecvPacket)
            new = await memory_client(nursery, server, a, peer="127.0.0.1:2222")
            with pytest.raises(trio.EndOfChannel):
                await recv_type(old, RecvPacket)
            await cb.send_packet(pub(a), b"to a")
            assert await recv_type(new, RecvPacket) == RecvPacket(pub(b), b"to a")
            # The key never left, so B was not told it was gone.
            assert cb.pending() == []
            assert server.stats.duplicate_replaced == 1
            assert server.stats.current_connections == 2
            server.close()


async def test_slow_reader_loses_its_own_packets_and_never_stalls_others() -> None:
    server = DerpServer(new_key(), send_queue_depth=8, write_timeout=60)
    a, b, slow = new_key(), new_key(), new_key()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            ca = await memory_client(nursery, server, a)
            cb = await memory_client(nursery, server, b)
            # lockstep: the server's writes to this client block until it reads;
            # it never reads again after the handshake.
            await memory_client(nursery, server, slow, lockstep=True)
            got = 0
            for i in range(200):
                await ca.send_packet(pub(slow), b"s" * 1280)
                await ca.send_packet(pub(b), i.to_bytes(4, "big"))
            while got < 200:
                ev = await recv_type(cb, RecvPacket)
                assert ev.data == got.to_bytes(4, "big")
                got += 1
            # All of B's packets arrived, in order; the slow client lost most of its own.
            assert server.stats.packets_dropped["queue_head"] >= 200 - 8 - 2
            server.close()


async def test_stuck_client_is_dropped_after_write_timeout(autojump_clock) -> None:
    server = DerpServer(new_key(), write_timeout=2.0)
    a, stuck = new_key(), new_key()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            ca = await memory_client(nursery, server, a)
            await memory_client(nursery, server, stuck, lockstep=True)
            await ca.send_packet(pub(stuck), b"x")
            assert server.is_connected(pub(stuck))
            await trio.sleep(2.5)
            assert not server.is_connected(pub(stuck))
            assert server.stats.write_timeouts == 1
            server.close()


async def test_keep_alive_every_60_to_65_seconds(autojump_clock) -> None:
    server = DerpServer(new_key())
    with trio.fail_after(200):
        async with trio.open_nursery() as nursery:
            c = await memory_client(nursery, server, new_key())
            start = trio.current_time()
            await recv_type(c, KeepAlive, skip=())
            first = trio.current_time()
            await recv_type(c, KeepAlive, skip=())
            second = trio.current_time()
            assert 60 <= first - start <= 65
            assert second - first == pytest.approx(first - start, abs=0.01)
            server.close()


async def test_ping_gets_pong(server: DerpServer) -> None:
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            c = await memory_client(nursery, server, new_key())
            await c.send(c.conn.send_ping(b"12345678"))
            assert await recv_type(c, Pong) == Pong(b"12345678")
            server.close()


async def test_verify_clients_refuses_unknown_keys_with_a_reason() -> None:
    allowed = new_key()

    async def verify(node_key: bytes) -> bool:
        return node_key == pub(allowed)

    server = DerpServer(new_key(), verify_client=verify)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            ok = await memory_client(nursery, server, allowed)
            assert server.is_connected(ok.public_key)
            bad = await memory_client(nursery, server, new_key(), wait_server_info=False)
            health = await recv_type(bad, Health)
            assert "not a registered" in health.problem
            assert "verify_clients" in health.problem
            with pytest.raises(trio.EndOfChannel):
                await bad.recv()
            assert server.stats.refused == 1
            assert not server.is_connected(bad.public_key)
            server.close()


async def test_watchers_see_peers_come_and_go_and_can_close_them(server: DerpServer) -> None:
    w, a, b = new_key(), new_key(), new_key()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            ca = await memory_client(nursery, server, a, peer="192.0.2.10:4000")
            cw = await memory_client(nursery, server, w, mesh_key=MESH)
            await cw.send(cw.conn.send_watch_conns())
            # The initial dump lists everyone connected (the watcher too, as in Go).
            dump = {(await recv_type(cw, PeerPresent)) for _ in range(2)}
            by_key = {p.key: p for p in dump}
            assert set(by_key) == {pub(a), pub(w)}
            assert (str(by_key[pub(a)].ip), by_key[pub(a)].port) == ("192.0.2.10", 4000)
            cb = await memory_client(nursery, server, b)
            assert (await recv_type(cw, PeerPresent)).key == pub(b)
            await cw.send(cw.conn.send_close_peer(pub(b)))
            with pytest.raises(trio.EndOfChannel):
                await recv_type(cb, RecvPacket)
            assert await recv_type(cw, PeerGone) == PeerGone(pub(b), 0)
            await ca.aclose()
            assert await recv_type(cw, PeerGone) == PeerGone(pub(a), 0)
            server.close()


async def test_watch_conns_without_mesh_key_drops_the_connection(server: DerpServer) -> None:
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            c = await memory_client(nursery, server, new_key())
            await c.send(c.conn.send_watch_conns())
            with pytest.raises(trio.EndOfChannel):
                await c.recv()
            server.close()


async def test_fast_start_sends_no_http_response(server: DerpServer) -> None:
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            a = await memory_client(
                nursery, server, new_key(), fast_start=True, server_key=server.public_key
            )
            b = await memory_client(nursery, server, new_key())
            await a.send_packet(b.public_key, b"fast")
            assert await recv_type(b, RecvPacket) == RecvPacket(a.public_key, b"fast")
            server.close()


async def test_plain_get_without_upgrade_gets_426(server: DerpServer) -> None:
    from tests.derp.derp_harness import front_end

    client_end, server_end = trio.testing.memory_stream_pair()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(front_end, server_end, "127.0.0.1:1", server.handle_upgrade)
            await client_end.send_all(b"GET /derp HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while chunk := await client_end.receive_some():
                data += chunk
    assert data.startswith(b"HTTP/1.1 426 ")
    assert data.endswith(b"DERP requires connection upgrade")


async def test_malformed_websocket_upgrade_is_refused_at_once(server: DerpServer) -> None:
    """``Upgrade: websocket`` with the derp subprotocol but no valid opening handshake
    (no Sec-WebSocket-Key): a 400 naming what is missing, not a wait for the timeout."""
    from tests.derp.derp_harness import front_end

    client_end, server_end = trio.testing.memory_stream_pair()
    with trio.fail_after(2):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(front_end, server_end, "127.0.0.1:1", server.handle_upgrade)
            await client_end.send_all(
                b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                b"Sec-WebSocket-Protocol: derp\r\n\r\n"
            )
            data = b""
            while chunk := await client_end.receive_some():
                data += chunk
    assert data.startswith(b"HTTP/1.1 400 "), data
    assert b"Sec-WebSocket-Key" in data, data
    assert server.stats.websocket_accepts == 0


async def test_health_and_restarting_reach_clients(server: DerpServer) -> None:
    from derp.codec import Restarting

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            c = await memory_client(nursery, server, new_key())
            server.health("relay overloaded")
            assert await recv_type(c, Health) == Health("relay overloaded")
            server.restarting(1000, 30000)
            assert await recv_type(c, Restarting) == Restarting(1000, 30000)
            server.close()


async def test_relay_over_tls_on_loopback(tmp_path: Path, server: DerpServer) -> None:
    tls = make_tls(tmp_path)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await serve_loopback(
                nursery, server.handle_upgrade, ssl_context=tls.server_context()
            )
            a = await tcp_client(port, new_key(), ssl_context=tls.client_context())
            b = await tcp_client(port, new_key(), ssl_context=tls.client_context())
            for i in range(50):
                await a.send_packet(b.public_key, bytes([i]) * 1280)
            for i in range(50):
                assert await recv_type(b, RecvPacket) == RecvPacket(a.public_key, bytes([i]) * 1280)
            await a.aclose()
            assert await recv_type(b, PeerGone) == PeerGone(a.public_key, 0)
            await b.aclose()
            server.close()
            nursery.cancel_scope.cancel()


async def test_derp_over_websocket(server: DerpServer) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await serve_loopback(nursery, server.handle_upgrade)
            plain = await tcp_client(port, new_key())
            async with open_websocket(
                "127.0.0.1", port, "/derp", use_ssl=False, subprotocols=["derp"]
            ) as ws:
                assert ws.subprotocol == "derp"
                stream = WebSocketByteStream(ws, ConnectionClosed)
                wsc = await DerpClient.connect(stream, new_key(), upgrade=False)
                await wsc.send_packet(plain.public_key, b"over websocket")
                assert await recv_type(plain, RecvPacket) == RecvPacket(
                    wsc.public_key, b"over websocket"
                )
                await plain.send_packet(wsc.public_key, b"back")
                assert await recv_type(wsc, RecvPacket) == RecvPacket(plain.public_key, b"back")
            await plain.aclose()
            assert server.stats.websocket_accepts == 1
            server.close()
            nursery.cancel_scope.cancel()


def test_server_key_file_is_created_once_in_headscale_format(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "derp_server_private.key"
    key = load_or_create_server_key(path)
    text = path.read_text()
    assert text == "privkey:" + key.hex()
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_or_create_server_key(path) == key
    path.write_text("nodekey:abc")
    with pytest.raises(DerpConfigError, match="not a DERP private key"):
        load_or_create_server_key(path)


async def test_close_ends_connections_still_in_handshake(server: DerpServer) -> None:
    from tests.derp.derp_harness import front_end

    client_end, server_end = trio.testing.memory_stream_pair()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(front_end, server_end, "127.0.0.1:1", server.handle_upgrade)
            await client_end.send_all(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\n\r\n")
            data = b""
            while b"DERP\xf0\x9f\x94\x91" not in data:  # 101 + ServerKey arrived
                data += await client_end.receive_some()
            assert data.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
            # The client never sends ClientInfo; shutdown must not wait 10 s for it.
            server.close()
    assert server.stats.current_connections == 0


async def test_handshake_times_out_after_10_seconds(autojump_clock, server: DerpServer) -> None:
    from tests.derp.derp_harness import front_end

    client_end, server_end = trio.testing.memory_stream_pair()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(front_end, server_end, "127.0.0.1:1", server.handle_upgrade)
            await client_end.send_all(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\n\r\n")
            start = trio.current_time()
            while await client_end.receive_some():
                pass
            assert 10 <= trio.current_time() - start < 11
