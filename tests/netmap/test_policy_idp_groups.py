"""Identity-provider groups in the policy: a group member "oidc:<group>" stands for
the users the provider put in that group at their last sign-in (issue 13)."""

from __future__ import annotations

import ipaddress
import json
import re

import pytest

from netmap.policy import PolicyError, PolicyNode, PolicyUser, compile_policy, parse_policy

POLICY = """{
  "groups": {"group:eng": ["oidc:engineering", "carol@"]},
  "acls": [{"action": "accept", "src": ["group:eng"], "dst": ["tag:db:5432"]}],
  "tagOwners": {"tag:db": ["carol@"]},
}"""
DB = PolicyNode(9, "db", None, tags=("tag:db",), ipv4="100.64.0.9")
NODES = [
    PolicyNode(1, "alice-laptop", "alice", ipv4="100.64.0.1"),
    PolicyNode(2, "bob-laptop", "bob", ipv4="100.64.0.2"),
    PolicyNode(3, "carol-laptop", "carol", ipv4="100.64.0.3"),
    DB,
]


def sources(users: list[PolicyUser]) -> set[str]:
    rules = compile_policy(parse_policy(POLICY), users, NODES).filter_for(DB.id)
    nets = [ipaddress.ip_network(ip) for r in rules for ip in r["SrcIPs"]]
    return {str(a) for n in nets for a in (n if n.num_addresses > 1 else [n.network_address])}


def test_members_follow_the_provider_groups() -> None:
    users = [
        PolicyUser(1, "alice", groups=("engineering", "tailnet")),
        PolicyUser(2, "bob", groups=("sales",)),
        PolicyUser(3, "carol"),
    ]
    assert sources(users) == {"100.64.0.1", "100.64.0.3"}
    # bob joins engineering at the provider, alice leaves it: at their next sign-in
    # the stored groups change, and so does who may reach the database.
    users[0] = PolicyUser(1, "alice", groups=("tailnet",))
    users[1] = PolicyUser(2, "bob", groups=("sales", "engineering"))
    assert sources(users) == {"100.64.0.2", "100.64.0.3"}


def test_group_names_match_exactly() -> None:
    users = [PolicyUser(1, "alice", groups=("Engineering", "/engineering", "engineering-ops"))]
    assert sources(users) == set()


@pytest.mark.parametrize(
    ("member", "says"),
    [
        ("oidc:", "names no provider group"),
        ("engineering", "or a provider group (oidc:<group>)"),
    ],
)
def test_bad_members_are_refused(member: str, says: str) -> None:
    with pytest.raises(PolicyError, match=re.escape(says)):
        parse_policy(json.dumps({"groups": {"group:x": [member]}}))
