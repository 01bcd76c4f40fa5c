"""Sans-IO DERP frame codec: bytes in, events out; ``send_*`` return bytes.

No trio, no sockets (like h11): the trio relay in ``derp/server.py`` owns the
stream. Facts from tailscale v1.90.9 ``derp/derp.go`` (constants, frame types),
``derp/derp_client.go`` (client parsing) and ``derp/derpserver/derpserver.go``
(server limits and checks).

Wire format: 1-byte frame type, 4-byte big-endian payload length (header not
counted), payload. Keys are raw 32-byte Curve25519 public keys; a node's DERP
identity is its WireGuard node key.
"""

from __future__ import annotations

import enum
import hmac
import ipaddress
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey

from derp.errors import LocalDerpError, RemoteDerpError
from protocol import safejson

# "DERP🔑": every ServerKey frame starts with it (derp.go Magic).
MAGIC = "DERP🔑".encode()
assert len(MAGIC) == 8
# derp.go ProtocolVersion: v2 puts the source key in RecvPacket.
PROTOCOL_VERSION = 2
KEY_LEN = 32
NONCE_LEN = 24
FRAME_HEADER_LEN = 5
# derp.go MaxPacketSize: the largest packet a client may send or receive.
MAX_PACKET_SIZE = 64 << 10
# derp_client.go recvTimeout rejects frames over 1 MiB; we hold both sides to it.
MAX_FRAME_SIZE = 1 << 20
# derpserver.go recvClientKey: "we don't trust the client at all yet".
MAX_CLIENT_INFO_LEN = 256 << 10
# Mesh keys are 32 bytes (key.DERPMesh); headscale's are the same. Room for odd ones.
MAX_MESH_KEY_LEN = 64
# derpserver.go handleFramePing: 8 bytes, some room for extension, not more.
PING_LEN = 8
MAX_PING_LEN = 1000
# derp.go KeepAlive; derpserver.go sendLoop adds rand(0..5s) of jitter.
KEEP_ALIVE_SECONDS = 60.0
KEEP_ALIVE_JITTER_SECONDS = 5.0
# derpserver.go peerPresentFrameLen: key + 16-byte IP + 2-byte port + 1-byte flags.
PEER_PRESENT_LEN = KEY_LEN + 16 + 2 + 1

_HEADER = struct.Struct(">BI")


class FrameType(enum.IntEnum):
    """derp.go frame types."""

    SERVER_KEY = 0x01
    CLIENT_INFO = 0x02
    SERVER_INFO = 0x03
    SEND_PACKET = 0x04
    RECV_PACKET = 0x05
    KEEP_ALIVE = 0x06
    NOTE_PREFERRED = 0x07
    PEER_GONE = 0x08
    PEER_PRESENT = 0x09
    FORWARD_PACKET = 0x0A
    WATCH_CONNS = 0x10
    CLOSE_PEER = 0x11
    PING = 0x12
    PONG = 0x13
    HEALTH = 0x14
    RESTARTING = 0x15


class PeerGoneReason(enum.IntEnum):
    """derp.go PeerGoneReasonType (0xF0 is client-internal, never on the wire)."""

    DISCONNECTED = 0x00
    NOT_HERE = 0x01


class PeerPresentFlags(enum.IntFlag):
    """derp.go PeerPresentFlags."""

    IS_REGULAR = 1 << 0
    IS_MESH_PEER = 1 << 1
    IS_PROBER = 1 << 2
    NOT_IDEAL = 1 << 3


# ---------------------------------------------------------------- events


class Event:
    """Base class of everything ``receive_data`` returns."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class ServerKey(Event):
    key: bytes


@dataclass(frozen=True, slots=True)
class ClientInfo(Event):
    """The client's identity proof, already opened (derp_client.go ClientInfo)."""

    key: bytes
    version: int = PROTOCOL_VERSION
    can_ack_pings: bool = True
    mesh_key: bytes | None = None
    is_prober: bool = False


@dataclass(frozen=True, slots=True)
class ServerInfo(Event):
    """derp.go ServerInfo; zero token-bucket values mean "no client-side limit"."""

    version: int = PROTOCOL_VERSION
    token_bucket_bytes_per_second: int = 0
    token_bucket_bytes_burst: int = 0


@dataclass(frozen=True, slots=True)
class SendPacket(Event):
    dst: bytes
    data: bytes


@dataclass(frozen=True, slots=True)
class ForwardPacket(Event):
    src: bytes
    dst: bytes
    data: bytes


@dataclass(frozen=True, slots=True)
class RecvPacket(Event):
    src: bytes
    data: bytes


@dataclass(frozen=True, slots=True)
class KeepAlive(Event):
    pass


@dataclass(frozen=True, slots=True)
class NotePreferred(Event):
    preferred: bool


@dataclass(frozen=True, slots=True)
class PeerGone(Event):
    key: bytes
    reason: int = PeerGoneReason.DISCONNECTED


@dataclass(frozen=True, slots=True)
class PeerPresent(Event):
    """A peer connected. ``ip``/``port``/``flags`` are None from older servers."""

    key: bytes
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    port: int | None = None
    flags: int | None = None


@dataclass(frozen=True, slots=True)
class WatchConns(Event):
    pass


@dataclass(frozen=True, slots=True)
class ClosePeer(Event):
    key: bytes


@dataclass(frozen=True, slots=True)
class Ping(Event):
    data: bytes


@dataclass(frozen=True, slots=True)
class Pong(Event):
    data: bytes


@dataclass(frozen=True, slots=True)
class Health(Event):
    """Empty ``problem`` means healthy again."""

    problem: str


@dataclass(frozen=True, slots=True)
class Restarting(Event):
    reconnect_in_ms: int
    try_for_ms: int


@dataclass(frozen=True, slots=True)
class UnknownFrame(Event):
    """A frame type this side does not handle; both Go sides skip these."""

    frame_type: int
    payload: bytes


# ---------------------------------------------------------------- framing


def encode_frame(frame_type: int, payload: bytes = b"") -> bytes:
    """One frame: type, BE length, payload."""
    if len(payload) > MAX_FRAME_SIZE:
        raise LocalDerpError(f"frame of {len(payload)} bytes exceeds {MAX_FRAME_SIZE}")
    return _HEADER.pack(frame_type, len(payload)) + payload


class FrameBuffer:
    """Accumulates stream bytes and cuts whole frames; partial frames wait for more."""

    __slots__ = ("_buf", "_pos")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0

    def feed(self, data: bytes) -> None:
        if self._pos and self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif self._pos > 65536:
            # Compact now and then, not per frame: del on a bytearray head is O(n).
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def __len__(self) -> int:
        return len(self._buf) - self._pos

    def next_frame(self, max_size: int) -> tuple[int, bytes] | None:
        """The next whole frame, or None if more bytes are needed.

        The length is checked against ``max_size`` as soon as the header is
        in, so an oversized frame is refused before we buffer it.
        """
        buf, pos = self._buf, self._pos
        if len(buf) - pos < FRAME_HEADER_LEN:
            return None
        frame_type, length = _HEADER.unpack_from(buf, pos)
        if length > max_size:
            raise RemoteDerpError(
                f"DERP frame type 0x{frame_type:02x} of {length} bytes exceeds the "
                f"limit of {max_size} bytes"
            )
        end = pos + FRAME_HEADER_LEN + length
        if len(buf) < end:
            return None
        payload = bytes(buf[pos + FRAME_HEADER_LEN : end])
        self._pos = end
        return frame_type, payload


def _need(payload: bytes, size: int, what: str) -> None:
    if len(payload) < size:
        raise RemoteDerpError(f"short {what} frame: {len(payload)} bytes, need {size}")


def _exact(payload: bytes, size: int, what: str) -> None:
    if len(payload) != size:
        raise RemoteDerpError(f"{what} frame has {len(payload)} bytes, want {size}")


def _check_key(key: bytes, what: str = "key") -> bytes:
    if len(key) != KEY_LEN:
        raise LocalDerpError(f"{what} must be {KEY_LEN} raw bytes, got {len(key)}")
    return bytes(key)


# Frame payload parsers shared by both sides (the sealed frames need keys and
# live in the connection classes).


def _parse_send_packet(p: bytes) -> SendPacket:
    _need(p, KEY_LEN, "SendPacket")
    if len(p) - KEY_LEN > MAX_PACKET_SIZE:
        raise RemoteDerpError(
            f"SendPacket data of {len(p) - KEY_LEN} bytes exceeds {MAX_PACKET_SIZE}"
        )
    return SendPacket(p[:KEY_LEN], p[KEY_LEN:])


def _parse_forward_packet(p: bytes) -> ForwardPacket:
    _need(p, 2 * KEY_LEN, "ForwardPacket")
    if len(p) - 2 * KEY_LEN > MAX_PACKET_SIZE:
        raise RemoteDerpError("ForwardPacket data exceeds the maximum packet size")
    return ForwardPacket(p[:KEY_LEN], p[KEY_LEN : 2 * KEY_LEN], p[2 * KEY_LEN :])


def _parse_recv_packet(p: bytes) -> RecvPacket:
    _need(p, KEY_LEN, "RecvPacket")
    return RecvPacket(p[:KEY_LEN], p[KEY_LEN:])


def _parse_note_preferred(p: bytes) -> NotePreferred:
    _exact(p, 1, "NotePreferred")
    return NotePreferred(p[0] != 0)


def _parse_peer_gone(p: bytes) -> PeerGone:
    _need(p, KEY_LEN, "PeerGone")
    # derp_client.go: an old server sends no reason byte -> Disconnected.
    reason = p[KEY_LEN] if len(p) > KEY_LEN else PeerGoneReason.DISCONNECTED
    return PeerGone(p[:KEY_LEN], reason)


def _parse_peer_present(p: bytes) -> PeerPresent:
    _need(p, KEY_LEN, "PeerPresent")
    key = p[:KEY_LEN]
    # derp_client.go: the address and flags were added later; each is optional.
    if len(p) < KEY_LEN + 18:
        return PeerPresent(key)
    ip6 = ipaddress.IPv6Address(p[KEY_LEN : KEY_LEN + 16])
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ip6.ipv4_mapped or ip6
    (port,) = struct.unpack_from(">H", p, KEY_LEN + 16)
    flags = p[KEY_LEN + 18] if len(p) > KEY_LEN + 18 else None
    return PeerPresent(key, ip, port, flags)


def _parse_watch_conns(p: bytes) -> WatchConns:
    _exact(p, 0, "WatchConns")
    return WatchConns()


def _parse_close_peer(p: bytes) -> ClosePeer:
    _exact(p, KEY_LEN, "ClosePeer")
    return ClosePeer(p)


def _parse_ping(p: bytes) -> Ping:
    _need(p, PING_LEN, "Ping")
    if len(p) > MAX_PING_LEN:
        raise RemoteDerpError(f"Ping body of {len(p)} bytes is too large")
    return Ping(p[:PING_LEN])


def _parse_pong(p: bytes) -> Pong:
    _need(p, PING_LEN, "Pong")
    return Pong(p[:PING_LEN])


def _parse_keep_alive(p: bytes) -> KeepAlive:
    return KeepAlive()


def _parse_health(p: bytes) -> Health:
    return Health(p.decode("utf-8", errors="replace"))


def _parse_restarting(p: bytes) -> Restarting:
    _need(p, 8, "Restarting")
    a, b = struct.unpack_from(">II", p)
    return Restarting(a, b)


# Frame encoders (payloads), shared by both sides.


def peer_present_payload(
    key: bytes,
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None,
    port: int,
    flags: int,
) -> bytes:
    if ip is None:
        ip16 = bytes(16)
    elif isinstance(ip, ipaddress.IPv4Address):
        # derpserver.go sendPeerPresent: As16(), i.e. v4-mapped.
        ip16 = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + ip.packed).packed
    else:
        ip16 = ip.packed
    return _check_key(key) + ip16 + struct.pack(">HB", port, flags)


def _json_get(obj: dict[str, Any], name: str) -> Any:
    """Go's encoding/json matches field names case-insensitively."""
    lname = name.lower()
    for k, v in obj.items():
        if k.lower() == lname:
            return v
    return None


def _open_json(box: Box, sealed: bytes, what: str) -> dict[str, Any]:
    if len(sealed) < NONCE_LEN:
        raise RemoteDerpError(f"short {what}: no room for the nonce")
    try:
        plain = box.decrypt(sealed)
    except CryptoError as e:
        raise RemoteDerpError(f"{what}: cannot open the sealed box ({e})") from None
    try:
        obj = safejson.loads(plain)
    except safejson.JSONInputError as e:
        raise RemoteDerpError(f"{what}: bad JSON ({e})") from None
    if not isinstance(obj, dict):
        raise RemoteDerpError(f"{what}: JSON is not an object")
    return obj


# Go's int on the 64-bit platforms the clients run on.
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


def _as_int(v: Any, what: str) -> int:
    """A Go ``int`` field: null is 0; anything else Go's decoder refuses, we refuse."""
    if v is None:
        return 0
    if isinstance(v, bool) or not isinstance(v, int):
        raise RemoteDerpError(f"{what} must be an integer, got {_short(v)}")
    if not _INT64_MIN <= v <= _INT64_MAX:
        raise RemoteDerpError(f"{what} {_short(v)} is out of Go's int range")
    return v


def _as_bool(v: Any, what: str) -> bool:
    """A Go ``bool`` field: null is false; a non-bool fails Go's whole decode."""
    if v is None:
        return False
    if not isinstance(v, bool):
        raise RemoteDerpError(f"{what} must be true or false, got {_short(v)}")
    return v


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _box(priv: PrivateKey, peer_key: bytes, what: str) -> Box:
    """The NaCl box with a peer's key, refusing keys libsodium cannot use.

    The all-zero key (and the other small-order points) make
    ``crypto_box_beforenm`` fail with a bare RuntimeError; no real node has one.
    """
    if peer_key == bytes(KEY_LEN):
        raise RemoteDerpError(f"{what} carries the all-zero key")
    try:
        return Box(priv, PublicKey(peer_key))
    except (RuntimeError, CryptoError, ValueError, TypeError) as e:
        raise RemoteDerpError(f"{what} key {peer_key.hex()[:16]}... is unusable: {e}") from None


# ---------------------------------------------------------------- connections


class ServerState(enum.Enum):
    """States of one server-side connection (rules, as in h11's _state.py):

    1. START: nothing sent, input buffered; ``start()`` emits ServerKey
       -> AWAIT_CLIENT_INFO.
    2. AWAIT_CLIENT_INFO: the first frame must be ClientInfo (<= 256 KiB)
       -> VERIFYING; any other frame is a protocol error.
    3. VERIFYING: the caller decides; later bytes are buffered, not parsed.
       ``accept()`` emits ServerInfo -> ESTABLISHED; ``refuse()`` emits a
       Health frame with the reason -> CLOSED.
    4. ESTABLISHED: client frames become events; frame types a server does not
       handle are skipped (as the Go server does); mesh frames need the mesh key.
    5. CLOSED: nothing more in or out.
    """

    START = "start"
    AWAIT_CLIENT_INFO = "await-client-info"
    VERIFYING = "verifying"
    ESTABLISHED = "established"
    CLOSED = "closed"


_Parser = Callable[[bytes], Event]

# ESTABLISHED-state frames a server accepts from a client, and whether the
# frame needs the mesh key (derpserver.go: "insufficient permissions").
_SERVER_FRAMES: dict[int, tuple[_Parser, bool]] = {
    FrameType.SEND_PACKET: (_parse_send_packet, False),
    FrameType.NOTE_PREFERRED: (_parse_note_preferred, False),
    FrameType.PING: (_parse_ping, False),
    # The Go server skips client Pongs; we report them so server Pings can be timed.
    FrameType.PONG: (_parse_pong, False),
    FrameType.FORWARD_PACKET: (_parse_forward_packet, True),
    FrameType.WATCH_CONNS: (_parse_watch_conns, True),
    FrameType.CLOSE_PEER: (_parse_close_peer, True),
}


class DerpServerConnection:
    """The server side of one DERP connection, as a state machine."""

    def __init__(self, private_key: bytes, *, mesh_key: bytes | None = None) -> None:
        self._priv = PrivateKey(_check_key(private_key, "server private key"))
        self.public_key: bytes = bytes(self._priv.public_key)
        self._mesh_key = mesh_key
        self._frames = FrameBuffer()
        self.state = ServerState.START
        self.client_info: ClientInfo | None = None
        self._box: Box | None = None

    @property
    def client_key(self) -> bytes | None:
        return self.client_info.key if self.client_info else None

    @property
    def can_mesh(self) -> bool:
        """derpserver.go isMeshPeer: constant-time compare of a non-empty mesh key."""
        info = self.client_info
        if not self._mesh_key or info is None or not info.mesh_key:
            return False
        return hmac.compare_digest(self._mesh_key, info.mesh_key)

    @property
    def buffered(self) -> int:
        """Bytes of a frame not yet complete (the relay times out a stalled one)."""
        return len(self._frames)

    def _expect(self, *states: ServerState) -> None:
        if self.state not in states:
            raise LocalDerpError(f"not allowed in state {self.state.value}")

    def start(self) -> bytes:
        """The ServerKey frame: sent first, with or without the HTTP 101 (fast start)."""
        self._expect(ServerState.START)
        self.state = ServerState.AWAIT_CLIENT_INFO
        return encode_frame(FrameType.SERVER_KEY, MAGIC + self.public_key)

    def receive_data(self, data: bytes) -> list[Event]:
        if self.state is ServerState.CLOSED:
            raise LocalDerpError("receive_data on a closed DERP connection")
        if data:
            self._frames.feed(data)
        events: list[Event] = []
        while True:
            state = self.state
            if state is ServerState.ESTABLISHED:
                frame = self._frames.next_frame(MAX_FRAME_SIZE)
                if frame is None:
                    return events
                ftype, payload = frame
                entry = _SERVER_FRAMES.get(ftype)
                if entry is None:
                    events.append(UnknownFrame(ftype, payload))
                    continue
                parse, needs_mesh = entry
                if needs_mesh and not self.can_mesh:
                    raise RemoteDerpError(
                        f"frame type 0x{ftype:02x} needs the mesh key: insufficient permissions"
                    )
                events.append(parse(payload))
            elif state is ServerState.AWAIT_CLIENT_INFO:
                frame = self._frames.next_frame(MAX_CLIENT_INFO_LEN)
                if frame is None:
                    return events
                events.append(self._receive_client_info(*frame))
            else:
                # START (a fast-start client may speak before our ServerKey is
                # out) and VERIFYING: hold the bytes until start()/accept().
                return events

    def _receive_client_info(self, ftype: int, payload: bytes) -> ClientInfo:
        if ftype != FrameType.CLIENT_INFO:
            raise RemoteDerpError(f"expected ClientInfo frame, got type 0x{ftype:02x}")
        _need(payload, KEY_LEN + NONCE_LEN, "ClientInfo")
        key = payload[:KEY_LEN]
        box = _box(self._priv, key, "ClientInfo")
        obj = _open_json(box, payload[KEY_LEN:], "ClientInfo")
        mesh_hex = _json_get(obj, "meshKey")
        mesh_key = None
        if mesh_hex is not None and mesh_hex != "":
            # derp.go ClientInfo.MeshKey (key.DERPMesh): 64 hex digits when set.
            if not isinstance(mesh_hex, str) or len(mesh_hex) > 2 * MAX_MESH_KEY_LEN:
                raise RemoteDerpError(
                    f"ClientInfo meshKey must be a hex string, got {_short(mesh_hex)}"
                )
            try:
                mesh_key = bytes.fromhex(mesh_hex)
            except ValueError:
                raise RemoteDerpError("ClientInfo meshKey is not hex") from None
        info = ClientInfo(
            key=key,
            version=_as_int(_json_get(obj, "version"), "ClientInfo version"),
            can_ack_pings=_as_bool(_json_get(obj, "CanAckPings"), "ClientInfo CanAckPings"),
            mesh_key=mesh_key,
            is_prober=_as_bool(_json_get(obj, "IsProber"), "ClientInfo IsProber"),
        )
        self._box = box
        self.client_info = info
        self.state = ServerState.VERIFYING
        return info

    def accept(self, info: ServerInfo | None = None) -> bytes:
        """Admit the client: the sealed ServerInfo frame (derpserver.go sendServerInfo).

        Afterwards call ``receive_data(b"")`` to parse frames that arrived early.
        """
        self._expect(ServerState.VERIFYING)
        assert self._box is not None
        info = info or ServerInfo()
        msg: dict[str, int] = {}
        if info.version:
            msg["version"] = info.version
        if info.token_bucket_bytes_per_second:
            msg["TokenBucketBytesPerSecond"] = info.token_bucket_bytes_per_second
        if info.token_bucket_bytes_burst:
            msg["TokenBucketBytesBurst"] = info.token_bucket_bytes_burst
        sealed = bytes(self._box.encrypt(json.dumps(msg, separators=(",", ":")).encode()))
        self.state = ServerState.ESTABLISHED
        return encode_frame(FrameType.SERVER_INFO, sealed)

    def refuse(self, reason: str) -> bytes:
        """Turn the client away: a Health frame saying why (the Go client logs
        Health frames at any point), and the connection is done."""
        self._expect(ServerState.VERIFYING)
        self.state = ServerState.CLOSED
        return encode_frame(FrameType.HEALTH, reason.encode())

    def close(self) -> None:
        self.state = ServerState.CLOSED

    # Server -> client frames. They are plain byte builders; they need only that
    # the handshake is done (nothing may precede ServerInfo except ServerKey).

    def send_packet(self, src: bytes, data: bytes) -> bytes:
        self._expect(ServerState.ESTABLISHED)
        if len(data) > MAX_PACKET_SIZE:
            raise LocalDerpError(f"packet of {len(data)} bytes exceeds {MAX_PACKET_SIZE}")
        return _HEADER.pack(FrameType.RECV_PACKET, KEY_LEN + len(data)) + src + data

    def send_keep_alive(self) -> bytes:
        self._expect(ServerState.ESTABLISHED)
        return encode_frame(FrameType.KEEP_ALIVE)

    def send_ping(self, data: bytes) -> bytes:
        self._expect(ServerState.ESTABLISHED)
        return encode_frame(FrameType.PING, _ping_data(data))

    def send_pong(self, data: bytes) -> bytes:
        self._expect(ServerState.ESTABLISHED)
        return encode_frame(FrameType.PONG, _ping_data(data))

    def send_peer_gone(self, key: bytes, reason: int = PeerGoneReason.DISCONNECTED) -> bytes:
        self._expect(ServerState.ESTABLISHED)
        return encode_frame(FrameType.PEER_GONE, _check_key(key) + bytes([reason]))

    def send_peer_present(
        self,
        key: bytes,
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None,
        port: int = 0,
        flags: int = PeerPresentFlags.IS_REGULAR,
    ) -> bytes:
        self._expect(ServerState.ESTABLISHED)
        return encode_frame(FrameType.PEER_PRESENT, peer_present_payload(key, ip, port, flags))

    def send_health(self, problem: str) -> bytes:
        self._expect(ServerState.ESTABLISHED)
        return encode_frame(FrameType.HEALTH, problem.encode())

    def send_restarting(self, reconnect_in_ms: int, try_for_ms: int) -> bytes:
        self._expect(ServerState.ESTABLISHED)
        return encode_frame(FrameType.RESTARTING, struct.pack(">II", reconnect_in_ms, try_for_ms))


def _ping_data(data: bytes) -> bytes:
    if len(data) != PING_LEN:
        raise LocalDerpError(f"ping data must be {PING_LEN} bytes, got {len(data)}")
    return bytes(data)


class ClientState(enum.Enum):
    """States of the client side (derp_client.go), used by tests and benchmarks:

    1. AWAIT_SERVER_KEY: the first frame must be ServerKey with the magic.
       ``send_client_info`` is allowed here only if the server key was given
       up front (fast start).
    2. AWAIT_SERVER_INFO: the sealed ServerInfo (after our ClientInfo)
       -> ESTABLISHED; other server frames are reported meanwhile.
    3. ESTABLISHED: server frames become events; unknown types are skipped.
    4. CLOSED.
    """

    AWAIT_SERVER_KEY = "await-server-key"
    AWAIT_SERVER_INFO = "await-server-info"
    ESTABLISHED = "established"
    CLOSED = "closed"


_CLIENT_FRAMES: dict[int, _Parser] = {
    FrameType.RECV_PACKET: _parse_recv_packet,
    FrameType.KEEP_ALIVE: _parse_keep_alive,
    FrameType.PEER_GONE: _parse_peer_gone,
    FrameType.PEER_PRESENT: _parse_peer_present,
    FrameType.PING: _parse_ping,
    FrameType.PONG: _parse_pong,
    FrameType.HEALTH: _parse_health,
    FrameType.RESTARTING: _parse_restarting,
}


class DerpClientConnection:
    """The client side of a DERP connection (what magicsock's derp.Client does)."""

    def __init__(self, private_key: bytes, *, server_key: bytes | None = None) -> None:
        self._priv = PrivateKey(_check_key(private_key, "client private key"))
        self.public_key: bytes = bytes(self._priv.public_key)
        self.server_key: bytes | None = _check_key(server_key, "server key") if server_key else None
        self._frames = FrameBuffer()
        self.state = ClientState.AWAIT_SERVER_KEY
        self._sent_info = False
        self.server_info: ServerInfo | None = None

    def send_client_info(
        self,
        *,
        version: int = PROTOCOL_VERSION,
        can_ack_pings: bool = True,
        mesh_key: bytes | None = None,
        is_prober: bool = False,
    ) -> bytes:
        """The sealed ClientInfo frame (v1.90.9 sends {"version":2,"CanAckPings":true})."""
        if self._sent_info or self.server_key is None or self.state is ClientState.CLOSED:
            raise LocalDerpError("ClientInfo needs the server key and may be sent once")
        msg: dict[str, Any] = {}
        if mesh_key:
            msg["meshKey"] = mesh_key.hex()
        msg["version"] = version
        msg["CanAckPings"] = can_ack_pings
        if is_prober:
            msg["IsProber"] = True
        box = _box(self._priv, self.server_key, "ServerKey")
        sealed = bytes(box.encrypt(json.dumps(msg, separators=(",", ":")).encode()))
        self._sent_info = True
        return encode_frame(FrameType.CLIENT_INFO, self.public_key + sealed)

    def receive_data(self, data: bytes) -> list[Event]:
        if self.state is ClientState.CLOSED:
            raise LocalDerpError("receive_data on a closed DERP connection")
        if data:
            self._frames.feed(data)
        events: list[Event] = []
        while (frame := self._frames.next_frame(MAX_FRAME_SIZE)) is not None:
            ftype, payload = frame
            state = self.state
            if state is ClientState.ESTABLISHED:
                parse = _CLIENT_FRAMES.get(ftype)
                events.append(parse(payload) if parse else UnknownFrame(ftype, payload))
            elif state is ClientState.AWAIT_SERVER_KEY:
                events.append(self._receive_server_key(ftype, payload))
            elif ftype == FrameType.SERVER_INFO:
                events.append(self._receive_server_info(payload))
            else:
                # derp_client.go recvTimeout takes any frame in any order after
                # ServerKey; a refusing server sends Health before hanging up.
                parse = _CLIENT_FRAMES.get(ftype)
                events.append(parse(payload) if parse else UnknownFrame(ftype, payload))
        return events

    def _receive_server_key(self, ftype: int, payload: bytes) -> ServerKey:
        if ftype != FrameType.SERVER_KEY:
            raise RemoteDerpError(f"expected ServerKey frame, got type 0x{ftype:02x}")
        _need(payload, len(MAGIC) + KEY_LEN, "ServerKey")
        if payload[: len(MAGIC)] != MAGIC:
            raise RemoteDerpError("ServerKey frame lacks the DERP magic")
        key = payload[len(MAGIC) : len(MAGIC) + KEY_LEN]
        if self.server_key is not None and key != self.server_key:
            raise RemoteDerpError("server key differs from the one expected (fast start)")
        self.server_key = key
        self.state = ClientState.AWAIT_SERVER_INFO
        return ServerKey(key)

    def _receive_server_info(self, payload: bytes) -> ServerInfo:
        if not self._sent_info:
            raise RemoteDerpError("ServerInfo arrived before ClientInfo was sent")
        assert self.server_key is not None
        obj = _open_json(_box(self._priv, self.server_key, "ServerKey"), payload, "ServerInfo")
        info = ServerInfo(
            version=_as_int(_json_get(obj, "version"), "ServerInfo version"),
            token_bucket_bytes_per_second=_as_int(
                _json_get(obj, "TokenBucketBytesPerSecond"), "TokenBucketBytesPerSecond"
            ),
            token_bucket_bytes_burst=_as_int(
                _json_get(obj, "TokenBucketBytesBurst"), "TokenBucketBytesBurst"
            ),
        )
        self.server_info = info
        self.state = ClientState.ESTABLISHED
        return info

    def close(self) -> None:
        self.state = ClientState.CLOSED

    # Client -> server frames (pure builders; the server buffers early frames).

    def send_packet(self, dst: bytes, data: bytes) -> bytes:
        if len(data) > MAX_PACKET_SIZE:
            raise LocalDerpError(f"packet of {len(data)} bytes exceeds {MAX_PACKET_SIZE}")
        return _HEADER.pack(FrameType.SEND_PACKET, KEY_LEN + len(data)) + _check_key(dst) + data

    def send_forward_packet(self, src: bytes, dst: bytes, data: bytes) -> bytes:
        if len(data) > MAX_PACKET_SIZE:
            raise LocalDerpError(f"packet of {len(data)} bytes exceeds {MAX_PACKET_SIZE}")
        return encode_frame(FrameType.FORWARD_PACKET, _check_key(src) + _check_key(dst) + data)

    def send_note_preferred(self, preferred: bool) -> bytes:
        return encode_frame(FrameType.NOTE_PREFERRED, b"\x01" if preferred else b"\x00")

    def send_watch_conns(self) -> bytes:
        return encode_frame(FrameType.WATCH_CONNS)

    def send_close_peer(self, key: bytes) -> bytes:
        return encode_frame(FrameType.CLOSE_PEER, _check_key(key))

    def send_ping(self, data: bytes) -> bytes:
        return encode_frame(FrameType.PING, _ping_data(data))

    def send_pong(self, data: bytes) -> bytes:
        return encode_frame(FrameType.PONG, _ping_data(data))
