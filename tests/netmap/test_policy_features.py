"""Grants with app and via, nodeAttrs, ipsets and sshTests on a small tailnet."""

from __future__ import annotations

import ipaddress

import pytest

from netmap.policy import CompiledPolicy, PolicyError, compile_policy, load_policy, parse_policy
from netmap.policy.ipset import IPSet
from tests.netmap.test_policy_compile import ALICE1, BOB, NODES, ROUTER, SERVER, USERS

TAGS = '"tagOwners": {"tag:web": ["alice@"], "tag:router": ["alice@"]}'


def compiled(body: str) -> CompiledPolicy:
    return compile_policy(parse_policy("{" + TAGS + "," + body + "}"), USERS, NODES)


def test_app_grant_reaches_destination_as_capgrant_with_values_as_given() -> None:
    c = compiled(
        '"grants": [{"src": ["bob@"], "dst": ["tag:web"],'
        ' "app": {"example.com/cap/x": [{"role": "admin", "n": [1, 2]}]}}]'
    )
    assert c.filter_for(SERVER.id) == [
        {
            "SrcIPs": ["100.64.0.3", "fd7a:115c:a1e0::3"],
            "CapGrant": [
                {
                    "Dsts": ["100.64.0.4/32", "fd7a:115c:a1e0::4/128"],
                    "CapMap": {"example.com/cap/x": [{"role": "admin", "n": [1, 2]}]},
                }
            ],
        }
    ]
    assert c.filter_for(BOB.id) == []
    assert c.may_see(BOB.id, SERVER.id)  # a capability grant makes them peers


def test_drive_grant_sends_the_sources_their_sharer_companion() -> None:
    c = compiled(
        '"grants": [{"src": ["bob@"], "dst": ["tag:web"],'
        ' "app": {"tailscale.com/cap/drive": [{"shares": ["*"], "access": "rw"}]}}]'
    )
    assert c.filter_for(BOB.id) == [
        {
            "SrcIPs": ["100.64.0.4", "fd7a:115c:a1e0::4"],
            "CapGrant": [
                {
                    "Dsts": ["100.64.0.3/32", "fd7a:115c:a1e0::3/128"],
                    "CapMap": {"tailscale.com/cap/drive-sharer": None},
                }
            ],
        }
    ]


@pytest.mark.parametrize(
    ("cap", "message"),
    [
        ("https://example.com/cap/x", "capability name must have the form {domain}/{path}"),
        ("tailscale.com/cap/ingress", "capability name must not be in the tailscale.com domain"),
    ],
)
def test_app_capability_names_refused_like_tailscale(cap: str, message: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(f'{{"grants": [{{"src": ["*"], "dst": ["*"], "app": {{"{cap}": [{{}}]}}}}]}}')
    assert info.value.message == message
    assert info.value.path == f'grants[0].app["{cap}"]'


def test_via_grant_steers_to_the_tagged_router_only() -> None:
    other = ROUTER.__class__(
        6,
        "router2",
        None,
        tags=("tag:other",),
        ipv4="100.64.0.6",
        routable_ips=("10.1.0.0/16",),
        approved_routes=("10.1.0.0/16",),
    )
    policy = parse_policy(
        '{"tagOwners": {"tag:router": ["alice@"], "tag:other": ["alice@"]},'
        ' "grants": [{"src": ["bob@"], "dst": ["10.1.0.0/16"], "ip": ["tcp:22"],'
        ' "via": ["tag:router"]}]}'
    )
    c = compile_policy(policy, USERS, [*NODES, other])
    assert c.filter_for(ROUTER.id)[0]["DstPorts"] == [
        {"IP": "10.1.0.0/16", "Ports": {"First": 22, "Last": 22}}
    ]
    assert c.filter_for(other.id) == []
    assert c.may_see(BOB.id, ROUTER.id)
    assert not c.may_see(BOB.id, other.id)
    # bob's map must route 10.1.0.0/16 through the via router, not router2.
    assert c.via_routes(BOB.id) == {ipaddress.ip_network("10.1.0.0/16"): [ROUTER.id]}
    assert c.via_routes(ALICE1.id) == {}
    with pytest.raises(PolicyError, match="via can only be a tag"):
        parse_policy('{"grants": [{"src": ["*"], "dst": ["*"], "ip": ["*"], "via": ["bob@"]}]}')


def test_node_attrs_reach_the_targets_cap_map() -> None:
    c = compiled(
        '"randomizeClientPort": true, "nodeAttrs": ['
        '{"target": ["tag:web"], "attr": ["magicdns-aaaa", "nextdns:abc"]},'
        '{"target": ["alice@"], "app": {"tailscale.com/app-connectors": [{"name": "x"}]}}]'
    )
    assert c.cap_map(SERVER.id) == {
        "randomize-client-port": None,
        "magicdns-aaaa": None,
        "nextdns:abc": None,
    }
    assert c.cap_map(ALICE1.id) == {
        "randomize-client-port": None,
        "tailscale.com/app-connectors": [{"name": "x"}],
    }
    assert c.cap_map(BOB.id) == {"randomize-client-port": None}


def test_ipsets_add_and_remove_in_order() -> None:
    policy = parse_policy(
        '{"hosts": {"lan": "10.0.0.0/8"}, "ipsets": {'
        '"ipset:base": ["add host:lan", "remove 10.1.0.0/16", "192.168.1.1-192.168.1.3"],'
        '"ipset:more": ["ipset:base", "remove 192.168.1.2"]},'
        ' "acls": [{"action": "accept", "src": ["bob@"], "dst": ["ipset:more:443"]}]}'
    )
    assert policy.ipsets["ipset:more"] == IPSet.of(
        ["10.0.0.0-10.0.255.255", "10.2.0.0-10.255.255.255", "192.168.1.1", "192.168.1.3"]
    )
    rules = compile_policy(policy, USERS, NODES).filter_for(ROUTER.id)
    assert rules == []  # 10.1.0.0/16, the router's subnet, was removed
    for bad, message in (
        ('{"ipset:a": ["ipset:a"]}', "circular"),
        ('{"ipset:a": ["tag:web"]}', "not tags, users or groups"),
        ('{"ipset:a": ["ipset:nope"]}', "not defined"),
    ):
        with pytest.raises(PolicyError, match=message):
            parse_policy('{"tagOwners": {"tag:web": []}, "ipsets": ' + bad + "}")


SSH = (
    '"ssh": [{"action": "accept", "src": ["bob@"], "dst": ["tag:web"], "users": ["root"]},'
    '{"action": "check", "src": ["alice@"], "dst": ["tag:web"], "users": ["autogroup:nonroot"]}]'
)


def test_ssh_tests_pass_and_fail_as_tailscale_evaluates_them() -> None:
    ok = (
        "{" + TAGS + "," + SSH + ', "sshTests": [{"src": "bob@", "dst": ["tag:web"],'
        ' "accept": ["root"], "deny": ["alice"]},'
        ' {"src": "alice@", "dst": ["tag:web"], "check": ["alice"], "deny": ["root"]}]}'
    )
    load_policy(ok, USERS, NODES)
    bad = (
        "{" + TAGS + "," + SSH + ', "sshTests": [{"src": "alice@", "dst": ["tag:web"],'
        ' "accept": ["root"]}]}'
    )
    with pytest.raises(PolicyError) as info:
        load_policy(bad, USERS, NODES)
    assert info.value.message.startswith("test(s) failed")
    assert info.value.path == "sshTests[0]"
    assert "expected ALLOWED, got DENIED" in info.value.message
