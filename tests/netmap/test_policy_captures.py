"""Tailscale's own answers for grants, nodeAttrs, routes, SSH and policy tests.

headscale's capture tool recorded what Tailscale's service sent every node
for many more policies than ``../shared/golden`` holds: six families under
``hscontrol/policy/v2/testdata/`` at headscale commit f20f1f1. Each scenario
goes through the same comparison as test_policy_golden.py (peers, filter
rules incl. CapGrant, SSH rules, the node's own and its peers' policy
CapMap entries, and acceptance -- with Tailscale's message for policy
tests).

Point ``HEADSCALE_TESTDATA`` at that directory of a headscale checkout to
compare all of them (skipped with the reason otherwise); a compact copy of
a few per family lives in ``tests/fixtures/policy_headscale`` (see its
README for source and licence), so a plain clone still compares something.

Every scenario matches except those in KNOWN_DIFFERENCES, each with the
reason; a listed scenario that starts matching fails the summary, so the
list stays true.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.netmap.test_policy_golden import check_scenario, load_scenario

FAMILIES = (
    "grant_results",
    "nodeattrs_results",
    "routes_results",
    "ssh_results",
    "policytest_results",
    "sshtest_results",
)
TESTDATA = Path(os.environ.get("HEADSCALE_TESTDATA") or "/nonexistent")
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "policy_headscale"

_FUNNEL = "homescale refuses the funnel attribute: Funnel (public ingress) is not implemented"
_IPPOOL = "homescale refuses ipPool: per-group address pools are not implemented"
_ROLES = "homescale has no admin/owner roles, so autogroup:admin/owner are refused"
KNOWN_DIFFERENCES: dict[str, str] = {
    "nodeattrs-attr-c1-funnel": _FUNNEL,
    "nodeattrs-funnel-f1-tag": _FUNNEL,
    "nodeattrs-funnel-f2-user": _FUNNEL,
    "nodeattrs-ippool-g1-admin": _IPPOOL,
    "nodeattrs-ippool-g2-group": _IPPOOL,
    "nodeattrs-ippool-g3-mixed": _IPPOOL,
    "nodeattrs-target-a10-autogroup-admin": _ROLES,
    "nodeattrs-target-a11-autogroup-owner": _ROLES,
    "policytest-allpass-grants-only-tag-src-ipv6-literal-dst": (
        "Tailscale sent no filter and no peers for a grant whose only destination is a "
        "node's IPv6 literal; homescale lets tag:client reach that address (what the "
        "policy says, and what the same capture's tests accepted)"
    ),
}


def _family_files(root: Path, family: str) -> list[Path]:
    d = root / family
    return sorted([*d.glob("*.hujson"), *d.glob("*.json")]) if d.is_dir() else []


def compact(data: dict[str, Any]) -> dict[str, Any]:
    """What the comparison reads of a capture, nothing more (for the fixture)."""
    captures = {}
    for name, cap in data["captures"].items():
        netmap = cap.get("netmap") or {}
        peers = []
        for p in netmap.get("Peers") or []:
            entry = {"Name": p["Name"]}
            routes = [a for a in p.get("AllowedIPs") or [] if a not in (p.get("Addresses") or [])]
            if routes:  # the routes this peer serves to the node (via steering)
                entry["AllowedIPs"] = routes
            if p.get("CapMap"):
                entry["CapMap"] = p["CapMap"]
            peers.append(entry)
        small: dict[str, Any] = {
            "packet_filter_rules": cap.get("packet_filter_rules"),
            "netmap": {
                "Peers": peers,
                "SelfNode": {"CapMap": netmap.get("SelfNode", {}).get("CapMap")},
            },
        }
        if "ssh_rules" in cap:
            small["ssh_rules"] = cap["ssh_rules"]
        captures[name] = small
    inp = data["input"]
    return {
        "test_id": data["test_id"],
        "category": data.get("category"),
        "tailnet": data.get("tailnet", ""),
        "input": {
            k: inp[k] for k in ("api_response_code", "api_response_body", "full_policy") if k in inp
        },
        "topology": data["topology"],
        "captures": captures,
    }


@pytest.mark.skipif(
    not TESTDATA.is_dir(),
    reason="HEADSCALE_TESTDATA (headscale's hscontrol/policy/v2/testdata) is not set",
)
@pytest.mark.parametrize("family", FAMILIES)
def test_capture_family(family: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Print N/M per family; only the listed differences may differ."""
    paths = _family_files(TESTDATA, family)
    assert paths, f"{TESTDATA / family} holds no captures"
    results = {p.stem: check_scenario(p) for p in paths}
    matched = sum(1 for problems in results.values() if not problems)
    with capsys.disabled():
        print(f"\n{family}: {matched}/{len(results)} scenarios match")
    unexpected = {k: v for k, v in results.items() if v and k not in KNOWN_DIFFERENCES}
    assert not unexpected, "\n".join(f"{k}: {v[0]}" for k, v in sorted(unexpected.items()))
    stale = [k for k in KNOWN_DIFFERENCES if k in results and not results[k]]
    assert not stale, f"listed as known differences but now match: {stale}"


FIXTURE_FILES = [p for f in FAMILIES for p in _family_files(FIXTURES, f)]


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=[p.stem for p in FIXTURE_FILES])
def test_capture_fixture(path: Path) -> None:
    """The compact credited copy: compared in every clone."""
    problems = check_scenario(path)
    if path.stem in KNOWN_DIFFERENCES:
        assert problems, f"{path.stem} now matches; drop it from KNOWN_DIFFERENCES"
        pytest.skip(f"known difference: {KNOWN_DIFFERENCES[path.stem]}")
    assert not problems, "\n".join(problems)


def test_fixture_covers_every_family() -> None:
    for family in FAMILIES:
        assert _family_files(FIXTURES, family), f"no fixture for {family}"


if (
    __name__ == "__main__"
):  # regenerate the fixture: python -m tests.netmap.test_policy_captures ID...
    import sys

    for test_id in sys.argv[1:]:
        for family in FAMILIES:
            src = TESTDATA / family / f"{test_id}.hujson"
            if src.exists():
                out = FIXTURES / family / f"{test_id}.json"
                out.parent.mkdir(parents=True, exist_ok=True)
                text = json.dumps(compact(load_scenario(src)), sort_keys=True)
                out.write_text(text + "\n")
