"""Issue 9 over the real server: what a Go peer could not decode is refused with a 400
that names field and value, nothing is stored, and the peers' map streams never see it.

The server is a real homescale process on loopback; the nodes are driven over real
ts2021 by tests/protocol/ts2021client.py (no tsnet needed).
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import trio
from nacl.public import Box
from nacl.public import PrivateKey as NaclPrivateKey
from nacl.public import PublicKey as NaclPublicKey

from derp.codec import MAGIC, FrameType, encode_frame
from tests import realclient
from tests.e2e.conftest import ControlPeer, MapStream, connect_peer
from tests.realclient import msg_has

MOVING = ("lastSeen", "online")


def snapshot(nodes: list[dict[str, Any]]) -> str:
    return json.dumps(
        sorted(({k: v for k, v in n.items() if k not in MOVING} for n in nodes), key=str),
        sort_keys=True,
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[realclient.HomescaleServer]:
    d = tmp_path_factory.mktemp("wire")
    srv = realclient.HomescaleServer(d)
    srv.start()
    try:
        srv.cli("users", "create", "alice")
        yield srv
    finally:
        srv.stop()


# (what is sent in a lite MapRequest, what the 400 must name)
HOSTILE_MAP_FIELDS: list[tuple[dict[str, Any], list[str]]] = [
    ({"Endpoints": ["not-an-endpoint"]}, ["Endpoints[0]", "not-an-endpoint", "netip.AddrPort"]),
    ({"Endpoints": ["1.2.3.4:41641", "1.2.3.4:70000"]}, ["Endpoints[1]", "1.2.3.4:70000"]),
    ({"Endpoints": ["[::1]"]}, ["Endpoints[0]", "[::1]"]),
    ({"Endpoints": ["::1:80"]}, ["Endpoints[0]", "square brackets"]),
    ({"Endpoints": ["1.2.3.4:1"] * 2000}, ["Endpoints", "2000 items"]),
    (
        {"Hostinfo": {"Hostname": "x", "RoutableIPs": ["not-a-prefix"]}},
        ["Hostinfo.RoutableIPs[0]", "not-a-prefix", "netip.Prefix"],
    ),
    ({"Hostinfo": {"RoutableIPs": ["10.0.0.0/33"]}}, ["RoutableIPs[0]", "out of range"]),
    ({"Hostinfo": {"RoutableIPs": ["10.0.0.1/8"]}}, ["RoutableIPs[0]", "host bits"]),
    (
        {"Hostinfo": {"NetInfo": {"PreferredDERP": 2**70}}},
        ["Hostinfo.NetInfo.PreferredDERP", "1180591620717411303424"],
    ),
    ({"Hostinfo": {"NetInfo": {"PreferredDERP": -1}}}, ["PreferredDERP", "-1"]),
    ({"Hostinfo": {"Services": [{"Proto": "tcp", "Port": 65536}]}}, ["Services[0].Port"]),
    ({"Hostinfo": {"Hostname": "h" * 5000}}, ["Hostinfo.Hostname", "5000 characters"]),
    ({"Version": 2**63}, ["MapRequest.Version"]),
    ({"DiscoKey": "discokey:" + "ab" * 31}, ["DiscoKey"]),
    ({"NodeKey": "nodekey:" + "0" * 64}, ["NodeKey", "zero key"]),
]

HOSTILE_BODIES = [
    (b"[" * 100_000, "nested deeper"),
    (b'{"Version": ' + b"1" * 5000 + b"}", "number literal"),
    (b'{"Version": NaN}', "NaN"),
    (b'{"Hostinfo": {"Location": {"Latitude": Infinity}}}', "Infinity"),
    (b'{"Hostinfo": {"Hostname": "\xff"}}', "invalid UTF-8"),
    (b'{"Hostinfo": {"Hostname": "\\ud800"}}', "surrogate"),
]


async def register(
    server: realclient.HomescaleServer, nursery: trio.Nursery, name: str
) -> ControlPeer:
    peer = await connect_peer(server, nursery, name)
    key = await trio.to_thread.run_sync(server.create_key, "alice")
    await peer.register(key)
    return peer


async def quiet(stream: MapStream, seconds: float) -> list[dict[str, Any]]:
    """Every non-keepalive message the stream brings within ``seconds``."""
    got: list[dict[str, Any]] = []
    with trio.move_on_after(seconds):
        while True:
            got.append((await stream.next(timeout=seconds + 1))[1])
    return got


async def test_values_go_cannot_decode_are_refused_and_never_reach_peers(
    server: realclient.HomescaleServer,
) -> None:
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            bad = await register(server, nursery, "mallory")
            watcher = await register(server, nursery, "watcher")
            stream = await watcher.open_stream()
            await stream.next()  # the full netmap
            await bad.lite_update(Endpoints=["192.0.2.1:41641"])
            before = snapshot(await server.anodes())
            await quiet(stream, 1.0)  # drain the good update

            since = server.log.mark()
            for fields, names in HOSTILE_MAP_FIELDS:
                req = bad.map_request(stream=False, omit_peers=True)
                for k, v in fields.items():
                    req[k] = {**req[k], **v} if isinstance(v, dict) and k in req else v
                status, body = await bad.post("/machine/map", req)
                assert status == 400, (fields, status, body[:300])
                text = body.decode()
                for name in names:
                    assert name in text, (name, text)
            for raw, reason in HOSTILE_BODIES:
                for path in ("/machine/map", "/machine/register"):
                    status, body = await bad.post(path, raw)
                    assert status == 400, (path, raw[:40], status, body[:300])
                    assert reason in body.decode(), (reason, body[:300])
            await server.log.wait_for(msg_has("refused", "netip.AddrPort"), since=since, timeout=5)

            # The watcher's stream saw none of it; a valid change still flows.
            for msg in await quiet(stream, 1.0):
                assert "not-an-endpoint" not in json.dumps(msg), msg
            await bad.lite_update(Endpoints=["192.0.2.1:41642"])
            seen = json.dumps(await quiet(stream, 2.0))
            assert "192.0.2.1:41642" in seen
            nursery.cancel_scope.cancel()

    after = snapshot(await server.anodes())
    # Only the last (valid) endpoint change may differ from the snapshot.
    assert after.replace("41642", "41641") == before
    assert server.running
    assert server.log.find(msg_has("Traceback")) is None


async def derp_session(
    server: realclient.HomescaleServer, client_info: Callable[[bytes], bytes]
) -> bytes:
    """Upgrade to DERP over TLS on the main listener, send one ClientInfo built for the
    server's key, and return what the server sent until it hung up."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the test talks to its own self-signed server
    with trio.fail_after(15):
        stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", server.port, ssl_context=ctx)
        async with stream:
            await stream.send_all(
                b"GET /derp HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n"
            )
            data = b""
            while MAGIC not in data or len(data) < data.index(MAGIC) + len(MAGIC) + 32:
                data += await stream.receive_some()
            server_key = data[data.index(MAGIC) + len(MAGIC) :][:32]
            await stream.send_all(client_info(server_key))
            try:
                while chunk := await stream.receive_some():
                    data += chunk
            except trio.BrokenResourceError:
                pass
    return data


def _sealed(plaintext: bytes) -> Callable[[bytes], bytes]:
    def build(server_key: bytes) -> bytes:
        priv = NaclPrivateKey.generate()
        sealed = bytes(Box(priv, NaclPublicKey(server_key)).encrypt(plaintext))
        return encode_frame(FrameType.CLIENT_INFO, bytes(priv.public_key) + sealed)

    return build


@pytest.mark.parametrize(
    ("client_info", "reason"),
    [
        (_sealed(b"[" * 100_000), "nested deeper"),
        (lambda _key: encode_frame(FrameType.CLIENT_INFO, bytes(56) + b"x" * 40), "all-zero key"),
    ],
    ids=["deep-json-client-info", "zero-node-key"],
)
async def test_derp_client_info_that_once_killed_the_process(
    server: realclient.HomescaleServer, client_info: Callable[[bytes], bytes], reason: str
) -> None:
    before = (await trio.to_thread.run_sync(server.metrics))["homescale_derp_protocol_errors_total"]
    since = server.log.mark()
    await derp_session(server, client_info)
    await server.log.wait_for(msg_has("derp", "protocol error", reason), since=since, timeout=5)
    assert server.running
    after = (await trio.to_thread.run_sync(server.metrics))["homescale_derp_protocol_errors_total"]
    assert after == before + 1
    # It was refused before verify_clients: no refusal for an unregistered key was counted.
    assert server.log.find(msg_has("derp", "refused"), since=since) is None
