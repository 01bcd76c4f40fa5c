"""Issue 9 item 3: a stored row that cannot be served is quarantined; the server starts and
serves everyone else; `homescale doctor` lists the row and `--fix` repairs it."""

from __future__ import annotations

import logging

import pytest
import trio

from appliance.changes import NodeChanged
from appliance.config import load_config
from appliance.quarantine import node_row_problems
from appliance.serve import serve
from appliance.store import NodeRow, Store

from .conftest import LOG, START_TIMEOUT, Site, run_cli
from .test_tailnet_support import compose, connect, make_tailnet, node, user

# Routes the policy has to place: autoApprovers make it read every node's routes.
POLICY = """{
  "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
  "autoApprovers": {"routes": {"10.0.0.0/8": ["alice@"]}}
}"""


def poison(store: Store) -> tuple[NodeRow, NodeRow]:
    """A good node and one whose stored Hostinfo.RoutableIPs holds no prefix (written
    directly, as an older homescale stored what clients sent)."""
    alice = store.create_user("alice")
    good = store.create_node(
        machine_key=f"mkey:{1:064x}",
        node_key=f"nodekey:{1:064x}",
        disco_key=f"discokey:{1:064x}",
        given_name="good",
        ipv4="100.64.0.1",
        user_id=alice.id,
    )
    bad = store.create_node(
        machine_key=f"mkey:{2:064x}",
        node_key=f"nodekey:{2:064x}",
        disco_key=f"discokey:{2:064x}",
        given_name="poisoned",
        ipv4="100.64.0.2",
        user_id=alice.id,
        hostinfo={"Hostname": "poisoned", "RoutableIPs": ["10.1.0.0/16", "not-a-prefix"]},
    )
    store.set_policy(POLICY)
    return good, bad


async def test_server_starts_with_a_poisoned_row_and_doctor_repairs_it(
    site: Site, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    store = site.store()
    good, bad = poison(store)
    store.close()
    config = load_config(site.config_path, environ={})

    with caplog.at_level(logging.WARNING):
        async with trio.open_nursery() as nursery:
            with trio.fail_after(START_TIMEOUT):
                srv = await nursery.start(serve, config, LOG)
            assert set(srv.tailnet.nodes) == {good.id}
            assert set(srv.tailnet.quarantined) == {bad.id}
            # The others are served: the good node's map is complete, without the bad one.
            _, first = connect(srv.tailnet, good.id)
            assert first["Node"]["Name"].startswith("good.")
            assert "Peers" not in first or first["Peers"] == []
            listed = await trio.to_thread.run_sync(lambda: run_cli(capsys, site, "doctor"))
            nursery.cancel_scope.cancel()
    assert f"node {bad.id} (poisoned): Hostinfo.RoutableIPs[1] 'not-a-prefix'" in caplog.text
    assert listed.code == 1
    assert "Hostinfo.RoutableIPs[1]" in listed.out
    assert "not-a-prefix" in listed.out
    assert "doctor --fix" in listed.out

    fixed = run_cli(capsys, site, "doctor", "--fix")
    assert fixed.code == 0, fixed.err
    assert f"repaired nodes: {bad.id}" in fixed.out
    again = run_cli(capsys, site, "doctor")
    assert again.code == 0
    assert "every stored node can be served" in again.out
    store = site.store()
    try:
        # Only the bad entry went: the valid route the node advertised is kept.
        assert store.node(bad.id).hostinfo["RoutableIPs"] == ["10.1.0.0/16"]
    finally:
        store.close()

    async with trio.open_nursery() as nursery:
        with trio.fail_after(START_TIMEOUT):
            srv = await nursery.start(serve, config, LOG)
        assert set(srv.tailnet.nodes) == {good.id, bad.id}
        assert srv.tailnet.quarantined == {}
        nursery.cancel_scope.cancel()


def test_doctor_json_names_node_field_and_value(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    store = site.store()
    _, bad = poison(store)
    store.update_node(bad.id, endpoints=["1.2.3.4:70000", "192.0.2.1:41641"], ipv4="300.1.2.3")
    store.close()
    result = run_cli(capsys, site, "doctor", "-o", "json")
    assert result.code == 1
    found = {(p["id"], p["field"]) for p in result.json()["problems"]}
    assert found == {
        (bad.id, "Hostinfo.RoutableIPs[1]"),
        (bad.id, "endpoints[0]"),
        (bad.id, "ipv4"),
    }
    fixed = run_cli(capsys, site, "doctor", "--fix")
    assert fixed.code == 0, fixed.err
    store = site.store()
    try:
        row = store.node(bad.id)
        assert row.endpoints == ["192.0.2.1:41641"]
        assert row.ipv4 is not None
        assert row.ipv4 not in ("300.1.2.3", "100.64.0.1")  # a fresh, free address
        assert node_row_problems(row) == []
    finally:
        store.close()


def test_a_row_that_turns_bad_at_runtime_leaves_the_tailnet_until_repaired() -> None:
    tn = make_tailnet([user(1, "alice")], [node(1), node(2)], POLICY)
    h1, _ = connect(tn, 1)
    good_hostinfo = tn.nodes[2].hostinfo
    tn.apply([NodeChanged(node(2, hostinfo={**good_hostinfo, "RoutableIPs": ["not-a-prefix"]}))])
    assert 2 not in tn.nodes
    assert [p.field for p in tn.quarantined[2].problems] == ["Hostinfo.RoutableIPs[0]"]
    msg = compose(tn, h1)
    assert msg is not None
    assert msg["PeersRemoved"] == [2]
    # The next valid record brings it back.
    tn.apply([NodeChanged(node(2))])
    assert 2 in tn.nodes
    assert tn.quarantined == {}
    msg = compose(tn, h1)
    assert msg is not None
    assert [p["ID"] for p in msg["PeersChanged"]] == [2]
