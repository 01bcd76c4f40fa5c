"""The SQLite store: fresh schema, forward migrations with a backup, refused downgrades."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path

import pytest
import sqlite_utils

from appliance import store as store_mod
from appliance.errors import Conflict, MigrationError
from appliance.store import SCHEMA_VERSION, Store


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def raw_rows(path: Path, sql: str) -> list[tuple]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def open_fds_on(path: Path) -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                n += 1
        except OSError:
            pass
    return n


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "db.sqlite"


def seeded(db_path: Path) -> None:
    """A current-version database with a user and a node in it, closed."""
    s = Store(db_path)
    u = s.create_user("alice")
    s.create_node(
        machine_key="mkey:" + "1" * 64,
        node_key="nodekey:" + "2" * 64,
        given_name="laptop",
        hostname="laptop",
        user_id=u.id,
        ipv4="100.64.0.1",
    )
    s.close()


def test_fresh_database_has_the_current_schema(db_path: Path) -> None:
    s = Store(db_path)
    try:
        assert s.schema_version() == SCHEMA_VERSION
        assert {
            "users",
            "nodes",
            "pre_auth_keys",
            "api_keys",
            "policies",
            "schema_migrations",
        } <= set(s.db.table_names())
        assert s.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert s.db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    finally:
        s.close()
    # no backup for a fresh database: there was nothing to lose
    assert list(db_path.parent.glob("*.bak")) == []


def test_reopening_applies_nothing(db_path: Path) -> None:
    seeded(db_path)
    s = Store(db_path)
    try:
        assert s.migrate() == []
        assert [u.name for u in s.users()] == ["alice"]
    finally:
        s.close()
    assert list(db_path.parent.glob("*.bak")) == []


def _add_note_column(db: sqlite_utils.Database) -> None:
    db.execute("ALTER TABLE users ADD COLUMN note TEXT NOT NULL DEFAULT 'migrated'")


def test_upgrade_applies_the_new_migration_with_a_backup(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seeded(db_path)
    monkeypatch.setattr(
        store_mod,
        "MIGRATIONS",
        [*store_mod.MIGRATIONS, (SCHEMA_VERSION + 1, "user notes", _add_note_column)],
    )
    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    s = Store(db_path)
    try:
        assert s.schema_version() == SCHEMA_VERSION + 1
        assert [u.name for u in s.users()] == ["alice"]
        assert len(s.nodes()) == 1
        assert s.db.execute("SELECT note FROM users").fetchall() == [("migrated",)]
    finally:
        s.close()
    backup = db_path.with_name(f"db.sqlite.v{SCHEMA_VERSION}.bak")
    assert backup.is_file()
    # the backup is the database as it was: old version, same data
    assert raw_rows(backup, "SELECT MAX(version) FROM schema_migrations") == [(SCHEMA_VERSION,)]
    assert raw_rows(backup, "SELECT name FROM users") == [("alice",)]


def test_newer_database_is_refused_and_left_untouched(db_path: Path) -> None:
    seeded(db_path)
    conn = sqlite3.connect(db_path)
    conn.execute(
        "INSERT INTO schema_migrations (version, name, applied_at) "
        "VALUES (?, 'from the future', '2030-01-01T00:00:00Z')",
        [SCHEMA_VERSION + 5],
    )
    conn.commit()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    before = file_digest(db_path)
    with pytest.raises(MigrationError) as info:
        Store(db_path)
    msg = str(info.value)
    assert str(db_path) in msg
    assert f"schema version {SCHEMA_VERSION + 5}" in msg
    assert "newer" in msg
    assert f"({SCHEMA_VERSION})" in msg
    assert file_digest(db_path) == before
    assert list(db_path.parent.glob("*.bak")) == []
    # the refused file is not held open
    assert open_fds_on(db_path) == 0


def _bad_sql(db: sqlite_utils.Database) -> None:
    db.execute("ALTER TABLE users ADD COLUMN note TEXT")
    db.execute("UPDATE users SET name = 'mallory'")
    db.execute("INSERT INTO no_such_table VALUES (1)")


def _bad_python(db: sqlite_utils.Database) -> None:
    db.execute("ALTER TABLE users ADD COLUMN note TEXT")
    db.execute("UPDATE users SET name = 'mallory'")
    raise ValueError("a bug in the migration")


@pytest.mark.parametrize("migration", [_bad_sql, _bad_python])
def test_failing_migration_keeps_data_and_version(
    db_path: Path, monkeypatch: pytest.MonkeyPatch, migration
) -> None:
    seeded(db_path)
    monkeypatch.setattr(
        store_mod, "MIGRATIONS", [*store_mod.MIGRATIONS, (SCHEMA_VERSION + 1, "broken", migration)]
    )
    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with pytest.raises(MigrationError) as info:
        Store(db_path)
    msg = str(info.value)
    assert f"migration to schema {SCHEMA_VERSION + 1} failed" in msg
    assert f"left at version {SCHEMA_VERSION}" in msg
    assert open_fds_on(db_path) == 0
    assert raw_rows(db_path, "SELECT MAX(version) FROM schema_migrations") == [(SCHEMA_VERSION,)]
    assert raw_rows(db_path, "SELECT name FROM users") == [("alice",)]
    cols = [r[1] for r in raw_rows(db_path, "PRAGMA table_info(users)")]
    assert "note" not in cols
    assert db_path.with_name(f"db.sqlite.v{SCHEMA_VERSION}.bak").is_file()
    # and with the fixed code the database opens as before
    monkeypatch.undo()
    s = Store(db_path)
    try:
        assert [u.name for u in s.users()] == ["alice"]
    finally:
        s.close()


def test_duplicate_user_is_a_conflict(db_path: Path) -> None:
    s = Store(db_path)
    try:
        s.create_user("alice")
        with pytest.raises(Conflict, match="already exists"):
            s.create_user("alice")
        assert len(s.users()) == 1
    finally:
        s.close()


def test_user_with_nodes_cannot_be_deleted(db_path: Path) -> None:
    seeded(db_path)
    s = Store(db_path)
    try:
        with pytest.raises(Conflict, match="still owns 1 node"):
            s.delete_user(s.users()[0].id)
        assert len(s.users()) == 1
    finally:
        s.close()


def test_state_files_are_private_and_folders_closed(tmp_path: Path) -> None:
    """Issue 9: db.sqlite (with -wal and -shm) 0600, its new folder 0750."""
    import stat

    path = tmp_path / "state" / "db.sqlite"
    store = Store(path)
    try:
        store.create_user("alice")
        for p in (path, path.with_name("db.sqlite-wal"), path.with_name("db.sqlite-shm")):
            assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o750
    finally:
        store.close()


def test_a_world_readable_database_is_named_with_the_fix(tmp_path: Path) -> None:
    from appliance.store import exposure_warning

    path = tmp_path / "db.sqlite"
    Store(path).close()
    assert exposure_warning(path) is None
    path.chmod(0o644)  # as an older homescale created it
    warning = exposure_warning(path)
    assert warning is not None
    assert "0644" in warning
    assert f"chmod 600 {path}" in warning
