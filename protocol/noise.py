"""Tailscale's control-protocol Noise layer (controlbase), sans-IO.

``Noise_IK_25519_ChaChaPoly_BLAKE2s`` with Tailscale's own framing
(control/controlbase/{handshake,messages,conn}.go at v1.90.9):

* initiation (client -> server), 101 bytes: ``ver(2 BE) 0x01 len(2 BE)=96``
  + ephemeral pub (32) + encrypted machine pub (48) + tag (16);
* response (server -> client), 51 bytes: ``0x02 len=48`` + ephemeral pub + tag;
* error (server -> client, unencrypted): ``0x03 len`` + UTF-8 text;
* transport records: ``0x04 len`` + ChaCha20-Poly1305 ciphertext, at most 4096
  bytes in all, nonce = 4 zero bytes + 8-byte *big-endian* counter.

Nothing here does I/O: the responder takes the initiation bytes and returns the
response bytes plus a ``NoiseTransport``; the transport turns plaintext into
record bytes and record bytes into plaintext. ``appliance/noise_stream.py`` runs
it over a trio stream.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import hmac
import json
import struct
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from protocol import safejson
from protocol.keys import ChallengePublic, KeyParseError, MachinePublic, PrivateKey

PROTOCOL_NAME = b"Noise_IK_25519_ChaChaPoly_BLAKE2s"
PROLOGUE_PREFIX = b"Tailscale Control Protocol v"

MSG_INITIATION = 1
MSG_RESPONSE = 2
MSG_ERROR = 3
MSG_RECORD = 4

HEADER_LEN = 3
INITIATION_HEADER_LEN = 5
INITIATION_LEN = INITIATION_HEADER_LEN + 32 + 48 + 16  # 101
RESPONSE_LEN = HEADER_LEN + 32 + 16  # 51
TAG_LEN = 16
# conn.go: maxMessageSize = 4096 including the 3-byte header.
MAX_MESSAGE_SIZE = 4096
MAX_CIPHERTEXT_SIZE = MAX_MESSAGE_SIZE - HEADER_LEN  # 4093
MAX_PLAINTEXT_SIZE = MAX_CIPHERTEXT_SIZE - TAG_LEN  # 4077
# Counter 2^64-1 is never used (handshake.go invalidNonce).
_INVALID_NONCE = (1 << 64) - 1
_RECORD_HEADER = struct.Struct(">BH")

# ts2021/conn.go: the early payload starts with these 5 bytes, then a 4-byte BE
# JSON length; any other first bytes are taken as the start of HTTP/2.
EARLY_PAYLOAD_MAGIC = b"\xff\xff\xffTS"
EARLY_PAYLOAD_HEADER_LEN = len(EARLY_PAYLOAD_MAGIC) + 4
# The client refuses an early payload JSON larger than 10 MiB.
EARLY_PAYLOAD_MAX_JSON = 10 << 20
# Clients understand the early payload from capability version 49 on.
EARLY_PAYLOAD_MIN_VERSION = 49


class NoiseError(Exception):
    """Root of every error from the Noise layer."""


class LocalNoiseError(NoiseError):
    """We misused the API (e.g. sent after the transport broke)."""


class RemoteNoiseError(NoiseError):
    """The peer broke the protocol: bad handshake, tampered or oversized record."""


class HandshakeRefused(RemoteNoiseError):
    """The server answered the initiation with an error frame (client side)."""

    def __init__(self, message: str) -> None:
        super().__init__(f"server error: {message!r}")
        self.server_message = message


# --- primitives -----------------------------------------------------------------


def _blake2s(data: bytes) -> bytes:
    return hashlib.blake2s(data).digest()


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.blake2s).digest()


def _hkdf2(ck: bytes, ikm: bytes) -> tuple[bytes, bytes]:
    """The Noise spec's HKDF with two outputs (HMAC-BLAKE2s, empty info)."""
    temp = _hmac(ck, ikm)
    out1 = _hmac(temp, b"\x01")
    out2 = _hmac(temp, out1 + b"\x02")
    return out1, out2


@functools.lru_cache(maxsize=4)
def _static_key(private: bytes) -> tuple[X25519PrivateKey, bytes]:
    """A server's long-lived key, ready for X25519, and its public half: each handshake
    uses both, and a reconnect storm is thousands of handshakes."""
    return X25519PrivateKey.from_private_bytes(private), PrivateKey(private).public_raw()


def _dh(private: bytes | X25519PrivateKey, public: bytes) -> bytes:
    if isinstance(private, bytes):
        private = X25519PrivateKey.from_private_bytes(private)
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:
        # All-zero shared secret: a low-order point. Go's curve25519.X25519 refuses too.
        raise RemoteNoiseError("peer sent a low-order Curve25519 point") from None


_ZERO_NONCE = bytes(12)


class _SymmetricState:
    """Noise SymmetricState (h, ck) with single-use keys, as controlbase does."""

    def __init__(self) -> None:
        # The 33-byte protocol name is longer than HASHLEN, so h = HASH(name).
        self.h = _blake2s(PROTOCOL_NAME)
        self.ck = self.h

    def mix_hash(self, data: bytes) -> None:
        self.h = _blake2s(self.h + data)

    def mix_dh(self, private: bytes | X25519PrivateKey, public: bytes) -> bytes:
        self.ck, k = _hkdf2(self.ck, _dh(private, public))
        return k

    def encrypt_and_hash(self, k: bytes, plaintext: bytes) -> bytes:
        # Each handshake key is used exactly once, so the all-zero nonce is safe.
        ct = ChaCha20Poly1305(k).encrypt(_ZERO_NONCE, plaintext, self.h)
        self.mix_hash(ct)
        return ct

    def decrypt_and_hash(self, k: bytes, ciphertext: bytes) -> bytes:
        try:
            pt = ChaCha20Poly1305(k).decrypt(_ZERO_NONCE, ciphertext, self.h)
        except InvalidTag:
            raise RemoteNoiseError("handshake decryption failed") from None
        self.mix_hash(ciphertext)
        return pt

    def split(self) -> tuple[bytes, bytes]:
        return _hkdf2(self.ck, b"")


def prologue(version: int) -> bytes:
    return PROLOGUE_PREFIX + str(version).encode("ascii")


def error_frame(message: str) -> bytes:
    """An unencrypted refusal (type 3); the client shows ``server error: "<text>"``."""
    body = message.encode("utf-8")[: (1 << 16) - 1]
    return struct.pack(">BH", MSG_ERROR, len(body)) + body


# --- transport ------------------------------------------------------------------


class _Direction:
    """One direction's cipher and counter; breaks for good after any failure."""

    def __init__(self, key: bytes) -> None:
        self._aead = ChaCha20Poly1305(key)
        self._counter = 0

    def nonce(self) -> bytes:
        if self._counter >= _INVALID_NONCE:
            raise LocalNoiseError("Noise cipher exhausted; reconnect")
        n = b"\x00\x00\x00\x00" + self._counter.to_bytes(8, "big")
        self._counter += 1
        return n


class NoiseTransport:
    """The post-handshake record layer: ``send`` and ``receive_data``/``read``.

    Record boundaries carry no meaning; both directions are byte streams.
    After a decrypt failure the receive side stays broken (conn.go keeps the
    first error), as a tampered stream cannot be trusted again.
    """

    def __init__(
        self,
        *,
        send_key: bytes,
        recv_key: bytes,
        version: int,
        peer: MachinePublic,
        handshake_hash: bytes,
    ) -> None:
        self._tx = _Direction(send_key)
        self._rx = _Direction(recv_key)
        self.version = version
        self.peer = peer
        self.handshake_hash = handshake_hash
        self._inbuf = bytearray()
        self._plain = bytearray()
        self._rx_error: RemoteNoiseError | None = None

    def send(self, plaintext: bytes) -> bytes:
        """Encrypt ``plaintext`` into as many records as needed (4077 bytes each at most)."""
        parts: list[bytes] = []
        view = memoryview(plaintext)
        encrypt, nonce = self._tx._aead.encrypt, self._tx.nonce
        full = _RECORD_HEADER.pack(MSG_RECORD, MAX_PLAINTEXT_SIZE + TAG_LEN)
        for start in range(0, len(view), MAX_PLAINTEXT_SIZE):
            # A first map is hundreds of records: no copy of the chunk, one join at the end.
            ct = encrypt(nonce(), view[start : start + MAX_PLAINTEXT_SIZE], None)
            parts.append(
                full
                if len(ct) == MAX_PLAINTEXT_SIZE + TAG_LEN
                else _RECORD_HEADER.pack(MSG_RECORD, len(ct))
            )
            parts.append(ct)
        return b"".join(parts)

    def receive_data(self, data: bytes) -> None:
        """Take record bytes off the wire; decrypted bytes become available to ``read``.

        Raises RemoteNoiseError on a wrong message type, an oversized record or
        a failed decryption (tampering, reordering, wrong key).
        """
        if self._rx_error is not None:
            raise self._rx_error
        self._inbuf += data
        try:
            self._decrypt_available()
        except RemoteNoiseError as e:
            self._rx_error = e
            raise

    def _decrypt_available(self) -> None:
        buf = self._inbuf
        pos = 0
        while len(buf) - pos >= HEADER_LEN:
            mtype = buf[pos]
            (length,) = struct.unpack_from(">H", buf, pos + 1)
            if mtype != MSG_RECORD:
                raise RemoteNoiseError(
                    f"received message with unexpected type {mtype}, want {MSG_RECORD}"
                )
            if HEADER_LEN + length > MAX_MESSAGE_SIZE:
                raise RemoteNoiseError(
                    f"record of {HEADER_LEN + length} bytes exceeds {MAX_MESSAGE_SIZE}"
                )
            if len(buf) - pos < HEADER_LEN + length:
                break
            ct = bytes(buf[pos + HEADER_LEN : pos + HEADER_LEN + length])
            try:
                self._plain += self._rx._aead.decrypt(self._rx.nonce(), ct, None)
            except InvalidTag:
                raise RemoteNoiseError("Noise record failed to decrypt (tampered?)") from None
            except LocalNoiseError as e:
                raise RemoteNoiseError(str(e)) from None
            pos += HEADER_LEN + length
        del buf[:pos]

    def read(self, max_bytes: int | None = None) -> bytes:
        """Return (and consume) decrypted bytes received so far, up to ``max_bytes``."""
        if max_bytes is None or max_bytes >= len(self._plain):
            out = bytes(self._plain)
            self._plain.clear()
        else:
            out = bytes(self._plain[:max_bytes])
            del self._plain[:max_bytes]
        return out

    @property
    def plaintext_pending(self) -> int:
        return len(self._plain)

    @property
    def has_partial_record(self) -> bool:
        """True if bytes of an incomplete record are buffered (EOF now = truncation)."""
        return bool(self._inbuf)


# --- responder (server) ---------------------------------------------------------


@dataclass(frozen=True)
class InitiationHeader:
    """The clear part of an initiation: what the server can know before decrypting."""

    version: int
    msg_type: int
    length: int


def parse_initiation_header(initiation: bytes) -> InitiationHeader:
    if len(initiation) < INITIATION_HEADER_LEN:
        raise RemoteNoiseError("handshake initiation too short")
    version, mtype, length = struct.unpack_from(">HBH", initiation, 0)
    return InitiationHeader(version, mtype, length)


@dataclass
class Accepted:
    """A completed server handshake: send ``response``, then use ``transport``."""

    response: bytes
    machine_key: MachinePublic
    version: int
    transport: NoiseTransport


class HandshakeRejected(RemoteNoiseError):
    """The initiation was invalid; ``refusal`` is the error frame to send (if any).

    controlbase.Server sends an error frame for size/type/length problems and
    simply closes on a decryption failure; we keep that split.
    """

    def __init__(self, reason: str, refusal: bytes | None) -> None:
        super().__init__(reason)
        self.refusal = refusal


def respond(
    server_private: PrivateKey, initiation: bytes, *, ephemeral: PrivateKey | None = None
) -> Accepted:
    """Run the server side of the IK handshake on a complete 101-byte initiation."""
    if len(initiation) != INITIATION_LEN:
        msg = "wrong handshake initiation size"
        raise HandshakeRejected(msg, error_frame(msg))
    hdr = parse_initiation_header(initiation)
    if hdr.msg_type != MSG_INITIATION:
        msg = "unexpected handshake message type"
        raise HandshakeRejected(msg, error_frame(msg))
    if hdr.length != INITIATION_LEN - INITIATION_HEADER_LEN:
        msg = "wrong handshake initiation length"
        raise HandshakeRejected(msg, error_frame(msg))
    e_cli = initiation[5:37]
    enc_s = initiation[37:85]
    tag = initiation[85:101]

    static, static_public = _static_key(server_private.raw)
    s = _SymmetricState()
    s.mix_hash(prologue(hdr.version))
    s.mix_hash(static_public)
    s.mix_hash(e_cli)
    try:
        k = s.mix_dh(static, e_cli)
        machine_raw = s.decrypt_and_hash(k, enc_s)
        k = s.mix_dh(static, machine_raw)
        s.decrypt_and_hash(k, tag)
    except RemoteNoiseError as e:
        # Wrong server key or garbage: Go returns without an error frame.
        raise HandshakeRejected(f"handshake initiation invalid: {e}", None) from None

    eph = ephemeral or PrivateKey.generate()
    e_srv = eph.public_raw()
    s.mix_hash(e_srv)
    s.mix_dh(eph.raw, e_cli)  # ee: the key is discarded, only ck changes
    k = s.mix_dh(eph.raw, machine_raw)
    resp_tag = s.encrypt_and_hash(k, b"")
    c2s, s2c = s.split()
    response = struct.pack(">BH", MSG_RESPONSE, RESPONSE_LEN - HEADER_LEN) + e_srv + resp_tag
    machine = MachinePublic(machine_raw)
    transport = NoiseTransport(
        send_key=s2c, recv_key=c2s, version=hdr.version, peer=machine, handshake_hash=s.h
    )
    return Accepted(response, machine, hdr.version, transport)


# --- initiator (client; used by tests and our own tooling) -----------------------


class InitiatorState(enum.Enum):
    AWAIT_RESPONSE = "await-response"
    DONE = "done"
    FAILED = "failed"


@dataclass
class Initiator:
    """The client side: ``initiation`` to send, then feed the server's bytes in.

    ``receive_data`` returns the transport once the 51-byte response arrived;
    any bytes after it (records the server sent at once) go into that transport.
    """

    machine_private: PrivateKey
    server_public: MachinePublic
    version: int
    ephemeral: PrivateKey = field(default_factory=PrivateKey.generate)
    initiation: bytes = field(init=False)
    state: InitiatorState = field(init=False, default=InitiatorState.AWAIT_RESPONSE)
    transport: NoiseTransport | None = field(init=False, default=None)
    _s: _SymmetricState = field(init=False, repr=False)
    _buf: bytearray = field(init=False, repr=False, default_factory=bytearray)

    def __post_init__(self) -> None:
        if not 0 <= self.version < 1 << 16:
            raise LocalNoiseError(f"protocol version {self.version} does not fit in 16 bits")
        s = _SymmetricState()
        s.mix_hash(prologue(self.version))
        s.mix_hash(self.server_public.raw)
        e_pub = self.ephemeral.public_raw()
        s.mix_hash(e_pub)
        k = s.mix_dh(self.ephemeral.raw, self.server_public.raw)
        enc_s = s.encrypt_and_hash(k, self.machine_private.public_raw())
        k = s.mix_dh(self.machine_private.raw, self.server_public.raw)
        tag = s.encrypt_and_hash(k, b"")
        hdr = struct.pack(
            ">HBH", self.version, MSG_INITIATION, INITIATION_LEN - INITIATION_HEADER_LEN
        )
        self.initiation = hdr + e_pub + enc_s + tag
        self._s = s

    def receive_data(self, data: bytes) -> NoiseTransport | None:
        if self.state is InitiatorState.DONE:
            raise LocalNoiseError("handshake already complete; feed the transport instead")
        if self.state is InitiatorState.FAILED:
            raise LocalNoiseError("handshake already failed")
        self._buf += data
        try:
            return self._advance()
        except RemoteNoiseError:
            self.state = InitiatorState.FAILED
            raise

    def _advance(self) -> NoiseTransport | None:
        buf = self._buf
        if len(buf) < HEADER_LEN:
            return None
        mtype = buf[0]
        (length,) = struct.unpack_from(">H", buf, 1)
        if mtype == MSG_ERROR:
            if len(buf) < HEADER_LEN + length:
                return None
            raise HandshakeRefused(bytes(buf[3 : 3 + length]).decode("utf-8", "replace"))
        if mtype != MSG_RESPONSE:
            raise RemoteNoiseError(f"unexpected response message type {mtype}")
        if length != RESPONSE_LEN - HEADER_LEN:
            raise RemoteNoiseError(f"wrong length {length} received for handshake response")
        if len(buf) < RESPONSE_LEN:
            return None
        e_srv = bytes(buf[3:35])
        tag = bytes(buf[35:51])
        rest = bytes(buf[RESPONSE_LEN:])
        s = self._s
        s.mix_hash(e_srv)
        s.mix_dh(self.ephemeral.raw, e_srv)
        k = s.mix_dh(self.machine_private.raw, e_srv)
        s.decrypt_and_hash(k, tag)
        c2s, s2c = s.split()
        t = NoiseTransport(
            send_key=c2s,
            recv_key=s2c,
            version=self.version,
            peer=self.server_public,
            handshake_hash=s.h,
        )
        self.state = InitiatorState.DONE
        self.transport = t
        self._buf.clear()
        if rest:
            t.receive_data(rest)
        return t


# --- early payload -------------------------------------------------------------


def encode_early_payload(challenge: ChallengePublic) -> bytes:
    """The plaintext the server sends before HTTP/2 (tailcfg.EarlyNoise)."""
    body = json.dumps({"nodeKeyChallenge": str(challenge)}, separators=(",", ":")).encode()
    return EARLY_PAYLOAD_MAGIC + struct.pack(">I", len(body)) + body


@dataclass(frozen=True)
class EarlyPayload:
    node_key_challenge: ChallengePublic | None


def parse_early_payload(plaintext: bytes) -> tuple[EarlyPayload | None, int] | None:
    """Client side: look for the early payload at the start of the plaintext stream.

    Returns None if more bytes are needed, else ``(payload or None, consumed)``;
    a stream not starting with the magic has no early payload (consumed 0).
    """
    if len(plaintext) < EARLY_PAYLOAD_HEADER_LEN:
        if EARLY_PAYLOAD_MAGIC.startswith(plaintext[: len(EARLY_PAYLOAD_MAGIC)]):
            return None
        return (None, 0)
    if not plaintext.startswith(EARLY_PAYLOAD_MAGIC):
        return (None, 0)
    (n,) = struct.unpack_from(">I", plaintext, len(EARLY_PAYLOAD_MAGIC))
    if n > EARLY_PAYLOAD_MAX_JSON:
        raise RemoteNoiseError(f"early payload of {n} bytes is too large")
    end = EARLY_PAYLOAD_HEADER_LEN + n
    if len(plaintext) < end:
        return None
    try:
        obj = safejson.loads(plaintext[EARLY_PAYLOAD_HEADER_LEN:end])
        chal = obj.get("nodeKeyChallenge") if isinstance(obj, dict) else None
        key = ChallengePublic.parse(chal) if chal is not None else None
    except (ValueError, KeyParseError) as e:
        raise RemoteNoiseError(f"early payload is malformed: {e}") from None
    return (EarlyPayload(key), end)
