"""Subnet routes: which a node serves, and which router is primary for each (pure).

A node serves a route it advertises (`Hostinfo.RoutableIPs`) and that is approved
(by an admin, or by the policy's autoApprovers). Exit routes are offered by every
exit node alike; every other served route gets one primary router, as headscale
elects it (hscontrol/routes/primary.go): an online router first, then the lowest
node ID, so that when the primary goes offline the next one takes over.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

EXIT_ROUTES = ("0.0.0.0/0", "::/0")


def served_routes(advertised: Iterable[str], approved: Iterable[str]) -> list[str]:
    """The approved routes the node also advertises, in approval order: the one rule."""
    offered = set(advertised)
    out: list[str] = []
    for r in approved:
        if r in offered and r not in out:
            out.append(r)
    return out


def elect_primaries(served: Mapping[int, Iterable[str]], online: set[int]) -> dict[str, int]:
    """Subnet route -> primary router: online routers first, then the lowest node ID."""
    elected: dict[str, int] = {}
    for nid in sorted(served):
        for r in served[nid]:
            if r in EXIT_ROUTES:
                continue  # every exit node offers them; no election
            cur = elected.get(r)
            if cur is None or (nid in online and cur not in online):
                elected[r] = nid
    return elected


def routers_moved(before: Mapping[str, int], after: Mapping[str, int]) -> set[int]:
    """The routers whose primary routes differ between two elections (to re-encode)."""
    return {
        nid
        for r in before.keys() | after.keys()
        if before.get(r) != after.get(r)
        for nid in (before.get(r), after.get(r))
        if nid is not None
    }
