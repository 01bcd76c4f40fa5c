"""Node addresses as joins see them: handed out in order, never twice, from a store that
keeps the used addresses in memory (issue 10: a join no longer reads every node)."""

from __future__ import annotations

import dataclasses
import ipaddress
import random
from collections.abc import Iterator

import pytest

from appliance.config import Config, load_config
from appliance.errors import Conflict, InvalidInput
from appliance.nodes import Login, log_in
from appliance.store import NodeRow, Store
from tests.appliance.conftest import Site


@pytest.fixture
def config(site: Site) -> Config:
    return load_config(site.config_path, environ={})


@pytest.fixture
def store(site: Site) -> Iterator[Store]:
    s = Store(site.db_path)
    yield s
    s.close()


def join(store: Store, config: Config, i: int) -> NodeRow:
    """A new machine registers (a fresh node, as a pre-auth key login makes)."""
    owner = store.user_by_name("alice") or store.create_user("alice")
    login = Login(node_key=f"nodekey:{i:064x}", hostinfo={"Hostname": f"n{i}"}, user_id=owner.id)
    return log_in(store, config, f"mkey:{i:064x}", None, login)


def sql_addresses(store: Store) -> tuple[set[str], set[str]]:
    rows = store.db.execute("SELECT ipv4, ipv6 FROM nodes").fetchall()
    return {a for a, _ in rows if a}, {b for _, b in rows if b}


def small(config: Config, prefix: str) -> Config:
    return dataclasses.replace(config, prefix_v4=ipaddress.IPv4Network(prefix))


def test_joins_get_addresses_in_order(store: Store, config: Config) -> None:
    rows = [join(store, config, i) for i in range(1, 4)]
    assert [r.ipv4 for r in rows] == ["100.64.0.1", "100.64.0.2", "100.64.0.3"]
    assert [r.ipv6 for r in rows] == ["fd7a:115c:a1e0::1", "fd7a:115c:a1e0::2", "fd7a:115c:a1e0::3"]


def test_a_deleted_nodes_address_waits_for_the_wrap(store: Store, config: Config) -> None:
    """As headscale: the next join takes the address after the last one, not the hole."""
    rows = [join(store, config, i) for i in range(1, 4)]
    store.delete_node(rows[1].id)
    assert store.used_addresses()[0] == {"100.64.0.1", "100.64.0.3"}
    assert join(store, config, 4).ipv4 == "100.64.0.4"
    assert join(store, config, 5).ipv6 == "fd7a:115c:a1e0::5"


def test_a_restarted_store_scans_from_the_start_again(site: Site, config: Config) -> None:
    """headscale's cursor starts at the prefix start when it starts: the hole is reused."""
    s = Store(site.db_path)
    rows = [join(s, config, i) for i in range(1, 5)]
    s.delete_node(rows[1].id)
    s.close()
    s = Store(site.db_path)
    try:
        assert s.used_addresses()[0] == {"100.64.0.1", "100.64.0.3", "100.64.0.4"}
        assert join(s, config, 5).ipv4 == "100.64.0.2"
        assert join(s, config, 6).ipv4 == "100.64.0.5"
    finally:
        s.close()


def test_a_full_prefix_refuses_the_join_and_wraps_once_freed(store: Store, config: Config) -> None:
    cfg = small(config, "100.64.0.0/29")  # usable: .1 to .6
    rows = [join(store, cfg, i) for i in range(1, 7)]
    assert [r.ipv4 for r in rows] == [f"100.64.0.{i}" for i in range(1, 7)]
    with pytest.raises(
        InvalidInput,
        match=r"cannot register the node: no free address left in 100\.64\.0\.0/29: "
        r"all 6 usable addresses are taken",
    ):
        join(store, cfg, 7)
    store.delete_node(rows[2].id)
    assert join(store, cfg, 8).ipv4 == "100.64.0.3"


def half_join(store: Store, config: Config, user_id: int | None) -> None:
    assert config.prefix_v4 is not None
    with store.transaction():
        store.create_node(
            machine_key="mkey:rolled-back",
            node_key="nodekey:rolled-back",
            given_name="rolled-back",
            user_id=user_id,
            ipv4=store.fresh_address(config.prefix_v4, "sequential"),
        )
        raise RuntimeError("a later write of the same registration failed")


def test_a_rolled_back_join_frees_its_address(store: Store, config: Config) -> None:
    first = join(store, config, 1)
    login = Login(node_key="nodekey:" + "f" * 64, user_id=first.user_id)
    with pytest.raises(Conflict):  # the machine key is taken: the insert fails
        log_in(store, config, first.machine_key, None, login)
    with pytest.raises(RuntimeError, match="later write"):  # inserted, then rolled back
        half_join(store, config, first.user_id)
    assert store.used_addresses() == ({"100.64.0.1"}, {"fd7a:115c:a1e0::1"})
    assert join(store, config, 3).ipv4 == "100.64.0.4"  # .2 and .3 wait for the wrap


def test_readdressing_a_node_is_tracked(store: Store, config: Config) -> None:
    """Backfill and doctor change a node's addresses through update_node."""
    row = join(store, config, 1)
    assert store.used_addresses()[0] == {"100.64.0.1"}
    store.update_node(row.id, ipv4="100.64.0.9", ipv6=None)
    assert store.used_addresses() == ({"100.64.0.9"}, set())
    store.update_node(row.id, given_name="renamed")  # no address change
    assert store.used_addresses() == ({"100.64.0.9"}, set())


def test_another_connections_commit_is_seen(site: Site, store: Store, config: Config) -> None:
    """`homescale doctor --fix` writes beside the running server (its own connection)."""
    first = join(store, config, 1)
    other = Store(site.db_path)
    try:
        other.create_node(
            machine_key="mkey:other",
            node_key="nodekey:other",
            given_name="other",
            user_id=first.user_id,
            ipv4="100.64.0.2",
        )
    finally:
        other.close()
    assert store.used_addresses()[0] == {"100.64.0.1", "100.64.0.2"}
    assert join(store, config, 2).ipv4 == "100.64.0.3"


def test_a_migrated_database_is_read_as_it_is(site: Site, config: Config) -> None:
    """Rows written with SQL (the headscale import, a restored file) before first use."""
    s = Store(site.db_path)
    uid = s.create_user("alice").id
    for i, addr in enumerate(("100.64.0.1", "100.64.0.2", "100.64.0.5"), 1):
        s.db.execute(
            "INSERT INTO nodes (machine_key, node_key, given_name, user_id, ipv4, created_at, "
            "updated_at) VALUES (?, ?, ?, ?, ?, '', '')",
            [f"mkey:{i}", f"nodekey:{i}", f"m{i}", uid, addr],
        )
    try:
        assert [join(s, config, i).ipv4 for i in (10, 11, 12)] == [
            "100.64.0.3",
            "100.64.0.4",
            "100.64.0.6",
        ]
    finally:
        s.close()


def test_addresses_stay_unique_through_joins_deletes_and_reopens(
    site: Site, config: Config
) -> None:
    """A random run on a /28 (14 addresses): the memory always matches the rows."""
    rng = random.Random(10)
    cfg = small(config, "100.64.0.0/28")
    s = Store(site.db_path)
    try:
        for i in range(300):
            step = rng.random()
            nodes = s.nodes()
            if step < 0.05:
                s.close()
                s = Store(site.db_path)
            elif step < 0.45 and nodes:
                s.delete_node(rng.choice(nodes).id)
            elif len(nodes) < 14:
                join(s, cfg, i)
            else:
                with pytest.raises(InvalidInput, match="no free address left"):
                    join(s, cfg, i)
            v4, v6 = sql_addresses(s)
            assert s.used_addresses() == (v4, v6)
            assert len(v4) == len(v6) == len(s.nodes())
    finally:
        s.close()


def test_used_addresses_reads_no_rows(store: Store, config: Config) -> None:
    join(store, config, 1)
    store.used_addresses()
    seen: list[str] = []
    store._conn.set_trace_callback(seen.append)
    try:
        assert store.used_addresses()[0] == {"100.64.0.1"}
        assert join(store, config, 2).ipv4 == "100.64.0.2"
    finally:
        store._conn.set_trace_callback(None)
    assert not [q for q in seen if "SELECT ipv4, ipv6 FROM nodes" in q and "WHERE" not in q]
    assert seen  # the trace saw the join's own statements
