"""The DNSConfig every node receives, from the `dns.*` settings (as headscale builds it)."""

from __future__ import annotations

import ipaddress
from typing import Any


def _resolver(addr: str) -> dict[str, Any]:
    return {"Addr": addr}


def reverse_zones(prefix: str) -> list[str]:
    """The in-addr.arpa / ip6.arpa zones covering `prefix`, so MagicDNS answers PTR queries."""
    net = ipaddress.ip_network(prefix)
    if net.version == 4:
        # Whole-octet zones covering the prefix (100.64.0.0/10 -> 64..127.100.in-addr.arpa.).
        octets = net.prefixlen // 8
        sub = net.subnets(new_prefix=max(octets * 8 + (8 if net.prefixlen % 8 else 0), 8))
        zones = []
        for s in sub:
            parts = str(s.network_address).split(".")[: (s.prefixlen // 8)]
            zones.append(".".join(reversed(parts)) + ".in-addr.arpa.")
        return zones
    nibbles = net.prefixlen // 4
    hexstr = net.network_address.exploded.replace(":", "")[:nibbles]
    return [".".join(reversed(hexstr)) + ".ip6.arpa."]


def dns_config(
    *,
    magic_dns: bool,
    base_domain: str,
    override_local_dns: bool,
    nameservers: list[str],
    split: dict[str, list[str]],
    search_domains: list[str],
    extra_records: list[dict[str, str]],
    prefixes: list[str],
) -> dict[str, Any] | None:
    """The tailcfg.DNSConfig object; None when nothing is configured (headscale sends null)."""
    cfg: dict[str, Any] = {}
    resolvers = [_resolver(ns) for ns in nameservers]
    if resolvers:
        # With override_local_dns the node uses these for everything; without, only
        # as fallbacks when its own OS resolvers are unusable.
        cfg["Resolvers" if override_local_dns else "FallbackResolvers"] = resolvers
    routes: dict[str, list[dict[str, Any]] | None] = {}
    for domain, servers in split.items():
        routes[domain.rstrip(".") + "."] = [_resolver(s) for s in servers]
    domains = list(search_domains)
    if magic_dns and base_domain:
        routes[base_domain + "."] = None  # answered by 100.100.100.100 from the netmap
        for p in prefixes:
            for zone in reverse_zones(p):
                routes[zone] = None
        domains = [base_domain, *[d for d in domains if d != base_domain]]
        cfg["Proxied"] = True
    if routes:
        cfg["Routes"] = routes
    if domains:
        cfg["Domains"] = domains
    if extra_records:
        cfg["ExtraRecords"] = [
            {"Name": r["name"], "Type": r["type"], "Value": r["value"]} for r in extra_records
        ]
    return cfg or None
