"""The embedded DERP relay as the process runs it: key, routes, STUN task, DERP map.

`derp/` holds the relay and the map builder; this module wires them to the config,
to the tailnet (which node keys may connect) and to the main listener.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import trio

from derp import endpoints
from derp.derpmap import DerpMapBuilder, embedded_region, stun_port_of
from derp.errors import DerpConfigError
from derp.server import DerpServer, load_or_create_server_key, open_stun_socket

from .config import Config
from .errors import ConfigError
from .httpserver import Request, Response, RouteHandler
from .store import STATE_DIR_MODE
from .tailnet import Tailnet, node_is_expired


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
        node_id = self.tailnet.by_node_key.get("nodekey:" + node_key_raw.hex())
        row = self.tailnet.nodes.get(node_id) if node_id is not None else None
        return row is not None and not node_is_expired(row)

    def routes(self) -> dict[str, RouteHandler]:
        async def probe(req: Request) -> Response:
            return _response(endpoints.probe(req.method))

        async def generate_204(req: Request) -> Response:
            return _response(endpoints.generate_204(req.headers.get("x-tailscale-challenge")))

        async def bootstrap_dns(req: Request) -> Response:
            return _response(endpoints.bootstrap_dns({}, req.arg("q") or None))

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
