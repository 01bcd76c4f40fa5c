"""`homescale migrate headscale` against headscale's own database dumps (tests/fixtures/headscale).

Every dump headscale keeps of its databases must import, with the counts, keys,
addresses and edge cases (null tags, zero-time expiry, a dangling auth key id)
checked row by row; the source file is never changed; imported pre-auth and API
keys still work.
"""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import bcrypt
import pytest

from appliance.admin import Admin
from appliance.secrets import needs_rehash
from protocol.keys import PrivateKey, read_private_key_file, write_private_key_file

from .conftest import Site, run_cli

FIXTURES = Path(__file__).parent.parent / "fixtures" / "headscale"
DUMPS = sorted(p.name for p in FIXTURES.glob("*.sql") if p.name != "schema.sql")


def headscale_db(dir: Path, dump: str, extra_sql: str = "") -> Path:
    """A headscale database file made from one of headscale's dumps (or its schema)."""
    dir.mkdir(parents=True, exist_ok=True)
    db = dir / "db.sqlite"
    conn = sqlite3.connect(db)
    conn.executescript((FIXTURES / dump).read_text() + extra_sql)
    conn.commit()
    conn.close()
    return db


def live_rows(db: Path, table: str) -> list[sqlite3.Row]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    cols = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
    where = " WHERE deleted_at IS NULL" if "deleted_at" in cols else ""
    rows = conn.execute(f"SELECT * FROM {table}{where} ORDER BY id").fetchall()
    conn.close()
    return rows


def digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def headscale_key(dir: Path) -> tuple[Path, PrivateKey]:
    key = PrivateKey.generate()
    path = dir / "noise_private.key"
    write_private_key_file(path, key)
    return path, key


@pytest.mark.parametrize("dump", DUMPS)
def test_every_headscale_dump_imports(
    dump: str, site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = headscale_db(tmp_path / "headscale", dump)
    key_path, key = headscale_key(tmp_path / "headscale")
    before = digest(src)

    r = run_cli(
        capsys, site, "-o", "json", "migrate", "headscale", "--db", str(src), "--noise-key",
        str(key_path),
    )  # fmt: skip
    assert r.code == 0, r.err
    report = r.json()
    users, nodes = live_rows(src, "users"), live_rows(src, "nodes")
    assert report["counts"]["users"] == len(users)
    assert report["counts"]["nodes"] == len(nodes)

    # The source is only read: same bytes, no journal left beside it.
    assert digest(src) == before
    assert sorted(p.name for p in src.parent.iterdir()) == ["db.sqlite", "noise_private.key"]

    # Clients see the same server key.
    assert read_private_key_file(site.key_path) == key

    store = site.store()
    try:
        assert [u.name for u in store.users()] == [u["name"] for u in users]
        imported = {n.id: n for n in store.nodes()}
        for row in nodes:
            n = imported[row["id"]]
            assert (n.machine_key, n.node_key, n.disco_key) == (
                row["machine_key"],
                row["node_key"],
                row["disco_key"],
            )
            assert (n.ipv4, n.ipv6) == (row["ipv4"], row["ipv6"])
            assert (n.hostname, n.given_name) == (row["hostname"], row["given_name"])
    finally:
        store.close()


def test_edge_cases_carried_as_headscale_means_them(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Zero-time expiry is "never", a JSON `null` tag list is "untagged" (owner kept),
    auth_key_id 0 is "none", legacy API keys are named as not carried over."""
    zero = headscale_db(tmp_path / "a", "zero_time_expiry_migration_test.sql")
    r = run_cli(capsys, site, "-o", "json", "migrate", "headscale", "--db", str(zero))
    assert r.code == 0, r.err
    store = site.store()
    expiry = {n.id: n.expiry for n in store.nodes()}
    store.close()
    assert expiry[1] is None
    assert expiry[2] is None
    assert expiry[5] is None
    assert expiry[3] is not None
    assert expiry[3].year == 2099
    assert expiry[4] is not None
    assert expiry[4].year == 2020

    site.db_path.unlink()
    nulls = headscale_db(tmp_path / "b", "null_tags_user_id_migration_test.sql")
    r = run_cli(capsys, site, "migrate", "headscale", "--db", str(nulls))
    assert r.code == 0, r.err
    store = site.store()
    by_id = {n.id: n for n in store.nodes()}
    store.close()
    assert (by_id[1].tags, by_id[1].user_id) == ([], 2)
    assert by_id[2].tags == ["tag:server"]
    assert (by_id[4].tags, by_id[4].user_id) == ([], 1)

    site.db_path.unlink()
    failing = headscale_db(tmp_path / "c", "failing-node-preauth-constraint_dump.sql")
    r = run_cli(capsys, site, "-o", "json", "migrate", "headscale", "--db", str(failing))
    assert r.code == 0, r.err
    report = r.json()
    assert report["counts"]["nodes"] == 6
    assert report["counts"]["api_keys"] == 0
    legacy = [s for s in report["notCarriedOver"] if "table api_keys" in s]
    assert len(legacy) == 2
    assert "hFKcRjLyfw" in legacy[0]
    store = site.store()
    assert all(n.auth_key_id is None for n in store.nodes())
    assert store.node(1).tags == ["tag:ssh", "tag:sshclient"]
    store.close()


SECRET_AUTH = "a" * 64
SECRET_API = "b" * 64


def keys_sql() -> str:
    """A user, a node that joined with a reusable pre-auth key, an API key: the rows
    headscale 0.27+ writes (bcrypt hashes of the secret after the prefix)."""
    h_auth = bcrypt.hashpw(SECRET_AUTH.encode(), bcrypt.gensalt(4)).decode()
    h_api = bcrypt.hashpw(SECRET_API.encode(), bcrypt.gensalt(4)).decode()
    return f"""
INSERT INTO users (id, name, display_name, email, created_at)
  VALUES (1, 'alice', 'Alice', 'alice@example.com', '2025-01-01 10:00:00.123456789+00:00');
INSERT INTO pre_auth_keys (id, prefix, hash, user_id, reusable, ephemeral, used, tags,
  expiration, created_at)
  VALUES (1, '0123456789ab', '{h_auth}', 1, 1, 1, 1, '[]', '2999-01-01 00:00:00+00:00',
  '2025-01-01 00:00:00+00:00');
INSERT INTO api_keys (id, prefix, hash, expiration, created_at)
  VALUES (1, 'ba9876543210', '{h_api}', '2999-01-01 00:00:00+00:00', '2025-01-01 00:00:00+00:00');
INSERT INTO nodes (id, machine_key, node_key, disco_key, endpoints, host_info, ipv4, ipv6,
  hostname, given_name, user_id, register_method, tags, auth_key_id, last_seen, expiry,
  approved_routes, created_at, updated_at)
  VALUES (7, 'mkey:{"11" * 32}', 'nodekey:{"22" * 32}', 'discokey:{"33" * 32}',
  '["192.168.1.5:41641"]', '{{"Hostname": "laptop", "RoutableIPs": ["10.1.0.0/24"]}}',
  '100.64.0.7', 'fd7a:115c:a1e0::7', 'laptop', 'alices-laptop', 1, 'authkey', '[]', 1,
  '2025-02-01 00:00:00+00:00', NULL, '["10.1.0.0/24"]', '2025-01-01 00:00:00+00:00',
  '2025-02-01 00:00:00+00:00');
INSERT INTO policies (id, data, created_at)
  VALUES (1, '{{"acls": [{{"action": "accept", "src": ["alice@"], "dst": ["*:*"]}}]}}',
  '2025-01-01 00:00:00+00:00');
"""


def test_keys_routes_and_policy_keep_working(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = headscale_db(tmp_path / "hs", "schema.sql", keys_sql())
    r = run_cli(capsys, site, "-o", "json", "migrate", "headscale", "--db", str(src))
    assert r.code == 0, r.err
    report = r.json()
    assert report["counts"] == {
        "users": 1,
        "nodes": 1,
        "pre_auth_keys": 1,
        "api_keys": 1,
        "policy": 1,
    }
    assert any("noise_key: no source key" in s for s in report["notCarriedOver"])

    store = site.store()
    try:
        n = store.node(7)
        assert n.ephemeral  # headscale keeps this on the key the node joined with
        assert n.approved_routes == ["10.1.0.0/24"]
        assert n.hostinfo["RoutableIPs"] == ["10.1.0.0/24"]
        assert n.endpoints == ["192.168.1.5:41641"]
        assert n.user_id == 1
        assert n.auth_key_id == 1
        assert n.last_seen is not None
        assert n.last_seen.month == 2
        assert store.user(1).email == "alice@example.com"
        policy = store.policy()
        assert policy is not None
        assert "alice@" in policy.data

        admin = Admin(store)
        row = admin.check_pre_auth_key(f"hskey-auth-0123456789ab-{SECRET_AUTH}")
        assert row.id == 1
        # Re-hashed the homescale way on first use; still valid afterwards.
        assert not needs_rehash(store.pre_auth_key(1).hash)
        admin.check_pre_auth_key(f"hskey-auth-0123456789ab-{SECRET_AUTH}")
        with pytest.raises(Exception, match="not found"):
            admin.check_pre_auth_key(f"hskey-auth-0123456789ab-{'c' * 64}")

        assert admin.check_api_key(f"hskey-api-ba9876543210-{SECRET_API}")
        assert not needs_rehash(store.api_key(1).hash)
        assert admin.check_api_key(f"hskey-api-ba9876543210-{SECRET_API}")
        assert not admin.check_api_key(f"hskey-api-ba9876543210-{'c' * 64}")
    finally:
        store.close()


def test_import_is_idempotent_and_refuses_other_data(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = headscale_db(tmp_path / "hs", "request_tags_migration_test.sql")
    first = run_cli(capsys, site, "-o", "json", "migrate", "headscale", "--db", str(src))
    assert first.code == 0, first.err
    again = run_cli(capsys, site, "-o", "json", "migrate", "headscale", "--db", str(src))
    assert again.code == 0, again.err
    assert again.json()["counts"] == first.json()["counts"]
    store = site.store()
    assert len(store.nodes()) == 7
    assert len(store.users()) == 3
    store.create_user("someone-else")
    store.close()

    other = headscale_db(tmp_path / "other", "zero_time_expiry_migration_test.sql")
    r = run_cli(capsys, site, "migrate", "headscale", "--db", str(other))
    assert r.code != 0
    assert "already has users" in r.err
    assert "fresh homescale database" in r.err


def test_refuses_a_running_headscale(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = headscale_db(tmp_path / "hs", "zero_time_expiry_migration_test.sql")
    wal = src.with_name("db.sqlite-wal")
    wal.write_bytes(b"")
    r = run_cli(capsys, site, "migrate", "headscale", "--db", str(src))
    assert r.code != 0
    assert str(wal) in r.err
    assert "headscale is running" in r.err
    assert not site.db_path.exists()


def test_bad_rows_are_named_and_nothing_is_written(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = headscale_db(
        tmp_path / "hs",
        "zero_time_expiry_migration_test.sql",
        "UPDATE nodes SET machine_key = 'mkey:zz' WHERE id = 2;"
        "UPDATE nodes SET ipv4 = '100.64.0.1' WHERE id = 3;",
    )
    r = run_cli(capsys, site, "migrate", "headscale", "--db", str(src))
    assert r.code != 0
    assert f"{src}: table nodes, row id 2, machine_key: expected mkey:" in r.err
    assert "row id 3, ipv4: 100.64.0.1 is also node id 1" in r.err
    assert "nothing was written" in r.err
    store = site.store()
    assert store.nodes() == []
    assert store.users() == []
    store.close()


def test_dry_run_writes_nothing(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = headscale_db(tmp_path / "hs", "request_tags_migration_test.sql")
    key_path, _ = headscale_key(tmp_path / "hs")
    r = run_cli(
        capsys, site, "migrate", "headscale", "--db", str(src), "--noise-key", str(key_path),
        "--dry-run",
    )  # fmt: skip
    assert r.code == 0, r.err
    assert "would import: 3 users, 7 nodes" in r.out
    assert not site.db_path.exists()
    assert not site.key_path.exists()


def test_config_after_the_command_is_headscales(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`homescale -c HOMESCALE migrate headscale --config HEADSCALE` (paths relative to it)."""
    hs = tmp_path / "etc-headscale"
    headscale_db(hs / "lib", "zero_time_expiry_migration_test.sql")
    _, key = headscale_key(hs / "lib")
    (hs / "config.yaml").write_text(
        "database:\n  type: sqlite\n  sqlite:\n    path: lib/db.sqlite\n"
        "noise:\n  private_key_path: lib/noise_private.key\n"
    )
    r = run_cli(capsys, site, "migrate", "headscale", "--config", str(hs / "config.yaml"))
    assert r.code == 0, r.err
    assert "imported: 1 users, 5 nodes" in r.out
    assert read_private_key_file(site.key_path) == key

    # headscale's DERP key, when its embedded relay ran, is carried too; none is no error.
    derp_key = PrivateKey.generate()
    write_private_key_file(hs / "lib" / "derp.key", derp_key)
    (hs / "config.yaml").write_text(
        (hs / "config.yaml").read_text() + "derp:\n  server:\n    private_key_path: lib/derp.key\n"
    )
    monkeypatch.setenv("HOMESCALE_DERP_SERVER_PRIVATE_KEY_PATH", "derp_server.key")
    r = run_cli(
        capsys, site, "-o", "json", "migrate", "headscale", "--config", str(hs / "config.yaml")
    )
    assert r.code == 0, r.err
    assert r.json()["counts"]["derp_key"] == 1
    assert read_private_key_file(site.dir / "derp_server.key") == derp_key
    (hs / "lib" / "derp.key").unlink()
    r = run_cli(
        capsys, site, "-o", "json", "migrate", "headscale", "--config", str(hs / "config.yaml")
    )
    assert r.code == 0, r.err
    assert any("derp_key: no source key" in n for n in r.json()["notes"])


def test_routes_table_of_older_headscale(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before 0.26 headscale kept routes in a table of their own: an enabled route is an
    approved one, an advertised one joins the node's RoutableIPs; deleted rows are gone."""
    src = headscale_db(
        tmp_path / "hs",
        "failing-node-preauth-constraint_dump.sql",
        """
INSERT INTO routes (id, created_at, updated_at, deleted_at, node_id, prefix, advertised,
  enabled, is_primary) VALUES
  (1, '2024-01-01 00:00:00+00:00', NULL, NULL, 1, '10.1.0.0/24', 1, 1, 1),
  (2, '2024-01-01 00:00:00+00:00', NULL, NULL, 1, '10.2.0.0/24', 1, 0, 0),
  (3, '2024-01-01 00:00:00+00:00', NULL, '2024-02-01 00:00:00+00:00', 2, '10.3.0.0/24', 1, 1, 0);
""",
    )
    r = run_cli(capsys, site, "-o", "json", "migrate", "headscale", "--db", str(src))
    assert r.code == 0, r.err
    assert any("routes: 1 soft-deleted row(s) skipped" in n for n in r.json()["notes"])
    store = site.store()
    try:
        n1, n2 = store.node(1), store.node(2)
        assert n1.approved_routes == ["10.1.0.0/24"]
        assert n1.hostinfo["RoutableIPs"] == ["10.1.0.0/24", "10.2.0.0/24"]
        assert n2.approved_routes == []
        assert "RoutableIPs" not in n2.hostinfo
    finally:
        store.close()


def test_not_a_database_is_named(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "dir with space" / "db.sqlite"
    src.parent.mkdir()
    src.write_text("headscale: not really\n")
    r = run_cli(capsys, site, "migrate", "headscale", "--db", str(src))
    assert r.code != 0
    assert f"{src}: cannot read it as an sqlite database (file is not a database)" in r.err
    assert src.read_text() == "headscale: not really\n"
