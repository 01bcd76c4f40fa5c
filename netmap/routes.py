"""Subnet routes: which a node serves, and which router is primary for each (pure).

A node serves a route it advertises (`Hostinfo.RoutableIPs`) and that is approved
(by an admin, or by the policy's autoApprovers). Exit routes are offered by every
exit node alike; every other served route gets one primary router, as headscale
elects it (hscontrol/routes/primary.go): the primary keeps it while it is up, so
that when it goes (offline, or silent to HA probes) the next one takes over.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

# The exit routes; a client takes a peer as an exit node only when it routes both.
EXIT_ROUTES = ("0.0.0.0/0", "::/0")


def served_routes(advertised: Iterable[str], approved: Iterable[str]) -> list[str]:
    """The advertised routes that are approved, in advertised order: the one rule. One
    approved exit route approves both (as headscale: rows approved before, imported)."""
    ok = set(approved)
    if ok & set(EXIT_ROUTES):
        ok |= set(EXIT_ROUTES)
    return [r for r in advertised if r in ok]


def subnet_routers(served: Mapping[int, Iterable[str]]) -> dict[str, list[int]]:
    """Subnet route -> the routers serving it, lowest node ID first (exit routes aside:
    every exit node offers them, there is nothing to elect)."""
    out: dict[str, list[int]] = {}
    for nid in sorted(served):
        for r in served[nid]:
            if r not in EXIT_ROUTES:
                out.setdefault(r, []).append(nid)
    return out


def elect_primaries(
    served: Mapping[int, Iterable[str]], *, up: set[int], current: Mapping[str, int]
) -> dict[str, int]:
    """Subnet route -> primary router, as headscale's electPrimaryRoutes: the current
    primary while it is up (online, answering probes: no flapping back), else the
    lowest-ID router that is up; with none up, the current one or the lowest ID."""
    elected: dict[str, int] = {}
    for r, ids in subnet_routers(served).items():
        cur = current.get(r)
        if cur in ids and cur in up:
            elected[r] = cur
            continue
        first_up = next((n for n in ids if n in up), None)
        elected[r] = first_up if first_up is not None else (cur if cur in ids else ids[0])
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
