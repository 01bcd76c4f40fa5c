"""Fuzz target: a policy file, parsed, compiled and tested (netmap/policy).

The policy comes from an admin's file or the REST API (``policy set``): a
mistake or a hostile edit must end as a PolicyError naming the problem, never
another exception or a hang -- and whatever is accepted must compile: every
node's filter, SSH rules, peers and CapMap come out, and the policy's
``tests``/``sshTests`` give a verdict.
"""

from __future__ import annotations

import json

from hypothesis import strategies as st

from netmap.policy import PolicyError, PolicyNode, PolicyUser, compile_policy, parse_policy
from netmap.policy.policytests import check_policy_tests
from tests.fuzz.harness import fuzz_tests
from tests.fuzz.strategies import HOSTILE_STRINGS, dumps, json_values, mutated

USERS = [PolicyUser(1, "alice", "alice@example.com"), PolicyUser(2, "bob", "bob@example.com")]
NODES = [
    PolicyNode(1, "laptop", "alice", ipv4="100.64.0.1", ipv6="fd7a:115c:a1e0::1"),
    PolicyNode(2, "phone", "bob", ipv4="100.64.0.2", ipv6="fd7a:115c:a1e0::2"),
    PolicyNode(
        3,
        "router",
        None,
        tags=("tag:router",),
        ipv4="100.64.0.3",
        routable_ips=("10.1.0.0/16", "0.0.0.0/0"),
        approved_routes=("10.1.0.0/16", "0.0.0.0/0"),
    ),
]

GOOD = {
    "groups": {"group:eng": ["alice@example.com", "bob@"]},
    "hosts": {"lan": "10.0.0.0/8", "one": "100.64.0.2"},
    "ipsets": {
        "ipset:a": ["add host:lan", "remove 10.2.0.0/16", "192.168.1.1-192.168.1.9"],
        "ipset:b": ["ipset:a", "autogroup:internet"],
    },
    "tagOwners": {"tag:router": ["group:eng"], "tag:web": ["alice@"]},
    "acls": [{"action": "accept", "src": ["group:eng"], "dst": ["ipset:a:22,80-90", "one:*"]}],
    "grants": [
        {"src": ["*"], "dst": ["tag:router"], "ip": ["tcp:443", "icmp:*"]},
        {
            "src": ["alice@"],
            "dst": ["*"],
            "app": {"tailscale.com/cap/drive": [{"shares": ["*"], "access": "rw"}]},
        },
        {
            "src": ["bob@"],
            "dst": ["10.1.0.0/16", "autogroup:internet"],
            "ip": ["*"],
            "via": ["tag:router"],
        },
        {
            "src": ["group:eng"],
            "dst": ["autogroup:self"],
            "ip": ["*"],
            "app": {"example.com/c": [1]},
        },
    ],
    "nodeAttrs": [
        {"target": ["*"], "attr": ["magicdns-aaaa", "nextdns:x"]},
        {"target": ["tag:router"], "app": {"tailscale.com/app-connectors": [{"name": "a"}]}},
    ],
    "ssh": [
        {
            "action": "check",
            "src": ["user:*@example.com"],
            "dst": ["autogroup:self"],
            "users": ["root", "localpart:*@example.com"],
        },
        {
            "action": "accept",
            "src": ["group:eng"],
            "dst": ["tag:router"],
            "users": ["autogroup:nonroot"],
            "checkPeriod": "1h",
        },
    ],
    "autoApprovers": {"routes": {"10.0.0.0/8": ["tag:router"]}, "exitNode": ["tag:router"]},
    "randomizeClientPort": True,
    "tests": [{"src": "alice@", "proto": "tcp", "accept": ["one:22"], "deny": ["100.64.0.3:22"]}],
    "sshTests": [{"src": "alice@", "dst": ["tag:router"], "accept": ["alice"], "deny": ["root"]}],
}

_KEYS = [*GOOD, "postures", "derpMap", "ACLs", "Grants"]
_FIELDS = ["src", "dst", "ip", "app", "via", "target", "attr", "action", "users", "accept", "deny"]


def check(data: bytes) -> None:
    policy = parse_policy(data.decode("utf-8", "replace"), "fuzz.hujson")
    compiled = compile_policy(policy, USERS, NODES, server_url="https://hs.example")
    for n in NODES:
        json.dumps(compiled.filter_for(n.id))  # what the client is sent must serialise
        json.dumps(compiled.ssh_for(n.id))
        json.dumps(compiled.cap_map(n.id))
        json.dumps(compiled.peer_cap_map(n.id))
        compiled.visible_peers(n.id)
    check_policy_tests(policy, compiled)


def _policies() -> st.SearchStrategy[bytes]:
    text = st.one_of(st.sampled_from(HOSTILE_STRINGS), st.text(max_size=12))
    entry = st.dictionaries(
        st.sampled_from(_FIELDS), st.one_of(st.lists(text, max_size=3), json_values(4)), max_size=5
    )
    section = st.one_of(
        st.lists(entry, max_size=3), st.dictionaries(text, json_values(4), max_size=3)
    )
    shaped = st.dictionaries(st.sampled_from(_KEYS), section, max_size=4)
    return st.one_of(
        mutated(st.just(dumps(GOOD))),
        shaped.map(lambda d: dumps({**GOOD, **d})),
        json_values().map(dumps),
    )


test_fuzz, test_corpus = fuzz_tests("policy", _policies(), check, expected=(PolicyError,))
