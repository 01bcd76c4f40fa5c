"""Sans-IO STUN (RFC 5389) binding requests and responses, as Tailscale's net/stun.

The server side answers a binding request with a success response carrying
XOR-MAPPED-ADDRESS (the client's address as we saw it); netcheck uses it to
learn its public endpoint. Malformed packets are ignored (``None``), never an
error: UDP is unauthenticated and anyone may send junk.
"""

from __future__ import annotations

import ipaddress
import os
import struct
import zlib
from dataclasses import dataclass

MAGIC_COOKIE = b"\x21\x12\xa4\x42"
HEADER_LEN = 20
TXID_LEN = 12
BINDING_REQUEST = 0x0001
BINDING_SUCCESS = 0x0101
ATTR_MAPPED_ADDRESS = 0x0001
ATTR_XOR_MAPPED_ADDRESS = 0x0020
# Pre-RFC 5389 servers used 0x8020; net/stun's client accepts it too.
ATTR_XOR_MAPPED_ADDRESS_ALT = 0x8020
ATTR_SOFTWARE = 0x8022
ATTR_FINGERPRINT = 0x8028
# net/stun: what every Tailscale client puts in SOFTWARE (8 bytes: no padding).
TAILSCALE_SOFTWARE = b"tailnode"
# RFC 5389 section 15.5: CRC-32 of the message so far, XORed with "STUN".
_FINGERPRINT_XOR = 0x5354554E
_FINGERPRINT_ATTR_LEN = 8

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def fingerprint(data: bytes) -> int:
    return zlib.crc32(data) ^ _FINGERPRINT_XOR


def is_stun(packet: bytes) -> bool:
    """net/stun Is: >= 20 bytes, top two bits zero, magic cookie in place."""
    return len(packet) >= HEADER_LEN and packet[0] & 0xC0 == 0 and packet[4:8] == MAGIC_COOKIE


def _attributes(body: bytes) -> list[tuple[int, bytes]] | None:
    """The (type, value) list of a STUN body, or None if any attribute overruns."""
    out: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(body):
        if len(body) - pos < 4:
            return None
        atype, alen = struct.unpack_from(">HH", body, pos)
        pos += 4
        padded = (alen + 3) & ~3  # attributes are padded to 4 bytes
        if pos + padded > len(body):
            return None
        out.append((atype, body[pos : pos + alen]))
        pos += padded
    return out


def parse_binding_request(packet: bytes, *, require_tailscale: bool = True) -> bytes | None:
    """The 12-byte transaction ID of a binding request, or None to ignore the packet.

    With ``require_tailscale`` (the default, like derper and headscale) only
    requests with SOFTWARE "tailnode" ending in a valid FINGERPRINT count;
    otherwise any well-formed binding request is answered, and a FINGERPRINT,
    if present, must still be right.
    """
    if not is_stun(packet) or packet[0:2] != b"\x00\x01":
        return None
    (length,) = struct.unpack_from(">H", packet, 2)
    # net/stun walks attributes to the end of the datagram; the header length
    # must agree or the packet is not a well-formed message.
    if length != len(packet) - HEADER_LEN or length % 4:
        return None
    attrs = _attributes(packet[HEADER_LEN:])
    if attrs is None:
        return None
    software_ok = any(t == ATTR_SOFTWARE and v == TAILSCALE_SOFTWARE for t, v in attrs)
    has_fp = bool(attrs) and attrs[-1][0] == ATTR_FINGERPRINT
    if has_fp:
        value = attrs[-1][1]
        if len(value) != 4:
            return None
        (got,) = struct.unpack(">I", value)
        if got != fingerprint(packet[:-_FINGERPRINT_ATTR_LEN]):
            return None
    if require_tailscale and not (software_ok and has_fp):
        return None
    return packet[8:20]


def binding_request(txid: bytes | None = None) -> bytes:
    """The 40-byte request a Tailscale client sends (net/stun Request)."""
    txid = os.urandom(TXID_LEN) if txid is None else txid
    if len(txid) != TXID_LEN:
        raise ValueError("STUN transaction ID must be 12 bytes")
    body = struct.pack(">HH", ATTR_SOFTWARE, len(TAILSCALE_SOFTWARE)) + TAILSCALE_SOFTWARE
    head = struct.pack(">HH", BINDING_REQUEST, len(body) + _FINGERPRINT_ATTR_LEN)
    msg = head + MAGIC_COOKIE + txid + body
    return msg + struct.pack(">HHI", ATTR_FINGERPRINT, 4, fingerprint(msg))


def _xor_address(txid: bytes, ip: IPAddress, port: int) -> bytes:
    family = 1 if ip.version == 4 else 2
    mask = MAGIC_COOKIE + txid  # v4 uses the cookie, v6 the cookie and txid
    xored = bytes(a ^ b for a, b in zip(ip.packed, mask, strict=False))
    return struct.pack(">BBH", 0, family, port ^ 0x2112) + xored


def binding_response(txid: bytes, ip: IPAddress | str, port: int) -> bytes:
    """A binding success with XOR-MAPPED-ADDRESS (net/stun Response).

    An IPv4-mapped IPv6 source (dual-stack socket) is reported as IPv4, as Go's
    netip does after Unmap, so the client sees its real v4 endpoint.
    """
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    value = _xor_address(txid, addr, port)
    attr = struct.pack(">HH", ATTR_XOR_MAPPED_ADDRESS, len(value)) + value
    return struct.pack(">HH", BINDING_SUCCESS, len(attr)) + MAGIC_COOKIE + txid + attr


@dataclass(frozen=True, slots=True)
class BindingResponse:
    txid: bytes
    ip: IPAddress
    port: int


def _parse_address(value: bytes, txid: bytes, xor: bool) -> tuple[IPAddress, int] | None:
    if len(value) < 4:
        return None
    family, port = value[1], struct.unpack_from(">H", value, 2)[0]
    size = {1: 4, 2: 16}.get(family)
    if size is None or len(value) < 4 + size:
        return None
    raw = value[4 : 4 + size]
    if xor:
        port ^= 0x2112
        raw = bytes(a ^ b for a, b in zip(raw, MAGIC_COOKIE + txid, strict=False))
    return ipaddress.ip_address(raw), port


def parse_binding_response(packet: bytes) -> BindingResponse | None:
    """Client side (net/stun ParseResponse): XOR-MAPPED first, MAPPED as fallback."""
    if not is_stun(packet) or packet[0:2] != b"\x01\x01":
        return None
    txid = packet[8:20]
    (length,) = struct.unpack_from(">H", packet, 2)
    if length > len(packet) - HEADER_LEN:
        return None
    attrs = _attributes(packet[HEADER_LEN : HEADER_LEN + length])
    if attrs is None:
        return None
    found = fallback = None
    for atype, value in attrs:
        if atype in (ATTR_XOR_MAPPED_ADDRESS, ATTR_XOR_MAPPED_ADDRESS_ALT):
            found = _parse_address(value, txid, xor=True) or found
        elif atype == ATTR_MAPPED_ADDRESS:
            fallback = _parse_address(value, txid, xor=False) or fallback
    best = found or fallback
    if best is None:
        return None
    ip, port = best
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return BindingResponse(txid, ip, port)


def answer(packet: bytes, ip: IPAddress | str, port: int) -> bytes | None:
    """The reply to one datagram from ``ip:port``, or None to stay silent."""
    txid = parse_binding_request(packet)
    if txid is None:
        return None
    return binding_response(txid, ip, port)
