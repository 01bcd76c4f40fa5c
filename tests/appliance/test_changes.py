"""One write path: store writes record typed changes, one `Tailnet.apply` announces them."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from appliance.boundary import Boundary
from appliance.changes import Change, NodeChanged, NodeRemoved, PolicyChanged, UserChanged
from appliance.metrics import Metrics
from appliance.nodes import Login, log_in
from appliance.serve import Server
from appliance.store import NodeRow, Store
from netmap import nodes as netmap_nodes
from protocol import tailcfg
from tests.appliance.test_tailnet_support import compose, connect, make_tailnet, node, user


def test_writes_record_what_they_committed(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    try:
        result, changes = store.recorded(store.create_user, "alice")
        alice = result.unwrap()
        assert changes == [UserChanged(alice)]
        uid = alice.id
        row, changes = store.recorded(
            lambda: store.create_node(
                machine_key="mkey:1", node_key="nodekey:1", given_name="one", user_id=uid
            )
        )
        created = row.unwrap()
        assert changes == [NodeChanged(created)]
        result2, changes = store.recorded(lambda: store.update_node(created.id, given_name="uno"))
        renamed = result2.unwrap()
        assert changes == [NodeChanged(renamed)]
        assert renamed.given_name == "uno"
        _, changes = store.recorded(store.set_policy, "{}")
        assert changes == [PolicyChanged("{}")]
        _, changes = store.recorded(store.delete_node, created.id)
        assert changes == [NodeRemoved(created.id)]
    finally:
        store.close()


def test_a_rolled_back_write_announces_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")

    def fails_inside_a_transaction() -> None:
        with store.transaction():
            store.create_user("alice")
            raise RuntimeError("boom")

    try:
        result, changes = store.recorded(fails_inside_a_transaction)
        assert changes == []
        with pytest.raises(RuntimeError):
            result.unwrap()
        assert store.users() == []
    finally:
        store.close()


def test_a_call_that_fails_after_committing_still_hands_out_its_change(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")

    def commits_then_fails() -> None:
        store.create_user("alice")
        raise RuntimeError("after the commit")

    try:
        result, changes = store.recorded(commits_then_fails)
        with pytest.raises(RuntimeError):
            result.unwrap()
        (change,) = changes
        assert isinstance(change, UserChanged)
        assert change.row.name == "alice"
    finally:
        store.close()


def test_one_failing_change_is_logged_and_the_rest_still_apply(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    tn = make_tailnet([user(1, "alice")], [node(1), node(2), node(3)])
    # A logger created now: an earlier test's logging set-up may have disabled older ones.
    metrics = Metrics()
    tn.boundary = Boundary(logging.getLogger(f"test.changes.{id(tn)}"), metrics)
    h1, _ = connect(tn, 1)
    real = netmap_nodes.encode_node

    def encode_node(n: netmap_nodes.PeerNode, domain: str) -> bytes:
        if n.id == 2:
            raise RuntimeError("a bug encoding node 2")
        return real(n, domain)

    monkeypatch.setattr("appliance.nodeentries.encode_node", encode_node)
    bad = NodeChanged(node(2, endpoints=["192.0.2.9:1"]))
    good = NodeChanged(node(3, endpoints=["192.0.2.7:41641"]))
    with caplog.at_level(logging.ERROR):
        tn.apply([bad, good])
    assert "change node 2 (node2) changed: internal error: RuntimeError: a bug" in caplog.text
    assert metrics.counters == {
        'homescale_isolated_errors_total{kind="change",cause="internal"}': 1
    }
    msg = compose(tn, h1)
    assert msg is not None
    (patch,) = msg["PeersChangedPatch"]
    assert patch["NodeID"] == 3
    assert patch["Endpoints"] == ["192.0.2.7:41641"]


async def test_an_admin_rename_and_a_reported_endpoint_take_the_same_path(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both reach peers as a NodeChanged through `Tailnet.apply`, nothing else."""
    applied: list[Change] = []
    real_apply = server.tailnet.apply

    def spy(changes: Any) -> None:
        changes = list(changes)
        applied.extend(changes)
        real_apply(changes)

    monkeypatch.setattr(server.tailnet, "apply", spy)
    user = await server.run_db(server.store.create_user, "alice")

    def register(i: int) -> NodeRow:
        login = Login(node_key=f"nodekey:{i:064x}", hostinfo={"Hostname": f"n{i}"}, user_id=user.id)
        row = log_in(server.store, server.config, f"mkey:{i:064x}", None, login)
        return server.store.update_node(row.id, disco_key=f"discokey:{i:064x}")

    a = await server.run_db(register, 1)
    b = await server.run_db(register, 2)
    handle, first = connect(server.tailnet, b.id)
    assert [p["Name"].split(".")[0] for p in first["Peers"]] == [a.given_name]

    applied.clear()
    await server.run_db(server.admin.rename_node, str(a.id), "renamed")
    assert [type(c) for c in applied] == [NodeChanged]
    msg = compose(server.tailnet, handle)
    assert msg is not None
    (peer,) = msg["PeersChanged"]
    assert peer["Name"].startswith("renamed.")

    applied.clear()
    assert server.control is not None
    report = tailcfg.MapRequest.from_json(
        {"NodeKey": a.node_key, "Endpoints": ["198.51.100.7:41641"], "OmitPeers": True}
    )
    await server.control._store_report(server.tailnet.nodes[a.id], report)
    assert [type(c) for c in applied] == [NodeChanged]
    msg = compose(server.tailnet, handle)
    assert msg is not None
    (patch,) = msg["PeersChangedPatch"]
    assert patch == {"NodeID": a.id, "Endpoints": ["198.51.100.7:41641"]}
