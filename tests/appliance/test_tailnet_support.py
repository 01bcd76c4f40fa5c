"""Helpers for the Tailnet coordinator tests: an in-memory tailnet and a way to read its streams.

No sockets, no database: a Tailnet is loaded from NodeRow/UserRow values (as
`tests/bench_netmap.py` does) and each "client" is a SessionHandle whose messages
the test composes itself, the way the stream task in appliance/control.py does.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio

from appliance.changes import NodeChanged
from appliance.config import Config, load_config
from appliance.sessions import SessionHandle
from appliance.setup import render_config
from appliance.store import NodeRow, UserRow
from appliance.tailnet import Tailnet
from protocol import tailcfg
from protocol.mapframe import message_json

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
LATER = datetime(2024, 5, 1, 12, 30, 0, tzinfo=UTC)
BASE_DOMAIN = "tailnet.internal"  # render_config's default


@functools.cache
def base_config() -> Config:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(render_config("http://127.0.0.1:8080"))
        return load_config(path, {})


def make_config(**dns: Any) -> Config:
    base = base_config()
    return dataclasses.replace(base, dns=dataclasses.replace(base.dns, **dns)) if dns else base


def user(i: int, name: str, **kw: Any) -> UserRow:
    return UserRow(id=i, name=name, created_at=NOW, **kw)


def node(i: int, user_id: int | None = 1, **kw: Any) -> NodeRow:
    values: dict[str, Any] = {
        "id": i,
        "machine_key": f"mkey:{i:064x}",
        "node_key": f"nodekey:{i:064x}",
        "given_name": f"node{i}",
        "hostname": f"node{i}",
        "disco_key": f"discokey:{i:064x}",
        "endpoints": [f"192.0.2.{i % 250}:41641"],
        "user_id": user_id,
        "ipv4": f"100.64.{i // 250}.{i % 250 + 1}",
        "ipv6": f"fd7a:115c:a1e0::{i:x}",
        "created_at": NOW,
        "hostinfo": {"Hostname": f"node{i}", "OS": "linux", "NetInfo": {"PreferredDERP": 999}},
    }
    values.update(kw)
    return NodeRow(**values)


def make_tailnet(
    users: list[UserRow],
    nodes: list[NodeRow],
    policy: str | None = None,
    config: Config | None = None,
) -> Tailnet:
    tn = Tailnet(config=config or base_config(), log=logging.getLogger("test.tailnet"))
    tn.load(users, nodes, policy)
    tn.set_derp_map(
        {
            "Regions": {
                "999": {
                    "RegionID": 999,
                    "RegionCode": "homescale",
                    "RegionName": "homescale",
                    "Nodes": [],
                }
            }
        }
    )
    return tn


def compose(tn: Tailnet, h: SessionHandle) -> dict[str, Any] | None:
    """What the stream task would send now (None: nothing); re-arms the wake-up like it does."""
    h.wake = trio.Event()
    msg = h.state.next_message(tn, NOW)
    if msg is None:
        return None
    out: dict[str, Any] = json.loads(message_json(msg))
    tailcfg.MapResponse.from_json(out)  # Go-compatible names and types, every message
    return out


def connect(tn: Tailnet, node_id: int) -> tuple[SessionHandle, dict[str, Any]]:
    """Open a stream and take its first (full) map."""
    h = tn.sessions.open(node_id)
    first = compose(tn, h)
    assert first is not None
    return h, first


def change(tn: Tailnet, node_id: int, **kw: Any) -> NodeRow:
    """The store updated the node (a fresh row, as the store hands out)."""
    row = dataclasses.replace(tn.nodes[node_id], **kw)
    tn.apply([NodeChanged(row)])
    return row


def delta_keys(msg: dict[str, Any] | None) -> set[str]:
    return set(msg or ()) - {"ControlTime"}
