"""Stored node rows that cannot be served, what is wrong with them, and how to repair them.

A row written before homescale checked its inputs (or edited by hand) can hold a
value no peer can decode or the policy cannot place: a route that is no prefix,
an address that is none, an endpoint with port 70000. One such row must not stop
the server or cut everyone else off, so the tailnet quarantines it: it is not
shown to anyone and a warning names the node and the field; `homescale doctor`
lists such rows and `--fix` repairs what can be repaired. The checks are the
wire types' own rules (`protocol.netip`, `protocol.tailcfg`): one definition of a
valid value for what arrives and for what is stored.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from protocol import tailcfg
from protocol.gojson import WireError
from protocol.keys import DiscoPublic, MachinePublic, NodePublic
from protocol.netip import NetipError, parse_addr, parse_addr_port, parse_prefix

from .admin import validate_tags
from .config import Config
from .errors import InvalidInput
from .store import NodeRow, Store

# What no repair can fix in place: the node must register again.
UNREPAIRABLE = ("node_key", "machine_key", "disco_key")
REPAIRABLE = {
    "endpoints",
    "approved_routes",
    "tags",
    "Hostinfo.RoutableIPs",
    "Hostinfo",
    "ipv4",
    "ipv6",
}


@dataclass(frozen=True)
class RowProblem:
    """One field of one stored node that cannot be served."""

    node_id: int
    node_name: str
    field: str  # as a user reads it: "Hostinfo.RoutableIPs[0]", "ipv4", "policy"
    value: str
    reason: str

    def __str__(self) -> str:
        return f"node {self.node_id} ({self.node_name}): {self.field} {self.value}: {self.reason}"


def node_row_problems(row: NodeRow) -> list[RowProblem]:
    """What in `row` a peer could not decode or the policy could not place (empty: fine)."""
    out: list[RowProblem] = []

    def bad(field: str, value: object, reason: str) -> None:
        out.append(RowProblem(row.id, row.given_name, field, repr(value)[:80], reason))

    for name, cls in (
        ("node_key", NodePublic),
        ("machine_key", MachinePublic),
        ("disco_key", DiscoPublic),
    ):
        text = getattr(row, name)
        if name == "disco_key" and not text:
            continue  # no disco key yet: the node is simply not shown to peers
        try:
            cls.parse(text)
        except (ValueError, TypeError) as e:
            bad(name, text, str(e))
    for name, version in (("ipv4", 4), ("ipv6", 6)):
        addr = getattr(row, name)
        if addr is None:
            continue
        try:
            if parse_addr(addr).version != version:
                bad(name, addr, f"not an IPv{version} address")
        except NetipError as e:
            bad(name, addr, str(e))
    for name in ("endpoints", "approved_routes", "tags"):
        value = getattr(row, name)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            bad(name, value, "expected a list of strings")
            return out  # the checks below read these lists
    if not isinstance(row.hostinfo, dict):
        bad("Hostinfo", row.hostinfo, "expected a JSON object")
        return out
    for i, ep in enumerate(row.endpoints):
        try:
            parse_addr_port(ep)
        except NetipError as e:
            bad(f"endpoints[{i}]", ep, str(e))
    for i, route in enumerate(row.approved_routes):
        try:
            parse_prefix(route)
        except NetipError as e:
            bad(f"approved_routes[{i}]", route, str(e))
    try:
        validate_tags(list(row.tags))
    except (InvalidInput, AttributeError, TypeError) as e:
        bad("tags", row.tags, str(e))
    routable = row.hostinfo.get("RoutableIPs") or []
    for i, route in enumerate(routable if isinstance(routable, list) else [routable]):
        try:
            parse_prefix(route)
        except NetipError as e:
            bad(f"Hostinfo.RoutableIPs[{i}]", route, str(e))
    try:
        _hostinfo(row.hostinfo)
    except (WireError, ValueError, TypeError) as e:
        bad("Hostinfo", "{...}", str(e))
    return out


def repair(row: NodeRow, problems: list[RowProblem]) -> tuple[dict[str, Any], list[str]]:
    """The store values that repair `row`, and what could not be repaired (a note each).

    Invalid list entries (routes, endpoints, tags) are dropped; a Hostinfo the wire
    type refuses is reset to its hostname (the client sends it again on its next map
    request); a bad address is cleared so that a fresh one is allocated (`fresh_address`).
    """
    values: dict[str, Any] = {}
    left: list[str] = []
    fields = {p.field.split("[")[0] for p in problems}
    if not fields <= REPAIRABLE | set(UNREPAIRABLE):
        left.append(f"node {row.id}: no automatic repair for {sorted(fields - REPAIRABLE)}")
    for key in UNREPAIRABLE:
        if key in fields:
            left.append(
                f"node {row.id}: {key} is unusable; delete the node "
                f"(homescale nodes delete -i {row.id}) and register it again"
            )
    if "endpoints" in fields:
        values["endpoints"] = [e for e in _list(row.endpoints) if _ok(parse_addr_port, e)]
    if "approved_routes" in fields:
        values["approved_routes"] = [r for r in _list(row.approved_routes) if _ok(parse_prefix, r)]
    if "tags" in fields:
        tags = [t for t in _list(row.tags) if _ok(lambda t: validate_tags([t]), t)]
        if not tags and row.user_id is None:
            left.append(f"node {row.id}: owned by its tags, and none is valid; delete the node")
        else:
            values["tags"] = tags
    if "Hostinfo.RoutableIPs" in fields and isinstance(row.hostinfo, dict):
        hostinfo = copy.deepcopy(row.hostinfo)
        routable = hostinfo.get("RoutableIPs")
        kept = [r for r in routable if _ok(parse_prefix, r)] if isinstance(routable, list) else []
        hostinfo["RoutableIPs"] = kept
        values["hostinfo"] = hostinfo
    if "Hostinfo" in fields:
        values["hostinfo"] = {"Hostname": row.hostname} if row.hostname else {}
    for key in ("ipv4", "ipv6"):
        if key in fields:
            values[key] = None  # the caller allocates a fresh one
    return values, left


def _hostinfo(value: dict[str, Any]) -> None:
    """The wire type's check of a stored Hostinfo, but for RoutableIPs (checked above with
    Go's ParsePrefix: host bits, which the wire type refuses from clients, harm no peer)."""
    tailcfg.Hostinfo.from_json({k: v for k, v in value.items() if k != "RoutableIPs"})


def _list(value: object) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _ok(check: Any, value: Any) -> bool:
    try:
        check(value)
    except (NetipError, WireError, InvalidInput, ValueError, TypeError):
        return False
    return True


@dataclass
class DoctorReport:
    """What `homescale doctor` found (and, with --fix, what it repaired or could not)."""

    problems: list[RowProblem]
    repaired: list[int]  # node IDs
    left: list[str]  # what needs a person


def doctor(store: Store, config: Config, *, fix: bool) -> DoctorReport:
    """(store thread or CLI) Every stored node the server would quarantine, and the repair."""
    from netmap.addresses import PrefixExhausted

    report = DoctorReport([], [], [])
    rows = store.nodes()
    found = {n.id: node_row_problems(n) for n in rows}
    report.problems = [p for ps in found.values() for p in ps]
    if not fix:
        return report
    for row in rows:
        problems = found[row.id]
        if not problems:
            continue
        values, left = repair(row, problems)
        report.left.extend(left)
        if left and not values:
            continue
        with store.transaction():
            for key, prefix in (("ipv4", config.prefix_v4), ("ipv6", config.prefix_v6)):
                if key in values and prefix is not None:
                    try:
                        values[key] = store.fresh_address(prefix, config.ip_allocation)
                    except PrefixExhausted as e:
                        report.left.append(f"node {row.id}: no free {key} address: {e}")
                        values.pop(key)
            store.update_node(row.id, **values)
        report.repaired.append(row.id)
    return report
