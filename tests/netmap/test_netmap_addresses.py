"""Address allocation from the tailnet prefixes."""

from __future__ import annotations

import ipaddress
import random

import pytest

from netmap.addresses import PrefixExhausted, allocate

V4 = ipaddress.IPv4Network("100.64.0.0/10")
V6 = ipaddress.IPv6Network("fd7a:115c:a1e0::/48")


def fill(net: ipaddress.IPv4Network | ipaddress.IPv6Network, n: int, **kw: object) -> list[str]:
    used: list[str] = []
    seen: set[str] = set()
    for _ in range(n):
        addr = allocate(net, seen, **kw)  # type: ignore[arg-type]
        used.append(addr)
        seen.add(addr)
    return used


def test_sequential_starts_at_one_and_counts_up() -> None:
    assert fill(V4, 3) == ["100.64.0.1", "100.64.0.2", "100.64.0.3"]
    assert fill(V6, 2) == ["fd7a:115c:a1e0::1", "fd7a:115c:a1e0::2"]


def test_sequential_fills_gaps_first() -> None:
    assert allocate(V4, ["100.64.0.1", "100.64.0.3"]) == "100.64.0.2"


def test_sequential_skips_the_magicdns_address() -> None:
    net = ipaddress.IPv4Network("100.100.100.96/29")
    got = fill(net, 5)
    assert "100.100.100.100" not in got
    assert "100.100.100.96" not in got  # the network address
    assert "100.100.100.103" not in got  # the broadcast address
    assert got == [
        "100.100.100.97",
        "100.100.100.98",
        "100.100.100.99",
        "100.100.100.101",
        "100.100.100.102",
    ]


def test_sequential_skips_the_chromeos_range() -> None:
    net = ipaddress.IPv4Network("100.115.0.0/16")
    below = {
        str(a)
        for a in ipaddress.IPv4Network("100.115.0.0/17")
        if a < ipaddress.IPv4Address("100.115.92.0")
    }
    below.discard("100.115.0.0")
    assert allocate(net, below) == "100.115.94.0"  # 100.115.92.0/23 is ChromeOS's


def test_addresses_are_unique() -> None:
    got = fill(ipaddress.IPv4Network("100.64.0.0/23"), 500)
    assert len(set(got)) == 500


def test_exhausted_prefix_raises() -> None:
    net = ipaddress.IPv4Network("100.64.0.0/29")
    got = fill(net, 6)
    assert len(set(got)) == 6
    with pytest.raises(PrefixExhausted):
        allocate(net, got)
    with pytest.raises(PrefixExhausted):
        allocate(net, got, strategy="random", rng=random.Random(1))


def test_random_stays_inside_the_prefix_and_skips_reserved() -> None:
    rng = random.Random(42)
    net = ipaddress.IPv4Network("100.100.100.96/29")
    got = fill(net, 5, strategy="random", rng=rng)
    assert set(got) == {
        "100.100.100.97",
        "100.100.100.98",
        "100.100.100.99",
        "100.100.100.101",
        "100.100.100.102",
    }
    big = fill(V4, 200, strategy="random", rng=rng)
    assert len(set(big)) == 200
    for a in big:
        ip = ipaddress.ip_address(a)
        assert ip in V4
        assert ip not in ipaddress.ip_network("100.115.92.0/23")
        assert a != "100.100.100.100"
    v6 = fill(V6, 50, strategy="random", rng=rng)
    assert all(ipaddress.ip_address(a) in V6 for a in v6)


def test_used_addresses_from_elsewhere_do_not_confuse_the_scan() -> None:
    # `used` may hold the other family's addresses or another prefix's.
    used = [f"fd7a:115c:a1e0::{i:x}" for i in range(1, 600)] + ["100.64.0.1"]
    assert allocate(V4, used) == "100.64.0.2"
