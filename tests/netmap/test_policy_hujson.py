"""Property tests: HuJSON reads all JSON, and IP sets render faithfully."""

from __future__ import annotations

import ipaddress
import json

from hypothesis import given
from hypothesis import strategies as st

from netmap.policy import parse_hujson
from netmap.policy.ipset import IPSet

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(json_values, st.booleans())
def test_plain_json_round_trips(value: object, indent: bool) -> None:
    text = json.dumps(value, indent=2 if indent else None, ensure_ascii=False)
    assert parse_hujson(text) == value


@given(json_values)
def test_comments_and_trailing_commas_change_nothing(value: object) -> None:
    text = json.dumps(value, indent=1)
    # A comment before every line and a trailing comma before every closer.
    noisy = "\n".join(f"/* c */ {line} // trailing" for line in text.split("\n"))
    noisy = (
        noisy.replace("\n]", ",\n]").replace("\n}", ",\n}")
        if isinstance(value, list | dict) and value
        else noisy
    )
    assert parse_hujson(noisy) == value


addresses = st.one_of(
    st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address),
    st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address),
)
networks = st.builds(
    lambda a, bits: ipaddress.ip_network(f"{a}/{min(bits, a.max_prefixlen)}", strict=False),
    addresses,
    st.integers(0, 128),
)


@given(st.lists(networks | addresses, max_size=6))
def test_strings_and_prefixes_describe_the_same_set(items: list) -> None:
    s = IPSet.of(items)
    assert IPSet.of(s.strings()) == s
    assert IPSet.of(s.prefixes()) == s
    for item in items:
        net = item if hasattr(item, "prefixlen") else ipaddress.ip_network(item)
        assert s.covers(net)
        assert s.overlaps(net)


@given(st.lists(networks, max_size=4), st.lists(networks, max_size=4), addresses)
def test_difference_and_union(
    a_items: list, b_items: list, probe: ipaddress.IPv4Address | ipaddress.IPv6Address
) -> None:
    a, b = IPSet.of(a_items), IPSet.of(b_items)
    assert (a - b).contains(probe) == (a.contains(probe) and not b.contains(probe))
    assert (a | b).contains(probe) == (a.contains(probe) or b.contains(probe))
    assert (a - b).issubset(a)
