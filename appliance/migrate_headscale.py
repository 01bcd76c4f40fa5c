"""`homescale migrate headscale`: carry a stopped headscale's state into homescale's store.

What makes a switch painless is that no device notices: every node keeps its ID,
keys, addresses, names, tags, routes and expiry, and the server keeps headscale's
Noise private key, so clients see the same server key and never log in again.
Pre-auth and API keys keep working: headscale stores bcrypt hashes of their
secrets, which homescale verifies (and re-hashes its own way on first use).

The source is read from a private copy (the file headscale left is never opened
for writing), and only when headscale is stopped. Rows that cannot be carried
over refuse the whole import, each named by file, table, row and field; things
homescale has no place for (legacy-format keys, OAuth clients) are reported.
Running the import again with the same source changes nothing; a target that
holds other data is refused. Schemas: headscale 0.23 and later (sqlite).
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from protocol.keys import DiscoPublic, KeyParseError, MachinePublic, NodePublic, PrivateKey

from .config import Config, read_yaml
from .errors import HomescaleError
from .secrets import BCRYPT_SCHEME
from .store import Store, _node_values, to_iso


class ImportRefused(HomescaleError):
    """The headscale state cannot be imported as it is; nothing was written."""


# headscale's tables this import reads; anything else with rows is reported.
_TABLES = ("users", "nodes", "pre_auth_keys", "api_keys", "policies")
# Tables that hold nothing a tailnet needs (bookkeeping, replication).
_IGNORED_TABLES = ("migrations", "database_versions", "sqlite_sequence")
_IGNORED_TABLE_PREFIXES = ("_litestream_",)
# Tables of headscale before 0.23 that the 0.23+ migrations dropped or renamed.
_PRE_023_TABLES = ("machines", "namespaces", "shared_machines", "kvs", "pre_auth_key_acl_tags")

# The 12-hex-character prefix of `hskey-*` keys (headscale's and homescale's format).
_KEY_PREFIX_LEN = 12


@dataclass(frozen=True)
class HeadscaleSource:
    """Where headscale keeps what is imported (from its config, or given one by one)."""

    db: Path
    noise_key: Path | None = None
    derp_key: Path | None = None
    policy_mode: str = "file"
    policy_path: Path | None = None


@dataclass
class ImportReport:
    counts: dict[str, int] = field(default_factory=dict)
    not_carried: list[str] = field(default_factory=list)  # what the user has to redo
    notes: list[str] = field(default_factory=list)
    dry_run: bool = False

    def lines(self) -> list[str]:
        verb = "would import" if self.dry_run else "imported"
        out = [f"{verb}: " + ", ".join(f"{n} {k}" for k, n in self.counts.items())]
        out += [f"not carried over: {s}" for s in self.not_carried]
        out += [f"note: {s}" for s in self.notes]
        return out


# ---------------------------------------------------------------- the source


def source_from_headscale_config(
    config_path: Path | None,
    *,
    db: Path | None = None,
    noise_key: Path | None = None,
    derp_key: Path | None = None,
) -> HeadscaleSource:
    """The source from headscale's config file; each explicit path wins over the file's."""
    raw: dict[str, Any] = {}
    base = Path.cwd()
    if config_path is not None:
        loaded = read_yaml(config_path)
        if not isinstance(loaded, dict):
            raise ImportRefused(f"{config_path}: expected a YAML mapping (headscale's config)")
        raw = loaded
        base = config_path.parent.resolve()

    def get(dotted: str) -> Any:
        node: Any = raw
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node

    def path(dotted: str) -> Path | None:
        v = get(dotted)
        if not v or not isinstance(v, str):
            return None
        p = Path(v).expanduser()
        return p if p.is_absolute() else base / p

    dbtype = str(get("database.type") or "sqlite")
    if db is None and dbtype not in ("sqlite", "sqlite3"):
        raise ImportRefused(
            f"{config_path}: database.type is {dbtype!r}; homescale imports headscale's "
            f"sqlite database only"
        )
    db = db or path("database.sqlite.path") or path("db_path")
    if db is None:
        raise ImportRefused(
            "no headscale database: pass --db FILE (headscale's db.sqlite) or --config with "
            "database.sqlite.path"
        )
    return HeadscaleSource(
        db=db,
        noise_key=noise_key or path("noise.private_key_path"),
        derp_key=derp_key or path("derp.server.private_key_path"),
        policy_mode=str(get("policy.mode") or "file"),
        policy_path=path("policy.path") or path("acl_policy_path"),
    )


def refuse_running(db: Path) -> None:
    """Refuse a database headscale may still be using.

    headscale opens sqlite in WAL mode by default; while any connection is open the
    `-wal` and `-shm` files exist, and a clean shutdown removes them. A `-journal`
    is a rollback-mode transaction in progress (or interrupted).
    """
    if not db.is_file():
        raise ImportRefused(f"{db}: headscale database not found")
    for suffix in ("-wal", "-shm", "-journal"):
        side = db.with_name(db.name + suffix)
        if side.exists():
            raise ImportRefused(
                f"{side} exists: headscale is running or did not shut down cleanly. Stop it "
                f"(systemctl stop headscale) and retry; if it is stopped and the file stays, "
                f"run `sqlite3 {db} 'PRAGMA wal_checkpoint(TRUNCATE)'` once (it folds "
                f"the journal into the database) and retry"
            )


@contextmanager
def _private_copy(db: Path) -> Iterator[sqlite3.Connection]:
    """The source opened from a private copy: headscale's file is only ever read."""
    with tempfile.TemporaryDirectory(prefix="homescale-import-") as tmp:
        copy = Path(tmp) / "headscale.sqlite"
        conn = sqlite3.connect(copy)
        try:
            # SQLite's backup from a read-only connection: a consistent snapshot (under
            # SQLite's own read lock) that never writes to headscale's file.
            source = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
            try:
                source.backup(conn)
            finally:
                source.close()
        except sqlite3.DatabaseError as e:
            conn.close()
            raise ImportRefused(f"{db}: cannot read it as an sqlite database ({e})") from None
        try:
            yield conn
        finally:
            conn.close()


# ---------------------------------------------------------------- field parsers
# Each raises ValueError with what was expected; the caller adds file, table, row, field.


def _go_time(v: Any) -> datetime | None:
    """gorm's sqlite time text (`2023-03-30 23:18:17.612740902+00:00`); Go's zero time is None."""
    if v is None or v == "":
        return None
    s = str(v).strip().replace("T", " ", 1)
    if s.startswith("0001-01-01"):  # Go's zero time.Time: "not set" (headscale 0.29 agrees)
        return None
    # Python parses at most microseconds: cut nanoseconds down to six digits.
    if "." in s:
        head, _, rest = s.partition(".")
        digits = len(rest) - len(rest.lstrip("0123456789"))
        s = head + "." + rest[: min(digits, 6)].ljust(6, "0") + rest[digits:]
    if s.endswith("Z"):
        s = s[:-1] + "+00:00"
    try:
        t = datetime.fromisoformat(s)
    except ValueError:
        raise ValueError(f"expected a time like 2024-01-01 00:00:00+00:00, got {v!r}") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return t.astimezone(UTC).replace(microsecond=0)


def _json(v: Any, kind: type, empty: Any) -> Any:
    """A JSON column; NULL, '' and the literal `null` (a nil Go slice) are empty."""
    if v is None or (isinstance(v, str | bytes) and v.strip() in ("", "null", b"", b"null")):
        return empty
    try:
        out = json.loads(v)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"expected JSON, got {str(v)[:60]!r}") from None
    if out is None:
        return empty
    if not isinstance(out, kind):
        raise ValueError(f"expected a JSON {'list' if kind is list else 'object'}")
    return out


def _str_list(v: Any) -> list[str]:
    out = _json(v, list, [])
    if not all(isinstance(x, str) for x in out):
        raise ValueError("expected a JSON list of strings")
    return list(out)


def _tags(v: Any) -> list[str]:
    tags = _str_list(v)
    for t in tags:
        if not t.startswith("tag:") or len(t) < 5:
            raise ValueError(f"tag {t!r}: expected tag:<name>")
    return sorted(set(tags))


def _prefixes(v: Any) -> list[str]:
    out = []
    for p in _str_list(v):
        try:
            out.append(str(ipaddress.ip_network(p, strict=True)))
        except ValueError:
            raise ValueError(f"route {p!r}: expected a CIDR prefix like 10.0.0.0/24") from None
    return out


def _addr(version: int) -> Any:
    def parse(v: Any) -> str | None:
        if v in (None, ""):
            return None
        try:
            a = ipaddress.ip_address(str(v))
        except ValueError:
            raise ValueError(f"expected an IPv{version} address, got {v!r}") from None
        if a.version != version:
            raise ValueError(f"expected an IPv{version} address, got {v!r}")
        return str(a)

    return parse


def _key(cls: type[MachinePublic] | type[NodePublic] | type[DiscoPublic], optional: bool) -> Any:
    def parse(v: Any) -> str:
        if optional and v in (None, ""):
            return ""
        try:
            return str(cls.parse(str(v or "")))
        except KeyParseError:
            raise ValueError(f"expected {cls.PREFIX}<64 hex>, got {str(v)[:80]!r}") from None

    return parse


def _text(v: Any) -> str:
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return "" if v is None else str(v)


def _flag(v: Any) -> bool:
    # gorm writes booleans as 0/1 (numeric columns); older rows may hold 'true'/'false'.
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "t")
    return bool(v)


# ---------------------------------------------------------------- reading


@dataclass
class _Read:
    """What the source holds, as homescale rows (ids kept), plus what could not come along."""

    users: list[dict[str, Any]] = field(default_factory=list)
    nodes: list[dict[str, Any]] = field(default_factory=list)
    pre_auth_keys: list[dict[str, Any]] = field(default_factory=list)
    api_keys: list[dict[str, Any]] = field(default_factory=list)
    policy: tuple[int, str] | None = None
    errors: list[str] = field(default_factory=list)
    not_carried: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class _Rows:
    """Reads one table's live rows (gorm's soft-deleted ones are what headscale hides too)."""

    def __init__(self, conn: sqlite3.Connection, db: Path, out: _Read) -> None:
        self.conn, self.db, self.out = conn, db, out

    def columns(self, table: str) -> set[str]:
        return {r[1] for r in self.conn.execute(f'PRAGMA table_info("{table}")')}

    def rows(self, table: str) -> list[dict[str, Any]]:
        cols = self.columns(table)
        where = " WHERE deleted_at IS NULL" if "deleted_at" in cols else ""
        cur = self.conn.execute(f'SELECT * FROM "{table}"{where} ORDER BY id')
        names = [c[0] for c in cur.description]
        rows = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
        if where:
            (n,) = self.conn.execute(
                f'SELECT COUNT(*) FROM "{table}" WHERE deleted_at IS NOT NULL'
            ).fetchone()
            if n:
                self.out.notes.append(
                    f"{self.db}: {table}: {n} soft-deleted row(s) skipped (headscale hides them too)"
                )
        return rows

    def field(self, table: str, row: dict[str, Any], name: str, parse: Any) -> Any:
        """`parse(row[name])`, or None with a located error recorded."""
        try:
            return parse(row.get(name))
        except ValueError as e:
            self.out.errors.append(f"{self.db}: table {table}, row id {row.get('id')}, {name}: {e}")
            return None


def read_headscale(conn: sqlite3.Connection, db: Path) -> _Read:
    out = _Read()
    r = _Rows(conn, db, out)
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if "nodes" not in tables:
        old = sorted(tables & set(_PRE_023_TABLES))
        raise ImportRefused(
            f"{db}: no nodes table"
            + (f" (it has {', '.join(old)}: a headscale older than 0.23)" if old else "")
            + "; upgrade headscale to 0.23 or later, start it once so it migrates its "
            "database, stop it, and import again"
        )
    for t in ("users", "pre_auth_keys", "api_keys", "policies"):
        if t not in tables:
            raise ImportRefused(f"{db}: table {t} is missing: not a headscale 0.23+ database")
    for t in sorted(tables - set(_TABLES) - set(_IGNORED_TABLES)):
        if t.startswith(_IGNORED_TABLE_PREFIXES):
            continue
        (n,) = conn.execute(f'SELECT COUNT(*) FROM "{t}"').fetchone()
        if not n:
            continue
        if t == "routes":
            continue  # read with the nodes (headscale before 0.26 kept routes there)
        if t.startswith("oauth_"):
            out.not_carried.append(
                f"{db}: table {t}: {n} row(s) (homescale has no OAuth clients for its API; "
                f"create API keys with `homescale apikeys create`)"
            )
        else:
            out.not_carried.append(f"{db}: table {t}: {n} row(s) (not a table homescale knows)")

    _read_users(r, out)
    keys_ephemeral = _read_pre_auth_keys(r, out)
    _read_api_keys(r, out)
    _read_nodes(r, out, keys_ephemeral, "routes" in tables)
    pol = r.rows("policies")
    if pol and pol[-1].get("data"):
        out.policy = (int(pol[-1]["id"]), _text(pol[-1]["data"]))
    return out


def _read_users(r: _Rows, out: _Read) -> None:
    names: dict[str, int] = {}
    for row in r.rows("users"):
        uid = int(row["id"])
        name = _text(row.get("name")).strip()
        if not name:
            out.errors.append(f"{r.db}: table users, row id {uid}, name: empty")
            continue
        if name in names:
            # headscale allows one name per identity provider; homescale's names are unique.
            out.errors.append(
                f"{r.db}: table users, row id {uid}, name: {name!r} is also user id "
                f"{names[name]} (from another identity provider); rename one in headscale "
                f"(headscale users rename) and import again"
            )
            continue
        names[name] = uid
        out.users.append(
            {
                "id": uid,
                "name": name,
                "display_name": _text(row.get("display_name")),
                "email": _text(row.get("email")),
                "profile_pic_url": _text(row.get("profile_pic_url")),
                "provider": _text(row.get("provider")),
                "provider_id": _text(row.get("provider_identifier")),
                "created_at": to_iso(r.field("users", row, "created_at", _go_time)),
            }
        )


def _read_pre_auth_keys(r: _Rows, out: _Read) -> dict[int, bool]:
    """Import the bcrypt-hashed keys; returns every key's ephemeral flag (nodes inherit it)."""
    ephemeral: dict[int, bool] = {}
    user_ids = {u["id"] for u in out.users}
    for row in r.rows("pre_auth_keys"):
        kid = int(row["id"])
        eph = _flag(row.get("ephemeral"))
        ephemeral[kid] = eph
        prefix = _text(row.get("prefix"))
        hashed = row.get("hash")
        if not prefix or not hashed:
            # Before headscale 0.27 the key itself was stored (column `key`), in a shape
            # homescale's keys do not have; such keys are usually spent anyway.
            spent = _flag(row.get("used")) and not _flag(row.get("reusable"))
            out.not_carried.append(
                f"{r.db}: table pre_auth_keys, row id {kid}: a legacy-format key (no "
                f"prefix/hash){' (already used)' if spent else ''}; create a new one with "
                f"`homescale preauthkeys create`"
            )
            continue
        if len(prefix) != _KEY_PREFIX_LEN or not all(c in "0123456789abcdef" for c in prefix):
            out.errors.append(
                f"{r.db}: table pre_auth_keys, row id {kid}, prefix: expected 12 hex "
                f"characters, got {prefix!r}"
            )
            continue
        user_id = row.get("user_id")
        if user_id is not None and int(user_id) not in user_ids:
            user_id = None  # ON DELETE SET NULL in headscale: the user is gone
        expiration = r.field("pre_auth_keys", row, "expiration", _go_time)
        revoked = r.field("pre_auth_keys", row, "revoked", _go_time)
        if revoked is not None and (expiration is None or revoked < expiration):
            expiration = revoked  # a revoked key is an expired key to homescale
        out.pre_auth_keys.append(
            {
                "id": kid,
                "prefix": prefix,
                "hash": _bcrypt_stored(hashed),
                "user_id": None if user_id is None else int(user_id),
                "reusable": int(_flag(row.get("reusable"))),
                "ephemeral": int(eph),
                "used": int(_flag(row.get("used"))),
                "tags": json.dumps(r.field("pre_auth_keys", row, "tags", _tags) or []),
                "expiration": to_iso(expiration),
                "created_at": to_iso(r.field("pre_auth_keys", row, "created_at", _go_time))
                or to_iso(datetime.now(UTC)),
            }
        )
    return ephemeral


def _read_api_keys(r: _Rows, out: _Read) -> None:
    for row in r.rows("api_keys"):
        kid = int(row["id"])
        prefix = _text(row.get("prefix"))
        if len(prefix) != _KEY_PREFIX_LEN or not all(c in "0123456789abcdef" for c in prefix):
            out.not_carried.append(
                f"{r.db}: table api_keys, row id {kid} (prefix {prefix!r}): a legacy-format "
                f"API key (prefix.secret); create a new one with `homescale apikeys create`"
            )
            continue
        if row.get("user_id") is not None:
            # headscale's v2 API scopes such keys to one user; homescale's API keys are
            # admin keys, so carrying it over would widen what the key may do.
            out.not_carried.append(
                f"{r.db}: table api_keys, row id {kid} (prefix {prefix}): scoped to user id "
                f"{row['user_id']}; homescale's API keys are admin keys, so it is not imported"
            )
            continue
        if not row.get("hash"):
            out.errors.append(f"{r.db}: table api_keys, row id {kid}, hash: empty")
            continue
        out.api_keys.append(
            {
                "id": kid,
                "prefix": prefix,
                "hash": _bcrypt_stored(row["hash"]),
                "expiration": to_iso(r.field("api_keys", row, "expiration", _go_time)),
                "last_seen": to_iso(r.field("api_keys", row, "last_seen", _go_time)),
                "created_at": to_iso(r.field("api_keys", row, "created_at", _go_time))
                or to_iso(datetime.now(UTC)),
            }
        )


def _bcrypt_stored(h: Any) -> str:
    """headscale's bcrypt hash (a blob `$2a$10$...`) in homescale's `scheme$...` form."""
    return BCRYPT_SCHEME + "$" + _text(h)


def _read_nodes(r: _Rows, out: _Read, key_ephemeral: dict[int, bool], has_routes: bool) -> None:
    t = "nodes"
    cols = r.columns(t)
    tag_col = "tags" if "tags" in cols else "forced_tags"
    enabled_routes: dict[int, list[str]] = {}
    advertised_routes: dict[int, list[str]] = {}
    if has_routes:
        # headscale before 0.26: one row per route; `enabled` is what the admin approved.
        for row in r.rows("routes"):
            nid = int(row["node_id"])
            p = r.field("routes", row, "prefix", lambda v: _prefixes(json.dumps([_text(v)])))
            if not p:
                continue
            if _flag(row.get("advertised")):
                advertised_routes.setdefault(nid, []).extend(p)
            if _flag(row.get("enabled")):
                enabled_routes.setdefault(nid, []).extend(p)
    user_ids = {u["id"] for u in out.users}
    key_ids = {k["id"] for k in out.pre_auth_keys}
    seen: dict[str, dict[Any, int]] = {"machine_key": {}, "node_key": {}, "given_name": {}}
    seen.update(ipv4={}, ipv6={})
    for row in r.rows(t):
        nid = int(row["id"])
        before = len(out.errors)
        node: dict[str, Any] = {
            "id": nid,
            "machine_key": r.field(t, row, "machine_key", _key(MachinePublic, False)),
            "node_key": r.field(t, row, "node_key", _key(NodePublic, False)),
            "disco_key": r.field(t, row, "disco_key", _key(DiscoPublic, True)),
            "endpoints": r.field(t, row, "endpoints", _str_list),
            "hostinfo": r.field(t, row, "host_info", lambda v: _json(v, dict, {})),
            "ipv4": r.field(t, row, "ipv4", _addr(4)),
            "ipv6": r.field(t, row, "ipv6", _addr(6)),
            "hostname": _text(row.get("hostname")),
            "given_name": _text(row.get("given_name")).strip(),
            "tags": r.field(t, row, tag_col, _tags),
            "expiry": r.field(t, row, "expiry", _go_time),
            "last_seen": r.field(t, row, "last_seen", _go_time),
            "approved_routes": r.field(t, row, "approved_routes", _prefixes),
            "created_at": r.field(t, row, "created_at", _go_time),
        }
        if len(out.errors) > before:
            continue
        if not node["given_name"]:
            out.errors.append(f"{r.db}: table nodes, row id {nid}, given_name: empty")
            continue
        if node["ipv4"] is None and node["ipv6"] is None:
            out.errors.append(f"{r.db}: table nodes, row id {nid}, ipv4/ipv6: no address")
            continue
        for col, taken in seen.items():
            v = node[col]
            if v is not None and v in taken:
                out.errors.append(
                    f"{r.db}: table nodes, row id {nid}, {col}: {v} is also node id {taken[v]}"
                )
            taken[v] = nid
        user_id = row.get("user_id")
        user_id = None if user_id is None else int(user_id)
        if user_id is not None and user_id not in user_ids:
            if not node["tags"]:
                out.errors.append(
                    f"{r.db}: table nodes, row id {nid}, user_id: user {user_id} does not "
                    f"exist (and the node has no tags to own it)"
                )
                continue
            user_id = None
        auth_key_id = row.get("auth_key_id")
        # auth_key_id 0 is how some headscale versions wrote "none" (their FK failed on it).
        auth_key_id = int(auth_key_id) if auth_key_id else None
        ephemeral = key_ephemeral.get(auth_key_id, False) if auth_key_id else False
        if auth_key_id not in key_ids:
            auth_key_id = None
        approved = list(node["approved_routes"])
        approved += [p for p in enabled_routes.get(nid, []) if p not in approved]
        hostinfo = node["hostinfo"]
        advertised = [
            p for p in advertised_routes.get(nid, []) if p not in hostinfo.get("RoutableIPs", [])
        ]
        if advertised:
            hostinfo = {**hostinfo, "RoutableIPs": [*hostinfo.get("RoutableIPs", []), *advertised]}
        requested = [
            x for x in (hostinfo.get("RequestTags") or []) if isinstance(x, str)
        ]  # --advertise-tags
        missing = sorted(set(requested) - set(node["tags"]))
        if missing:
            out.notes.append(
                f"node id {nid} ({node['given_name']}): requested tags (--advertise-tags) "
                f"{', '.join(missing)} are not among its tags in headscale's database and are "
                f"not applied; grant them with `homescale nodes tag`"
            )
        method = _text(row.get("register_method")) or "authkey"
        node.update(
            user_id=user_id,
            auth_key_id=auth_key_id,
            ephemeral=ephemeral,
            approved_routes=approved,
            hostinfo=hostinfo,
            register_method=method if method in ("authkey", "cli", "oidc") else "cli",
            updated_at=r.field(t, row, "updated_at", _go_time) or datetime.now(UTC),
        )
        if node["created_at"] is None:
            node["created_at"] = datetime.now(UTC)
        out.nodes.append(_node_values(node))


# ---------------------------------------------------------------- writing


def _write_rows(store: Store, table: str, identity: str, rows: list[dict[str, Any]]) -> None:
    """Insert, or update a row this import wrote before (same id, same identity)."""
    for values in rows:
        existing = store.db.execute(
            f"SELECT {identity} FROM {table} WHERE id = ?", [values["id"]]
        ).fetchone()
        if existing is None:
            cols = ", ".join(values)
            store.db.execute(
                f"INSERT INTO {table} ({cols}) VALUES ({', '.join('?' * len(values))})",
                list(values.values()),
            )
        elif existing[0] == values[identity]:
            sets = ", ".join(f"{k} = ?" for k in values if k != "id")
            store.db.execute(
                f"UPDATE {table} SET {sets} WHERE id = ?",
                [v for k, v in values.items() if k != "id"] + [values["id"]],
            )
        else:
            raise ImportRefused(
                f"{store.path}: {table} id {values['id']} is {existing[0]!r} here but "
                f"{values[identity]!r} in headscale: import into a fresh homescale database"
            )


def _refuse_other_data(store: Store, read: _Read) -> None:
    """The target must be fresh, or hold only what an earlier run of this import wrote."""
    for table, rows in (
        ("users", read.users),
        ("nodes", read.nodes),
        ("pre_auth_keys", read.pre_auth_keys),
        ("api_keys", read.api_keys),
    ):
        ids = {r["id"] for r in rows}
        extra = [i for (i,) in store.db.execute(f"SELECT id FROM {table}").fetchall()]
        extra = [i for i in extra if i not in ids]
        if extra:
            raise ImportRefused(
                f"{store.path}: the homescale database already has {table} that are not in "
                f"this headscale database (ids {', '.join(map(str, extra[:5]))}); import into "
                f"a fresh homescale database (a new database.sqlite.path)"
            )


def _import_into(store: Store, read: _Read, config: Config, report: ImportReport) -> None:
    from .policies import PolicyInvalid, check_policy_text

    _refuse_other_data(store, read)
    with store.transaction():
        try:
            _write_rows(store, "users", "name", read.users)
            _write_rows(store, "pre_auth_keys", "prefix", read.pre_auth_keys)
            _write_rows(store, "api_keys", "prefix", read.api_keys)
            _write_rows(store, "nodes", "machine_key", read.nodes)
        except sqlite3.IntegrityError as e:
            raise ImportRefused(f"{store.path}: {e}") from None
        if read.policy is not None:
            pid, text = read.policy
            try:
                check_policy_text(text, f"headscale policies row id {pid}", store)
            except PolicyInvalid as e:
                raise ImportRefused(
                    f"the policy (table policies, row id {pid}) does not load in homescale:"
                    f"\n  {e}\nfix it in headscale (headscale policy set) and import again"
                ) from None
            current = store.policy()
            if current is None or current.data != text:
                store.set_policy(text)
    report.counts.update(
        users=len(read.users),
        nodes=len(read.nodes),
        pre_auth_keys=len(read.pre_auth_keys),
        api_keys=len(read.api_keys),
        policy=int(read.policy is not None),
    )
    if read.policy is not None and config.policy_mode != "database":
        report.notes.append(
            "the imported policy is stored in the database, but homescale's policy.mode is "
            "'file': set policy.mode: database to use it"
        )
    for n in read.nodes:
        for col, net in (("ipv4", config.prefix_v4), ("ipv6", config.prefix_v6)):
            a = n[col]
            if a and (net is None or ipaddress.ip_address(a) not in net):
                report.notes.append(
                    f"node id {n['id']} ({n['given_name']}): {a} is outside homescale's "
                    f"prefixes.{col[2:]} ({net}); set prefixes.{col[2:]} to headscale's"
                )


def _carry_key(
    src: Path | None, dst: Path, what: str, report: ImportReport, dry: bool, *, optional: bool
) -> None:
    """Copy headscale's private key file; the one it replaces is kept beside it.

    `optional`: a missing file is only noted (headscale writes its DERP key only when
    its embedded relay ran; DERP clients take a new relay key without a login)."""
    if src is None or (optional and not src.exists()):
        where = f" ({src} does not exist)" if src is not None else ""
        message = f"{what}: no source key{where} (pass the key file, or --config with its path)"
        (report.notes if optional else report.not_carried).append(message)
        return
    try:
        key = PrivateKey.parse(src.read_text().strip())
    except OSError as e:
        raise ImportRefused(f"{src}: cannot read {what}: {e.strerror}") from None
    except KeyParseError as e:
        raise ImportRefused(f"{src}: {what}: {e}; expected privkey:<64 hex>") from None
    text = str(key)
    if dst.exists() and dst.read_text().strip() == text:
        report.counts[what] = 1
        return
    report.counts[what] = 1
    if dry:
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        backup = dst.with_name(dst.name + ".before-import")
        shutil.copy2(dst, backup)
        report.notes.append(f"{dst}: replaced by headscale's {what}; the old key is in {backup}")
    tmp = dst.with_name(f"{dst.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, dst)


def import_headscale(source: HeadscaleSource, config: Config, *, dry_run: bool) -> ImportReport:
    """Import `source` into the store and key files `config` names (or, dry, only check)."""
    refuse_running(source.db)
    report = ImportReport(dry_run=dry_run)
    with _private_copy(source.db) as conn:
        read = read_headscale(conn, source.db)
    if read.errors:
        raise ImportRefused(
            f"{len(read.errors)} row(s) of {source.db} cannot be imported (nothing was "
            f"written):\n  " + "\n  ".join(read.errors)
        )
    report.not_carried += read.not_carried
    report.notes += read.notes
    if source.policy_mode == "file" and source.policy_path is not None:
        report.notes.append(
            f"headscale reads its policy from {source.policy_path} (policy.mode: file); "
            f"point homescale's policy.path at that file"
        )
    with tempfile.TemporaryDirectory(prefix="homescale-dry-") as tmp:
        target = config.database_path
        if dry_run:
            # The whole import, run against a copy of the target: the report is exact.
            copy = Path(tmp) / "db.sqlite"
            if target.exists():
                with sqlite3.connect(target) as src, sqlite3.connect(copy) as dst:
                    src.backup(dst)
            target = copy
        store = Store(target, wal=config.write_ahead_log and not dry_run)
        try:
            _import_into(store, read, config, report)
        finally:
            store.close()
    _carry_key(
        source.noise_key, config.noise_private_key_path, "noise_key", report, dry_run,
        optional=False,
    )  # fmt: skip
    if source.derp_key is not None or config.derp.server_enabled:
        _carry_key(
            source.derp_key, config.derp.private_key_path, "derp_key", report, dry_run,
            optional=True,
        )  # fmt: skip
    return report
