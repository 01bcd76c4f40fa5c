"""The real-client tests' own helpers (tests/realclient.py), checked without a client."""

from __future__ import annotations

from tests.realclient import _not_echoes


def test_a_nodes_own_report_echoed_back_is_not_counted_as_sent() -> None:
    """`assert_nothing_sent` asks whether a change (a policy edit) sent a node anything;
    the node's own entry echoed after a NetInfo report of its own is not that, while
    anything else is."""
    node = {"ID": 2, "Name": "alicepc.", "CapMap": {}, "Hostinfo": {"NetInfo": {"x": 1}}}
    before = [{"Node": node, "Peers": []}]
    echo = {"Node": {**node, "Hostinfo": {"NetInfo": {"x": 2}}, "Endpoints": ["a"]}}
    caps = {"Node": {**node, "CapMap": {"cap": []}}}
    peers = {"Node": node, "PeersChanged": [{"ID": 3}]}
    assert _not_echoes(before, [echo]) == []
    assert _not_echoes(before, [caps]) == [caps]
    assert _not_echoes(before, [peers]) == [peers]
    assert _not_echoes([], [echo]) == [echo]  # nothing to compare with: counted
    assert _not_echoes(before, [echo, caps, {"Node": caps["Node"]}]) == [caps]
