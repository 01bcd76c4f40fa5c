from __future__ import annotations

import json
import struct

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.mapframe import (
    KEEPALIVE_JSON,
    LocalMapFrameError,
    MapFrameDecoder,
    MapFrameEncoder,
    RemoteMapFrameError,
)


def test_keepalive_is_compressed_with_le_length() -> None:
    wire = MapFrameEncoder().keepalive()
    (n,) = struct.unpack("<I", wire[:4])
    assert n == len(wire) - 4
    # zstd magic number, as the Go client's zstdframe expects.
    assert wire[4:8] == b"\x28\xb5\x2f\xfd"
    assert zstandard.ZstdDecompressor().decompress(wire[4:]) == KEEPALIVE_JSON


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.binary(min_size=1, max_size=3000), min_size=1, max_size=5),
    st.integers(min_value=1, max_value=64),
)
def test_round_trip_in_arbitrary_chunks(messages: list[bytes], chunk: int) -> None:
    enc, dec = MapFrameEncoder(), MapFrameDecoder()
    wire = b"".join(enc.encode(m) for m in messages)
    got = []
    for i in range(0, len(wire), chunk):
        dec.receive_data(wire[i : i + chunk])
        while (m := dec.next_message()) is not None:
            got.append(m)
    assert got == messages
    assert dec.buffered == 0


def test_frame_without_content_size_decodes() -> None:
    body = zstandard.ZstdCompressor(write_content_size=False).compress(b'{"Domain":"x"}')
    dec = MapFrameDecoder()
    dec.receive_data(struct.pack("<I", len(body)) + body)
    msg = dec.next_message()
    assert msg is not None
    assert json.loads(msg) == {"Domain": "x"}


def test_oversized_length_refused_before_buffering() -> None:
    dec = MapFrameDecoder(max_frame=1000)
    with pytest.raises(RemoteMapFrameError, match="exceeds"):
        dec.receive_data(struct.pack("<I", 1001))


def test_uncompressed_json_is_rejected() -> None:
    # What the Go client would say: zstd "magic number mismatch".
    dec = MapFrameDecoder()
    dec.receive_data(struct.pack("<I", len(KEEPALIVE_JSON)) + KEEPALIVE_JSON)
    with pytest.raises(RemoteMapFrameError, match="zstd"):
        dec.next_message()


@pytest.mark.parametrize("declared", [True, False])
def test_decompression_bomb_refused(declared: bool) -> None:
    body = zstandard.ZstdCompressor(write_content_size=declared).compress(b"a" * 100_000)
    dec = MapFrameDecoder(max_decompressed=10_000)
    dec.receive_data(struct.pack("<I", len(body)) + body)
    with pytest.raises(RemoteMapFrameError):
        dec.next_message()


def test_truncated_zstd_frame_refused() -> None:
    body = zstandard.ZstdCompressor().compress(b"x" * 500)[:-3]
    dec = MapFrameDecoder()
    dec.receive_data(struct.pack("<I", len(body)) + body)
    with pytest.raises(RemoteMapFrameError):
        dec.next_message()


def test_incomplete_message_waits() -> None:
    wire = MapFrameEncoder().encode(b'{"Peers":[]}')
    dec = MapFrameDecoder()
    dec.receive_data(wire[:-1])
    assert dec.next_message() is None
    assert dec.buffered == len(wire) - 1


def test_encoder_refuses_too_big() -> None:
    enc = MapFrameEncoder(compress=False, max_frame=10)
    with pytest.raises(LocalMapFrameError):
        enc.encode(b"x" * 11)


def test_uncompressed_mode_for_clients_without_zstd() -> None:
    enc, dec = MapFrameEncoder(compress=False), MapFrameDecoder(compressed=False)
    dec.receive_data(enc.encode(b"{}"))
    assert dec.next_message() == b"{}"


def test_shared_encoder_compresses_a_repeated_message_once_and_stays_bounded() -> None:
    enc, dec = MapFrameEncoder(cache_entries=2), MapFrameDecoder()
    delta = (
        b'{"PeersChangedPatch":[{"NodeID":7,"Online":true}],"ControlTime":"2026-01-01T00:00:00Z"}'
    )
    first = enc.encode(delta)
    assert enc.encode(delta) is first  # the same bytes object: no second compression
    dec.receive_data(first + first)
    assert dec.next_message() == delta
    assert dec.next_message() == delta
    enc.encode(b'{"a":1}')
    enc.encode(b'{"b":2}')
    assert enc.encode(delta) is not first  # evicted: at most cache_entries kept
    big = b'{"Peers":[' + b",".join([b'{"ID":1}'] * 20000) + b"]}"
    # A large message is kept by identity only: the one object a round's sessions share
    # is compressed once, an equal copy (a full map built for one node) is not looked up.
    kept = enc.encode(big)
    assert enc.encode(big) is kept
    assert enc.encode(bytes(bytearray(big))) is not kept
    dec.receive_data(kept)
    assert dec.next_message() == big
    for other in (big + b" ", big + b"  "):
        enc.encode(other)
    assert enc.encode(big) is not kept  # BIG_KEPT bounds what is held


def test_a_message_of_several_frames_decodes_whole_and_stays_bounded() -> None:
    """The Go client decodes every frame of a message (util/zstdframe: "zero or more
    frames"); ours does too, keeping the inflation bound over all of them, and refuses a
    frame without a declared size anywhere but last (its end is unknown)."""
    cctx = zstandard.ZstdCompressor()
    parts = [b'{"Peers":[', b'{"ID":1},', b'{"ID":2}', b"]}"]
    body = b"".join(cctx.compress(p) for p in parts)
    dec = MapFrameDecoder()
    dec.receive_data(struct.pack("<I", len(body)) + body)
    assert dec.next_message() == b"".join(parts)

    many = b"".join(cctx.compress(b"x" * 20) for _ in range(2))
    small = MapFrameDecoder(max_decompressed=30)
    small.receive_data(struct.pack("<I", len(many)) + many)
    with pytest.raises(RemoteMapFrameError, match="inflates beyond"):
        small.next_message()
    small = MapFrameDecoder(max_decompressed=30)

    # Frames that do not declare their size are bounded all the same, wherever they are.
    unsized = zstandard.ZstdCompressor(write_content_size=False)
    mixed = unsized.compress(b'{"a":') + cctx.compress(b"1,") + unsized.compress(b'"b":2}')
    dec.receive_data(struct.pack("<I", len(mixed)) + mixed)
    assert dec.next_message() == b'{"a":1,"b":2}'
    bomb = unsized.compress(b"x" * 20) + unsized.compress(b"y" * 20)
    small.receive_data(struct.pack("<I", len(bomb)) + bomb)
    with pytest.raises(RemoteMapFrameError):
        small.next_message()


@pytest.mark.parametrize("cut", [1, 3, 9])
def test_a_message_cut_inside_a_frame_is_refused(cut: int) -> None:
    """Go's DecodeAll fails on a truncated frame; the streaming decoder would stop
    quietly with part of the JSON, so the frames' extent is checked first."""
    cctx = zstandard.ZstdCompressor()
    body = cctx.compress(b'{"Peers":[') + cctx.compress(b'{"ID":1}]}')
    body = body[:-cut]
    dec = MapFrameDecoder()
    dec.receive_data(struct.pack("<I", len(body)) + body)
    with pytest.raises(RemoteMapFrameError, match="ends inside"):
        dec.next_message()
