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


def test_sequential_continues_after_the_last_address_handed_out() -> None:
    """headscale's cursor: a freed address below the cursor waits for the wrap."""
    used = {"100.64.0.1", "100.64.0.3", "100.64.0.4"}  # .2 was freed
    assert allocate(V4, used, after="100.64.0.4") == "100.64.0.5"
    assert allocate(V4, used, after="100.64.0.1") == "100.64.0.2"  # .2 is after the cursor
    assert allocate(V6, {"fd7a:115c:a1e0::1"}, after="fd7a:115c:a1e0::9") == "fd7a:115c:a1e0::a"


def test_sequential_wraps_to_the_start_once() -> None:
    net = ipaddress.IPv4Network("100.64.0.0/29")  # usable: .1 to .6
    used = {"100.64.0.1", "100.64.0.3", "100.64.0.4", "100.64.0.5", "100.64.0.6"}
    assert allocate(net, used, after="100.64.0.6") == "100.64.0.2"
    assert allocate(net, used, after="100.64.0.5") == "100.64.0.2"


def test_a_cursor_outside_the_prefix_starts_at_its_start() -> None:
    # prefixes.v4 changed since, or the cursor is the other family's.
    assert allocate(V4, set(), after="10.0.0.9") == "100.64.0.1"
    assert allocate(V4, set(), after="fd7a:115c:a1e0::9") == "100.64.0.1"


def test_the_cursor_jumps_over_reserved_addresses() -> None:
    assert allocate(V4, set(), after="100.100.100.99") == "100.100.100.101"
    assert allocate(V4, set(), after="100.115.91.255") == "100.115.94.0"
    assert allocate(V6, set(), after="fd7a:115c:a1e0::52") == "fd7a:115c:a1e0::54"


def test_a_full_small_prefix_is_exhausted_from_any_cursor() -> None:
    net = ipaddress.IPv4Network("100.64.0.0/30")  # usable: .1 and .2
    used = {"100.64.0.1", "100.64.0.2"}
    for after in (None, "100.64.0.1", "100.64.0.2", "100.64.0.3"):
        with pytest.raises(PrefixExhausted, match=r"100\.64\.0\.0/30: all 2 usable addresses"):
            allocate(net, used, after=after)
    assert allocate(net, used - {"100.64.0.1"}, after="100.64.0.2") == "100.64.0.1"


def test_a_prefix_inside_a_reserved_range_has_nothing_to_give() -> None:
    net = ipaddress.IPv4Network("100.115.92.0/24")  # ChromeOS's
    with pytest.raises(PrefixExhausted, match="all 0 usable addresses"):
        allocate(net, set())


def test_random_mode_ignores_the_cursor_and_stays_unique() -> None:
    rng = random.Random(7)
    net = ipaddress.IPv4Network("100.64.0.0/28")
    seen: set[str] = set()
    last: str | None = None
    for _ in range(14):
        last = allocate(net, seen, strategy="random", rng=rng, after=last)
        seen.add(last)
    assert len(seen) == 14
    with pytest.raises(PrefixExhausted):
        allocate(net, seen, strategy="random", rng=rng, after=last)
