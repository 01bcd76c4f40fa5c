"""Framing of the ``/machine/map`` response stream, sans-IO.

Each message is a 4-byte *little-endian* length followed by that many bytes
(control/controlclient/direct.go sendMapRequest reads ``binary.LittleEndian``).
With ``Compress: "zstd"`` -- what every client from 1.56 to 1.90 sends -- those
bytes are one zstd frame holding the JSON, and the client zstd-decodes every
message, keep-alives included (util/zstdframe), so nothing is sent raw.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import zstandard

LENGTH_PREFIX = 4
# testcontrol refuses map messages above 16 MiB; we hold our peers to the same.
DEFAULT_MAX_FRAME = 16 << 20
# A small zstd frame can expand enormously; bound what one message may inflate to.
DEFAULT_MAX_DECOMPRESSED = 64 << 20
# Messages up to this size are remembered framed: a delta that many sessions send
# (the same patch to every peer) is compressed once. Full maps are not kept.
CACHE_MAX_MESSAGE = 64 << 10
KEEPALIVE_JSON = b'{"KeepAlive":true}'


class MapFrameError(Exception):
    """Root of map-stream framing errors."""


class LocalMapFrameError(MapFrameError):
    """We were asked to send something that cannot be framed."""


class RemoteMapFrameError(MapFrameError):
    """The stream we read is malformed: oversized, truncated or bad zstd."""


@dataclass
class MapFrameEncoder:
    """Frames JSON messages for map streams; one encoder can serve every stream.

    ``compress`` follows the request's ``Compress`` field; ``level`` trades CPU
    for bytes (zstd's default 3 is what Go's zstd "SpeedDefault" roughly matches).
    Each message is a frame of its own, so sharing the encoder changes no byte; it
    keeps one compression context (about 1 MB once it has compressed a large map)
    instead of one per stream. With ``cache_entries``, the last that many distinct
    small messages are kept framed and an identical message costs a lookup.
    """

    compress: bool = True
    level: int = 3
    max_frame: int = DEFAULT_MAX_FRAME
    cache_entries: int = 0
    _cctx: zstandard.ZstdCompressor = field(init=False, repr=False)
    _cache: dict[bytes, bytes] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        self._cctx = zstandard.ZstdCompressor(level=self.level)

    def encode(self, message_json: bytes) -> bytes:
        cacheable = self.cache_entries > 0 and len(message_json) <= CACHE_MAX_MESSAGE
        if cacheable:
            hit = self._cache.get(message_json)
            if hit is not None:
                return hit
        body = self._cctx.compress(message_json) if self.compress else message_json
        if len(body) > self.max_frame:
            raise LocalMapFrameError(
                f"map message of {len(body)} bytes exceeds the {self.max_frame}-byte limit"
            )
        frame = struct.pack("<I", len(body)) + body
        if cacheable:
            if len(self._cache) >= self.cache_entries:
                del self._cache[next(iter(self._cache))]  # the oldest
            self._cache[message_json] = frame
        return frame

    def keepalive(self) -> bytes:
        return self.encode(KEEPALIVE_JSON)


@dataclass
class MapFrameDecoder:
    """Incremental decoder: ``receive_data`` then ``next_message`` until None."""

    compressed: bool = True
    max_frame: int = DEFAULT_MAX_FRAME
    max_decompressed: int = DEFAULT_MAX_DECOMPRESSED
    _buf: bytearray = field(init=False, repr=False, default_factory=bytearray)
    _dctx: zstandard.ZstdDecompressor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._dctx = zstandard.ZstdDecompressor()

    def receive_data(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) >= LENGTH_PREFIX:
            (n,) = struct.unpack_from("<I", self._buf, 0)
            if n > self.max_frame:
                # Refuse before buffering: the length alone proves the peer is wrong.
                raise RemoteMapFrameError(
                    f"map message of {n} bytes exceeds the {self.max_frame}-byte limit"
                )

    def next_message(self) -> bytes | None:
        """Return the next whole message's JSON bytes, or None if more data is needed."""
        if len(self._buf) < LENGTH_PREFIX:
            return None
        (n,) = struct.unpack_from("<I", self._buf, 0)
        if n > self.max_frame:
            raise RemoteMapFrameError(
                f"map message of {n} bytes exceeds the {self.max_frame}-byte limit"
            )
        if len(self._buf) < LENGTH_PREFIX + n:
            return None
        body = bytes(self._buf[LENGTH_PREFIX : LENGTH_PREFIX + n])
        del self._buf[: LENGTH_PREFIX + n]
        # A length check of the next frame, now that it may be at the front.
        self.receive_data(b"")
        if not self.compressed:
            return body
        return self._decompress(body)

    def _decompress(self, body: bytes) -> bytes:
        try:
            # A declared content size is trusted by decompress() over
            # max_output_size, so check it first; -1 means "not declared", and
            # then max_output_size bounds the output buffer itself.
            declared = zstandard.frame_content_size(body)
            if declared > self.max_decompressed:
                raise RemoteMapFrameError(
                    f"map message inflates beyond {self.max_decompressed} bytes"
                )
            return self._dctx.decompress(body, max_output_size=self.max_decompressed)
        except zstandard.ZstdError as e:
            raise RemoteMapFrameError(f"map message is not valid zstd: {e}") from None

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete message (non-zero at EOF = truncated stream)."""
        return len(self._buf)
