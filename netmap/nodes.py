"""One node as every other node sees it: the tailcfg.Node JSON, encoded once per change.

The peer JSON of a node does not depend on who receives it, so the coordinator
encodes it once per change and every recipient's message reuses the bytes -- the
cost of a change is the encoding plus one splice per recipient, never a rebuild of
every node's map.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from protocol.gojson import format_time

ZERO_TIME = "0001-01-01T00:00:00Z"
ZERO_DISCO = "discokey:" + "0" * 64
# Tailscale's legacy DERP address form: clients before capver 111 read the home
# region from `DERP: "127.3.3.40:<region>"` (tailcfg.DerpMagicIP).
DERP_MAGIC_IP = "127.3.3.40"
# The client's default for automatic updates (tailcfg.NodeAttrDefaultAutoUpdate): a JSON
# bool, true when the server offers them (headscale: auto_update.enabled).
AUTO_UPDATE_CAP = "default-auto-update"
# Node attributes headscale grants every node (hscontrol/types/node.go TailNode).
DEFAULT_CAPMAP: dict[str, list[Any]] = {
    "https://tailscale.com/cap/is-admin": [],
    "https://tailscale.com/cap/ssh": [],
    AUTO_UPDATE_CAP: [False],
}
# Taildrop, granted to every node when the server offers it (headscale: taildrop.enabled).
FILE_SHARING_CAP = "https://tailscale.com/cap/file-sharing"


@dataclass(frozen=True)
class PeerNode:
    """What the netmap needs to know about one node (plain values from the store)."""

    id: int
    given_name: str
    user_id: int
    node_key: str
    machine_key: str
    disco_key: str = ""
    tags: tuple[str, ...] = ()
    ipv4: str | None = None
    ipv6: str | None = None
    endpoints: tuple[str, ...] = ()
    hostinfo: dict[str, Any] = field(default_factory=dict)
    home_derp: int = 0
    created: datetime | None = None
    key_expiry: datetime | None = None
    last_seen: datetime | None = None
    online: bool = False
    primary_routes: tuple[str, ...] = ()
    exit_routes: tuple[str, ...] = ()
    # Approved subnet routes, primary or not (a via grant may steer a viewer to a
    # router that is not the tailnet-wide primary). Not sent as such.
    served_routes: tuple[str, ...] = ()
    capver: int = 0
    # Capabilities the policy gives the node (nodeAttrs, randomizeClientPort):
    # ``self_caps`` in its own view, ``peer_caps`` in its peers' (as sorted
    # (name, JSON value) pairs, so the dataclass stays comparable).
    self_caps: tuple[tuple[str, str], ...] = ()
    peer_caps: tuple[tuple[str, str], ...] = ()
    authorized: bool = True  # False: waiting for device approval (NeedsMachineAuth)

    @property
    def addresses(self) -> list[str]:
        out = []
        if self.ipv4:
            out.append(f"{self.ipv4}/32")
        if self.ipv6:
            out.append(f"{self.ipv6}/128")
        return out

    @property
    def has_disco(self) -> bool:
        return bool(self.disco_key) and self.disco_key != ZERO_DISCO


def fqdn(given_name: str, base_domain: str) -> str:
    """The MagicDNS name with its trailing dot (the client derives its suffix from it)."""
    return f"{given_name}.{base_domain}." if base_domain else f"{given_name}."


def cap_pairs(caps: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """A CapMap as the hashable pairs PeerNode keeps (values as canonical JSON)."""
    return tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in caps.items()))


def node_json(n: PeerNode, base_domain: str, *, self_view: bool = False) -> dict[str, Any]:
    """The tailcfg.Node object for `n`: as its peers see it, or (``self_view``)
    as the node itself does, with its own policy capabilities."""
    caps = n.self_caps if self_view else n.peer_caps
    cap_map = {**DEFAULT_CAPMAP, **{k: json.loads(v) for k, v in caps}} if caps else DEFAULT_CAPMAP
    hostinfo = dict(n.hostinfo)
    out: dict[str, Any] = {
        "ID": n.id,
        "StableID": str(n.id),
        "Name": fqdn(n.given_name, base_domain),
        "User": n.user_id,
        "Key": n.node_key,
        "KeyExpiry": format_time(n.key_expiry) if n.key_expiry else ZERO_TIME,
        "Machine": n.machine_key,
        "DiscoKey": n.disco_key or ZERO_DISCO,
        "Addresses": n.addresses,
        # Addresses plus the routes this node serves; always explicit (capver < 112
        # clients do not read null as "= Addresses").
        "AllowedIPs": n.addresses + list(n.primary_routes) + list(n.exit_routes),
        "Endpoints": list(n.endpoints),
        "Hostinfo": hostinfo,  # always an object: some client code dereferences it
        "Created": format_time(n.created) if n.created else ZERO_TIME,
        "MachineAuthorized": n.authorized,
        "CapMap": cap_map,
        "Online": n.online,
    }
    if n.home_derp:
        out["HomeDERP"] = n.home_derp
        out["DERP"] = f"{DERP_MAGIC_IP}:{n.home_derp}"
    if n.capver:
        out["Cap"] = n.capver
    if n.tags:
        out["Tags"] = list(n.tags)
    if n.primary_routes:
        out["PrimaryRoutes"] = list(n.primary_routes)
    if not n.online and n.last_seen is not None:
        out["LastSeen"] = format_time(n.last_seen)  # headscale: only for offline nodes
    return out


def encode_node(n: PeerNode, base_domain: str, *, self_view: bool = False) -> bytes:
    return json.dumps(
        node_json(n, base_domain, self_view=self_view), separators=(",", ":")
    ).encode()


# Fields a PeersChangedPatch can carry instead of the full node (tailcfg.PeerChange).
def patch_between(old: PeerNode, new: PeerNode) -> dict[str, Any] | None:
    """A PeerChange turning `old` into `new`, or None when a full node must be sent."""
    patchable = {
        "disco_key",
        "endpoints",
        "home_derp",
        "online",
        "last_seen",
        "key_expiry",
        "node_key",
        "hostinfo",
    }
    for f in PeerNode.__dataclass_fields__:
        if f not in patchable and getattr(old, f) != getattr(new, f):
            return None
    # Hostinfo is not patchable; only its NetInfo.PreferredDERP echo (home_derp) is.
    if old.hostinfo != new.hostinfo and _hostinfo_sans_netinfo(old) != _hostinfo_sans_netinfo(new):
        return None
    patch: dict[str, Any] = {"NodeID": new.id}
    if new.disco_key != old.disco_key:
        patch["DiscoKey"] = new.disco_key or ZERO_DISCO
    if new.endpoints != old.endpoints:
        patch["Endpoints"] = list(new.endpoints)
    if new.home_derp != old.home_derp and new.home_derp:
        patch["DERPRegion"] = new.home_derp
    if new.node_key != old.node_key:
        patch["Key"] = new.node_key
    if new.key_expiry != old.key_expiry:
        patch["KeyExpiry"] = format_time(new.key_expiry) if new.key_expiry else ZERO_TIME
    if new.online != old.online:
        patch["Online"] = new.online
    if new.last_seen != old.last_seen and new.last_seen is not None:
        patch["LastSeen"] = format_time(new.last_seen)
    if new.home_derp != old.home_derp and not new.home_derp:
        return None  # a patch cannot clear the home region
    return patch


def _hostinfo_sans_netinfo(n: PeerNode) -> dict[str, Any]:
    return {k: v for k, v in n.hostinfo.items() if k != "NetInfo"}
