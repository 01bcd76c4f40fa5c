"""Golden oracle: what Tailscale's own service sent each node, per policy.

Every scenario under ``<repo>/../shared/golden/tailscale-saas/`` (captured by
headscale's tscap from Tailscale SaaS; see its README) is rebuilt here: the
users and nodes from ``topology``, the policy from ``input.full_policy``. For
each captured node homescale must produce

(a) the same peers (by hostname) as ``netmap.Peers``;
(b) the same filter rules, compared by address sets, ports and protocols
    (not IDs, order, or how addresses are split into strings);
(c) for SSH scenarios, the same SSH rules (in order; principals as a multiset).

Policies Tailscale refused (``api_response_code`` != 200) must raise
PolicyError. A compact copy of a few scenarios lives in
``tests/fixtures/policy/`` so a clone without ``shared/`` still runs the
comparison.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import pytest

from netmap.policy import (
    PolicyError,
    PolicyNode,
    PolicyUser,
    compile_policy,
    parse_hujson,
    parse_policy,
)
from netmap.policy.ipset import IPSet
from netmap.policy.policytests import check_policy_tests
from tests import tiers

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "golden" / "tailscale-saas"
FIXTURES = REPO / "tests" / "fixtures" / "policy" / "golden"

# Scenarios homescale deliberately does not reproduce, with the reason
# ("acl-xNN": "why"). Empty: every captured scenario matches. Two harness
# choices make that so, both mirroring what the server does:
# - localpart_domains is the capture's tailnet domain (Tailscale refuses
#   localpart:*@<domain> for a domain that is not the tailnet's: ssh-d1, ssh-e2);
# - advertised routes the policy's autoApprovers cover are approved before
#   compiling (Tailscale did; the topology lists only hand-approved routes).
# The other capture families (grants with app/via, nodeAttrs, routes, policy
# tests, sshTests) are compared in test_policy_captures.py.
UNSUPPORTED: dict[str, str] = {}


def _plain(value: Any) -> Any:
    """LocDict/LocList -> dict/list (for JSON re-serialisation)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def scenario_files(root: Path) -> list[Path]:
    return sorted(root.glob("*/*.hujson")) if root.is_dir() else []


@functools.cache
def load_scenario(path: Path) -> dict[str, Any]:
    return _plain(parse_hujson(path.read_text(), str(path)))


def build_tailnet(topology: dict[str, Any]) -> tuple[list[PolicyUser], list[PolicyNode]]:
    users = [PolicyUser(u["id"], u["name"], u.get("email", "")) for u in topology["users"]]
    nodes = [
        PolicyNode(
            id=i,
            hostname=spec["hostname"],
            user=spec.get("user"),
            tags=tuple(spec.get("tags") or ()),
            ipv4=spec.get("ipv4"),
            ipv6=spec.get("ipv6"),
            routable_ips=tuple(spec.get("routable_ips") or ()),
            approved_routes=tuple(spec.get("approved_routes") or ()),
        )
        for i, (_, spec) in enumerate(sorted(topology["nodes"].items()), start=1)
    ]
    return users, nodes


_DEFAULT_PROTOS = frozenset({6, 17, 1, 58})


# (source set, destination set, first port, last port, protocols) per DstPorts entry;
# (source set, destination set, the CapMap as canonical JSON) per CapGrant.
FilterEntry = tuple[IPSet, IPSet, int, int, frozenset[int]] | tuple[IPSet, IPSet, str]


def normalise_filter(rules: list[dict[str, Any]] | None) -> set[FilterEntry]:
    """(source set, destination set, first, last, protocols) per DstPorts entry."""
    out: set[FilterEntry] = set()
    for rule in rules or []:
        src = IPSet.of(rule["SrcIPs"])
        protos = frozenset(rule.get("IPProto") or ()) or _DEFAULT_PROTOS
        for dst in rule.get("DstPorts") or []:
            ports = dst["Ports"]
            out.add((src, IPSet.of([dst["IP"]]), ports["First"], ports["Last"], protos))
        for grant in rule.get("CapGrant") or []:
            out.add((src, IPSet.of(grant["Dsts"]), json.dumps(grant["CapMap"], sort_keys=True)))
    return out


def normalise_ssh(rules: list[dict[str, Any]] | None) -> list[tuple]:
    return [
        (
            tuple(sorted(json.dumps(p, sort_keys=True) for p in r.get("principals") or [])),
            json.dumps(r.get("sshUsers"), sort_keys=True),
            json.dumps(r.get("action"), sort_keys=True),
            tuple(r.get("acceptEnv") or ()),
        )
        for r in rules or []
    ]


def _describe(items: set[FilterEntry]) -> list[str]:
    def show(x: Any) -> Any:
        return x.strings() if isinstance(x, IPSet) else sorted(x) if isinstance(x, frozenset) else x

    return sorted(str(tuple(show(x) for x in item)) for item in items)


# CapMap entries Tailscale's service adds from tailnet state or features
# homescale does not model (roles, tailnet lock, display name, app
# connectors, internal tuning knobs; file-sharing, ssh and auto-update are
# server defaults, not policy). Stripped on both sides: the comparison is
# about what the policy puts in a CapMap.
AMBIENT_CAPS = frozenset(
    {
        "default-auto-update",
        "https://tailscale.com/cap/file-sharing",
        "https://tailscale.com/cap/is-admin",
        "https://tailscale.com/cap/is-owner",
        "https://tailscale.com/cap/ssh",
        "https://tailscale.com/cap/tailnet-lock",
        "https://tailscale.com/cap/warn-funnel-no-https",
        "probe-udp-lifetime",
        "ssh-behavior-v1",
        "ssh-env-vars",
        "store-appc-routes",
        "tailnet-display-name",
        "service-host",
        "max-key-duration",
        "native-ipv4",
    }
)


def policy_caps(cap_map: dict[str, Any] | None) -> dict[str, Any]:
    return {
        k: v
        for k, v in (cap_map or {}).items()
        if k not in AMBIENT_CAPS and not k.startswith("https://tailscale.com/cap/funnel-ports?")
    }


# Refusals whose message cannot be Tailscale's, with the reason; every other
# refusal must contain Tailscale's message word for word.
MESSAGE_DIFFERENCES = {
    "nodeattrs-error-e3-autogroup-self": "Tailscale answered 'internal server error'",
    "ssh-e1": "the capture's anonymiser rewrote the domain in Tailscale's message to PASSKEY",
}


def _refusal(data: dict[str, Any], exc: PolicyError) -> list[str]:
    """Tailscale refused too; its message must be in ours."""
    want = (data["input"].get("api_response_body") or {}).get("message", "")
    if want and want not in str(exc) and data.get("test_id") not in MESSAGE_DIFFERENCES:
        return [f"refused with {str(exc)!r}, Tailscale said {want!r}"]
    return []


@functools.cache
def check_scenario(path: Path) -> list[str]:
    """Mismatches between homescale and the capture; empty when they agree."""
    data = load_scenario(path)
    policy_text = data["input"]["full_policy"]
    if not isinstance(policy_text, str):
        policy_text = json.dumps(policy_text)
    tailnet = data.get("tailnet", "")
    domains = {tailnet.rpartition("@")[2]} if "@" in tailnet else None
    rejected = data["input"]["api_response_code"] != 200
    users, nodes = build_tailnet(data["topology"])
    try:
        policy = parse_policy(policy_text, path.name, localpart_domains=domains)
        # Tailscale runs the policy's tests and sshTests as part of accepting it.
        first = compile_policy(policy, users, nodes)
        check_policy_tests(policy, first)
    except PolicyError as exc:
        return _refusal(data, exc) if rejected else [f"refused a policy Tailscale accepted: {exc}"]
    if rejected:
        return ["accepted a policy Tailscale refused"]
    # Tailscale approves advertised routes the policy's autoApprovers cover
    # (the topology lists only the routes approved by hand), as homescale's
    # server does with can_auto_approve before compiling.
    nodes = [
        dataclasses.replace(
            n,
            approved_routes=tuple(
                dict.fromkeys(
                    [
                        *n.approved_routes,
                        *(r for r in n.routable_ips if first.can_auto_approve(n.id, r)),
                    ]
                )
            ),
        )
        for n in nodes
    ]
    compiled = compile_policy(policy, users, nodes, server_url="https://unused")
    by_name = {n.hostname: n for n in nodes}
    problems = []
    for name, capture in sorted(data["captures"].items()):
        node = by_name[name]
        peers = capture["netmap"].get("Peers") or []
        want_peers = sorted(p["Name"].split(".")[0] for p in peers)
        got_peers = sorted(
            by_name_id.hostname
            for by_name_id in nodes
            if by_name_id.id in compiled.visible_peers(node.id)
        )
        if want_peers != got_peers:
            problems.append(f"{name}: peers {got_peers} != {want_peers}")
        want = normalise_filter(capture.get("packet_filter_rules"))
        got = normalise_filter(compiled.filter_for(node.id))
        if want != got:
            problems.append(
                f"{name}: filter extra {_describe(got - want)} missing {_describe(want - got)}"
            )
        if data.get("category") == "ssh" or "ssh_rules" in capture:
            want_ssh = normalise_ssh(capture.get("ssh_rules"))
            got_ssh = normalise_ssh(compiled.ssh_for(node.id))
            if want_ssh != got_ssh:
                problems.append(f"{name}: ssh {got_ssh} != {want_ssh}")
        for route, routers in compiled.via_routes(node.id).items():
            # A via grant: the steered router carries the route in this viewer's map.
            owners = [
                p["Name"].split(".")[0]
                for p in peers
                if str(route) in (p.get("AllowedIPs") or p.get("PrimaryRoutes") or [])
            ]
            want_owner = nodes[routers[0] - 1].hostname
            if owners != [want_owner]:
                problems.append(
                    f"{name}: {route} served by {owners}, homescale steers to {want_owner}"
                )
        self_node = capture["netmap"].get("SelfNode") or {}
        if "CapMap" in self_node:
            want_caps = policy_caps(self_node["CapMap"])
            got_caps = policy_caps(compiled.cap_map(node.id))
            if want_caps != got_caps:
                problems.append(f"{name}: CapMap {got_caps} != {want_caps}")
        for peer in peers:
            peer_name = peer["Name"].split(".")[0]
            want_caps = policy_caps(peer.get("CapMap"))
            got_caps = policy_caps(compiled.peer_cap_map(by_name[peer_name].id))
            if want_caps != got_caps:
                problems.append(f"{name}: peer {peer_name} CapMap {got_caps} != {want_caps}")
    return problems


def _ids(paths: list[Path]) -> list[str]:
    return [p.stem for p in paths]


SHARED_SCENARIOS = scenario_files(SHARED)
FIXTURE_SCENARIOS = scenario_files(FIXTURES)


@tiers.mark(
    "shared", bool(SHARED_SCENARIOS), f"{SHARED} (CI only) is not present next to this clone"
)
def test_golden_summary(capsys: pytest.CaptureFixture[str]) -> None:
    """Print N/M and require every supported scenario to match."""
    results = {p.stem: check_scenario(p) for p in SHARED_SCENARIOS}
    matched = sum(1 for problems in results.values() if not problems)
    with capsys.disabled():
        print(f"\ngolden policy: {matched}/{len(results)} scenarios match")
    failing = {k: v for k, v in results.items() if v and k not in UNSUPPORTED}
    assert not failing, "\n".join(f"{k}: {v[0]}" for k, v in sorted(failing.items()))


@tiers.mark(
    "shared", bool(SHARED_SCENARIOS), f"{SHARED} (CI only) is not present next to this clone"
)
@pytest.mark.parametrize("path", SHARED_SCENARIOS, ids=_ids(SHARED_SCENARIOS))
def test_golden_scenario(path: Path) -> None:
    if path.stem in UNSUPPORTED:
        pytest.skip(f"deliberately unsupported: {UNSUPPORTED[path.stem]}")
    problems = check_scenario(path)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", FIXTURE_SCENARIOS, ids=_ids(FIXTURE_SCENARIOS))
def test_golden_fixture(path: Path) -> None:
    """The compact fixture copy: runs even without ../shared."""
    problems = check_scenario(path)
    assert not problems, "\n".join(problems)


def test_fixture_present() -> None:
    """The compact fixture must exist, or a clone would compare nothing."""
    assert len(FIXTURE_SCENARIOS) >= 5
