"""The policy editor's preview: who could reach each node under a draft policy.

The draft is compiled against the stored users and nodes exactly as `policy check`
does (its `tests` run too); each node's packet filter -- the rules the node itself
would enforce -- is then read back as "these nodes may open connections to it, on
these ports". Nothing is stored.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from ..store import Store

Net = ipaddress.IPv4Network | ipaddress.IPv6Network


def _sources(src_ips: list[str]) -> list[Net] | None:
    """The networks of a rule's SrcIPs; None means everyone ("*")."""
    out: list[Net] = []
    for s in src_ips:
        if s == "*":
            return None
        try:
            if "-" in s:
                lo, hi = (ipaddress.ip_address(x) for x in s.split("-", 1))
                out += ipaddress.summarize_address_range(lo, hi)
            else:
                out.append(ipaddress.ip_network(s, strict=False))
        except (ValueError, TypeError):
            continue
    return out


def _ports(dst_ports: list[dict[str, Any]]) -> set[str]:
    out = set()
    for d in dst_ports:
        p = d.get("Ports") or {}
        first, last = p.get("First", 0), p.get("Last", 65535)
        out.add(
            "any"
            if (first, last) == (0, 65535)
            else str(first)
            if first == last
            else f"{first}-{last}"
        )
    return out


def reachability(text: str, store: Store) -> list[dict[str, Any]]:
    """For every node: the nodes that may connect to it under `text`, and on which ports.
    Raises PolicyInvalid (with the line) like `policy check`."""
    from ..policies import compile_policy_text
    from ..quarantine import node_row_problems

    compiled = compile_policy_text(text, "policy", store)  # as `policy check`: same nodes
    rows = [n for n in store.nodes() if not node_row_problems(n)]
    addrs = {n.id: [ipaddress.ip_address(a) for a in (n.ipv4, n.ipv6) if a] for n in rows}
    out = []
    for n in rows:
        allowed: dict[int, set[str]] = {}
        for rule in compiled.filter_for(n.id):
            dst_ports = rule.get("DstPorts")
            if not dst_ports:
                continue  # a capability grant, not a connection
            nets = _sources(list(rule.get("SrcIPs") or []))
            ports = _ports(list(dst_ports))
            for other in rows:
                if other.id == n.id:
                    continue
                if nets is None or any(a in net for a in addrs[other.id] for net in nets):
                    allowed.setdefault(other.id, set()).update(ports)
        names = {o.id: o.given_name for o in rows}
        out.append(
            {
                "node": n.given_name,
                "id": str(n.id),
                "from": [
                    {"node": names[i], "ports": sorted(p)}
                    for i, p in sorted(allowed.items(), key=lambda kv: names[kv[0]])
                ],
            }
        )
    return out
