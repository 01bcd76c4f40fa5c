"""The DNSConfig every node receives, built from the dns.* settings."""

from __future__ import annotations

from typing import Any

from netmap.dns import dns_config, reverse_zones
from protocol import tailcfg

PREFIXES = ["100.64.0.0/10", "fd7a:115c:a1e0::/48"]


def cfg(**kw: Any) -> dict[str, Any] | None:
    args: dict[str, Any] = {
        "magic_dns": True,
        "base_domain": "tail.example",
        "override_local_dns": True,
        "nameservers": [],
        "split": {},
        "search_domains": [],
        "extra_records": [],
        "prefixes": PREFIXES,
    }
    args.update(kw)
    out = dns_config(**args)
    if out is not None:
        tailcfg.DNSConfig.from_json(out)  # Go-compatible names and types
    return out


def test_reverse_zones_of_the_cgnat_range() -> None:
    zones = reverse_zones("100.64.0.0/10")
    assert len(zones) == 64
    assert zones[0] == "64.100.in-addr.arpa."
    assert zones[-1] == "127.100.in-addr.arpa."
    assert len(set(zones)) == 64


def test_reverse_zones_of_other_prefixes() -> None:
    assert reverse_zones("10.0.0.0/8") == ["10.in-addr.arpa."]
    assert reverse_zones("192.168.1.0/24") == ["1.168.192.in-addr.arpa."]
    assert reverse_zones("fd7a:115c:a1e0::/48") == ["0.e.1.a.c.5.1.1.a.7.d.f.ip6.arpa."]


def test_magic_dns_is_proxied_with_base_domain_and_reverse_zones() -> None:
    out = cfg(nameservers=["1.1.1.1"], search_domains=["corp.example"])
    assert out is not None
    assert out["Proxied"] is True
    routes = out["Routes"]
    assert "tail.example." in routes
    v4_zones = [z for z in routes if z.endswith(".in-addr.arpa.")]
    assert len(v4_zones) == 64
    assert "0.e.1.a.c.5.1.1.a.7.d.f.ip6.arpa." in routes
    # Answered by 100.100.100.100: no upstream resolvers for these routes.
    assert not routes["tail.example."]
    assert out["Domains"] == ["tail.example", "corp.example"]
    assert out["Resolvers"] == [{"Addr": "1.1.1.1"}]
    assert "FallbackResolvers" not in out


def test_base_domain_not_repeated_in_search_domains() -> None:
    out = cfg(search_domains=["tail.example", "corp.example"])
    assert out is not None
    assert out["Domains"] == ["tail.example", "corp.example"]


def test_without_override_local_dns_resolvers_are_fallbacks() -> None:
    out = cfg(override_local_dns=False, nameservers=["9.9.9.9", "https://dns.example/dns-query"])
    assert out is not None
    assert out["FallbackResolvers"] == [
        {"Addr": "9.9.9.9"},
        {"Addr": "https://dns.example/dns-query"},
    ]
    assert "Resolvers" not in out


def test_split_dns_routes() -> None:
    out = cfg(magic_dns=False, split={"corp.example": ["10.0.0.53"], "lab.example.": ["10.1.0.53"]})
    assert out is not None
    assert out["Routes"] == {
        "corp.example.": [{"Addr": "10.0.0.53"}],
        "lab.example.": [{"Addr": "10.1.0.53"}],
    }
    assert "Proxied" not in out


def test_extra_records() -> None:
    out = cfg(extra_records=[{"name": "grafana.tail.example", "type": "A", "value": "100.64.0.9"}])
    assert out is not None
    assert out["ExtraRecords"] == [
        {"Name": "grafana.tail.example", "Type": "A", "Value": "100.64.0.9"}
    ]


def test_nothing_configured_is_null() -> None:
    assert cfg(magic_dns=False) is None
