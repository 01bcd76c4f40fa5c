"""Fuzz target: the map-response framing (length prefix + zstd), as a client reads it.

Property: the decoder yields messages or raises RemoteMapFrameError; never
anything else, and never more than its size limits (zstd bombs included).
"""

from __future__ import annotations

import struct

import zstandard
from hypothesis import strategies as st

from protocol.mapframe import MapFrameDecoder, MapFrameEncoder, RemoteMapFrameError
from tests.fuzz.harness import fuzz_tests
from tests.fuzz.strategies import dumps, json_values, mutated

LIMIT = 1 << 20  # small limits so a bomb is caught fast


def check(data: bytes) -> None:
    for compressed in (True, False):
        dec = MapFrameDecoder(compressed=compressed, max_frame=LIMIT, max_decompressed=LIMIT)
        for i in range(0, len(data), 7):  # fed in pieces, as reads arrive
            dec.receive_data(data[i : i + 7])
            while (msg := dec.next_message()) is not None:
                assert len(msg) <= LIMIT


def _frames() -> st.SearchStrategy[bytes]:
    enc = MapFrameEncoder()
    messages = st.lists(json_values(8).map(dumps), min_size=1, max_size=3)
    return mutated(messages.map(lambda ms: b"".join(enc.encode(m) for m in ms)))


def _bomb(size: int) -> bytes:
    """A small zstd frame that inflates to ``size`` bytes (declared or not)."""
    body = zstandard.ZstdCompressor(write_content_size=size % 2 == 0).compress(b"\0" * size)
    return struct.pack("<I", len(body)) + body


test_fuzz, test_corpus = fuzz_tests(
    "mapframe",
    st.one_of(
        _frames(),
        st.sampled_from([2 * LIMIT, 2 * LIMIT + 1]).map(_bomb),
        st.binary(max_size=64),
    ),
    check,
    expected=(RemoteMapFrameError,),
)
