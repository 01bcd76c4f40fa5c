"""Address allocation from `prefixes.v4` / `prefixes.v6`, skipping what Tailscale reserves."""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Collection

IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network

# tailcfg / net/tsaddr: the MagicDNS service address and ChromeOS's VM range are never
# node addresses; the network address of the prefix is not one either.
RESERVED = (
    ipaddress.ip_network("100.100.100.100/32"),
    ipaddress.ip_network("100.115.92.0/23"),
    ipaddress.ip_network("fd7a:115c:a1e0::53/128"),
)
RANDOM_TRIES = 1000


class PrefixExhausted(Exception):
    """No free address is left in the prefix."""


def _usable(net: IPNet, addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if addr == net.network_address:
        return False
    if net.version == 4 and addr == net.broadcast_address:
        return False
    return not any(addr in r for r in RESERVED if r.version == addr.version)


def allocate(
    net: IPNet,
    used: Collection[str],
    strategy: str = "sequential",
    rng: random.Random | None = None,
) -> str:
    """A free address in `net` (as a string) not in `used`."""
    size = net.num_addresses
    if strategy == "random":
        rng = rng or random.SystemRandom()
        for _ in range(RANDOM_TRIES):
            addr = net.network_address + rng.randrange(1, size)
            if _usable(net, addr) and str(addr) not in used:
                return str(addr)
        # A nearly full prefix: fall back to a scan so allocation still succeeds.
    start = int(net.network_address)
    for offset in range(1, min(size, len(used) + len(RESERVED) * 512 + 2)):
        addr = ipaddress.ip_address(start + offset)
        if _usable(net, addr) and str(addr) not in used:
            return str(addr)
    raise PrefixExhausted(f"no free address left in {net}")
