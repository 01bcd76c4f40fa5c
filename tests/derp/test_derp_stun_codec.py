"""STUN: requests as Tailscale sends them are answered byte-exactly; junk is ignored."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from derp import stun

TXID = bytes.fromhex("2360b11e3ec68ffa93e08007")
# tailscale net/stun/stun_test.go "google-1": a real server's answer for 72.69.33.45:59028.
GOOGLE_1 = bytes.fromhex(
    "0101000c2112a4422360b11e3ec68ffa93e080070020000800 01c7866957856f".replace(" ", "")
)


def test_response_matches_a_real_server_byte_for_byte() -> None:
    assert stun.binding_response(TXID, "72.69.33.45", 59028) == GOOGLE_1


def test_request_is_the_40_byte_tailscale_request() -> None:
    req = stun.binding_request(TXID)
    assert len(req) == 40
    assert req[:8] == bytes.fromhex("000100142112a442")
    assert req[20:32] == bytes.fromhex("80220008") + b"tailnode"
    assert req[32:36] == bytes.fromhex("80280004")
    assert stun.parse_binding_request(req) == TXID


@pytest.mark.parametrize(
    ("ip", "port"),
    [("192.0.2.1", 41641), ("2001:db8::1234", 3478), ("::ffff:10.0.0.9", 1)],
)
def test_answer_round_trips_v4_and_v6(ip: str, port: int) -> None:
    reply = stun.answer(stun.binding_request(TXID), ip, port)
    assert reply is not None
    parsed = stun.parse_binding_response(reply)
    assert parsed is not None
    want = ipaddress.ip_address(ip)
    if isinstance(want, ipaddress.IPv6Address) and want.ipv4_mapped:
        want = want.ipv4_mapped
    assert (parsed.txid, parsed.ip, parsed.port) == (TXID, want, port)
    # XOR-MAPPED-ADDRESS, length 8 (v4) / 20 (v6), nothing else.
    assert struct.unpack(">HH", reply[20:24]) == (0x0020, 8 if want.version == 4 else 20)


def test_bad_fingerprint_wrong_software_and_truncation_are_ignored() -> None:
    req = bytearray(stun.binding_request(TXID))
    bad_fp = bytes(req[:-1]) + bytes([req[-1] ^ 1])
    assert stun.answer(bad_fp, "192.0.2.1", 1) is None
    other = bytes(req).replace(b"tailnode", b"othernod")
    assert stun.parse_binding_request(other) is None  # fingerprint now wrong too
    assert stun.answer(bytes(req[:30]), "192.0.2.1", 1) is None
    assert stun.answer(b"GET / HTTP/1.1\r\n\r\n" + b"x" * 10, "192.0.2.1", 1) is None
    # A response is not a request.
    assert stun.answer(GOOGLE_1, "192.0.2.1", 1) is None


def test_lax_mode_answers_plain_rfc5389_requests() -> None:
    plain = struct.pack(">HH", 1, 0) + stun.MAGIC_COOKIE + TXID
    assert stun.parse_binding_request(plain) is None
    assert stun.parse_binding_request(plain, require_tailscale=False) == TXID


def test_mapped_address_fallback_is_understood() -> None:
    value = struct.pack(">BBH", 0, 1, 80) + bytes([10, 0, 0, 1])
    attr = struct.pack(">HH", 0x0001, len(value)) + value
    pkt = struct.pack(">HH", 0x0101, len(attr)) + stun.MAGIC_COOKIE + TXID + attr
    parsed = stun.parse_binding_response(pkt)
    assert parsed == stun.BindingResponse(TXID, ipaddress.ip_address("10.0.0.1"), 80)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=80))
def test_arbitrary_datagrams_never_raise(data: bytes) -> None:
    reply = stun.answer(data, "127.0.0.1", 9)
    if reply is not None:
        assert stun.parse_binding_response(reply) is not None
    stun.parse_binding_response(data)
