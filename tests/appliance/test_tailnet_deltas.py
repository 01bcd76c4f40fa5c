"""The live coordinator: what each connected client receives when the tailnet changes."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from appliance.changes import NodeChanged, NodeOnline, NodeRemoved, PolicyChanged, UserChanged
from appliance.tailnet import Tailnet
from appliance.users import TAGGED_USER_ID
from netmap.policy.ipset import IPSet
from protocol import tailcfg
from tests.appliance.test_tailnet_support import (
    BASE_DOMAIN,
    LATER,
    NOW,
    change,
    compose,
    connect,
    delta_keys,
    make_config,
    make_tailnet,
    node,
    user,
)

USERS = [user(1, "alice"), user(2, "bob")]


def three() -> Tailnet:
    """Allow-all (no policy): everyone sees everyone."""
    return make_tailnet(USERS, [node(1), node(2), node(3, user_id=2)])


def test_first_map_is_complete() -> None:
    tn = three()
    h, first = connect(tn, 1)
    for key in (
        "Node",
        "Peers",
        "PacketFilter",
        "DERPMap",
        "DNSConfig",
        "UserProfiles",
        "Domain",
        "CollectServices",
        "Debug",
        "ControlTime",
    ):
        assert key in first, key
    assert first["Node"]["ID"] == 1
    assert first["Node"]["Name"] == f"node1.{BASE_DOMAIN}."
    assert first["Node"]["MachineAuthorized"] is True
    assert [p["ID"] for p in first["Peers"]] == [2, 3]
    assert first["Domain"] == BASE_DOMAIN
    assert first["Debug"]["DisableLogTail"] is True
    assert first["CollectServices"] is False
    assert sorted(p["ID"] for p in first["UserProfiles"]) == [1, 2]
    assert first["DNSConfig"]["Proxied"] is True
    assert first["PacketFilter"][0]["SrcIPs"] == ["*"]
    resp = tailcfg.MapResponse.from_json(first)
    assert resp.DERPMap is not None
    assert resp.DERPMap.Regions is not None
    assert 999 in resp.DERPMap.Regions
    assert compose(tn, h) is None  # nothing new: nothing to send
    assert not h.wake.is_set()


def test_endpoint_change_is_a_patch_to_peers_and_a_node_to_itself() -> None:
    tn = three()
    h1, _ = connect(tn, 1)
    h2, _ = connect(tn, 2)
    change(tn, 2, endpoints=["198.51.100.2:41641"])
    assert h1.wake.is_set()
    msg = compose(tn, h1)
    assert msg is not None
    assert delta_keys(msg) == {"PeersChangedPatch"}
    assert msg["PeersChangedPatch"] == [{"NodeID": 2, "Endpoints": ["198.51.100.2:41641"]}]
    assert h2.wake.is_set()
    own = compose(tn, h2)
    assert own is not None
    assert delta_keys(own) == {"Node"}
    assert own["Node"]["Endpoints"] == ["198.51.100.2:41641"]


def test_changes_before_the_session_composes_coalesce() -> None:
    tn = three()
    h1, _ = connect(tn, 1)
    change(tn, 2, endpoints=["198.51.100.1:1"])
    change(tn, 2, endpoints=["198.51.100.2:2"], disco_key="discokey:" + "ab" * 32)
    change(tn, 3, endpoints=["198.51.100.3:3"])
    msg = compose(tn, h1)
    assert msg is not None
    assert delta_keys(msg) == {"PeersChangedPatch"}
    assert msg["PeersChangedPatch"] == [
        {"NodeID": 2, "Endpoints": ["198.51.100.2:2"], "DiscoKey": "discokey:" + "ab" * 32},
        {"NodeID": 3, "Endpoints": ["198.51.100.3:3"]},
    ]
    assert compose(tn, h1) is None


@pytest.mark.parametrize(
    ("field", "value", "check"),
    [
        ("given_name", "renamed", lambda n: n["Name"] == f"renamed.{BASE_DOMAIN}."),
        ("tags", ["tag:web"], lambda n: n["Tags"] == ["tag:web"] and n["User"] == TAGGED_USER_ID),
        ("ipv4", "100.64.9.9", lambda n: "100.64.9.9/32" in n["Addresses"]),
    ],
)
def test_non_patchable_change_sends_the_full_node(field: str, value: Any, check: Any) -> None:
    tn = three()
    h1, _ = connect(tn, 1)
    change(tn, 2, **{field: value})
    msg = compose(tn, h1)
    assert msg is not None
    assert "PeersChangedPatch" not in msg
    (full,) = msg["PeersChanged"]
    assert full["ID"] == 2
    assert check(full)


def test_online_and_offline_are_patches() -> None:
    tn = three()
    h1, _ = connect(tn, 1)
    tn.apply([NodeOnline(2, True)])
    msg = compose(tn, h1)
    assert msg is not None
    assert msg["PeersChangedPatch"] == [{"NodeID": 2, "Online": True}]
    tn.apply([NodeOnline(2, False, LATER)])
    msg = compose(tn, h1)
    assert msg is not None
    assert msg["PeersChangedPatch"] == [
        {"NodeID": 2, "Online": False, "LastSeen": "2024-05-01T12:30:00Z"}
    ]


def test_nothing_changed_sends_nothing() -> None:
    tn = three()
    h1, _ = connect(tn, 1)
    h2, _ = connect(tn, 2)
    tn.apply([NodeOnline(2, True)])
    compose(tn, h1)
    compose(tn, h2)
    # A second stream of node 2 marks it online again; a store write that changed nothing.
    tn.apply([NodeOnline(2, True)])
    change(tn, 2)
    assert compose(tn, h1) is None
    assert compose(tn, h2) is None


def test_deleted_node_is_removed_and_its_stream_closed() -> None:
    tn = three()
    h1, _ = connect(tn, 1)
    h2, _ = connect(tn, 2)
    tn.apply([NodeRemoved(2)])
    msg = compose(tn, h1)
    assert msg is not None
    assert delta_keys(msg) == {"PeersRemoved"}
    assert msg["PeersRemoved"] == [2]
    assert h2.closed_reason
    assert 2 not in tn.sessions
    assert compose(tn, h2) is None  # the node is gone: nothing more for its stream


def test_new_stream_replaces_the_old_one() -> None:
    tn = three()
    old, _ = connect(tn, 1)
    new, first = connect(tn, 1)
    assert old.closed_reason
    assert "Peers" in first  # the new stream starts over with a full map
    assert tn.sessions[1] is new
    assert tn.sessions.close(old) is False  # the old stream ending does not take the node offline
    assert tn.sessions.close(new) is True


def test_new_peer_appears_with_its_profile() -> None:
    tn = make_tailnet([*USERS, user(3, "carol")], [node(1), node(2)])
    h1, _ = connect(tn, 1)
    tn.apply([NodeChanged(node(4, user_id=3))])
    msg = compose(tn, h1)
    assert msg is not None
    assert [p["ID"] for p in msg["PeersChanged"]] == [4]
    assert [p["LoginName"] for p in msg["UserProfiles"]] == ["carol"]


def test_peer_without_disco_key_is_not_advertised_until_it_has_one() -> None:
    tn = three()
    h1, _ = connect(tn, 1)
    tn.apply([NodeChanged(node(4, disco_key=""))])
    assert compose(tn, h1) is None
    change(tn, 4, disco_key="discokey:" + "cd" * 32)
    msg = compose(tn, h1)
    assert msg is not None
    assert [p["ID"] for p in msg["PeersChanged"]] == [4]


def test_tagged_node_is_owned_by_tagged_devices() -> None:
    tn = make_tailnet(USERS, [node(1), node(2, user_id=1, tags=["tag:server"])])
    _, first = connect(tn, 1)
    (peer,) = first["Peers"]
    assert peer["User"] == TAGGED_USER_ID
    assert peer["Tags"] == ["tag:server"]
    profiles = {p["ID"]: p for p in first["UserProfiles"]}
    assert profiles[TAGGED_USER_ID]["LoginName"] == "tagged-devices"
    assert profiles[TAGGED_USER_ID]["DisplayName"] == "Tagged Devices"


def test_user_rename_resends_the_profile() -> None:
    tn = three()
    h1, _ = connect(tn, 1)
    tn.apply([UserChanged(user(2, "bob", display_name="Bob Renamed"))])
    msg = compose(tn, h1)
    assert msg is not None
    profiles = {p["ID"]: p for p in msg.get("UserProfiles", [])}
    assert profiles[2]["DisplayName"] == "Bob Renamed"  # node 3's user, a peer's profile
    assert "Peers" not in msg
    assert "PeersChanged" not in msg


AUTO_POLICY = """{
  "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
  "autoApprovers": {"routes": {"10.0.0.0/8": ["alice@"]}, "exitNode": ["alice@"]}
}"""


def test_auto_approved_route_is_served_and_allowed() -> None:
    tn = make_tailnet(USERS, [node(1), node(2, user_id=2)], AUTO_POLICY)
    h1, _ = connect(tn, 1)
    h2, _ = connect(tn, 2)
    hostinfo = {**tn.nodes[1].hostinfo, "RoutableIPs": ["10.1.0.0/16", "192.168.0.0/24"]}
    change(tn, 1, hostinfo=hostinfo)
    msg = compose(tn, h2)
    assert msg is not None
    (router,) = msg["PeersChanged"]
    assert "10.1.0.0/16" in router["AllowedIPs"]
    assert router["PrimaryRoutes"] == ["10.1.0.0/16"]
    assert "192.168.0.0/24" not in router["AllowedIPs"]  # not auto-approved, not approved
    # The router's own filter now lets traffic to the subnet in.
    own = compose(tn, h1)
    assert own is not None
    dsts = {d["IP"] for r in own["PacketFilter"] for d in r["DstPorts"]}
    assert dsts & {"*", "10.1.0.0/16"}
    assert tn.primaries == {"10.1.0.0/16": 1}


def test_auto_approval_revoked_by_policy_withdraws_the_route() -> None:
    hostinfo = {**node(1).hostinfo, "RoutableIPs": ["10.1.0.0/16"]}
    tn = make_tailnet(USERS, [node(1, hostinfo=hostinfo), node(2, user_id=2)], AUTO_POLICY)
    h2, first = connect(tn, 2)
    (router,) = first["Peers"]
    assert "10.1.0.0/16" in router["AllowedIPs"]
    tn.apply([PolicyChanged('{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}')])
    msg = compose(tn, h2)
    assert msg is not None
    (router,) = msg["PeersChanged"]
    assert "10.1.0.0/16" not in router["AllowedIPs"]
    assert "PrimaryRoutes" not in router
    assert tn.primaries == {}


def test_unrelated_recompile_does_not_resend_auto_approved_routers() -> None:
    hostinfo = {**node(1).hostinfo, "RoutableIPs": ["10.1.0.0/16"]}
    tn = make_tailnet(USERS, [node(1, hostinfo=hostinfo), node(2, user_id=2)], AUTO_POLICY)
    h2, _ = connect(tn, 2)
    tn.apply([UserChanged(user(9, "zoe"))])  # a user without nodes: recompiles, changes no node
    msg = compose(tn, h2)
    assert msg is None or not ({"PeersChanged", "PeersChangedPatch"} & set(msg))


def test_dns_change_reaches_every_stream() -> None:
    tn = three()
    h1, _ = connect(tn, 1)
    tn.set_dns()
    msg = compose(tn, h1)
    assert msg is not None
    assert delta_keys(msg) == {"DNSConfig"}


def test_first_map_when_alone_has_node_and_no_peers() -> None:
    tn = make_tailnet(USERS, [node(1)])
    _, first = connect(tn, 1)
    assert first["Node"]["ID"] == 1
    assert not first.get("Peers")


def test_dns_config_in_the_first_map() -> None:
    _, first = connect(three(), 1)
    dns = first["DNSConfig"]
    assert dns["Proxied"] is True
    assert dns["Domains"][0] == BASE_DOMAIN
    assert f"{BASE_DOMAIN}." in dns["Routes"]
    assert len([z for z in dns["Routes"] if z.endswith(".in-addr.arpa.")]) == 64
    assert any(z.endswith(".ip6.arpa.") for z in dns["Routes"])


def test_dns_without_override_uses_fallback_resolvers() -> None:
    config = make_config(
        override_local_dns=False,
        nameservers_global=["9.9.9.9"],
        nameservers_split={"corp.example": ["10.0.0.53"]},
        extra_records=[{"name": "db.corp.example", "type": "A", "value": "100.64.0.9"}],
    )
    tn = make_tailnet(USERS, [node(1), node(2)], config=config)
    _, first = connect(tn, 1)
    dns = first["DNSConfig"]
    assert dns["FallbackResolvers"] == [{"Addr": "9.9.9.9"}]
    assert "Resolvers" not in dns
    assert dns["Routes"]["corp.example."] == [{"Addr": "10.0.0.53"}]
    assert dns["ExtraRecords"] == [{"Name": "db.corp.example", "Type": "A", "Value": "100.64.0.9"}]


def test_node_key_rotation_is_a_key_patch() -> None:
    tn = three()
    h1, _ = connect(tn, 1)
    h2, _ = connect(tn, 2)
    new_key = "nodekey:" + "ee" * 32
    change(tn, 2, node_key=new_key)
    msg = compose(tn, h1)
    assert msg is not None
    assert msg["PeersChangedPatch"] == [{"NodeID": 2, "Key": new_key}]
    own = compose(tn, h2)
    assert own is not None
    assert own["Node"]["Key"] == new_key
    assert tn.by_node_key.get(new_key) == 2
    assert f"nodekey:{2:064x}" not in tn.by_node_key


def test_expiring_a_node_tells_it_and_its_peers() -> None:
    tn = three()
    h1, _ = connect(tn, 1)
    h2, _ = connect(tn, 2)
    change(tn, 2, expiry=NOW)
    msg = compose(tn, h1)
    assert msg is not None
    assert msg["PeersChangedPatch"] == [{"NodeID": 2, "KeyExpiry": "2024-05-01T12:00:00Z"}]
    own = compose(tn, h2)
    assert own is not None
    assert own["Node"]["KeyExpiry"] == "2024-05-01T12:00:00Z"


SUBNET_POLICY = """{
  "acls": [{"action": "accept", "src": ["bob@"], "dst": ["10.1.0.0/16:*"]}],
  "autoApprovers": {"routes": {"10.0.0.0/8": ["alice@"]}}
}"""


def test_auto_approved_route_makes_the_router_reachable() -> None:
    tn = make_tailnet(USERS, [node(1), node(2, user_id=2)], SUBNET_POLICY)
    router, first_r = connect(tn, 1)
    client, first_c = connect(tn, 2)
    assert not first_c.get("Peers")  # nothing to reach yet
    assert first_r["PacketFilter"] == []
    change(tn, 1, hostinfo={**tn.nodes[1].hostinfo, "RoutableIPs": ["10.1.0.0/16"]})
    msg = compose(tn, client)
    assert msg is not None
    (peer,) = msg["PeersChanged"]
    assert peer["ID"] == 1
    assert "10.1.0.0/16" in peer["AllowedIPs"]
    assert peer["PrimaryRoutes"] == ["10.1.0.0/16"]
    own = compose(tn, router)
    assert own is not None
    assert [p["ID"] for p in own["PeersChanged"]] == [2]
    (rule,) = own["PacketFilter"]
    assert [d["IP"] for d in rule["DstPorts"]] == ["10.1.0.0/16"]
    assert IPSet.of(rule["SrcIPs"]).contains(ipaddress.ip_address(tn.nodes[2].ipv4 or ""))


def two_routers_and_a_client() -> Tailnet:
    """Nodes 1 and 2 both serve 10.1.0.0/16 (approved); node 3 of another user uses it."""
    routes = {"RoutableIPs": ["10.1.0.0/16"]}
    return make_tailnet(
        USERS,
        [
            node(1, hostinfo={**node(1).hostinfo, **routes}, approved_routes=["10.1.0.0/16"]),
            node(2, hostinfo={**node(2).hostinfo, **routes}, approved_routes=["10.1.0.0/16"]),
            node(3, user_id=2),
        ],
    )


def test_a_subnet_served_by_two_routers_is_primary_on_one() -> None:
    tn = two_routers_and_a_client()
    _, first = connect(tn, 3)
    claiming = [p["ID"] for p in first["Peers"] if "10.1.0.0/16" in p["AllowedIPs"]]
    assert len(claiming) == 1


def test_primary_router_fails_over_when_it_goes_offline() -> None:
    tn = two_routers_and_a_client()
    tn.apply([NodeOnline(1, True)])
    tn.apply([NodeOnline(2, True)])
    h, first = connect(tn, 3)
    owner = next(p["ID"] for p in first["Peers"] if "10.1.0.0/16" in p["AllowedIPs"])
    other = 2 if owner == 1 else 1
    tn.apply([NodeOnline(owner, False)])
    msg = compose(tn, h)
    assert msg is not None
    changed = {p["ID"]: p for p in msg.get("PeersChanged") or []}
    # The standby takes the route over and the old primary gives it up, in one delta.
    assert "10.1.0.0/16" in changed[other]["AllowedIPs"]
    assert "10.1.0.0/16" in changed[other]["PrimaryRoutes"]
    assert "10.1.0.0/16" not in changed[owner]["AllowedIPs"]


def test_extra_records_file_change_is_a_dns_delta() -> None:
    """dns.extra_records_path edited: the config's own records stay, the file's are
    replaced, and every open session gets the new DNSConfig (nothing else)."""
    mine = {"name": "a.corp.example", "type": "A", "value": "100.64.0.7"}
    config = make_config(extra_records=[mine], config_records=[mine])
    tn = make_tailnet(USERS, [node(1), node(2)], config=config)
    handles = [connect(tn, 1)[0], connect(tn, 2)[0]]
    new = {"name": "grafana.corp.example", "type": "A", "value": "100.64.0.3"}
    tn.set_extra_records([new])
    for h in handles:
        msg = compose(tn, h)
        assert msg is not None
        assert set(msg) - {"ControlTime"} == {"DNSConfig"}
        assert msg["DNSConfig"]["ExtraRecords"] == [
            {"Name": "a.corp.example", "Type": "A", "Value": "100.64.0.7"},
            {"Name": "grafana.corp.example", "Type": "A", "Value": "100.64.0.3"},
        ]
