"""Benchmark: `homescale migrate headscale` on a large headscale database.

A headscale-schema database (tests/fixtures/headscale/schema.sql) with N users and
N nodes (keys, addresses, host info, routes, tags on every tenth) is imported into
a fresh homescale store; printed: the wall time of the import and the rows per
second, for a dry run and the real one. Run with `make bench`.
"""

from __future__ import annotations

import json
import sqlite3
import tempfile
import time
from pathlib import Path

import trio

from appliance.config import load_config
from appliance.migrate_headscale import HeadscaleSource, import_headscale
from tests.bench import Figure

SCHEMA = Path(__file__).parent / "fixtures" / "headscale" / "schema.sql"
NODES = 5000
USERS = 50


def _headscale_db(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.executescript(SCHEMA.read_text())
    t = "2025-01-01 00:00:00.123456789+00:00"
    conn.executemany(
        "INSERT INTO users (id, name, email, created_at) VALUES (?, ?, ?, ?)",
        [(u, f"user{u}", f"user{u}@example.com", t) for u in range(1, USERS + 1)],
    )
    rows = []
    for i in range(1, NODES + 1):
        tagged = i % 10 == 0
        hostinfo = {
            "Hostname": f"host{i}",
            "OS": "linux",
            "RoutableIPs": [f"10.{i // 256}.{i % 256}.0/24"],
        }
        rows.append(
            (i, f"mkey:{i:064x}", f"nodekey:{i:064x}", f"discokey:{i:064x}", '["192.0.2.1:41641"]',
             json.dumps(hostinfo), f"100.64.{i // 256}.{i % 256}", f"fd7a:115c:a1e0::{i:x}",
             f"host{i}", f"host{i}", None if tagged else 1 + i % USERS, "authkey",
             '["tag:server"]' if tagged else "null", None, t, "0001-01-01 00:00:00+00:00",
             json.dumps(hostinfo["RoutableIPs"]), t, t)
        )  # fmt: skip
    conn.executemany(
        "INSERT INTO nodes (id, machine_key, node_key, disco_key, endpoints, host_info, ipv4, "
        "ipv6, hostname, given_name, user_id, register_method, tags, auth_key_id, last_seen, "
        "expiry, approved_routes, created_at, updated_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        rows,
    )
    conn.commit()
    conn.close()


def _run() -> list[Figure]:
    with tempfile.TemporaryDirectory(prefix="hs-bench-migrate-") as d:
        src = Path(d) / "headscale.sqlite"
        _headscale_db(src)
        cfg = Path(d) / "config.yaml"
        cfg.write_text(
            "noise:\n  private_key_path: noise.key\ndatabase:\n  sqlite:\n    path: db.sqlite\n"
            "dns:\n  base_domain: ts.example\n"
        )
        config = load_config(cfg, {})
        figures = []
        for dry in (True, False):
            t0 = time.perf_counter()
            report = import_headscale(HeadscaleSource(db=src), config, dry_run=dry)
            took = time.perf_counter() - t0
            assert report.counts["nodes"] == NODES
            label = "dry run" if dry else "import"
            figures += [
                Figure(f"migrate {label}: {NODES} nodes + {USERS} users", took, "s"),
                Figure(f"migrate {label}: rows per second", (NODES + USERS) / took, "rows/s"),
            ]
        return figures


async def bench_migrate_headscale() -> list[Figure]:
    """Importing a headscale database of 5,000 nodes (dry run and real)."""
    return await trio.to_thread.run_sync(_run)


if __name__ == "__main__":
    for f in trio.run(bench_migrate_headscale):
        print(f"  {f.name:<60} {f.value:>12.2f} {f.unit}")
