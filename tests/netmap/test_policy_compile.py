"""Compilation: filters, peers, SSH rules and the tests block on a small tailnet."""

from __future__ import annotations

import pytest

from netmap.policy import (
    ALLOW_ALL,
    PolicyError,
    PolicyNode,
    PolicyUser,
    compile_policy,
    load_policy,
    parse_policy,
    run_policy_tests,
)
from netmap.policy.ipset import IPSet

USERS = [
    PolicyUser(1, "alice", "alice@example.com"),
    PolicyUser(2, "bob", "bob@example.com"),
]
ALICE1 = PolicyNode(1, "alice-laptop", "alice", ipv4="100.64.0.1", ipv6="fd7a:115c:a1e0::1")
ALICE2 = PolicyNode(2, "alice-phone", "alice", ipv4="100.64.0.2", ipv6="fd7a:115c:a1e0::2")
BOB = PolicyNode(3, "bob-laptop", "bob", ipv4="100.64.0.3", ipv6="fd7a:115c:a1e0::3")
# Registered by alice, but tagged: owned by its tag, not by alice.
SERVER = PolicyNode(4, "web", None, tags=("tag:web",), ipv4="100.64.0.4", ipv6="fd7a:115c:a1e0::4")
ROUTER = PolicyNode(
    5,
    "router",
    None,
    tags=("tag:router",),
    ipv4="100.64.0.5",
    ipv6="fd7a:115c:a1e0::5",
    routable_ips=("10.1.0.0/16",),
    approved_routes=("10.1.0.0/16",),
)
NODES = [ALICE1, ALICE2, BOB, SERVER, ROUTER]
ALICES = IPSet.of(["100.64.0.1", "100.64.0.2", "fd7a:115c:a1e0::1", "fd7a:115c:a1e0::2"])

BASE = """
  "groups": {"group:web-users": ["alice@example.com"]},
  "tagOwners": {"tag:web": ["alice@"], "tag:router": ["alice@"]},
  "hosts": {"db": "10.1.2.3"},
"""


def compiled(body: str, nodes: list[PolicyNode] = NODES):
    return compile_policy(parse_policy("{" + BASE + body + "}"), USERS, nodes)


def dst_ips(rules: list[dict]) -> set[str]:
    return {d["IP"] for r in rules for d in r["DstPorts"]}


def test_no_policy_allows_all() -> None:
    c = compile_policy(None, USERS, NODES)
    assert c.filter_for(BOB.id) == ALLOW_ALL
    assert c.visible_peers(BOB.id) == {n.id for n in NODES} - {BOB.id}


def test_group_to_tag_port() -> None:
    c = compiled(
        '"acls": [{"action": "accept", "src": ["group:web-users"], "dst": ["tag:web:80"]}]'
    )
    rules = c.filter_for(SERVER.id)
    assert len(rules) == 1
    # Adjacent addresses may be sent as a range ("100.64.0.1-100.64.0.2"),
    # as Tailscale does: compare the address sets.
    assert IPSet.of(rules[0]["SrcIPs"]) == ALICES
    assert {(d["IP"], d["Ports"]["First"], d["Ports"]["Last"]) for d in rules[0]["DstPorts"]} == {
        ("100.64.0.4", 80, 80),
        ("fd7a:115c:a1e0::4", 80, 80),
    }
    assert "IPProto" not in rules[0]  # default protocols
    # Only the destination carries the rule; alice's devices get none.
    assert c.filter_for(ALICE1.id) == []
    # Peers: the group sees the server and the server sees the group; bob
    # sees nothing (he may not reach it, nor it him).
    assert c.visible_peers(SERVER.id) == {ALICE1.id, ALICE2.id}
    assert c.visible_peers(ALICE1.id) == {SERVER.id}
    assert c.visible_peers(BOB.id) == frozenset()
    assert c.may_see(ALICE2.id, SERVER.id)
    assert c.may_see(SERVER.id, ALICE2.id)
    assert not c.may_see(BOB.id, SERVER.id)


def test_tagged_node_is_not_its_registrants() -> None:
    c = compiled('"acls": [{"action": "accept", "src": ["*"], "dst": ["alice@:22"]}]')
    assert dst_ips(c.filter_for(ALICE1.id)) == {"100.64.0.1", "fd7a:115c:a1e0::1"}
    assert c.filter_for(SERVER.id) == []


def test_protocols_and_port_lists() -> None:
    c = compiled(
        '"acls": [{"action": "accept", "proto": "udp", "src": ["bob@"], "dst": ["tag:web:53,5000-5010"]}]'
    )
    (rule,) = c.filter_for(SERVER.id)
    assert rule["IPProto"] == [17]
    assert {(d["Ports"]["First"], d["Ports"]["Last"]) for d in rule["DstPorts"]} == {
        (53, 53),
        (5000, 5010),
    }


def test_wildcard_source_includes_approved_subnets() -> None:
    c = compiled('"acls": [{"action": "accept", "src": ["*"], "dst": ["tag:web:443"]}]')
    (rule,) = c.filter_for(SERVER.id)
    assert "10.1.0.0/16" in rule["SrcIPs"]
    assert "100.64.0.0-100.115.91.255" in rule["SrcIPs"]


def test_subnet_destination_reaches_router_and_makes_it_a_peer() -> None:
    c = compiled('"acls": [{"action": "accept", "src": ["bob@"], "dst": ["db:5432"]}]')
    assert dst_ips(c.filter_for(ROUTER.id)) == {"10.1.2.3"}
    assert c.filter_for(SERVER.id) == []
    assert c.visible_peers(BOB.id) == {ROUTER.id}


def test_unapproved_route_does_not_count() -> None:
    router = PolicyNode(
        5, "router", None, ("tag:router",), "100.64.0.5", None, ("10.1.0.0/16",), ()
    )
    c = compiled(
        '"acls": [{"action": "accept", "src": ["bob@"], "dst": ["db:5432"]}]', [*NODES[:4], router]
    )
    assert c.filter_for(router.id) == []
    assert c.visible_peers(BOB.id) == frozenset()


def test_autogroup_self_is_per_user() -> None:
    c = compiled(
        '"acls": [{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]}]'
    )
    (rule,) = c.filter_for(ALICE1.id)
    assert IPSet.of(rule["SrcIPs"]) == ALICES
    assert dst_ips([rule]) == {"100.64.0.1", "fd7a:115c:a1e0::1"}
    (bob_rule,) = c.filter_for(BOB.id)
    assert set(bob_rule["SrcIPs"]) == {"100.64.0.3", "fd7a:115c:a1e0::3"}
    assert c.filter_for(SERVER.id) == []  # tagged nodes are nobody's "self"
    assert c.visible_peers(ALICE1.id) == {ALICE2.id}
    assert c.visible_peers(BOB.id) == frozenset()


def test_empty_acls_denies_everything_but_missing_acls_allows() -> None:
    denied = compiled('"acls": []')
    assert denied.filter_for(BOB.id) == []
    assert denied.visible_peers(BOB.id) == frozenset()
    open_ = compiled('"ssh": []')
    assert dst_ips(open_.filter_for(BOB.id)) == {"*"}
    assert open_.visible_peers(BOB.id) == {n.id for n in NODES} - {BOB.id}


def test_internet_destination_only_on_exit_nodes() -> None:
    exit_node = PolicyNode(
        6,
        "exit",
        None,
        ("tag:router",),
        "100.64.0.6",
        None,
        ("0.0.0.0/0", "::/0"),
        ("0.0.0.0/0", "::/0"),
    )
    c = compiled(
        '"acls": [{"action": "accept", "src": ["bob@"], "dst": ["autogroup:internet:*"]}]',
        [*NODES, exit_node],
    )
    assert c.filter_for(exit_node.id)
    assert c.filter_for(SERVER.id) == []
    assert c.visible_peers(BOB.id) == {exit_node.id}


def test_ssh_rules() -> None:
    c = compile_policy(
        parse_policy(
            "{"
            + BASE
            + '"ssh": [{"action": "check", "src": ["group:web-users"], "dst": ["tag:web"],'
            ' "users": ["root", "autogroup:nonroot"]},'
            ' {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self"], "users": ["ubuntu"]}]}'
        ),
        USERS,
        NODES,
        server_url="https://hs.example.com/",
    )
    (check,) = c.ssh_for(SERVER.id)
    assert check["action"] == {
        "holdAndDelegate": "https://hs.example.com/machine/ssh/action/$SRC_NODE_ID/to/$DST_NODE_ID?local_user=$LOCAL_USER"
    }
    assert check["sshUsers"] == {"*": "=", "root": "root"}
    assert {p["nodeIP"] for p in check["principals"]} == {
        "100.64.0.1",
        "100.64.0.2",
        "fd7a:115c:a1e0::1",
        "fd7a:115c:a1e0::2",
    }
    (own,) = c.ssh_for(BOB.id)
    assert own["sshUsers"] == {"root": "", "ubuntu": "ubuntu"}
    assert own["action"]["accept"] is True
    assert {p["nodeIP"] for p in own["principals"]} == {"100.64.0.3", "fd7a:115c:a1e0::3"}


def test_auto_approvers() -> None:
    c = compiled(
        '"autoApprovers": {"routes": {"10.0.0.0/8": ["tag:router"]}, "exitNode": ["bob@"]}'
    )
    assert c.can_auto_approve(ROUTER.id, "10.1.0.0/16")
    assert not c.can_auto_approve(ROUTER.id, "192.168.0.0/24")
    assert not c.can_auto_approve(SERVER.id, "10.1.0.0/16")
    assert c.can_auto_approve(BOB.id, "0.0.0.0/0")
    assert not c.can_auto_approve(ROUTER.id, "0.0.0.0/0")


TESTED = (
    "{"
    + BASE
    + """
  "acls": [{"action": "accept", "src": ["group:web-users"], "dst": ["tag:web:80"]}],
  "tests": [
    {"src": "alice@example.com", "accept": ["tag:web:80"], "deny": ["tag:web:22"]},
    {"src": "bob@", "deny": ["tag:web:80"]},
  ],
}"""
)


def test_tests_block_passes() -> None:
    policy = parse_policy(TESTED)
    assert run_policy_tests(policy, USERS, NODES) == []
    assert load_policy(TESTED, USERS, NODES).filter_for(SERVER.id)


def test_tests_block_failure_refuses_policy() -> None:
    broken = TESTED.replace('"src": ["group:web-users"]', '"src": ["*"]')
    failures = run_policy_tests(parse_policy(broken), USERS, NODES)
    assert [(f.src, f.dst, f.expected) for f in failures] == [("bob@", "tag:web:80", "deny")]
    with pytest.raises(PolicyError) as info:
        load_policy(broken, USERS, NODES, "policy.hujson")
    assert info.value.path == "tests[1]"
    assert "bob@ -> tag:web:80: expected DENIED, got ALLOWED" in str(info.value)
    assert info.value.line is not None


def test_tests_block_shape_errors() -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy('{"tests": [{"src": "bob@", "accept": ["100.64.0.0/10:22"]}]}')
    assert info.value.path == "tests[0].accept[0]"
    with pytest.raises(PolicyError) as info:
        parse_policy('{"tests": [{"src": "bob@"}]}')
    assert info.value.path == "tests[0]"


def test_unknown_node_is_an_error() -> None:
    c = compiled('"acls": []')
    with pytest.raises(KeyError):
        c.filter_for(999)
