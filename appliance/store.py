"""The SQLite store: schema, forward-only migrations, and row-level operations.

One writer: the server calls these (blocking) methods from one worker thread at a
time (see `appliance.serve`); the CLI opens the file directly only when no server
is running. Only `appliance/` touches the store; other packages get plain values.

Every write that matters to clients records a typed change (`appliance.changes`) once
it has committed; `recorded` hands a call's changes back with its outcome, and the
server announces them (`Tailnet.apply`). Rows are immutable: a write returns a new one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import outcome
import sqlite_utils

from netmap.addresses import IPNet, allocate
from protocol.gojson import format_time

from .changes import (
    Change,
    NodeChanged,
    NodeRemoved,
    PolicyChanged,
    UserChanged,
    UserRemoved,
)
from .errors import Conflict, MigrationError, NotFound

P = ParamSpec("P")
R = TypeVar("R")


STATE_DIR_MODE = 0o750  # directories homescale creates for its state
PRIVATE_FILE_MODE = 0o600  # node keys, key hashes, private keys: the service user only


def create_private_file(path: Path) -> None:
    """Create `path` (and its folder) readable by its owner only, if it does not exist yet.

    SQLite gives the -wal, -shm and -journal files the database file's mode, so
    creating the database this way keeps all of them private.
    """
    path.parent.mkdir(mode=STATE_DIR_MODE, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    except FileExistsError:
        return
    os.close(fd)


def exposure_warning(path: Path) -> str | None:
    """A warning when a state file (made by an older version, or by hand) is world-readable."""
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        return None
    if not mode & 0o007:
        return None
    return (
        f"{path}: readable by every local user (mode {mode:04o}), and it holds node keys "
        f"and key hashes; make it private with: chmod 600 {path}"
    )


def utcnow() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def to_iso(t: datetime | None) -> str | None:
    """RFC 3339 in UTC, whole seconds, four-digit year (Go's zero time is 0001-01-01T00:00:00Z).

    A naive datetime is taken as UTC; an aware one outside the years 1-9999 in UTC
    cannot be stored (fields.parse_time refuses those before they get here).
    """
    if t is None:
        return None
    t = t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)
    return format_time(t.replace(microsecond=0))


# An older homescale wrote years below 1000 unpadded ("1-01-01T00:00:00Z", strftime's
# %Y on glibc): such rows still read back.
_SHORT_YEAR = re.compile(r"^(\d{1,3})-")


def from_iso(s: str | None) -> datetime | None:
    if not s:
        return None
    m = _SHORT_YEAR.match(s)
    if m:
        s = f"{int(m.group(1)):04d}" + s[m.end(1) :]
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


# ---------------------------------------------------------------- migrations
# Append-only: never edit a shipped migration, add the next number.


def _m001_initial(db: sqlite_utils.Database) -> None:
    db.execute("""
        CREATE TABLE users (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            display_name TEXT NOT NULL DEFAULT '',
            email TEXT NOT NULL DEFAULT '',
            profile_pic_url TEXT NOT NULL DEFAULT '',
            provider TEXT NOT NULL DEFAULT '',
            provider_id TEXT NOT NULL DEFAULT '',
            created_at TEXT NOT NULL
        )""")
    db.execute("""
        CREATE TABLE pre_auth_keys (
            id INTEGER PRIMARY KEY,
            prefix TEXT NOT NULL UNIQUE,
            hash TEXT NOT NULL,
            user_id INTEGER REFERENCES users(id) ON DELETE CASCADE,
            reusable INTEGER NOT NULL DEFAULT 0,
            ephemeral INTEGER NOT NULL DEFAULT 0,
            used INTEGER NOT NULL DEFAULT 0,
            tags TEXT NOT NULL DEFAULT '[]',
            expiration TEXT,
            created_at TEXT NOT NULL
        )""")
    db.execute("""
        CREATE TABLE api_keys (
            id INTEGER PRIMARY KEY,
            prefix TEXT NOT NULL UNIQUE,
            hash TEXT NOT NULL,
            expiration TEXT,
            last_seen TEXT,
            created_at TEXT NOT NULL
        )""")
    db.execute("""
        CREATE TABLE nodes (
            id INTEGER PRIMARY KEY,
            machine_key TEXT NOT NULL UNIQUE,
            node_key TEXT NOT NULL UNIQUE,
            disco_key TEXT NOT NULL DEFAULT '',
            endpoints TEXT NOT NULL DEFAULT '[]',
            hostinfo TEXT NOT NULL DEFAULT '{}',
            ipv4 TEXT UNIQUE,
            ipv6 TEXT UNIQUE,
            hostname TEXT NOT NULL DEFAULT '',
            given_name TEXT NOT NULL UNIQUE,
            user_id INTEGER REFERENCES users(id) ON DELETE RESTRICT,
            register_method TEXT NOT NULL DEFAULT 'authkey',
            tags TEXT NOT NULL DEFAULT '[]',
            auth_key_id INTEGER REFERENCES pre_auth_keys(id) ON DELETE SET NULL,
            ephemeral INTEGER NOT NULL DEFAULT 0,
            expiry TEXT,
            last_seen TEXT,
            approved_routes TEXT NOT NULL DEFAULT '[]',
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        )""")
    db.execute("""
        CREATE TABLE policies (
            id INTEGER PRIMARY KEY,
            data TEXT NOT NULL,
            created_at TEXT NOT NULL
        )""")


def _m002_user_groups(db: sqlite_utils.Database) -> None:
    # The identity provider's groups claim at the user's last sign-in (JSON list), which
    # the policy can name as "oidc:<group>".
    db.execute("ALTER TABLE users ADD COLUMN groups TEXT NOT NULL DEFAULT '[]'")


def _m003_node_approval(db: sqlite_utils.Database) -> None:
    # Device approval (node.require_approval): 0 = logged in, waiting for an admin.
    # Nodes that existed before are approved.
    db.execute("ALTER TABLE nodes ADD COLUMN approved INTEGER NOT NULL DEFAULT 1")


MIGRATIONS: list[tuple[int, str, Callable[[sqlite_utils.Database], None]]] = [
    (1, "initial schema", _m001_initial),
    (2, "users: identity provider groups", _m002_user_groups),
    (3, "nodes: device approval", _m003_node_approval),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


# ---------------------------------------------------------------- rows


@dataclass(frozen=True)
class UserRow:
    id: int
    name: str
    display_name: str = ""
    email: str = ""
    profile_pic_url: str = ""
    provider: str = ""
    provider_id: str = ""
    created_at: datetime | None = None
    groups: list[str] = field(default_factory=list)  # the provider's groups claim


@dataclass
class PreAuthKeyRow:
    id: int
    prefix: str
    hash: str
    user_id: int | None
    reusable: bool
    ephemeral: bool
    used: bool
    tags: list[str]
    expiration: datetime | None
    created_at: datetime | None


@dataclass
class ApiKeyRow:
    id: int
    prefix: str
    hash: str
    expiration: datetime | None
    last_seen: datetime | None
    created_at: datetime | None


@dataclass(frozen=True)
class NodeRow:
    """A stored node as read: immutable; a write returns a new row (`Store.update_node`)."""

    id: int
    machine_key: str
    node_key: str
    given_name: str
    hostname: str = ""
    disco_key: str = ""
    endpoints: list[str] = field(default_factory=list)
    hostinfo: dict[str, Any] = field(default_factory=dict)
    ipv4: str | None = None
    ipv6: str | None = None
    user_id: int | None = None
    register_method: str = "authkey"
    tags: list[str] = field(default_factory=list)
    auth_key_id: int | None = None
    ephemeral: bool = False
    expiry: datetime | None = None
    last_seen: datetime | None = None
    approved_routes: list[str] = field(default_factory=list)
    created_at: datetime | None = None
    updated_at: datetime | None = None
    approved: bool = True  # False: logged in, waiting for `nodes approve` (device approval)


@dataclass
class PolicyRow:
    id: int
    data: str
    created_at: datetime | None


def _user(r: dict[str, Any]) -> UserRow:
    return UserRow(
        id=r["id"],
        name=r["name"],
        display_name=r["display_name"],
        email=r["email"],
        profile_pic_url=r["profile_pic_url"],
        provider=r["provider"],
        provider_id=r["provider_id"],
        created_at=from_iso(r["created_at"]),
        groups=json.loads(r["groups"]),
    )


def _pak(r: dict[str, Any]) -> PreAuthKeyRow:
    return PreAuthKeyRow(
        id=r["id"],
        prefix=r["prefix"],
        hash=r["hash"],
        user_id=r["user_id"],
        reusable=bool(r["reusable"]),
        ephemeral=bool(r["ephemeral"]),
        used=bool(r["used"]),
        tags=json.loads(r["tags"]),
        expiration=from_iso(r["expiration"]),
        created_at=from_iso(r["created_at"]),
    )


def _apikey(r: dict[str, Any]) -> ApiKeyRow:
    return ApiKeyRow(
        id=r["id"],
        prefix=r["prefix"],
        hash=r["hash"],
        expiration=from_iso(r["expiration"]),
        last_seen=from_iso(r["last_seen"]),
        created_at=from_iso(r["created_at"]),
    )


_NODE_JSON = ("endpoints", "hostinfo", "tags", "approved_routes")
_NODE_TIMES = ("expiry", "last_seen", "created_at", "updated_at")


def _node(r: dict[str, Any]) -> NodeRow:
    d = dict(r)
    for k in _NODE_JSON:
        d[k] = json.loads(d[k])
    for k in _NODE_TIMES:
        d[k] = from_iso(d[k])
    d["ephemeral"] = bool(d["ephemeral"])
    d["approved"] = bool(d["approved"])
    return NodeRow(**d)


def _node_values(fields: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in fields.items():
        if k in _NODE_JSON:
            v = json.dumps(v)
        elif k in _NODE_TIMES:
            v = to_iso(v)
        elif k in ("ephemeral", "approved"):
            v = int(bool(v))
        out[k] = v
    return out


# ---------------------------------------------------------------- the store

Addresses = tuple[str | None, str | None]  # a node's (ipv4, ipv6)
NO_ADDRESSES: Addresses = (None, None)


class Store:
    """The database file. Opening it applies pending migrations (after a backup copy)."""

    def __init__(self, path: Path, *, wal: bool = True) -> None:
        self.path = path
        self._journal: list[Change] = []  # committed changes not yet handed out
        # Node addresses in use (IPv4, IPv6), built from the rows on first use and then
        # kept in step by every node write: a join no longer reads every node.
        self._used: tuple[set[str], set[str]] | None = None
        self._used_version = 0  # PRAGMA data_version when `_used` was built
        self._after: dict[int, str] = {}  # per IP version: the address handed out last
        create_private_file(path)
        self._conn = sqlite3.connect(
            str(path), check_same_thread=False, isolation_level=None, timeout=10
        )
        # execute_plugins=False: plugin discovery through entry points fails in the frozen app.
        self.db = sqlite_utils.Database(self._conn, execute_plugins=False)
        try:
            self.db.execute("PRAGMA foreign_keys = ON")
            if wal:
                self.db.enable_wal()
                # As headscale's default: in WAL mode NORMAL cannot corrupt the database; a
                # power cut may only roll back the last commits. FULL fsyncs every commit
                # (~5 ms each here), which made the store thread the limit on joins.
                self.db.execute("PRAGMA synchronous = NORMAL")
            self.migrate()
        except BaseException:
            # A refused or failed database is not kept open (the CLI reports and exits; the
            # server never starts): the file stays free for a restore or a newer homescale.
            self._conn.close()
            raise

    def close(self) -> None:
        self._conn.close()

    # -- schema

    def schema_version(self) -> int:
        if "schema_migrations" not in self.db.table_names():
            return 0
        row = self.db.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
        return int(row[0] or 0)

    def migrate(self) -> list[int]:
        """Apply pending migrations in one transaction; refuse a database newer than us."""
        current = self.schema_version()
        if current > SCHEMA_VERSION:
            raise MigrationError(
                f"{self.path}: the database has schema version {current}, newer than this "
                f"homescale understands ({SCHEMA_VERSION}); run the newer homescale, or restore "
                f"a backup taken before the upgrade"
            )
        pending = [m for m in MIGRATIONS if m[0] > current]
        if not pending:
            return []
        if current > 0:
            # Nothing is lost on a failed migration: keep a copy of the file first.
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            backup = self.path.with_name(f"{self.path.name}.v{current}.bak")
            shutil.copy2(self.path, backup)
        try:
            with self.transaction():
                self.db.execute("""CREATE TABLE IF NOT EXISTS schema_migrations (
                    version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)""")
                for version, name, fn in pending:
                    fn(self.db)
                    self.db.execute(
                        "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                        [version, name, to_iso(utcnow())],
                    )
        except Exception as e:
            # Any failure (SQL or a bug in the migration's Python) rolled the transaction back.
            raise MigrationError(
                f"{self.path}: migration to schema {pending[-1][0]} failed "
                f"({type(e).__name__}: {e}); the database was left at version "
                f"{current}"
            ) from e
        return [m[0] for m in pending]

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One atomic unit of writes (the connection is in autocommit mode otherwise)."""
        self._conn.execute("BEGIN IMMEDIATE")
        mark = len(self._journal)
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            del self._journal[mark:]  # rolled back: nothing to announce
            self._used = None  # it may hold rolled-back addresses: rebuilt on next use
            raise
        self._conn.execute("COMMIT")

    def recorded(
        self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs
    ) -> tuple[outcome.Outcome[R], list[Change]]:
        """Run `fn` and return its outcome with the changes its writes committed. A call that
        fails after a committed write still hands that write's change out to be announced."""
        self._journal = []
        try:
            return outcome.capture(fn, *args, **kwargs), self._journal
        finally:
            self._journal = []

    def ping(self) -> bool:
        return bool(self.db.execute("SELECT 1").fetchone()[0] == 1)

    def _rows(self, sql: str, params: list[Any] | tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        cur = self.db.execute(sql, params)
        cols = [c[0] for c in cur.description]
        return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]

    def _insert(self, table: str, values: dict[str, Any]) -> int:
        try:
            cur = self.db.execute(
                f"INSERT INTO {table} ({', '.join(values)}) VALUES ({', '.join('?' * len(values))})",
                list(values.values()),
            )
        except sqlite3.IntegrityError as e:
            raise Conflict(f"{table}: {e}") from None
        return int(cur.lastrowid or 0)

    def _update(self, table: str, row_id: int, values: dict[str, Any]) -> None:
        if not values:
            return
        sets = ", ".join(f"{k} = ?" for k in values)
        try:
            cur = self.db.execute(
                f"UPDATE {table} SET {sets} WHERE id = ?", [*values.values(), row_id]
            )
        except sqlite3.IntegrityError as e:
            raise Conflict(f"{table}: {e}") from None
        if cur.rowcount == 0:
            raise NotFound(f"{table}: no row with id {row_id}")

    # -- users

    def create_user(
        self, name: str, display_name: str = "", email: str = "", profile_pic_url: str = ""
    ) -> UserRow:
        if self.user_by_name(name) is not None:
            raise Conflict(f"user {name!r} already exists")
        uid = self._insert(
            "users",
            {
                "name": name,
                "display_name": display_name,
                "email": email,
                "profile_pic_url": profile_pic_url,
                "created_at": to_iso(utcnow()),
            },
        )
        row = self.user(uid)
        self._journal.append(UserChanged(row))
        return row

    def user(self, user_id: int) -> UserRow:
        rows = self._rows("SELECT * FROM users WHERE id = ?", [user_id])
        if not rows:
            raise NotFound(f"no user with id {user_id}")
        return _user(rows[0])

    def user_by_name(self, name: str) -> UserRow | None:
        rows = self._rows("SELECT * FROM users WHERE name = ?", [name])
        return _user(rows[0]) if rows else None

    def user_by_provider_id(self, provider_id: str) -> UserRow | None:
        """The user an identity provider's subject (iss/sub) belongs to."""
        rows = self._rows("SELECT * FROM users WHERE provider_id = ?", [provider_id])
        return _user(rows[0]) if rows else None

    def update_user(self, user_id: int, **values: Any) -> UserRow:
        """Set columns of a user (name, display_name, email, profile_pic_url, provider...)."""
        if "name" in values:
            other = self.user_by_name(values["name"])
            if other is not None and other.id != user_id:
                raise Conflict(f"user {values['name']!r} already exists")
        if "groups" in values:
            values["groups"] = json.dumps(list(values["groups"]))
        self._update("users", user_id, values)
        row = self.user(user_id)
        self._journal.append(UserChanged(row))
        return row

    def users(self) -> list[UserRow]:
        return [_user(r) for r in self._rows("SELECT * FROM users ORDER BY id")]

    def rename_user(self, user_id: int, new_name: str) -> UserRow:
        other = self.user_by_name(new_name)
        if other is not None and other.id != user_id:
            raise Conflict(f"user {new_name!r} already exists")
        self._update("users", user_id, {"name": new_name})
        row = self.user(user_id)
        self._journal.append(UserChanged(row))
        return row

    def delete_user(self, user_id: int) -> None:
        self.user(user_id)
        n = self.db.execute("SELECT COUNT(*) FROM nodes WHERE user_id = ?", [user_id]).fetchone()[0]
        if n:
            raise Conflict(
                f"user {self.user(user_id).name!r} still owns {n} node(s); delete or "
                f"move them first"
            )
        self.db.execute("DELETE FROM users WHERE id = ?", [user_id])
        self._journal.append(UserRemoved(user_id))

    # -- pre-auth keys

    def create_pre_auth_key(
        self,
        *,
        prefix: str,
        hash: str,
        user_id: int | None,
        reusable: bool,
        ephemeral: bool,
        tags: list[str],
        expiration: datetime | None,
    ) -> PreAuthKeyRow:
        kid = self._insert(
            "pre_auth_keys",
            {
                "prefix": prefix,
                "hash": hash,
                "user_id": user_id,
                "reusable": int(reusable),
                "ephemeral": int(ephemeral),
                "used": 0,
                "tags": json.dumps(tags),
                "expiration": to_iso(expiration),
                "created_at": to_iso(utcnow()),
            },
        )
        return self.pre_auth_key(kid)

    def pre_auth_key(self, key_id: int) -> PreAuthKeyRow:
        rows = self._rows("SELECT * FROM pre_auth_keys WHERE id = ?", [key_id])
        if not rows:
            raise NotFound(f"no pre-auth key with id {key_id}")
        return _pak(rows[0])

    def pre_auth_key_by_prefix(self, prefix: str) -> PreAuthKeyRow | None:
        rows = self._rows("SELECT * FROM pre_auth_keys WHERE prefix = ?", [prefix])
        return _pak(rows[0]) if rows else None

    def pre_auth_keys(self, user_id: int | None = None) -> list[PreAuthKeyRow]:
        if user_id is None:
            return [_pak(r) for r in self._rows("SELECT * FROM pre_auth_keys ORDER BY id")]
        return [
            _pak(r)
            for r in self._rows(
                "SELECT * FROM pre_auth_keys WHERE user_id = ? ORDER BY id", [user_id]
            )
        ]

    def update_pre_auth_key(self, key_id: int, **values: Any) -> None:
        if "expiration" in values:
            values["expiration"] = to_iso(values["expiration"])
        self._update("pre_auth_keys", key_id, values)

    def delete_pre_auth_key(self, key_id: int) -> None:
        self.pre_auth_key(key_id)
        self.db.execute("DELETE FROM pre_auth_keys WHERE id = ?", [key_id])

    # -- API keys

    def create_api_key(self, *, prefix: str, hash: str, expiration: datetime | None) -> ApiKeyRow:
        kid = self._insert(
            "api_keys",
            {
                "prefix": prefix,
                "hash": hash,
                "expiration": to_iso(expiration),
                "created_at": to_iso(utcnow()),
            },
        )
        return self.api_key(kid)

    def api_key(self, key_id: int) -> ApiKeyRow:
        rows = self._rows("SELECT * FROM api_keys WHERE id = ?", [key_id])
        if not rows:
            raise NotFound(f"no API key with id {key_id}")
        return _apikey(rows[0])

    def api_key_by_prefix(self, prefix: str) -> ApiKeyRow | None:
        rows = self._rows("SELECT * FROM api_keys WHERE prefix = ?", [prefix])
        return _apikey(rows[0]) if rows else None

    def api_keys(self) -> list[ApiKeyRow]:
        return [_apikey(r) for r in self._rows("SELECT * FROM api_keys ORDER BY id")]

    def update_api_key(self, key_id: int, **values: Any) -> None:
        for k in ("expiration", "last_seen"):
            if k in values:
                values[k] = to_iso(values[k])
        self._update("api_keys", key_id, values)

    def delete_api_key(self, key_id: int) -> None:
        self.api_key(key_id)
        self.db.execute("DELETE FROM api_keys WHERE id = ?", [key_id])

    # -- nodes

    def create_node(self, **values: Any) -> NodeRow:
        now = utcnow()
        values.setdefault("created_at", now)
        values["updated_at"] = now
        nid = self._insert("nodes", _node_values(values))
        row = self.node(nid)
        self._track_addresses(NO_ADDRESSES, (row.ipv4, row.ipv6))
        self._journal.append(NodeChanged(row))
        return row

    def node(self, node_id: int) -> NodeRow:
        rows = self._rows("SELECT * FROM nodes WHERE id = ?", [node_id])
        if not rows:
            raise NotFound(f"no node with id {node_id}")
        return _node(rows[0])

    def node_by(self, column: str, value: str) -> NodeRow | None:
        if column not in ("machine_key", "node_key", "given_name", "ipv4", "ipv6"):
            raise ValueError(column)
        rows = self._rows(f"SELECT * FROM nodes WHERE {column} = ?", [value])
        return _node(rows[0]) if rows else None

    def nodes(self, user_id: int | None = None) -> list[NodeRow]:
        if user_id is None:
            return [_node(r) for r in self._rows("SELECT * FROM nodes ORDER BY id")]
        return [
            _node(r)
            for r in self._rows("SELECT * FROM nodes WHERE user_id = ? ORDER BY id", [user_id])
        ]

    def update_node(self, node_id: int, **values: Any) -> NodeRow:
        readdressed = self._used is not None and not values.keys().isdisjoint(("ipv4", "ipv6"))
        before = self._node_addresses(node_id) if readdressed else NO_ADDRESSES
        values["updated_at"] = utcnow()
        self._update("nodes", node_id, _node_values(values))
        row = self.node(node_id)
        if readdressed:
            self._track_addresses(before, (row.ipv4, row.ipv6))
        self._journal.append(NodeChanged(row))
        return row

    def delete_node(self, node_id: int) -> None:
        row = self.node(node_id)
        self.db.execute("DELETE FROM nodes WHERE id = ?", [node_id])
        self._track_addresses((row.ipv4, row.ipv6), NO_ADDRESSES)
        self._journal.append(NodeRemoved(node_id))

    # -- node addresses

    def used_addresses(self) -> tuple[AbstractSet[str], AbstractSet[str]]:
        """The IPv4 and IPv6 addresses nodes hold: live sets, no SQL scan (store thread)."""
        return self._addresses()

    def fresh_address(self, net: IPNet, strategy: str) -> str:
        """A free node address in `net` (PrefixExhausted when none is left).

        Sequential allocation continues after the address handed out last, as headscale's
        allocator does; like its cursor, ours lives in memory, so a restarted server scans
        from the start of the prefix again (and reuses freed addresses there).
        """
        used = self._addresses()[0 if net.version == 4 else 1]
        addr = allocate(net, used, strategy, after=self._after.get(net.version))
        self._after[net.version] = addr
        return addr

    def _addresses(self) -> tuple[set[str], set[str]]:
        """Built from the rows on first use (a migrated or restored file is read as it is),
        and again when another connection committed since (`homescale doctor --fix` runs
        beside the server)."""
        version = int(self.db.execute("PRAGMA data_version").fetchone()[0])
        if self._used is None or version != self._used_version:
            v4: set[str] = set()
            v6: set[str] = set()
            for a, b in self.db.execute("SELECT ipv4, ipv6 FROM nodes").fetchall():
                if a:
                    v4.add(a)
                if b:
                    v6.add(b)
            self._used, self._used_version = (v4, v6), version
        return self._used

    def _node_addresses(self, node_id: int) -> Addresses:
        row = self.db.execute("SELECT ipv4, ipv6 FROM nodes WHERE id = ?", [node_id]).fetchone()
        return (row[0], row[1]) if row is not None else NO_ADDRESSES

    def _track_addresses(self, gone: Addresses, came: Addresses) -> None:
        """Keep the in-memory addresses in step with a node write that succeeded."""
        if self._used is None:
            return
        for addrs, old, new in zip(self._used, gone, came, strict=True):
            if old:
                addrs.discard(old)
            if new:
                addrs.add(new)

    # -- policy

    def set_policy(self, data: str) -> PolicyRow:
        pid = self._insert("policies", {"data": data, "created_at": to_iso(utcnow())})
        self._journal.append(PolicyChanged(data))
        return PolicyRow(id=pid, data=data, created_at=utcnow())

    def policy(self) -> PolicyRow | None:
        rows = self._rows("SELECT * FROM policies ORDER BY id DESC LIMIT 1")
        if not rows:
            return None
        r = rows[0]
        return PolicyRow(id=r["id"], data=r["data"], created_at=from_iso(r["created_at"]))
