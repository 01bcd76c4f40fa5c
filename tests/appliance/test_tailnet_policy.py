"""Policy changes through the coordinator: who hears about what, and nobody else."""

from __future__ import annotations

import ipaddress
import json

from appliance.changes import NodeRemoved, PolicyChanged
from appliance.sessions import SessionHandle
from appliance.tailnet import Tailnet
from netmap.policy.ipset import IPSet
from tests.appliance.test_tailnet_support import (
    change,
    compose,
    connect,
    delta_keys,
    make_tailnet,
    node,
    user,
)

USERS = [user(1, "alice"), user(2, "carol")]
A, B, C, D = 1, 2, 3, 4  # A: alice's laptop, B: a tag:web server, C and D: carol's

# A may reach B; carol's nodes reach each other; C does not see B.
POLICY = """{
  "tagOwners": {"tag:web": ["alice@"]},
  "acls": [
    {"action": "accept", "src": ["alice@"], "dst": ["tag:web:*"]},
    {"action": "accept", "src": ["carol@"], "dst": ["carol@:*"]}
  ]
}"""
# The same plus: carol's nodes may reach B on 443.
POLICY_OPEN = POLICY.replace(
    '"dst": ["carol@:*"]}',
    '"dst": ["carol@:*"]},\n    {"action": "accept", "src": ["carol@"], "dst": ["tag:web:443"]}',
)


def setup() -> tuple[Tailnet, dict[int, SessionHandle]]:
    tn = make_tailnet(
        USERS, [node(A), node(B, tags=["tag:web"]), node(C, user_id=2), node(D, user_id=2)], POLICY
    )
    handles = {nid: connect(tn, nid)[0] for nid in (A, B, C, D)}
    return tn, handles


def test_first_maps_follow_the_policy() -> None:
    tn = make_tailnet(
        USERS, [node(A), node(B, tags=["tag:web"]), node(C, user_id=2), node(D, user_id=2)], POLICY
    )
    peers = {
        nid: sorted(p["ID"] for p in connect(tn, nid)[1].get("Peers", [])) for nid in (A, B, C, D)
    }
    assert peers == {A: [B], B: [A], C: [D], D: [C]}


def test_change_reaches_only_who_can_see_it() -> None:
    tn, h = setup()
    change(tn, B, endpoints=["198.51.100.2:41641"])
    assert h[A].wake.is_set()
    assert not h[C].wake.is_set()
    assert not h[D].wake.is_set()
    assert compose(tn, h[C]) is None
    msg = compose(tn, h[A])
    assert msg is not None
    assert msg["PeersChangedPatch"] == [{"NodeID": B, "Endpoints": ["198.51.100.2:41641"]}]


def test_granting_and_revoking_access() -> None:
    tn, h = setup()
    b_filter = compose_filter_of(tn, B)
    tn.apply([PolicyChanged(POLICY_OPEN)])
    msg_c = compose(tn, h[C])
    assert msg_c is not None
    assert [p["ID"] for p in msg_c["PeersChanged"]] == [B]
    # C is a source only: its own inbound filter did not change, so none is sent.
    assert "PacketFilter" not in msg_c
    msg_b = compose(tn, h[B])
    assert msg_b is not None
    assert sorted(p["ID"] for p in msg_b["PeersChanged"]) == [C, D]
    assert msg_b["PacketFilter"] != b_filter
    srcs = IPSet.of([ip for r in msg_b["PacketFilter"] for ip in r["SrcIPs"]])
    for nid in (C, D):
        assert srcs.contains(ipaddress.ip_address(tn.nodes[nid].ipv4 or ""))
    # A's peers and filter are what they were: nothing to send.
    assert compose(tn, h[A]) is None

    tn.apply([PolicyChanged(POLICY)])
    msg_c = compose(tn, h[C])
    assert msg_c is not None
    assert delta_keys(msg_c) == {"PeersRemoved"}
    assert msg_c["PeersRemoved"] == [B]
    msg_b = compose(tn, h[B])
    assert msg_b is not None
    assert sorted(msg_b["PeersRemoved"]) == [C, D]
    assert msg_b["PacketFilter"] == b_filter
    assert compose(tn, h[A]) is None


def test_same_policy_again_sends_nothing() -> None:
    tn, h = setup()
    tn.apply([PolicyChanged(POLICY)])
    for nid in (A, B, C, D):
        assert compose(tn, h[nid]) is None


def test_tagging_a_node_moves_it_between_peer_sets() -> None:
    tn, h = setup()
    change(tn, C, tags=["tag:web"])  # C now is a web server: A sees it, D no longer does
    msg_a = compose(tn, h[A])
    assert msg_a is not None
    assert [p["ID"] for p in msg_a["PeersChanged"]] == [C]
    msg_d = compose(tn, h[D])
    assert msg_d is not None
    assert msg_d["PeersRemoved"] == [C]
    msg_c = compose(tn, h[C])
    assert msg_c is not None
    assert msg_c["Node"]["Tags"] == ["tag:web"]
    assert msg_c["PeersRemoved"] == [D]
    assert [p["ID"] for p in msg_c["PeersChanged"]] == [A]


def test_deleted_node_is_removed_only_where_it_was_seen() -> None:
    tn, h = setup()
    tn.apply([NodeRemoved(B)])
    msg_a = compose(tn, h[A])
    assert msg_a is not None
    assert msg_a["PeersRemoved"] == [B]
    assert h[B].closed_reason
    for nid in (C, D):
        msg = compose(tn, h[nid])
        assert msg is None or "PeersRemoved" not in msg


def test_ssh_policy_grant_and_revoke() -> None:
    tn, h = setup()
    ssh = POLICY.replace(
        '"acls"',
        '"ssh": [{"action": "accept", "src": ["alice@"], '
        '"dst": ["tag:web"], "users": ["root"]}],\n  "acls"',
    )
    tn.apply([PolicyChanged(ssh)])
    msg_b = compose(tn, h[B])
    assert msg_b is not None
    assert msg_b["SSHPolicy"]["rules"]
    assert compose(tn, h[C]) is None
    tn.apply([PolicyChanged(POLICY)])
    msg_b = compose(tn, h[B])
    assert msg_b is not None
    assert msg_b["SSHPolicy"] == {"rules": []}


def compose_filter_of(tn: Tailnet, nid: int) -> object:
    return json.loads(tn.filter_json(nid))


def test_node_attrs_reach_the_node_and_follow_policy_changes() -> None:
    """nodeAttrs land in the node's own CapMap (not its peers'); a policy change
    that adds one sends the node its new self node."""
    with_attrs = POLICY.replace(
        '"acls": [',
        '"nodeAttrs": [{"target": ["tag:web"], "attr": ["magicdns-aaaa", "nextdns:abc"],'
        ' "app": {"example.com/cap/x": [{"v": 1}]}}],\n  "acls": [',
    )
    tn, h = setup()
    first = connect(tn, B)[1]["Node"]["CapMap"]
    assert "magicdns-aaaa" not in first
    tn.apply([PolicyChanged(with_attrs)])
    msg_b = compose(tn, h[B])
    assert msg_b is not None
    caps = msg_b["Node"]["CapMap"]
    assert caps["magicdns-aaaa"] is None
    assert caps["nextdns:abc"] is None
    assert caps["example.com/cap/x"] == [{"v": 1}]
    assert "https://tailscale.com/cap/ssh" in caps  # the server's defaults stay
    # A sees B as a peer without B's own attributes.
    peer_b = next(p for p in connect(tn, A)[1]["Peers"] if p["ID"] == B)
    assert "magicdns-aaaa" not in peer_b["CapMap"]
