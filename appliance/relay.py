"""The embedded DERP relay as the process runs it: key, routes, STUN task, DERP map.

`derp/` holds the relay and the map builder; this module wires them to the config,
to the tailnet (which node keys may connect) and to the main listener.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import trio

from derp import endpoints
from derp.derpmap import DerpMapBuilder, embedded_region, stun_port_of
from derp.errors import DerpConfigError
from derp.server import DerpServer, load_or_create_server_key, open_stun_socket
from protocol import safejson
from protocol.keys import KeyParseError, NodePublic

from .config import Config
from .errors import ConfigError
from .httpserver import Request, Response, RouteHandler
from .store import STATE_DIR_MODE
from .tailnet import Tailnet, node_is_expired

# headscale's verifyBodyLimit: a DERPAdmitClientRequest is a few hundred bytes.
VERIFY_BODY_LIMIT = 4 * 1024
BOOTSTRAP_DNS_TTL = 60.0  # seconds an answer is reused (headscale resolves per request)
BOOTSTRAP_DNS_LOOKUP_TIMEOUT = 5.0
BOOTSTRAP_DNS_MAX_NAMES = 64


def node_key_admitted(tailnet: Tailnet, node_key: str) -> bool:
    """Whether a relay lets this node key in: a registered, unexpired node's."""
    node_id = tailnet.by_node_key.get(node_key)
    row = tailnet.nodes.get(node_id) if node_id is not None else None
    return row is not None and not node_is_expired(row)


def verify_route(tailnet: Tailnet) -> RouteHandler:
    """`POST /verify`: an external derper run with `--verify-client-url` asks whether a
    node key may connect (tailcfg.DERPAdmitClientRequest -> DERPAdmitClientResponse)."""

    async def verify(req: Request) -> Response:
        if req.method != "POST":
            return Response.text("method not allowed; use POST\n", 405)
        if len(req.body) > VERIFY_BODY_LIMIT:
            return Response.text("request body too large\n", 413)
        try:
            obj = safejson.loads(req.body, max_bytes=VERIFY_BODY_LIMIT)
            if not isinstance(obj, dict) or not isinstance(obj.get("NodePublic"), str):
                raise ValueError("NodePublic: expected a nodekey:<64 hex> string")
            key = NodePublic.parse(obj["NodePublic"])
        except (safejson.JSONInputError, KeyParseError, ValueError) as e:
            return Response.text(f"Bad Request: invalid JSON: {e}\n", 400)
        return Response.json({"Allow": node_key_admitted(tailnet, str(key))})

    return verify


class BootstrapDNS:
    """`/bootstrap-dns`: the addresses of the DERP map's hostnames, for clients whose own
    DNS is broken (as headscale's DERPBootstrapDNSHandler). Resolved at most once a
    minute, each name within a few seconds, so requests cannot make lookups pile up."""

    def __init__(self, tailnet: Tailnet) -> None:
        self.tailnet = tailnet
        self.lock = trio.Lock()
        self.cached: tuple[float, int, dict[str, list[str]]] = (-BOOTSTRAP_DNS_TTL, -1, {})

    def names(self) -> list[str]:
        regions = (json.loads(self.tailnet.derp_map[1]) or {}).get("Regions") or {}
        found = {
            str(n["HostName"])
            for r in regions.values()
            for n in r.get("Nodes") or []
            if n.get("HostName")
        }
        return sorted(found)[:BOOTSTRAP_DNS_MAX_NAMES]

    async def answer(self) -> dict[str, list[str]]:
        async with self.lock:
            when, version, names = self.cached
            now = trio.current_time()
            if now - when < BOOTSTRAP_DNS_TTL and version == self.tailnet.derp_map[0]:
                return names
            out: dict[str, list[str]] = {}
            for name in self.names():
                with trio.move_on_after(BOOTSTRAP_DNS_LOOKUP_TIMEOUT):
                    try:
                        infos = await trio.socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
                    except OSError:
                        continue
                    out[name] = sorted({str(i[4][0]) for i in infos})
            self.cached = (now, self.tailnet.derp_map[0], out)
            return out


def _response(r: endpoints.Response) -> Response:
    status, headers, body = r
    return Response(status, body, list(headers))


class EmbeddedRelay:
    """`derp.server.*`: the relay on the main listener and STUN on its own UDP socket."""

    def __init__(self, config: Config, tailnet: Tailnet, log: logging.Logger) -> None:
        self.config = config
        self.tailnet = tailnet
        self.log = log
        try:
            config.derp.private_key_path.parent.mkdir(
                mode=STATE_DIR_MODE, parents=True, exist_ok=True
            )
            key = load_or_create_server_key(config.derp.private_key_path)
        except (ValueError, OSError) as e:
            raise ConfigError(f"derp.server.private_key_path: {e}") from None
        self.server = DerpServer(
            key, verify_client=self.verify if config.derp.verify_clients else None, logger=log
        )

    async def verify(self, node_key_raw: bytes) -> bool:
        """verify_clients: only registered, unexpired node keys may use the relay."""
        return node_key_admitted(self.tailnet, "nodekey:" + node_key_raw.hex())

    def routes(self) -> dict[str, RouteHandler]:
        async def probe(req: Request) -> Response:
            return _response(endpoints.probe(req.method))

        async def generate_204(req: Request) -> Response:
            return _response(endpoints.generate_204(req.headers.get("x-tailscale-challenge")))

        resolver = BootstrapDNS(self.tailnet)

        async def bootstrap_dns(req: Request) -> Response:
            names = await resolver.answer()
            return _response(endpoints.bootstrap_dns(names, req.arg("q") or None))

        return {
            "/derp/probe": probe,
            "/derp/latency-check": probe,
            "/generate_204": generate_204,
            "/bootstrap-dns": bootstrap_dns,
        }

    async def serve_stun(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        addr = self.config.derp.stun_listen_addr
        if not addr:
            task_status.started()
            return
        try:
            sock = await open_stun_socket(addr)
        except DerpConfigError as e:
            raise ConfigError(f"derp.server.stun_listen_addr: {e}") from None
        with sock:
            self.log.info("STUN listening on udp %s", addr)
            await self.server.serve_stun(sock, task_status=task_status)

    def metrics(self) -> dict[str, Callable[[], float]]:
        s = self.server.stats
        return {
            "homescale_derp_current_connections": lambda: s.current_connections,
            "homescale_derp_accepts_total": lambda: s.accepts,
            "homescale_derp_packets_received_total": lambda: s.packets_received,
            "homescale_derp_packets_sent_total": lambda: s.packets_sent,
            "homescale_derp_packets_dropped_total": lambda: s.packets_dropped_total,
            "homescale_derp_refused_total": lambda: s.refused,
            "homescale_derp_bytes_received_total": lambda: s.bytes_received,
            "homescale_derp_bytes_sent_total": lambda: s.bytes_sent,
            "homescale_derp_duplicate_replaced_total": lambda: s.duplicate_replaced,
            "homescale_derp_write_timeouts_total": lambda: s.write_timeouts,
            "homescale_derp_websocket_accepts_total": lambda: s.websocket_accepts,
            "homescale_derp_protocol_errors_total": lambda: s.protocol_errors,
            "homescale_derp_frame_timeouts_total": lambda: s.frame_timeouts,
            "homescale_derp_internal_errors_total": lambda: s.internal_errors,
            "homescale_derp_home_connections": lambda: s.current_home_connections,
            "homescale_stun_requests_total": lambda: s.stun_requests,
            "homescale_stun_answered_total": lambda: s.stun_answered,
        }


def embedded(config: Config, cert_pin: str) -> dict[str, Any] | None:
    """The embedded region for the DERP map, or None when it is not to be advertised."""
    d = config.derp
    if not (d.server_enabled and d.automatically_add_embedded_region):
        return None
    host = urlsplit(config.server_url).hostname or ""
    ipv4, ipv6 = d.ipv4, d.ipv6
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    # An IP-literal server_url needs no DNS: say so, and skip the other family
    # ("none") so clients do not try an address that cannot be ours.
    if literal is not None and literal.version == 4:
        ipv4, ipv6 = ipv4 or host, ipv6 or "none"
    elif literal is not None:
        ipv6, ipv4 = ipv6 or host, ipv4 or "none"
    stun_port = stun_port_of(d.stun_listen_addr) if d.stun_listen_addr else -1
    try:
        return embedded_region(
            server_url=_derp_url(config),
            region_id=d.region_id,
            region_code=d.region_code,
            region_name=d.region_name,
            ipv4=ipv4,
            ipv6=ipv6,
            stun_port=stun_port,
            cert_name=cert_pin,
        )
    except DerpConfigError as e:
        raise ConfigError(str(e)) from None


def _derp_url(config: Config) -> str:
    """DERP is always TLS: a plain-http server_url serves TLS on the same port too."""
    parts = urlsplit(config.server_url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"https://{parts.hostname if ':' not in (parts.hostname or '') else f'[{parts.hostname}]'}:{port}"


def map_builder(config: Config, cert_pin: str, log: logging.Logger) -> DerpMapBuilder:
    return DerpMapBuilder(
        paths=[str(p) for p in config.derp.paths],
        urls=config.derp.urls,
        embedded=embedded(config, cert_pin),
        log=log,
    )


async def run_map_updates(
    builder: DerpMapBuilder,
    config: Config,
    on_change: Callable[[dict[str, Any]], Awaitable[None]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    if not (config.derp.auto_update_enabled and config.derp.urls):
        task_status.started()
        return
    await builder.run(
        on_change,
        update_frequency=config.derp.update_frequency.total_seconds(),
        task_status=task_status,
    )
