"""Go's ``net/netip`` text parsing rules, for values peers will decode with them.

A Tailscale client decodes ``Endpoints`` as ``[]netip.AddrPort`` and prefixes
(``RoutableIPs``, ``AllowedIPs``, ``PrimaryRoutes``) as ``[]netip.Prefix``; one
value its parser refuses fails the client's whole MapResponse. So homescale
checks every such string with the same rules when it arrives, and stores only
what passes. Python's ``ipaddress`` agrees with Go on addresses (dotted quads
without leading zeros, ASCII digits only, RFC 4291 IPv6 with an optional
embedded IPv4 and zone); the differences are in the wrappers, spelled out here
from go/src/net/netip/netip.go (``ParseAddrPort``/``splitAddrPort``,
``ParsePrefix``) -- for example ``"[::1]"`` has no port, ``"1.2.3.4:70000"``
overflows uint16, ``"10.0.0.0/08"`` has a leading zero in its bits.

Where Go accepts more than makes sense for a peer to send, ``masked=True``
asks for a canonical prefix (no host bits), as ``tailscale up
--advertise-routes`` itself insists.
"""

from __future__ import annotations

import ipaddress

# No legitimate text form of an address, addr:port or prefix is near this long
# (the longest IPv6 form is 45 characters; zones are interface names).
MAX_TEXT_LEN = 128

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class NetipError(ValueError):
    """A string Go's net/netip parser would refuse (message as Go words it, mostly)."""


def _check_text(s: object, what: str) -> str:
    if not isinstance(s, str):
        raise NetipError(f"{what}: expected a string, got {type(s).__name__}")
    if len(s) > MAX_TEXT_LEN:
        raise NetipError(f"{what}: {len(s)} characters is too long for an address")
    return s


def parse_addr(s: str) -> IPAddress:
    """``netip.ParseAddr``: IPv4 dotted quad or IPv6 (zone allowed)."""
    _check_text(s, "ParseAddr")
    if not s:
        raise NetipError('ParseAddr(""): unable to parse IP')
    try:
        if ":" in s:
            return ipaddress.IPv6Address(s)
        return ipaddress.IPv4Address(s)
    except ValueError as e:
        raise NetipError(f"ParseAddr({s!r}): {e}") from None


def _parse_port(port: str, s: str) -> int:
    # strconv.ParseUint(port, 10, 16): ASCII digits only (leading zeros are fine).
    if not port or not port.isascii() or not port.isdigit():
        raise NetipError(f"invalid port {port!r} parsing {s!r}")
    value = int(port)
    if value > 0xFFFF:
        raise NetipError(f"invalid port {port!r} parsing {s!r}")
    return value


def parse_addr_port(s: str) -> tuple[IPAddress, int]:
    """``netip.ParseAddrPort``: ``1.2.3.4:41641`` or ``[v6(%zone)]:41641``."""
    _check_text(s, "ParseAddrPort")
    host, sep, port = s.rpartition(":")
    if not sep:
        raise NetipError(f"{s!r}: not an ip:port")
    v6 = False
    if host.startswith("["):
        if len(host) < 2 or not host.endswith("]"):
            raise NetipError(f"{s!r}: missing ]")
        host = host[1:-1]
        v6 = True
    port_value = _parse_port(port, s)
    ip = parse_addr(host)
    if v6 and ip.version == 4:
        raise NetipError(f"{s!r}: square brackets can only be used with IPv6 addresses")
    if not v6 and ip.version == 6:
        raise NetipError(f"{s!r}: IPv6 addresses must be surrounded by square brackets")
    return ip, port_value


def parse_prefix(s: str, *, masked: bool = False) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """``netip.ParsePrefix`` (``masked``: also refuse host bits, as the CLI does)."""
    _check_text(s, "ParsePrefix")
    head, sep, bits_text = s.rpartition("/")
    if not sep:
        raise NetipError(f"netip.ParsePrefix({s!r}): no '/'")
    ip = parse_addr(head)
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        raise NetipError(f"netip.ParsePrefix({s!r}): IPv6 zones cannot be present in a prefix")
    # Go refuses a sign and leading zeros before strconv.Atoi sees them.
    if (
        not bits_text
        or not bits_text.isascii()
        or not bits_text.isdigit()
        or (len(bits_text) > 1 and bits_text[0] == "0")
    ):
        raise NetipError(f"netip.ParsePrefix({s!r}): bad bits after slash: {bits_text!r}")
    bits = int(bits_text)
    if bits > ip.max_prefixlen:
        raise NetipError(f"netip.ParsePrefix({s!r}): prefix length out of range")
    net = ipaddress.ip_network((ip, bits), strict=False)
    if masked and net.network_address != ip:
        raise NetipError(f"{s!r} has host bits set; the prefix is {net}")
    return net
