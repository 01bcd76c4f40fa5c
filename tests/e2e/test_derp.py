"""Issue 4 with real clients: the embedded DERP relay carries the traffic of nodes that
may not go direct, STUN answers the clients, verify_clients turns strangers away,
and a node that dies is reported gone to those it talked to.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterator

import pytest
import trio
from nacl.public import Box, PublicKey
from nacl.public import PrivateKey as NaclPrivateKey

from derp.client import DerpClient
from derp.codec import Health, PeerGone, PeerGoneReason, RecvPacket
from protocol.keys import PrivateKey
from tests import realclient
from tests.e2e.conftest import Pair, Tailnet, _pair, connect_peer, fetch_until, node_by_name
from tests.realclient import msg_has

pytestmark = [pytest.mark.realclient]

# disco/disco.go: magic "TS💬", then the sender's disco key, a NaCl nonce, the box.
DISCO_MAGIC = "TS💬".encode()
DISCO_PING = 0x01


@pytest.fixture(scope="module")
def derp_pair(tailnet: Tailnet) -> Iterator[Pair]:
    """derpa and derpb with TS_DEBUG_ALWAYS_USE_DERP=true: they talk only through our relay.

    Module-scoped: the PeerGone test (last here) kills derpa.
    """
    p = _pair(tailnet, "derpa", "derpb", always_derp=True)
    try:
        yield p
    finally:
        p.a.stop()
        p.b.stop()


async def derp_connect(
    server: realclient.HomescaleServer, private: bytes, **kw: object
) -> DerpClient:
    """A DERP client over TLS to the main listener (the certificate is self-signed; the
    real clients pin it, this test does not need to)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", server.port, ssl_context=ctx)
    return await DerpClient.connect(stream, private, host="127.0.0.1", **kw)  # type: ignore[arg-type]


def disco_ping(sender_disco: PrivateKey, receiver_disco: bytes, sender_node: bytes) -> bytes:
    """A disco Ping (disco.go: type 1, version 0, TxID[12], NodeKey[32]), sealed."""
    payload = bytes([DISCO_PING, 0]) + os.urandom(12) + sender_node
    sealed = Box(NaclPrivateKey(sender_disco.raw), PublicKey(receiver_disco)).encrypt(
        payload, os.urandom(24)
    )  # nonce || box
    return DISCO_MAGIC + sender_disco.disco_public().raw + bytes(sealed)


async def test_fetch_through_derp_relay(tailnet: Tailnet, derp_pair: Pair) -> None:
    server = tailnet.server
    before = await trio.to_thread.run_sync(server.metrics)
    body = await fetch_until(derp_pair.b, f"{derp_pair.ipv4['derpa']}:80", timeout=40)
    assert body == b"hello from derpa"
    after = await trio.to_thread.run_sync(server.metrics)
    # The WireGuard packets of that exchange went through our relay.
    relayed = (
        after["homescale_derp_packets_sent_total"] - before["homescale_derp_packets_sent_total"]
    )
    assert relayed > 0, (before, after)
    assert (
        after["homescale_derp_packets_received_total"]
        > before["homescale_derp_packets_received_total"]
    )
    assert after["homescale_derp_current_connections"] >= 2
    for c in (derp_pair.a, derp_pair.b):
        # No direct path was possible, and the clients use our region (999) as home.
        assert c.log.find(msg_has("disabled udp4 per TS_DEBUG_ALWAYS_USE_DERP")) is not None
        assert c.log.find(msg_has("derp-999 connected")) is not None


async def test_stun_answers_clients(tailnet: Tailnet, pair: Pair) -> None:
    # nodea may use UDP: its netcheck asks our STUN server for its address.
    line = await pair.a.wait_for_log(
        msg_has("netcheck", "report: udp=true"),
        timeout=20,
        what="a netcheck report with working UDP",
    )
    assert "derp=999" in str(line["msg"])
    stats = await trio.to_thread.run_sync(tailnet.server.metrics)
    assert stats["homescale_stun_requests_total"] > 0


async def test_verify_clients_refuses_unknown_keys(tailnet: Tailnet) -> None:
    server = tailnet.server
    before = (await trio.to_thread.run_sync(server.metrics))["homescale_derp_refused_total"]
    stranger = PrivateKey.generate()
    with trio.fail_after(15):
        dc = await derp_connect(server, stranger.raw, wait_server_info=False)
        events = []
        try:
            while True:
                events.append(await dc.recv())
        except trio.EndOfChannel:
            pass
        await dc.aclose()
    health = [e for e in events if isinstance(e, Health)]
    assert health, events
    assert "not a registered" in health[0].problem
    assert "verify_clients" in health[0].problem
    after = (await trio.to_thread.run_sync(server.metrics))["homescale_derp_refused_total"]
    assert after == before + 1
    await server.log.wait_for(
        msg_has("derp:", "refused", stranger.node_public().raw.hex()[:16]), timeout=5
    )

    # A registered node key is let in.
    async with trio.open_nursery() as nursery:
        peer = await connect_peer(server, nursery, "derpknown")
        with trio.fail_after(15):
            await peer.register(tailnet.reusable_key)
            dc = await derp_connect(server, peer.node.raw)  # waits for ServerInfo
            await dc.aclose()
        nursery.cancel_scope.cancel()


async def test_killed_node_is_reported_gone(tailnet: Tailnet, derp_pair: Pair) -> None:
    """Kill derpa: a DERP client that derpa had sent packets to gets PeerGone(derpa).

    The watcher is our own node (registered over ts2021 with a disco key, so derpa
    knows it as a peer); it pings derpa over DERP with a disco Ping, derpa answers,
    and from then on the relay owes it a PeerGone when derpa goes away.
    """
    server = tailnet.server
    a = node_by_name(await server.anodes(), "derpa")
    assert a is not None
    a_node = bytes.fromhex(a["nodeKey"].removeprefix("nodekey:"))
    a_disco = bytes.fromhex(a["discoKey"].removeprefix("discokey:"))
    async with trio.open_nursery() as nursery:
        watcher = await connect_peer(server, nursery, "gonewatch")
        with trio.fail_after(15):
            await watcher.register(tailnet.reusable_key)
            # Our disco key and home region reach derpa through the map stream.
            await watcher.lite_update(
                Endpoints=[], Hostinfo=watcher.hostinfo(NetInfo={"PreferredDERP": 999})
            )
            dc = await derp_connect(server, watcher.node.raw)
        node_pub = watcher.node.node_public().raw
        with trio.fail_after(30):
            got_reply = False
            while not got_reply:
                await dc.send_packet(a_node, disco_ping(watcher.disco, a_disco, node_pub))
                with trio.move_on_after(1.0):
                    while True:
                        ev = await dc.recv()
                        if isinstance(ev, RecvPacket) and ev.src == a_node:
                            got_reply = True
                            break
        derp_pair.a.kill()
        with trio.fail_after(15):
            while True:
                ev = await dc.recv()
                if isinstance(ev, PeerGone) and ev.key == a_node:
                    break
        assert ev.reason == PeerGoneReason.DISCONNECTED
        await dc.aclose()
        nursery.cancel_scope.cancel()
