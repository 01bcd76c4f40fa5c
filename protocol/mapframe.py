"""Framing of the ``/machine/map`` response stream, sans-IO.

Each message is a 4-byte *little-endian* length followed by that many bytes
(control/controlclient/direct.go sendMapRequest reads ``binary.LittleEndian``).
With ``Compress: "zstd"`` -- what every client from 1.56 to 1.90 sends -- those
bytes are zstd holding the JSON, and the client zstd-decodes every message,
keep-alives included, so nothing is sent raw. The client decodes "zero or more
frames" (util/zstdframe AppendDecode, klauspost's DecodeAll) into one JSON text,
so a big message may be sent as several frames: a `Segmented` first map is made
of pieces compressed once and shared by every map that holds them.
"""

from __future__ import annotations

import struct
from collections.abc import Hashable
from dataclasses import dataclass, field

import zstandard

LENGTH_PREFIX = 4
# testcontrol refuses map messages above 16 MiB; we hold our peers to the same.
DEFAULT_MAX_FRAME = 16 << 20
# A small zstd frame can expand enormously; bound what one message may inflate to.
DEFAULT_MAX_DECOMPRESSED = 64 << 20
INFLATE_STEP = 64 << 10  # the first read of an inflating message (see inflate)
# Messages up to this size are remembered framed: a delta that many sessions send
# (the same patch to every peer) is compressed once. Full maps are not kept.
CACHE_MAX_MESSAGE = 64 << 10
# Larger messages are remembered by identity, the last BIG_KEPT: one shared delta (a
# round with hundreds of joins is megabytes) is one object that every session sends.
BIG_KEPT = 2
KEEPALIVE_JSON = b'{"KeepAlive":true}'
# Compressed pieces kept for reuse, in bytes (a 5,000-node tailnet's peers are ~5 MB
# compressed; a changed peer leaves its old piece behind until it ages out).
PIECE_CACHE_BYTES = 32 << 20


class MapFrameError(Exception):
    """Root of map-stream framing errors."""


class LocalMapFrameError(MapFrameError):
    """We were asked to send something that cannot be framed."""


class RemoteMapFrameError(MapFrameError):
    """The stream we read is malformed: oversized, truncated or bad zstd."""


@dataclass(frozen=True)
class Segmented:
    """One message's JSON as pieces, each sent as a zstd frame of its own.

    A piece with a key (say, the ids and versions of the peers it lists) is compressed
    once and reused by every message holding the same key: in a reconnect storm every
    node's first map lists nearly the same peers, so each is mostly shared bytes.
    """

    pieces: tuple[tuple[Hashable | None, bytes], ...]

    def json(self) -> bytes:
        return b"".join(data for _, data in self.pieces)

    def __len__(self) -> int:
        return sum(len(data) for _, data in self.pieces)


_ZSTD_MAGIC = 0xFD2FB528
_FCS_SIZES = (0, 2, 4, 8)
_DICT_ID_SIZES = (0, 1, 2, 4)


def _check_frames(body: bytes) -> None:
    """That `body` is whole zstd frames back to back (RFC 8878 3.1), as the Go client's
    DecodeAll needs: zstandard's streaming reader stops quietly at a truncated frame."""
    view, pos = memoryview(body), 0
    while pos < len(view):
        if len(view) - pos < 6:
            raise RemoteMapFrameError("map message ends inside a zstd frame header")
        magic = int.from_bytes(view[pos : pos + 4], "little")
        if magic & 0xFFFFFFF0 == 0x184D2A50:  # a skippable frame
            size = 8 + int.from_bytes(view[pos + 4 : pos + 8], "little")
        elif magic == _ZSTD_MAGIC:
            desc = view[pos + 4]
            single = desc >> 5 & 1
            fcs = _FCS_SIZES[desc >> 6] or (1 if single else 0)
            size = 5 + (0 if single else 1) + _DICT_ID_SIZES[desc & 3] + fcs
            while True:
                if len(view) - pos < size + 3:
                    raise RemoteMapFrameError("map message ends inside a zstd frame")
                header = int.from_bytes(view[pos + size : pos + size + 3], "little")
                kind = header >> 1 & 3
                if kind == 3:
                    raise RemoteMapFrameError("map message has a reserved zstd block type")
                size += 3 + (1 if kind == 1 else header >> 3)
                if header & 1:
                    break
            size += 4 if desc >> 2 & 1 else 0
        else:
            raise RemoteMapFrameError("map message is not valid zstd: no frame magic")
        if len(view) - pos < size:
            raise RemoteMapFrameError("map message ends inside a zstd frame")
        pos += size


def message_json(message: bytes | Segmented) -> bytes:
    """The whole JSON text of a message (for logs and debug views)."""
    return message.json() if isinstance(message, Segmented) else message


@dataclass
class MapFrameEncoder:
    """Frames JSON messages for map streams; one encoder can serve every stream.

    ``compress`` follows the request's ``Compress`` field; ``level`` trades CPU
    for bytes (zstd's default 3 is what Go's zstd "SpeedDefault" roughly matches).
    Each message is a frame of its own, so sharing the encoder changes no byte; it
    keeps one compression context (about 1 MB once it has compressed a large map)
    instead of one per stream. With ``cache_entries``, the last that many distinct
    small messages are kept framed and an identical message costs a lookup; a large
    message is kept only while it is one of the last BIG_KEPT objects encoded.
    """

    compress: bool = True
    level: int = 3
    max_frame: int = DEFAULT_MAX_FRAME
    cache_entries: int = 0
    _cctx: zstandard.ZstdCompressor = field(init=False, repr=False)
    _cache: dict[bytes, bytes] = field(init=False, repr=False, default_factory=dict)
    _big: list[tuple[bytes, bytes]] = field(init=False, repr=False, default_factory=list)
    _pieces: dict[Hashable, bytes] = field(init=False, repr=False, default_factory=dict)
    _pieces_bytes: int = field(init=False, repr=False, default=0)

    def __post_init__(self) -> None:
        self._cctx = zstandard.ZstdCompressor(level=self.level)

    def encode(self, message_json: bytes | Segmented) -> bytes:
        if isinstance(message_json, Segmented):
            return b"".join(self.encode_parts(message_json))
        if self.cache_entries <= 0:
            return self._compressed(message_json)
        if len(message_json) > CACHE_MAX_MESSAGE:
            for kept, frame in self._big:
                if kept is message_json:
                    return frame
            frame = self._compressed(message_json)
            self._big = [(message_json, frame), *self._big[: BIG_KEPT - 1]]
            return frame
        hit = self._cache.get(message_json)
        if hit is not None:
            return hit
        frame = self._compressed(message_json)
        if len(self._cache) >= self.cache_entries:
            del self._cache[next(iter(self._cache))]  # the oldest
        self._cache[message_json] = frame
        return frame

    def _compressed(self, message_json: bytes) -> bytes:
        return self._frame(self._cctx.compress(message_json) if self.compress else message_json)

    def encode_parts(self, message_json: bytes | Segmented) -> list[bytes]:
        """The framed message as parts to send one after another: a Segmented message's
        compressed pieces are the cached objects themselves, so a storm's thousands of
        first maps share their bytes instead of each holding a joined copy."""
        if not isinstance(message_json, Segmented):
            return [self.encode(message_json)]
        parts = [self._piece(k, d) for k, d in message_json.pieces]
        return [self._prefix(sum(map(len, parts))), *parts]

    def keepalive(self) -> bytes:
        return self.encode(KEEPALIVE_JSON)

    def _frame(self, body: bytes) -> bytes:
        return self._prefix(len(body)) + body

    def _prefix(self, size: int) -> bytes:
        """The length prefix of a message body of `size` bytes, within max_frame."""
        if size > self.max_frame:
            raise LocalMapFrameError(
                f"map message of {size} bytes exceeds the {self.max_frame}-byte limit"
            )
        return struct.pack("<I", size)

    def _piece(self, key: Hashable | None, data: bytes) -> bytes:
        if not self.compress:
            return data
        if key is None:
            return self._cctx.compress(data)
        hit = self._pieces.pop(key, None)  # re-inserted: the dict's order is recency
        if hit is None:
            hit = self._cctx.compress(data)
            self._pieces_bytes += len(hit)
            while self._pieces_bytes > PIECE_CACHE_BYTES and self._pieces:
                self._pieces_bytes -= len(self._pieces.pop(next(iter(self._pieces))))
        self._pieces[key] = hit
        return hit


@dataclass
class MapFrameDecoder:
    """Incremental decoder: ``receive_data`` then ``next_message`` until None."""

    compressed: bool = True
    max_frame: int = DEFAULT_MAX_FRAME
    max_decompressed: int = DEFAULT_MAX_DECOMPRESSED
    # What arrived, as received: a megabyte message comes in dozens of DATA frames, and
    # is joined once when whole rather than regrown by every frame.
    _chunks: list[bytes] = field(init=False, repr=False, default_factory=list)
    _size: int = field(init=False, repr=False, default=0)
    _dctx: zstandard.ZstdDecompressor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._dctx = zstandard.ZstdDecompressor()

    def receive_data(self, data: bytes) -> None:
        if data:
            self._chunks.append(bytes(data))
            self._size += len(data)
        # Refuse before buffering more: the length alone proves the peer is wrong.
        self._length()

    def _length(self) -> int | None:
        """The length of the message at the front, once its prefix is in (checked)."""
        if self._size < LENGTH_PREFIX:
            return None
        if len(self._chunks[0]) < LENGTH_PREFIX:
            self._chunks = [b"".join(self._chunks)]
        (n,) = struct.unpack_from("<I", self._chunks[0], 0)
        if n > self.max_frame:
            raise RemoteMapFrameError(
                f"map message of {n} bytes exceeds the {self.max_frame}-byte limit"
            )
        return int(n)

    def next_message(self) -> bytes | None:
        """Return the next whole message's JSON bytes, or None if more data is needed."""
        body = self._next_body()
        if body is None or not self.compressed:
            return body
        return self.inflate(body)

    def next_frames(self) -> bytes | None:
        """The next whole message as sent, its zstd frames checked but not inflated.

        For a reader that only needs to know a message came whole (a load generator
        counting megabyte first maps): the structure a Go client's DecodeAll needs is
        checked, the inflation left to whoever reads the contents."""
        body = self._next_body()
        if body is not None and self.compressed:
            _check_frames(body)
        return body

    def _next_body(self) -> bytes | None:
        n = self._length()
        if n is None or self._size < LENGTH_PREFIX + n:
            return None
        buf = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        body = buf[LENGTH_PREFIX : LENGTH_PREFIX + n]
        rest = buf[LENGTH_PREFIX + n :]
        self._chunks = [rest] if rest else []
        self._size = len(rest)
        # A length check of the next frame, now that it may be at the front.
        self._length()
        return body

    def inflate(self, body: bytes) -> bytes:
        """Every frame of the message, as the Go client decodes it (zero or more), with
        the inflation bound over all of them (read in bounded steps: a declared size is
        not trusted, and a frame without one is bounded all the same)."""
        _check_frames(body)
        out = bytearray()
        # Each read allocates its whole size: asking for the bound at once (64 MiB) made a
        # small delta cost a huge allocation. Steps grow with what the message gives.
        step = max(INFLATE_STEP, 8 * len(body))
        try:
            reader = self._dctx.stream_reader(body, read_across_frames=True)
            while chunk := reader.read(min(step, self.max_decompressed + 1 - len(out))):
                step = max(step, 2 * len(out))
                out += chunk
                if len(out) > self.max_decompressed:
                    raise RemoteMapFrameError(
                        f"map message inflates beyond {self.max_decompressed} bytes"
                    )
        except zstandard.ZstdError as e:
            raise RemoteMapFrameError(f"map message is not valid zstd: {e}") from None
        return bytes(out)

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete message (non-zero at EOF = truncated stream)."""
        return self._size
