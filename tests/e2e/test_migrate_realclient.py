"""Issue 11 with real clients: devices recorded in a headscale database come up on
homescale after `homescale migrate headscale` with no login and their old addresses.

The two tsnet nodes register with a first homescale; their rows are then written,
in headscale's own schema and formats (tests/fixtures/headscale/schema.sql, gorm's
time text, bcrypt key hashes), into a headscale database next to that server's
Noise key -- what a headscale install leaves on disk. A fresh homescale (new
database, new keys, new certificate) on the same URL imports it; the clients,
restarted without any auth key, must be let in on their stored keys and reach
each other again.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import bcrypt
import pytest
import trio

from protocol.keys import read_private_key_file
from tests import realclient
from tests.e2e.conftest import (
    ONLINE_WITHIN,
    RUNNING_WITHIN,
    fetch_until,
    node_by_name,
    server_public_key,
    wait_nodes,
)
from tests.realclient import msg_has

pytestmark = [pytest.mark.realclient]

SCHEMA = Path(__file__).parent.parent / "fixtures" / "headscale" / "schema.sql"


def gorm_time(iso: str | None) -> str | None:
    """homescale's `2026-01-02T03:04:05Z` as gorm writes times into sqlite."""
    return None if not iso else iso.replace("T", " ").replace("Z", "+00:00")


def write_headscale_db(homescale_db: Path, headscale_db: Path) -> None:
    """The tailnet in `homescale_db`, as headscale 0.29 would have stored it."""
    src = sqlite3.connect(homescale_db)
    src.row_factory = sqlite3.Row
    dst = sqlite3.connect(headscale_db)
    dst.executescript(SCHEMA.read_text())
    for u in src.execute("SELECT * FROM users"):
        dst.execute(
            "INSERT INTO users (id, name, display_name, email, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [u["id"], u["name"], u["display_name"], u["email"]] + [gorm_time(u["created_at"])] * 2,
        )
    for k in src.execute("SELECT * FROM pre_auth_keys"):
        # headscale keeps bcrypt of the secret; this one is never presented again.
        h = bcrypt.hashpw(b"x" * 64, bcrypt.gensalt(4))
        dst.execute(
            "INSERT INTO pre_auth_keys (id, prefix, hash, user_id, reusable, ephemeral, used, "
            "tags, expiration, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                k["id"],
                k["prefix"],
                h,
                k["user_id"],
                k["reusable"],
                k["ephemeral"],
                k["used"],
                k["tags"],
                gorm_time(k["expiration"]),
                gorm_time(k["created_at"]),
            ],
        )
    for n in src.execute("SELECT * FROM nodes"):
        dst.execute(
            "INSERT INTO nodes (id, machine_key, node_key, disco_key, endpoints, host_info, "
            "ipv4, ipv6, hostname, given_name, user_id, register_method, tags, auth_key_id, "
            "last_seen, expiry, approved_routes, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                n["id"],
                n["machine_key"],
                n["node_key"],
                n["disco_key"],
                n["endpoints"],
                n["hostinfo"],
                n["ipv4"],
                n["ipv6"],
                n["hostname"],
                n["given_name"],
                n["user_id"],
                n["register_method"],
                "null" if n["tags"] == "[]" else n["tags"],  # a nil Go slice, as headscale writes
                n["auth_key_id"],
                gorm_time(n["last_seen"]),
                gorm_time(n["expiry"]) or "0001-01-01 00:00:00+00:00",  # Go's zero time
                n["approved_routes"],
                gorm_time(n["created_at"]),
                gorm_time(n["updated_at"]),
            ],
        )
    dst.commit()
    dst.close()
    src.close()


@pytest.mark.usefixtures("realclient_ready")  # the tier check, outside the trio run
async def test_clients_come_back_after_import_without_login(tmp_path: Path) -> None:
    first = realclient.HomescaleServer(tmp_path / "first")
    clients: list[realclient.TsnetClient] = []
    second: realclient.HomescaleServer | None = None
    try:
        first.start()
        await first.acli("users", "create", "alice")
        key = await trio.to_thread.run_sync(first.create_key, "alice", "--reusable")
        for name in ("nodea", "nodeb"):
            c = realclient.TsnetClient(tmp_path / "clients", name, first.url, auth_key=key)
            c.start()
            clients.append(c)
        before = await wait_nodes(first, ["nodea", "nodeb"], timeout=ONLINE_WITHIN + 15)
        for c in clients:
            c.stop()
        first.stop()

        # What a stopped headscale leaves: its database and its Noise key.
        hs = tmp_path / "headscale"
        hs.mkdir()
        write_headscale_db(first.data / "db.sqlite", hs / "db.sqlite")
        shutil.copy(first.data / "noise_private.key", hs / "noise_private.key")
        (hs / "config.yaml").write_text(
            "database:\n  type: sqlite\n  sqlite:\n    path: db.sqlite\n"
            "noise:\n  private_key_path: noise_private.key\n"
        )

        # A fresh homescale on the same URL: its own database, keys and certificate.
        second = realclient.HomescaleServer(tmp_path / "second")
        text = second.config.read_text().replace(str(second.port), str(first.port))
        second.config.write_text(text)
        second.port, second.url = first.port, first.url
        assert (second.data / "noise_private.key").read_text() != (
            hs / "noise_private.key"
        ).read_text()
        r = await second.acli("migrate", "headscale", "--config", str(hs / "config.yaml"))
        assert "imported: 1 users, 2 nodes, 1 pre_auth_keys" in r.stdout, r.stdout + r.stderr
        second.start()
        # The server answers with headscale's Noise key. (tsnet 1.90 would also follow a
        # changed server key; older clients and the DERP/TKA paths expect it unchanged.)
        headscale_key = read_private_key_file(hs / "noise_private.key").machine_public()
        assert await server_public_key(second) == headscale_key

        # The clients restart with no auth key: only their stored registration lets them in.
        since = {}
        for i, c in enumerate(clients):
            clients[i] = realclient.TsnetClient(tmp_path / "clients", c.name, second.url)
            since[c.name] = clients[i].log.mark()
            clients[i].start()
        after = await wait_nodes(second, ["nodea", "nodeb"], timeout=ONLINE_WITHIN + 15)
        for name in ("nodea", "nodeb"):
            old, new = node_by_name(before, name), node_by_name(after, name)
            assert old is not None
            assert new is not None
            assert (new["id"], new["nodeKey"], new["machineKey"], new["ipAddresses"]) == (
                old["id"],
                old["nodeKey"],
                old["machineKey"],
                old["ipAddresses"],
            )
        assert len(after) == 2  # no new registration
        for c in clients:
            await c.wait_for_log(
                msg_has("Switching ipn state", "-> Running"),
                since=since[c.name],
                timeout=RUNNING_WITHIN,
                what=f"{c.name} Running on the new server",
            )
            c.log.assert_absent(
                msg_has("NeedsLogin"),
                since=since[c.name],
                what=f"{c.name} asked to log in",
                proof=c.render_log("Switching ipn state Starting -> NeedsLogin (WantRunning=true)"),
            )
        a = node_by_name(after, "nodea")
        assert a is not None
        body = await fetch_until(clients[1], f"{a['ipAddresses'][0]}:80")
        assert body == b"hello from nodea"
        users = json.loads((await second.acli("users", "list", "-o", "json")).stdout)
        assert [u["name"] for u in users] == ["alice"]
    finally:
        for c in clients:
            c.stop()
        first.stop()
        if second is not None:
            second.stop()
