"""DERP codec: every frame type round-trips, whole and byte by byte; bad input is refused."""

from __future__ import annotations

import ipaddress
import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.public import Box, PrivateKey, PublicKey

from derp import codec
from derp.codec import (
    ClientInfo,
    ClientState,
    ClosePeer,
    DerpClientConnection,
    DerpServerConnection,
    ForwardPacket,
    FrameType,
    Health,
    KeepAlive,
    NotePreferred,
    PeerGone,
    PeerGoneReason,
    PeerPresent,
    Ping,
    Pong,
    RecvPacket,
    Restarting,
    SendPacket,
    ServerInfo,
    ServerKey,
    ServerState,
    UnknownFrame,
    WatchConns,
)
from derp.errors import DerpError, LocalDerpError, RemoteDerpError

SERVER_PRIV = bytes(range(1, 33))
CLIENT_PRIV = bytes(range(33, 65))
MESH = bytes([7]) * 32


def feed(conn, data: bytes, *, bytewise: bool) -> list:
    if not bytewise:
        return conn.receive_data(data)
    events = []
    for i in range(len(data)):
        events += conn.receive_data(data[i : i + 1])
    return events


def handshake(*, mesh: bool = False, bytewise: bool = False):
    server = DerpServerConnection(SERVER_PRIV, mesh_key=MESH)
    client = DerpClientConnection(CLIENT_PRIV)
    ev = feed(client, server.start(), bytewise=bytewise)
    assert ev == [ServerKey(server.public_key)]
    ev = feed(server, client.send_client_info(mesh_key=MESH if mesh else None), bytewise=bytewise)
    assert ev == [
        ClientInfo(
            key=client.public_key, version=2, can_ack_pings=True, mesh_key=MESH if mesh else None
        )
    ]
    assert server.state is ServerState.VERIFYING
    assert server.can_mesh is mesh
    ev = feed(client, server.accept(), bytewise=bytewise)
    assert ev == [ServerInfo(version=2)]
    assert client.state is ClientState.ESTABLISHED
    return server, client


K1, K2 = bytes([1]) * 32, bytes([2]) * 32


@pytest.mark.parametrize("bytewise", [False, True])
def test_handshake_seals_both_directions(bytewise: bool) -> None:
    handshake(bytewise=bytewise)


def test_server_key_frame_matches_the_go_wire_bytes() -> None:
    server = DerpServerConnection(SERVER_PRIV)
    frame = server.start()
    # type 1, length 40, "DERP🔑", key
    assert frame[:5] == b"\x01\x00\x00\x00\x28"
    assert frame[5:13] == bytes.fromhex("44455250f09f9491")
    assert frame[13:] == bytes(PrivateKey(SERVER_PRIV).public_key)


def test_client_info_json_is_what_go_sends() -> None:
    server_pub = bytes(PrivateKey(SERVER_PRIV).public_key)
    client = DerpClientConnection(CLIENT_PRIV, server_key=server_pub)
    frame = client.send_client_info()
    assert frame[0] == FrameType.CLIENT_INFO
    payload = frame[5:]
    assert payload[:32] == client.public_key
    plain = Box(PrivateKey(SERVER_PRIV), PublicKey(payload[:32])).decrypt(payload[32:])
    assert json.loads(plain) == {"version": 2, "CanAckPings": True}


@pytest.mark.parametrize("bytewise", [False, True])
@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (lambda s: s.send_packet(K1, b"wg-data"), RecvPacket(K1, b"wg-data")),
        (lambda s: s.send_packet(K1, b""), RecvPacket(K1, b"")),
        (lambda s: s.send_keep_alive(), KeepAlive()),
        (lambda s: s.send_peer_gone(K2), PeerGone(K2, PeerGoneReason.DISCONNECTED)),
        (lambda s: s.send_peer_gone(K2, PeerGoneReason.NOT_HERE), PeerGone(K2, 1)),
        (
            lambda s: s.send_peer_present(K2, ipaddress.ip_address("192.0.2.7"), 4242, 1),
            PeerPresent(K2, ipaddress.ip_address("192.0.2.7"), 4242, 1),
        ),
        (
            lambda s: s.send_peer_present(K2, ipaddress.ip_address("2001:db8::9"), 1, 9),
            PeerPresent(K2, ipaddress.ip_address("2001:db8::9"), 1, 9),
        ),
        (lambda s: s.send_ping(b"12345678"), Ping(b"12345678")),
        (lambda s: s.send_pong(b"abcdefgh"), Pong(b"abcdefgh")),
        (lambda s: s.send_health("disk on fire"), Health("disk on fire")),
        (lambda s: s.send_health(""), Health("")),
        (lambda s: s.send_restarting(1500, 60000), Restarting(1500, 60000)),
    ],
)
def test_server_to_client_frames_round_trip(build, expected, bytewise: bool) -> None:
    server, client = handshake()
    assert feed(client, build(server), bytewise=bytewise) == [expected]


@pytest.mark.parametrize("bytewise", [False, True])
@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (lambda c: c.send_packet(K2, b"x" * 1280), SendPacket(K2, b"x" * 1280)),
        (lambda c: c.send_packet(K2, b"m" * codec.MAX_PACKET_SIZE), SendPacket(K2, b"m" * 65536)),
        (lambda c: c.send_note_preferred(True), NotePreferred(True)),
        (lambda c: c.send_note_preferred(False), NotePreferred(False)),
        (lambda c: c.send_ping(b"pingpong"), Ping(b"pingpong")),
        (lambda c: c.send_pong(b"pongping"), Pong(b"pongping")),
        (lambda c: c.send_watch_conns(), WatchConns()),
        (lambda c: c.send_close_peer(K1), ClosePeer(K1)),
        (lambda c: c.send_forward_packet(K1, K2, b"fwd"), ForwardPacket(K1, K2, b"fwd")),
    ],
)
def test_client_to_server_frames_round_trip(build, expected, bytewise: bool) -> None:
    server, client = handshake(mesh=True)
    assert feed(server, build(client), bytewise=bytewise) == [expected]


def test_peer_present_from_older_servers_has_optional_fields() -> None:
    _, client = handshake()
    bare = codec.encode_frame(FrameType.PEER_PRESENT, K1)
    no_flags = codec.encode_frame(
        FrameType.PEER_PRESENT, K1 + ipaddress.ip_address("::ffff:10.0.0.1").packed + b"\x00\x50"
    )
    assert client.receive_data(bare) == [PeerPresent(K1)]
    assert client.receive_data(no_flags) == [PeerPresent(K1, ipaddress.ip_address("10.0.0.1"), 80)]


def test_peer_present_is_51_bytes_with_v4_mapped_address() -> None:
    server, _ = handshake()
    frame = server.send_peer_present(K1, ipaddress.ip_address("10.1.2.3"), 0x1234, 3)
    assert struct.unpack(">BI", frame[:5]) == (FrameType.PEER_PRESENT, 51)
    assert frame[5 + 32 : 5 + 48] == b"\0" * 10 + b"\xff\xff" + bytes([10, 1, 2, 3])


def test_peer_gone_without_reason_byte_means_disconnected() -> None:
    _, client = handshake()
    assert client.receive_data(codec.encode_frame(FrameType.PEER_GONE, K1)) == [PeerGone(K1, 0)]


def test_several_frames_in_one_chunk_and_unknown_types_are_skipped() -> None:
    server, client = handshake()
    data = (
        server.send_keep_alive()
        + codec.encode_frame(0x7F, b"future")
        + server.send_packet(K1, b"a")
        + server.send_packet(K2, b"b")
    )
    assert client.receive_data(data) == [
        KeepAlive(),
        UnknownFrame(0x7F, b"future"),
        RecvPacket(K1, b"a"),
        RecvPacket(K2, b"b"),
    ]


def test_truncated_frame_waits_for_the_rest() -> None:
    server, client = handshake()
    frame = client.send_packet(K2, b"hello")
    assert server.receive_data(frame[:3]) == []
    assert server.receive_data(frame[3:-1]) == []
    assert server.receive_data(frame[-1:]) == [SendPacket(K2, b"hello")]


def test_frames_sent_before_server_info_are_kept_until_accept() -> None:
    server = DerpServerConnection(SERVER_PRIV)
    client = DerpClientConnection(CLIENT_PRIV, server_key=server.public_key)
    # Fast start: ClientInfo and a packet arrive before we even sent ServerKey.
    early = client.send_client_info() + client.send_packet(K2, b"early")
    assert server.receive_data(early) == []
    server.start()
    assert [type(e) for e in server.receive_data(b"")] == [ClientInfo]
    server.accept()
    assert server.receive_data(b"") == [SendPacket(K2, b"early")]


def test_oversized_frame_is_refused_from_its_header() -> None:
    _, client = handshake()
    with pytest.raises(RemoteDerpError, match="exceeds the limit"):
        client.receive_data(struct.pack(">BI", FrameType.RECV_PACKET, codec.MAX_FRAME_SIZE + 1))


def test_oversized_send_packet_is_refused() -> None:
    server, _ = handshake()
    frame = codec.encode_frame(FrameType.SEND_PACKET, K2 + b"x" * (codec.MAX_PACKET_SIZE + 1))
    with pytest.raises(RemoteDerpError, match="exceeds 65536"):
        server.receive_data(frame)


def test_client_info_over_256k_is_refused_before_buffering() -> None:
    server = DerpServerConnection(SERVER_PRIV)
    server.start()
    with pytest.raises(RemoteDerpError, match="exceeds the limit"):
        server.receive_data(struct.pack(">BI", FrameType.CLIENT_INFO, (256 << 10) + 1))


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (codec.encode_frame(FrameType.NOTE_PREFERRED, b""), "NotePreferred"),
        (codec.encode_frame(FrameType.SEND_PACKET, b"short"), "short SendPacket"),
        (codec.encode_frame(FrameType.PING, b"1234"), "short Ping"),
        (codec.encode_frame(FrameType.PING, b"p" * 1001), "too large"),
    ],
)
def test_malformed_client_frames_raise(frame: bytes, message: str) -> None:
    server, _ = handshake()
    with pytest.raises(RemoteDerpError, match=message):
        server.receive_data(frame)


@pytest.mark.parametrize(
    "build",
    [
        lambda c: c.send_watch_conns(),
        lambda c: c.send_close_peer(K1),
        lambda c: c.send_forward_packet(K1, K2, b"x"),
    ],
)
def test_mesh_frames_need_the_mesh_key(build) -> None:
    server, client = handshake(mesh=False)
    with pytest.raises(RemoteDerpError, match="insufficient permissions"):
        server.receive_data(build(client))


def test_first_frame_must_be_client_info() -> None:
    server = DerpServerConnection(SERVER_PRIV)
    server.start()
    with pytest.raises(RemoteDerpError, match="expected ClientInfo"):
        server.receive_data(codec.encode_frame(FrameType.SEND_PACKET, K2 + b"x"))


def test_client_info_sealed_to_another_key_is_refused() -> None:
    server = DerpServerConnection(SERVER_PRIV)
    server.start()
    wrong = DerpClientConnection(CLIENT_PRIV, server_key=bytes(PrivateKey.generate().public_key))
    with pytest.raises(RemoteDerpError, match="cannot open"):
        server.receive_data(wrong.send_client_info())


def test_server_key_without_magic_is_refused() -> None:
    client = DerpClientConnection(CLIENT_PRIV)
    with pytest.raises(RemoteDerpError, match="magic"):
        client.receive_data(codec.encode_frame(FrameType.SERVER_KEY, b"NOTMAGIC" + K1))


def test_api_misuse_is_a_local_error() -> None:
    server = DerpServerConnection(SERVER_PRIV)
    with pytest.raises(LocalDerpError):
        server.accept()
    server.start()
    with pytest.raises(LocalDerpError):
        server.send_keep_alive()
    with pytest.raises(LocalDerpError):
        DerpClientConnection(CLIENT_PRIV).send_client_info()
    s, _ = handshake()
    with pytest.raises(LocalDerpError):
        s.send_ping(b"short")
    with pytest.raises(LocalDerpError):
        s.send_packet(K1, b"x" * (codec.MAX_PACKET_SIZE + 1))


# ---------------------------------------------------------------- hypothesis

frames = st.builds(
    codec.encode_frame,
    st.sampled_from([int(t) for t in FrameType] + [0x00, 0x30, 0xFF]),
    st.binary(max_size=120),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(frames, max_size=8), st.lists(st.integers(0, 400), max_size=6))
def test_client_parser_is_split_invariant(frame_list: list[bytes], cuts: list[int]) -> None:
    """Any chunking of a byte stream yields the same events or the same error class."""
    data = b"".join(frame_list)

    def run(chunks: list[bytes]):
        _, client = handshake()
        out = []
        try:
            for c in chunks:
                out += client.receive_data(c)
        except RemoteDerpError as e:
            return out, type(e)
        return out, None

    points = sorted({min(c, len(data)) for c in cuts})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    whole_events, whole_err = run([data])
    split_events, split_err = run(chunks)
    assert whole_err == split_err
    if whole_err is None:
        assert whole_events == split_events


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_server_parser_only_raises_derp_errors(data: bytes) -> None:
    server, _ = handshake(mesh=True)
    try:
        events = server.receive_data(data)
    except DerpError:
        return
    for ev in events:
        assert isinstance(ev, codec.Event)
