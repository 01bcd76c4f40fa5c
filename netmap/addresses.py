"""Address allocation from `prefixes.v4` / `prefixes.v6`, skipping what Tailscale reserves.

Sequential allocation continues after the address handed out last (headscale's IP
allocator keeps the same cursor), so a join checks about one candidate instead of
rescanning every used address from the start of the prefix.
"""

from __future__ import annotations

import ipaddress
import itertools
import random
from collections.abc import Collection, Iterator

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


def _unusable_spans(net: IPNet) -> list[tuple[int, int]]:
    """The inclusive integer ranges in `net` that are never handed out: sorted, merged."""
    first, last = int(net.network_address), int(net.broadcast_address)
    spans = [(first, first)]
    if net.version == 4:
        spans.append((last, last))
    for r in RESERVED:
        if r.version == net.version and r.overlaps(net):
            lo, hi = int(r.network_address), int(r.broadcast_address)
            spans.append((max(lo, first), min(hi, last)))
    merged: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
        else:
            merged.append((a, b))
    return merged


def _usable_run(lo: int, hi: int, spans: list[tuple[int, int]]) -> Iterator[int]:
    """The integers lo..hi outside `spans`; a reserved range is jumped over, not walked."""
    n = lo
    while n <= hi:
        for a, b in spans:
            if a <= n <= b:
                n = b + 1
                break
        else:
            yield n
            n += 1


def _sequential(net: IPNet, used: Collection[str], after: str | None) -> str:
    """The first free address after the cursor; bounded by len(used), not the prefix."""
    first, last = int(net.network_address), int(net.broadcast_address)
    start = first
    if after is not None:
        prev = ipaddress.ip_address(after)
        if prev.version == net.version and prev in net and int(prev) < last:
            start = int(prev) + 1
    spans = _unusable_spans(net)
    address = type(net.network_address)
    # From the cursor to the end of the prefix, then once around from its start.
    order = itertools.chain(_usable_run(start, last, spans), _usable_run(first, start - 1, spans))
    # Each used address blocks at most one candidate: past len(used) + 1 the prefix is full.
    for n in itertools.islice(order, len(used) + 1):
        text = str(address(n))
        if text not in used:
            return text
    usable = last - first + 1 - sum(b - a + 1 for a, b in spans)
    raise PrefixExhausted(
        f"no free address left in {net}: all {usable} usable addresses are taken "
        f"(widen prefixes.v{net.version} or delete nodes)"
    )


def allocate(
    net: IPNet,
    used: Collection[str],
    strategy: str = "sequential",
    rng: random.Random | None = None,
    after: str | None = None,
) -> str:
    """A free address in `net` (as a string) not in `used`.

    Sequential: the first free one after `after` (the address this prefix handed out
    last; the caller keeps it), wrapping around to the start of the prefix once, so a
    freed address is reused only after the wrap. Random: a random free one.
    """
    if strategy == "random":
        rng = rng or random.SystemRandom()
        for _ in range(RANDOM_TRIES):
            addr = net.network_address + rng.randrange(1, net.num_addresses)
            if _usable(net, addr) and str(addr) not in used:
                return str(addr)
        # A nearly full prefix: fall back to a scan so allocation still succeeds.
    return _sequential(net, used, after)
