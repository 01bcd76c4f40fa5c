"""Immutable sets of IP addresses as merged intervals, per address family.

The compiler needs what netipx.IPSet gives headscale: unions, membership,
overlap with a prefix, subset tests, and Tailscale's wire rendering (single
IP, CIDR, or an ``a-b`` range, as seen in SrcIPs like
``100.64.0.0-100.115.91.255``). Intervals of plain ints keep it small and fast.
"""

from __future__ import annotations

import ipaddress
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_MAX = {4: (1 << 32) - 1, 6: (1 << 128) - 1}

Interval = tuple[int, int]
_INF = 1 << 129  # above any address: sorts (n, _INF) after every (n, x)


def _merge(intervals: Iterable[Interval]) -> tuple[Interval, ...]:
    out: list[list[int]] = []
    for lo, hi in sorted(intervals):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return tuple((lo, hi) for lo, hi in out)


def _net_interval(net: IPNetwork) -> Interval:
    return int(net.network_address), int(net.broadcast_address)


def _subtract(a: tuple[Interval, ...], b: tuple[Interval, ...]) -> tuple[Interval, ...]:
    out: list[Interval] = []
    for lo, hi in a:
        cur = lo
        for blo, bhi in b:
            if bhi < cur or blo > hi:
                continue
            if blo > cur:
                out.append((cur, blo - 1))
            cur = max(cur, bhi + 1)
            if cur > hi:
                break
        if cur <= hi:
            out.append((cur, hi))
    return tuple(out)


def _covers(container: tuple[Interval, ...], lo: int, hi: int) -> bool:
    # Intervals are sorted and disjoint: only the last one starting at or
    # before lo can cover [lo, hi].
    i = bisect_right(container, (lo, _INF)) - 1
    return i >= 0 and container[i][1] >= hi


def _touches(container: tuple[Interval, ...], lo: int, hi: int) -> bool:
    i = bisect_right(container, (hi, _INF)) - 1
    return i >= 0 and container[i][1] >= lo


@dataclass(frozen=True)
class IPSet:
    """A set of IPv4 and IPv6 addresses."""

    v4: tuple[Interval, ...] = ()
    v6: tuple[Interval, ...] = ()

    @classmethod
    def of(cls, items: Iterable[IPNetwork | IPAddress | str]) -> IPSet:
        """Build from networks, addresses or their strings (also ``a-b`` ranges)."""
        v4: list[Interval] = []
        v6: list[Interval] = []
        for item in items:
            if isinstance(item, str):
                if item == "*":
                    v4.append((0, _MAX[4]))
                    v6.append((0, _MAX[6]))
                    continue
                if "-" in item:
                    a, b = (ipaddress.ip_address(x) for x in item.split("-", 1))
                    (v4 if a.version == 4 else v6).append((int(a), int(b)))
                    continue
                item = ipaddress.ip_network(item, strict=False)
            if isinstance(item, ipaddress.IPv4Address | ipaddress.IPv6Address):
                (v4 if item.version == 4 else v6).append((int(item), int(item)))
            else:
                (v4 if item.version == 4 else v6).append(_net_interval(item))
        return cls(_merge(v4), _merge(v6))

    def __or__(self, other: IPSet) -> IPSet:
        return IPSet(_merge(self.v4 + other.v4), _merge(self.v6 + other.v6))

    def __sub__(self, other: IPSet) -> IPSet:
        return IPSet(_subtract(self.v4, other.v4), _subtract(self.v6, other.v6))

    def __bool__(self) -> bool:
        return bool(self.v4 or self.v6)

    def _fam(self, version: int) -> tuple[Interval, ...]:
        return self.v4 if version == 4 else self.v6

    def contains(self, addr: IPAddress) -> bool:
        n = int(addr)
        return _covers(self._fam(addr.version), n, n)

    def contains_any(self, addrs: Iterable[IPAddress]) -> bool:
        return any(self.contains(a) for a in addrs)

    def overlaps(self, net: IPNetwork) -> bool:
        return _touches(self._fam(net.version), *_net_interval(net))

    def overlaps_any(self, nets: Iterable[IPNetwork]) -> bool:
        return any(self.overlaps(n) for n in nets)

    def covers(self, net: IPNetwork) -> bool:
        return _covers(self._fam(net.version), *_net_interval(net))

    def issubset(self, other: IPSet) -> bool:
        return all(_covers(other.v4, lo, hi) for lo, hi in self.v4) and all(
            _covers(other.v6, lo, hi) for lo, hi in self.v6
        )

    def strings(self) -> list[str]:
        """Tailscale's wire form: an IP, else a CIDR, else ``first-last``."""
        out: list[str] = []
        for version, fam in ((4, self.v4), (6, self.v6)):
            cls = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
            for lo, hi in fam:
                a, b = cls(lo), cls(hi)
                if lo == hi:
                    out.append(str(a))
                    continue
                size = hi - lo + 1
                if size & (size - 1) == 0 and lo % size == 0:
                    bits = (32 if version == 4 else 128) - size.bit_length() + 1
                    out.append(f"{a}/{bits}")
                else:
                    out.append(f"{a}-{b}")
        return out

    def prefixes(self) -> list[IPNetwork]:
        """The smallest list of CIDR prefixes covering exactly this set."""
        out: list[IPNetwork] = []
        for version, fam in ((4, self.v4), (6, self.v6)):
            cls = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
            for lo, hi in fam:
                out.extend(ipaddress.summarize_address_range(cls(lo), cls(hi)))
        return out

    def addresses(self) -> list[IPAddress]:
        """Every address, for small sets only (SSH principals)."""
        out: list[IPAddress] = []
        for version, fam in ((4, self.v4), (6, self.v6)):
            cls = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
            for lo, hi in fam:
                out.extend(cls(n) for n in range(lo, hi + 1))
        return out


EMPTY = IPSet()

# tsaddr.CGNATRange and TailscaleULARange, minus tsaddr.ChromeOSVMRange: what
# "*" means as a source, as Tailscale renders it in SrcIPs
# ("100.64.0.0-100.115.91.255", "100.115.94.0-100.127.255.255",
# "fd7a:115c:a1e0::/48").
TAILNET = IPSet.of(["100.64.0.0/10", "fd7a:115c:a1e0::/48"]) - IPSet.of(["100.115.92.0/23"])

# headscale util.TheInternet: 0.0.0.0/0 and 2000::/3 minus private, Tailscale
# and link-local ranges -- what autogroup:internet (an exit node) carries.
INTERNET = IPSet.of(["0.0.0.0/0", "2000::/3"]) - IPSet.of(
    [
        "fc00::/7",
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "fd7a:115c:a1e0::/48",
        "100.64.0.0/10",
        "fe80::/10",
        "169.254.0.0/16",
    ]
)

EVERYTHING = IPSet.of(["0.0.0.0/0", "::/0"])
