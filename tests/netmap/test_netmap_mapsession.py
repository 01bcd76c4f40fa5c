"""MapSessionState on its own: what one stream sends, against a hand-built tailnet view."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from netmap.mapsession import (
    PATCH_HISTORY,
    FirstMapCache,
    LogRead,
    MapSessionState,
    NodeEntry,
    SharedDeltas,
)
from netmap.nodes import PeerNode, encode_node, patch_between
from protocol import tailcfg
from protocol.mapframe import message_json

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
ALLOW_ALL = b'[{"SrcIPs":["*"],"DstPorts":[{"IP":"*","Ports":{"First":0,"Last":65535}}]}]'


def peer(i: int, user: int = 1, **kw: Any) -> PeerNode:
    base: dict[str, Any] = {
        "id": i,
        "given_name": f"n{i}",
        "user_id": user,
        "node_key": f"nodekey:{i:064x}",
        "machine_key": f"mkey:{i:064x}",
        "disco_key": f"discokey:{i:064x}",
        "ipv4": f"100.64.0.{i}",
        "ipv6": f"fd7a:115c:a1e0::{i}",
        "endpoints": (f"192.0.2.{i}:41641",),
        "home_derp": 999,
        "online": True,
    }
    base.update(kw)
    return PeerNode(**base)


@dataclass
class View:
    """A TailnetView the test drives by hand (the coordinator's role)."""

    peers: dict[int, PeerNode] = field(default_factory=dict)
    entries: dict[int, NodeEntry] = field(default_factory=dict)
    visible: dict[int, frozenset[int]] = field(default_factory=dict)
    filters: dict[int, bytes] = field(default_factory=dict)
    ssh: dict[int, bytes | None] = field(default_factory=dict)
    derp: tuple[int, bytes] = (1, b'{"Regions":{}}')
    dns: tuple[int, bytes] = (1, b'{"Proxied":true}')
    first_map_cache: FirstMapCache = field(default_factory=FirstMapCache)
    deltas: SharedDeltas = field(default_factory=SharedDeltas)
    everyone: frozenset[int] | None = None

    def first_maps(self) -> FirstMapCache:
        return self.first_map_cache

    def shared_deltas(self) -> SharedDeltas:
        return self.deltas

    def routers(self) -> set[int]:
        return {i for i, e in self.entries.items() if e.for_viewer is not None}

    def put(self, n: PeerNode) -> None:
        old = self.peers.get(n.id)
        prev = self.entries.get(n.id)
        version = prev.version + 1 if prev else 1
        patches = dict(prev.patches) if prev else {}
        patch = patch_between(old, n) if old is not None else None
        if patch is None:
            patches = {}
        else:
            patches[version] = patch
        patches = {v: p for v, p in patches.items() if v > version - PATCH_HISTORY}
        self.peers[n.id] = n
        self.first_map_cache.changed(n.id)
        self.deltas.changed()
        self.entries[n.id] = NodeEntry(
            id=n.id,
            user_id=n.user_id,
            version=version,
            json=encode_node(n, "tail.example"),
            visible_to_peers=n.has_disco,
            patches=patches,
        )

    def entry(self, node_id: int) -> NodeEntry | None:
        return self.entries.get(node_id)

    def visible_peers(self, node_id: int) -> frozenset[int]:
        """As Tailnet: one set for every node with the same view (it may hold the node)."""
        if node_id in self.visible:
            return self.visible[node_id]
        if self.everyone is None or len(self.everyone) != len(self.entries):
            self.everyone = frozenset(self.entries)
        return self.everyone

    def filter_json(self, node_id: int) -> bytes:
        return self.filters.get(node_id, ALLOW_ALL)

    def ssh_json(self, node_id: int) -> bytes | None:
        return self.ssh.get(node_id)

    def user_profile(self, user_id: int) -> dict[str, Any] | None:
        return {"ID": user_id, "LoginName": f"user{user_id}", "DisplayName": f"User {user_id}"}

    def derp_map_json(self) -> tuple[int, bytes]:
        return self.derp

    def dns_json(self) -> tuple[int, bytes]:
        return self.dns


def setup(n: int = 3) -> tuple[View, MapSessionState, dict[str, Any]]:
    view = View()
    for i in range(1, n + 1):
        view.put(peer(i, user=1 if i < 3 else 2))
    s = MapSessionState(node_id=1, domain="tail.example")
    first = s.next_message(view, NOW)
    assert first is not None
    return view, s, json.loads(message_json(first))


def send(view: View, s: MapSessionState) -> dict[str, Any] | None:
    msg = s.next_message(view, NOW)
    if msg is None:
        return None
    tailcfg.MapResponse.from_json(json.loads(message_json(msg)))  # Go field names/types
    return json.loads(message_json(msg))


def test_first_map_is_complete_and_go_compatible() -> None:
    view, s, first = setup()
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
    for key in ("PeersChanged", "PeersRemoved", "PeersChangedPatch"):
        assert key not in first
    assert first["Node"]["ID"] == 1
    assert [p["ID"] for p in first["Peers"]] == [2, 3]
    assert first["Domain"] == "tail.example"
    assert first["Debug"] == {"DisableLogTail": True}
    assert {p["ID"] for p in first["UserProfiles"]} == {1, 2}
    resp = tailcfg.MapResponse.from_json(json.dumps(first))
    assert resp.Node is not None
    assert resp.Node.ID == 1
    assert resp.Peers is not None
    assert len(resp.Peers) == 2
    assert resp.ControlTime == NOW
    assert resp.PacketFilter is not None
    assert resp.PacketFilter[0].SrcIPs == ["*"]
    assert s.next_message(view, NOW) is None  # up to date
    s.mark_all()
    assert s.next_message(view, NOW) is None  # a re-check that finds nothing sends nothing


def test_endpoint_change_goes_out_as_a_patch() -> None:
    view, s, _ = setup()
    view.put(dataclasses.replace(view.peers[2], endpoints=("198.51.100.9:1",)))
    s.mark_peers([2])
    msg = send(view, s)
    assert msg is not None
    assert msg["PeersChangedPatch"] == [{"NodeID": 2, "Endpoints": ["198.51.100.9:1"]}]
    assert set(msg) == {"PeersChangedPatch", "ControlTime"}
    assert send(view, s) is None


def test_several_changes_coalesce_into_one_merged_patch() -> None:
    view, s, _ = setup()
    view.put(dataclasses.replace(view.peers[2], endpoints=("198.51.100.1:1",)))
    s.mark_peers([2])
    view.put(dataclasses.replace(view.peers[2], endpoints=("198.51.100.2:2",)))
    s.mark_peers([2])
    view.put(dataclasses.replace(view.peers[2], online=False, last_seen=NOW))
    s.mark_peers([2])
    msg = send(view, s)
    assert msg is not None
    assert msg["PeersChangedPatch"] == [
        {
            "NodeID": 2,
            "Endpoints": ["198.51.100.2:2"],
            "Online": False,
            "LastSeen": "2024-05-01T12:00:00Z",
        }
    ]
    assert send(view, s) is None


def test_patch_history_gap_sends_the_full_node() -> None:
    view, s, _ = setup()
    for i in range(PATCH_HISTORY + 2):
        view.put(dataclasses.replace(view.peers[2], endpoints=(f"198.51.100.{i}:1",)))
    s.mark_peers([2])
    msg = send(view, s)
    assert msg is not None
    assert "PeersChangedPatch" not in msg
    assert [p["Endpoints"] for p in msg["PeersChanged"]] == [[f"198.51.100.{PATCH_HISTORY + 1}:1"]]


def test_patch_then_full_change_sends_the_full_node() -> None:
    view, s, _ = setup()
    view.put(dataclasses.replace(view.peers[2], endpoints=("198.51.100.1:1",)))
    view.put(dataclasses.replace(view.peers[2], given_name="renamed"))
    s.mark_peers([2])
    msg = send(view, s)
    assert msg is not None
    assert [p["Name"] for p in msg["PeersChanged"]] == ["renamed.tail.example."]
    assert "PeersChangedPatch" not in msg


def test_peer_without_disco_key_is_held_back_until_it_has_one() -> None:
    view, s, _ = setup()
    view.put(peer(4, disco_key=""))
    s.mark_peers([4])
    assert send(view, s) is None
    view.put(peer(4))
    s.mark_peers([4])
    msg = send(view, s)
    assert msg is not None
    assert [p["ID"] for p in msg["PeersChanged"]] == [4]


def test_new_peer_of_a_new_user_brings_its_profile_once() -> None:
    view, s, _ = setup()
    view.put(peer(4, user=9))
    s.mark_peers([4])
    msg = send(view, s)
    assert msg is not None
    assert [p["ID"] for p in msg["PeersChanged"]] == [4]
    assert msg["UserProfiles"] == [{"ID": 9, "LoginName": "user9", "DisplayName": "User 9"}]
    view.put(peer(5, user=9))
    s.mark_peers([5])
    msg = send(view, s)
    assert msg is not None
    assert "UserProfiles" not in msg


def test_removed_and_hidden_peers_go_in_peers_removed() -> None:
    view, s, _ = setup()
    del view.entries[3]
    s.mark_peers([3])
    msg = send(view, s)
    assert msg == {"PeersRemoved": [3], "ControlTime": "2024-05-01T12:00:00Z"}
    view.visible[1] = frozenset()
    s.mark_all()
    msg = send(view, s)
    assert msg is not None
    assert msg["PeersRemoved"] == [2]


def test_self_change_sends_node_only() -> None:
    view, s, _ = setup()
    view.put(dataclasses.replace(view.peers[1], endpoints=("198.51.100.7:1",)))
    s.mark_self()
    msg = send(view, s)
    assert msg is not None
    assert msg["Node"]["Endpoints"] == ["198.51.100.7:1"]
    assert set(msg) == {"Node", "ControlTime"}


def test_empty_filter_is_sent_as_block_all() -> None:
    view, s, _ = setup()
    view.filters[1] = b"[]"
    s.mark_all()
    msg = send(view, s)
    assert msg is not None
    assert msg["PacketFilter"] == []  # present but empty: the client blocks all inbound


def test_derp_and_dns_changes_are_resent() -> None:
    view, s, _ = setup()
    view.derp = (2, b'{"Regions":{"900":null}}')
    view.dns = (2, b'{"Proxied":false}')
    s.mark_self()
    msg = send(view, s)
    assert msg is not None
    assert set(msg) == {"DERPMap", "DNSConfig", "ControlTime"}


def test_revoked_ssh_policy_is_replaced_not_left_in_place() -> None:
    view, s, _ = setup()
    rules = (
        b'{"rules":[{"principals":[{"any":true}],"sshUsers":{"*":"="},"action":{"accept":true}}]}'
    )
    view.ssh[1] = rules
    s.mark_all()
    msg = send(view, s)
    assert msg is not None
    assert msg["SSHPolicy"]["rules"][0]["action"] == {"accept": True}
    # An absent SSHPolicy means "unchanged" to the client: revoking must send an empty policy.
    view.ssh[1] = None
    s.mark_all()
    msg = send(view, s)
    assert msg is not None
    assert msg.get("SSHPolicy") == {"rules": []}


def test_netinfo_only_change_sends_nothing_to_peers() -> None:
    view, s, _ = setup()
    hostinfo = {
        **view.peers[2].hostinfo,
        "NetInfo": {"PreferredDERP": 999, "DERPLatency": {"999-v4": 0.01}},
    }
    view.put(dataclasses.replace(view.peers[2], hostinfo=hostinfo))
    s.mark_peers([2])
    assert send(view, s) is None
    view.put(dataclasses.replace(view.peers[2], endpoints=("198.51.100.9:1",)))
    s.mark_peers([2])
    msg = send(view, s)
    assert msg is not None
    assert msg["PeersChangedPatch"] == [{"NodeID": 2, "Endpoints": ["198.51.100.9:1"]}]


def test_a_big_first_map_goes_in_pieces_that_other_maps_share() -> None:
    """Issue 10 (storms): a first map of SEGMENT_MIN_PEERS or more peers is sent as pieces
    (protocol.mapframe.Segmented) whose JSON is the same map; two nodes' first maps
    share every piece but the one holding each node itself, so a storm compresses the
    tailnet's peers once instead of once per node."""
    from netmap.mapsession import PIECE_SPAN, SEGMENT_MIN_PEERS
    from protocol.mapframe import MapFrameDecoder, MapFrameEncoder, Segmented

    n = SEGMENT_MIN_PEERS + PIECE_SPAN + 5
    view = View()
    for i in range(1, n + 1):
        view.put(peer(i))
    a = MapSessionState(node_id=1, domain="tail.example").next_message(view, NOW)
    b = MapSessionState(node_id=n, domain="tail.example").next_message(view, NOW)
    assert isinstance(a, Segmented)
    assert isinstance(b, Segmented)
    got = json.loads(message_json(a))
    tailcfg.MapResponse.from_json(got)
    assert [p["ID"] for p in got["Peers"]] == list(range(2, n + 1))
    assert (got["Node"]["ID"], got["Domain"]) == (1, "tail.example")
    assert "PacketFilter" in got
    # One piece per span of ids; each node's own span is its own (not shared, no key).
    spans = -(-n // PIECE_SPAN)
    assert len(a.pieces) == len(b.pieces) == spans + 2  # with the head and the tail
    keyed_a = {k for k, _ in a.pieces if k is not None}
    keyed_b = {k for k, _ in b.pieces if k is not None}
    assert len(keyed_a) == len(keyed_b) == spans - 1
    assert len(keyed_a & keyed_b) == spans - 2  # all but the spans holding 1 and n

    # On the wire: one frame per piece; the shared ones are compressed once and decode,
    # frames concatenated, to the whole map (as the Go client's DecodeAll does).
    enc = MapFrameEncoder()
    wire_a, wire_b = enc.encode(a), enc.encode(b)
    dec = MapFrameDecoder()
    dec.receive_data(wire_a + wire_b)
    assert dec.next_message() == message_json(a)
    assert dec.next_message() == message_json(b)
    assert wire_a.count(b"\x28\xb5\x2f\xfd") == len(a.pieces)

    # A peer's change gives its piece a new key; a small first map stays one text.
    view.put(dataclasses.replace(view.peers[70], endpoints=("192.0.2.7:41641",)))
    c = MapSessionState(node_id=1, domain="tail.example").next_message(view, NOW)
    assert isinstance(c, Segmented)
    assert len({k for k, _ in c.pieces if k is not None} - keyed_a) == 1
    small = View()
    for i in range(1, 4):
        small.put(peer(i))
    assert isinstance(MapSessionState(node_id=1, domain="x").next_message(small, NOW), bytes)


def test_peer_versions_hold_what_a_dict_would() -> None:
    """Issue 10 (memory): what a session sent is kept in an array by id; it answers
    like the dict it replaced, also for ids and versions too big for the array."""
    from netmap.mapsession import PeerVersions

    pv, ref = PeerVersions(), {}
    big_id, big_version = PeerVersions.DENSE_IDS + 5, PeerVersions.MAX_VERSION + 1
    for pid, version in [(3, 1), (70, 2), (3, 4), (big_id, 1), (9, big_version), (0, 7)]:
        pv[pid] = version
        ref[pid] = version
    del pv[70]
    del ref[70]
    del pv[12345]  # never sent: nothing to forget
    assert {p: pv.get(p) for p in pv} == ref
    assert len(pv) == len(ref)
    assert 70 not in pv
    assert pv.get(70) is None
    assert pv.get(big_id) == 1
    assert pv.get(9) == big_version
    pv[9] = 2  # back into the array
    assert pv.get(9) == 2
    assert sorted(pv) == sorted({**ref, 9: 2})


def test_shared_peer_versions_are_copied_on_write() -> None:
    """Sessions in step share one array of versions; a write by one of them (a peer it
    alone was sent) never shows in another's, and sparse entries are never shared."""
    from array import array

    from netmap.mapsession import PeerVersions

    a, b = PeerVersions(), PeerVersions()
    for pid in (1, 2, 40):
        a[pid] = 3
        b[pid] = 3
    assert len(a.share() or ()) == PeerVersions.MIN_LENGTH
    shared = a.share()
    assert shared is not None
    assert b.same(shared)  # equal contents, equal lengths
    b.adopt(shared)
    b[2] = 9
    del b[1]
    b.set_span(64, array("I", [5, 5]))
    assert (a.get(1), a.get(2), a.get(64)) == (3, 3, None)
    assert (b.get(1), b.get(2), b.get(64), b.get(65)) == (None, 9, 5, 5)
    a[1] = 4  # the array it shared is now b's old one: a copies too
    assert shared[1] == 3
    assert not a.same(shared)
    a[PeerVersions.DENSE_IDS + 1] = 1
    assert a.share() is None


def _moved(view: View, pid: int, endpoint: str) -> None:
    view.put(dataclasses.replace(view.peers[pid], endpoints=(endpoint,)))


def test_sessions_reading_the_same_log_range_share_one_delta() -> None:
    """Issue 10 (churn): sessions that read the same range of the shared change log, with
    the same peers sent, send one composed delta; a session that differs (a peer version
    behind, its own node in the range, a new user's profile due, a router's routes per
    viewer) composes its own, and every client still gets exactly what it is missing."""
    view = View()
    for i in range(1, 9):
        view.put(peer(i, user=1))
    sessions = {nid: MapSessionState(node_id=nid, domain="tail.example") for nid in range(1, 9)}
    for s in sessions.values():
        assert s.next_message(view, NOW) is not None
    # Node 4 missed an earlier change of peer 6 (say it was marked, and not yet woken): a
    # rename, which no patch carries.
    view.put(dataclasses.replace(view.peers[6], given_name="renamed"))
    for nid, s in sessions.items():
        if nid != 4:
            s.mark_peers([6])
            assert s.next_message(view, NOW) is not None
    _moved(view, 5, "198.51.100.5:5")
    _moved(view, 6, "198.51.100.6:6")
    msgs = {}
    for nid, s in sessions.items():
        msgs[nid] = s.next_message(view, NOW, LogRead(10, 12, [5, 6]))
    twin = msgs[1]
    assert isinstance(twin, bytes)
    assert [n for n in msgs if msgs[n] is twin] == [1, 2, 3, 7, 8]  # composed once
    for nid, msg in msgs.items():
        assert msg is not None
        got = json.loads(message_json(msg))
        tailcfg.MapResponse.from_json(got)
        patches = {p["NodeID"]: p for p in got.get("PeersChangedPatch", [])}
        whole = {p["ID"]: p for p in got.get("PeersChanged", [])}
        for pid, endpoint in ((5, "198.51.100.5:5"), (6, "198.51.100.6:6")):
            if pid == nid:  # a node is never its own peer
                assert pid not in patches
                assert pid not in whole
            elif nid == 4 and pid == 6:  # behind: the whole node, with its new name
                assert whole[6]["Endpoints"] == [endpoint]
                assert whole[6]["Name"].startswith("renamed.")
            else:
                assert patches[pid]["Endpoints"] == [endpoint], nid
    # The versions each session now holds are the peers' latest: nothing more to send.
    for s in sessions.values():
        assert s.next_message(view, NOW, LogRead(12, 14, [5, 6])) is None

    # A node becomes visible (its disco key arrives): the others get it whole; the node
    # itself, which already sent its own new state, gets nothing of itself.
    view.put(dataclasses.replace(view.peers[8], disco_key=""))
    for s in sessions.values():
        s.mark_peers([8])
        s.next_message(view, NOW)
    view.put(peer(8, user=1))
    assert sessions[8].next_message(view, NOW) is not None  # its own Node, not via the log
    for nid in (1, 2, 8):
        msg = sessions[nid].next_message(view, NOW, LogRead(13, 14, [8]))
        if nid == 8:
            assert msg is None
        else:
            assert msg is not None
            assert [p["ID"] for p in json.loads(message_json(msg))["PeersChanged"]] == [8]

    # A new user's node: each session needs that profile, so none shares a delta.
    view.put(peer(9, user=3))
    for s in sessions.values():
        msg = s.next_message(view, NOW, LogRead(14, 15, [9]))
        assert msg is not None
        assert [p["ID"] for p in json.loads(message_json(msg))["UserProfiles"]] == [3]


def test_a_shared_delta_is_not_reused_once_a_node_changed() -> None:
    """A delta is the peers' state when it was composed: any change since voids it (the
    coordinator tells SharedDeltas of every change), so a late reader of the same range
    sends the newer endpoint, not the shared bytes."""
    view = View()
    for i in range(1, 4):
        view.put(peer(i, user=1))
    a = MapSessionState(node_id=1, domain="tail.example")
    b = MapSessionState(node_id=2, domain="tail.example")
    for s in (a, b):
        assert s.next_message(view, NOW) is not None
    _moved(view, 3, "198.51.100.3:1")
    first = a.next_message(view, NOW, LogRead(0, 1, [3]))
    _moved(view, 3, "198.51.100.3:2")
    late = b.next_message(view, NOW, LogRead(0, 1, [3]))
    assert late is not None
    assert late is not first
    patch = json.loads(message_json(late))["PeersChangedPatch"]
    assert patch == [{"NodeID": 3, "Endpoints": ["198.51.100.3:2"]}]
