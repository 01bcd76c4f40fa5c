"""The tailcfg.Node a peer receives and the PeerChange patches between two states of it."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from typing import Any

import pytest

from netmap.nodes import ZERO_DISCO, PeerNode, encode_node, node_json, patch_between
from protocol import tailcfg

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
T1 = datetime(2024, 5, 1, 13, 30, 0, tzinfo=UTC)

BASE = PeerNode(
    id=7,
    given_name="laptop",
    user_id=3,
    node_key="nodekey:" + "11" * 32,
    machine_key="mkey:" + "22" * 32,
    disco_key="discokey:" + "33" * 32,
    ipv4="100.64.0.7",
    ipv6="fd7a:115c:a1e0::7",
    endpoints=("192.0.2.1:41641",),
    hostinfo={"Hostname": "laptop", "OS": "linux", "NetInfo": {"PreferredDERP": 999}},
    home_derp=999,
    created=T0,
    online=True,
    capver=106,
)


def _keys(obj: Any) -> list[str]:
    """Every object key anywhere in a JSON value."""
    if isinstance(obj, dict):
        return [*obj, *(k for v in obj.values() for k in _keys(v))]
    if isinstance(obj, list):
        return [k for v in obj for k in _keys(v)]
    return []


def test_peer_node_json_shape() -> None:
    out = json.loads(encode_node(BASE, "tail.example"))
    assert out["ID"] == 7
    assert out["StableID"] == "7"
    assert out["Name"] == "laptop.tail.example."  # FQDN with the trailing dot
    assert out["User"] == 3
    assert out["Addresses"] == ["100.64.0.7/32", "fd7a:115c:a1e0::7/128"]
    assert out["AllowedIPs"] == out["Addresses"]
    assert out["HomeDERP"] == 999
    assert out["DERP"] == "127.3.3.40:999"  # the legacy form clients < capver 111 read
    assert out["Hostinfo"]["Hostname"] == "laptop"
    assert out["MachineAuthorized"] is True
    assert out["Online"] is True
    assert "LastSeen" not in out  # online: headscale leaves it out
    assert out["KeyExpiry"] == "0001-01-01T00:00:00Z"
    assert "" not in _keys(out)
    node = tailcfg.Node.from_json(out)
    assert str(node.Key) == BASE.node_key
    assert str(node.DiscoKey) == BASE.disco_key
    assert node.Created == T0
    assert node.Cap == 106


def test_served_routes_are_in_allowed_ips_and_primary_routes() -> None:
    n = dataclasses.replace(
        BASE, primary_routes=("10.1.0.0/16",), exit_routes=("0.0.0.0/0", "::/0")
    )
    out = node_json(n, "tail.example")
    assert out["AllowedIPs"] == [*out["Addresses"], "10.1.0.0/16", "0.0.0.0/0", "::/0"]
    # Exit routes are not "primary" subnet routes; the client reads them from AllowedIPs.
    assert out["PrimaryRoutes"] == ["10.1.0.0/16"]


def test_minimal_node_still_has_hostinfo_object_and_no_empty_keys() -> None:
    n = PeerNode(
        id=1,
        given_name="bare",
        user_id=1,
        node_key="nodekey:" + "aa" * 32,
        machine_key="mkey:" + "bb" * 32,
    )
    out = node_json(n, "")
    assert out["Name"] == "bare."
    assert out["Hostinfo"] == {}  # an object, never absent or null
    assert out["DiscoKey"] == ZERO_DISCO  # a valid key text, never "" (the client rejects "")
    assert "HomeDERP" not in out
    assert "DERP" not in out
    assert "Tags" not in out
    assert "" not in _keys(out)
    assert tailcfg.Node.from_json(out).Hostinfo is not None


def test_last_seen_only_when_offline() -> None:
    online = dataclasses.replace(BASE, last_seen=T1)
    assert "LastSeen" not in node_json(online, "tail.example")
    offline = dataclasses.replace(online, online=False)
    out = node_json(offline, "tail.example")
    assert out["Online"] is False
    assert out["LastSeen"] == "2024-05-01T13:30:00Z"


def test_tags_are_listed() -> None:
    out = node_json(dataclasses.replace(BASE, tags=("tag:web",)), "tail.example")
    assert out["Tags"] == ["tag:web"]


# -- patches ---------------------------------------------------------------------


def test_endpoint_change_is_an_endpoints_patch() -> None:
    new = dataclasses.replace(BASE, endpoints=("198.51.100.2:41641", "192.0.2.1:41641"))
    patch = patch_between(BASE, new)
    assert patch == {"NodeID": 7, "Endpoints": ["198.51.100.2:41641", "192.0.2.1:41641"]}
    assert tailcfg.PeerChange.from_json(patch).Endpoints == list(new.endpoints)


def test_disco_key_and_node_key_and_expiry_are_patchable() -> None:
    new = dataclasses.replace(
        BASE, disco_key="discokey:" + "44" * 32, node_key="nodekey:" + "55" * 32, key_expiry=T1
    )
    patch = patch_between(BASE, new)
    assert patch == {
        "NodeID": 7,
        "DiscoKey": new.disco_key,
        "Key": new.node_key,
        "KeyExpiry": "2024-05-01T13:30:00Z",
    }
    tailcfg.PeerChange.from_json(patch)


def test_home_derp_change_is_a_derp_region_patch() -> None:
    new = dataclasses.replace(
        BASE, home_derp=900, hostinfo={**BASE.hostinfo, "NetInfo": {"PreferredDERP": 900}}
    )
    assert patch_between(BASE, new) == {"NodeID": 7, "DERPRegion": 900}


def test_clearing_the_home_region_needs_the_full_node() -> None:
    new = dataclasses.replace(BASE, home_derp=0, hostinfo={**BASE.hostinfo, "NetInfo": {}})
    assert patch_between(BASE, new) is None


def test_online_and_offline_patches() -> None:
    offline = dataclasses.replace(BASE, online=False, last_seen=T1)
    assert patch_between(BASE, offline) == {
        "NodeID": 7,
        "Online": False,
        "LastSeen": "2024-05-01T13:30:00Z",
    }
    assert patch_between(offline, dataclasses.replace(offline, online=True)) == {
        "NodeID": 7,
        "Online": True,
    }


@pytest.mark.parametrize(
    "change",
    [
        {"given_name": "renamed"},
        {"tags": ("tag:web",)},
        {"ipv4": "100.64.0.8"},
        {"ipv6": None},
        {"user_id": 4},
        {"primary_routes": ("10.0.0.0/8",)},
        {"hostinfo": {**BASE.hostinfo, "OS": "windows"}},
    ],
)
def test_non_patchable_changes_need_the_full_node(change: dict[str, Any]) -> None:
    assert patch_between(BASE, dataclasses.replace(BASE, **change)) is None
