"""headscale's `/debug/*` views on the metrics listener, as JSON (what its integration
scripts read): nodes, routes, filter, SSH, policy, DERP map, pending logins and the map
response each node would get now.

Like headscale (protectedDebugHandler), only loopback, Tailscale (100.64.0.0/10,
fd7a:115c:a1e0::/48) and private addresses may read them: they show the tailnet.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from netmap.mapsession import MapSessionState
from protocol.mapframe import message_json

from .errors import InvalidInput
from .fields import parse_id
from .httpserver import Request, Response, RouteHandler
from .store import utcnow

if TYPE_CHECKING:
    from .serve import Server

_TAILSCALE_NETS = (
    ipaddress.ip_network("100.64.0.0/10"),
    ipaddress.ip_network("fd7a:115c:a1e0::/48"),
)
MAX_MAP_RESPONSES = 200  # /debug/mapresponses without ?node=: at most this many nodes


def debug_access(peer: str) -> bool:
    """Whether the client at `peer` ("ip:port") may read the debug views."""
    host = peer.rsplit(":", 1)[0].strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback or ip.is_private or any(ip in n for n in _TAILSCALE_NETS)


def _json(obj: Any) -> Response:
    return Response(
        200, json.dumps(obj, indent=2).encode() + b"\n", [("Content-Type", "application/json")]
    )


def debug_routes(server: Server) -> dict[str, RouteHandler]:
    """The views, keyed by path (served next to /metrics)."""
    tn = server.tailnet

    def nodes() -> Any:
        return {
            str(nid): {
                "id": nid,
                "givenName": row.given_name,
                "user": row.user_id,
                "tags": list(row.tags),
                "online": nid in tn.online,
                "ipAddresses": [a for a in (row.ipv4, row.ipv6) if a],
                "nodeKey": row.node_key,
                "approvedRoutes": list(row.approved_routes),
                "availableRoutes": list(row.hostinfo.get("RoutableIPs") or []),
                "servedRoutes": [
                    *tn.peers[nid].primary_routes,
                    *tn.peers[nid].exit_routes,
                ]
                if nid in tn.peers
                else [],
            }
            for nid, row in sorted(tn.nodes.items())
        }

    def routes() -> Any:
        return {
            "primaryRoutes": dict(sorted(tn.primaries.items())),
            "autoApproved": {str(k): list(v) for k, v in sorted(tn.auto_approved.items())},
        }

    def filter_() -> Any:
        return {str(nid): json.loads(tn.filter_json(nid)) for nid in sorted(tn.nodes)}

    def ssh() -> Any:
        out = {}
        for nid in sorted(tn.nodes):
            raw = tn.ssh_json(nid)
            out[str(nid)] = json.loads(raw) if raw is not None else None
        return out

    def policy() -> Any:
        return {"policy": tn.policy_text}

    def derp() -> Any:
        return json.loads(tn.derp_map[1])

    def registration_cache() -> Any:
        return server.logins.listing()

    def overview() -> Any:
        return {
            "nodes": len(tn.nodes),
            "online": len(tn.online),
            "users": len(tn.users),
            "sessions": len(tn.sessions),
            "primaryRoutes": len(tn.primaries),
            "policy": tn.policy_text is not None,
        }

    def map_response(node_id: int) -> Any:
        state = MapSessionState(
            node_id=node_id,
            domain=server.config.dns.base_domain,
            disable_logtail=not server.config.logtail_enabled,
        )
        msg = state.next_message(tn, utcnow())
        return json.loads(message_json(msg)) if msg is not None else None

    views: dict[str, tuple[str, Callable[[], Any]]] = {
        "overview": ("State overview", overview),
        "nodestore": ("Nodes as the server serves them", nodes),
        "routes": ("Primary routes and autoApprovers' approvals", routes),
        "filter": ("Packet filter of each node", filter_),
        "ssh": ("SSH policy of each node", ssh),
        "policy": ("Current policy", policy),
        "derp": ("DERP map", derp),
        "registration-cache": ("Interactive logins waiting", registration_cache),
    }

    def guarded(view: Callable[[Request], Response]) -> RouteHandler:
        async def handler(req: Request) -> Response:
            if not debug_access(req.peer):
                return Response.text("debug access denied\n", 403)
            return view(req)

        return handler

    def one(fn: Callable[[], Any]) -> RouteHandler:
        return guarded(lambda req: _json(fn()))

    def map_responses(req: Request) -> Response:
        """Each node's full map response as it would be sent now (?node=ID for one)."""
        if req.arg("node"):
            try:
                nid = parse_id(req.arg("node"), "node")
            except InvalidInput as e:
                return Response.text(f"{e}\n", 400)
            if nid not in tn.nodes:
                return Response.text(f"no node {nid}\n", 404)
            return _json({str(nid): map_response(nid)})
        ids = sorted(tn.nodes)[:MAX_MAP_RESPONSES]
        return _json({str(nid): map_response(nid) for nid in ids})

    async def ping(req: Request) -> Response:
        """`/debug/ping?node=ID`: send the node a PingRequest and say whether it answered."""
        if not debug_access(req.peer):
            return Response.text("debug access denied\n", 403)
        try:
            nid = parse_id(req.arg("node"), "node")
        except InvalidInput as e:
            return Response.text(f"{e}\n", 400)
        latency, session = await server.ha_prober.ping(nid)
        return _json({"node": nid, "connected": session is not None, "latency": latency})

    def index(req: Request) -> Response:
        if req.path != "/debug/":
            return Response.text("404 page not found\n", 404)
        links = {f"/debug/{name}": what for name, (what, _) in views.items()}
        links["/debug/mapresponses"] = "Map response of each node (?node=ID for one)"
        links["/debug/ping"] = "Ping a node (?node=ID): whether and how fast it answers"
        links["/metrics"] = "Prometheus metrics"
        return _json(links)

    routes_out: dict[str, RouteHandler] = {
        f"/debug/{name}": one(fn) for name, (_, fn) in views.items()
    }
    routes_out["/debug/mapresponses"] = guarded(map_responses)
    routes_out["/debug/ping"] = ping
    routes_out["/debug/"] = guarded(index)
    return routes_out
