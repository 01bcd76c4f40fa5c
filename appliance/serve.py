"""`homescale serve`: one trio root nursery running every listener of the server.

The nursery holds the main listener (control protocol, DERP, /health, /key,
/api/v1), the admin API on the unix socket (hypercorn), the metrics listener, and
the signal watcher. SIGTERM/SIGINT cancel the nursery (listeners stop, in-flight
work is cancelled), then the database is closed; SIGHUP reloads the policy.
"""

from __future__ import annotations

import errno
import gc
import html
import logging
import os
import resource
import signal
import socket
import ssl
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, TypeVarTuple

import trio

from derp.errors import DerpError
from protocol import tailcfg

from .admin import Admin, tailnet_routes
from .api import AdminApi
from .boundary import Boundary
from .changes import PolicyChanged
from .config import Config, OIDCSettings, split_hostport
from .control import ControlService
from .debugviews import debug_routes
from .errors import HomescaleError
from .haprobe import HAProber
from .httpserver import HttpServer, Request, Response, RouteHandler, Upgrade, UpgradeHandler
from .logins import PendingLogins
from .metrics import Metrics
from .policies import PolicyInvalid, check_policy_text, read_policy, recovery_steps
from .relay import verify_route
from .store import STATE_DIR_MODE, Store, exposure_warning
from .storethread import StoreThread
from .tailnet import Tailnet
from .users import TAGGED_USER_NAME
from .version import commit, version

if TYPE_CHECKING:
    from .oidc import OIDCLogin
    from .web import Console

R = TypeVar("R")
Ts = TypeVarTuple("Ts")


class ServeError(HomescaleError):
    """The server cannot start (port in use, socket busy, bad policy, ...)."""


class Server:
    """The running process's shared state; built by `serve`, used by every task."""

    def __init__(self, config: Config, log: logging.Logger) -> None:
        from protocol.keys import load_or_create_private_key

        self.config = config
        self.log = log
        self.store = Store(config.database_path, wal=config.write_ahead_log)
        if (exposed := exposure_warning(config.database_path)) is not None:
            log.warning("%s", exposed)
        self.store_thread = StoreThread()  # one writer: one store call at a time
        try:
            config.noise_private_key_path.parent.mkdir(
                mode=STATE_DIR_MODE, parents=True, exist_ok=True
            )
            self.noise_key = load_or_create_private_key(config.noise_private_key_path)
        except (ValueError, OSError) as e:
            self.store.close()
            raise ServeError(f"noise.private_key_path: {e}") from None
        self.metrics = Metrics()
        # Every connection, request and session runs inside this (appliance.boundary).
        self.boundary = Boundary(log.getChild("boundary"), self.metrics)
        self.routes: dict[str, RouteHandler] = {
            "/health": self.health,
            "/key": self.key,
            "/version": self.version_route,
        }
        self.upgrades: dict[str, UpgradeHandler] = {"/ts2021": self.ts2021}
        self.routes["/register/"] = self.register_page
        self.routes["/auth/"] = self.auth_page
        self.tailnet = Tailnet(config=config, log=log.getChild("tailnet"), boundary=self.boundary)
        self.admin = Admin(
            self.store, online=self.is_online, config=config, routes=tailnet_routes(self.tailnet)
        )
        self.routes["/verify"] = verify_route(self.tailnet)  # for an external derper
        self.ha_prober = HAProber(
            self.tailnet,
            config.server_url,
            config.ha_probe_interval.total_seconds(),
            config.ha_probe_timeout.total_seconds(),
            log.getChild("ha"),
        )
        self.routes["/machine/ping-response"] = self.ha_prober.ping_response
        self.control: ControlService | None = None
        # Interactive logins waiting for an admin or the OIDC provider (appliance.logins).
        self.logins = PendingLogins()
        self.oidc: OIDCLogin | None = None  # set by `serve` when oidc.issuer is configured
        self.console: Console | None = None  # the web console (appliance.web), set by `serve`
        self.metrics.gauge("homescale_nodes", lambda: len(self.tailnet.nodes), "registered nodes")
        # headscale's name for the same number, which its dashboards graph.
        self.metrics.gauge(
            "headscale_nodestore_nodes", lambda: len(self.tailnet.nodes), "nodes (headscale's name)"
        )
        self.metrics.gauge(
            "homescale_nodes_online",
            lambda: len(self.tailnet.online),
            "nodes with an open map stream",
        )
        self.metrics.gauge(
            f'homescale_build_info{{version="{version()}",commit="{commit()}"}}', lambda: 1
        )

    async def run_db(self, fn: Callable[[*Ts], R], /, *args: *Ts) -> R:
        """`fn(*args)` in the store's worker thread, one call at a time (a `RunDb`); what its
        writes committed is announced to the tailnet before this returns, even if it failed."""
        result, changes = await self.store_thread.run(self.store.recorded, fn, *args)
        if changes:
            self.tailnet.apply(changes)
        return result.unwrap()

    def is_online(self, node_id: int) -> bool:
        return node_id in self.tailnet.online

    # Interactive logins (appliance.api.InteractiveLogins, appliance.oidc.PendingLogins)
    # wait in the control service.
    async def complete_registration(
        self, user: str, reg_id: str, *, expiry: datetime | None = None, method: str = "cli"
    ) -> dict[str, Any]:
        assert self.control is not None
        return await self.control.complete_registration(user, reg_id, expiry=expiry, method=method)

    def pending_hostname(self, reg_id: str) -> str | None:
        return self.logins.hostname(reg_id)

    def reject_registration(self, reg_id: str) -> None:
        """`auth reject`: a pending login, or a pending SSH check."""
        assert self.control is not None
        if self.control.ssh_checks.get(reg_id) is not None:
            self.control.ssh_checks.finish(reg_id, accept=False, by="by an administrator")
            return
        self.control.reject_registration(reg_id)

    def add_debug_registration(self, auth_id: str, hostinfo: dict[str, Any]) -> tuple[str, str]:
        assert self.control is not None
        return self.control.add_debug_registration(auth_id, hostinfo)

    def approve_auth(self, auth_id: str) -> None:
        """`auth approve`: pass a pending SSH check (where no identity provider decides)."""
        assert self.control is not None
        self.control.ssh_checks.finish(auth_id, accept=True, by="by an administrator")

    async def auth_page(self, req: Request) -> Response:
        """An SSH check's URL: sign in at the provider, or what an admin runs."""
        from .oidc import page

        auth_id = req.path.rsplit("/", 1)[-1]
        check = self.control.ssh_checks.get(auth_id) if self.control else None
        if check is None:
            return page("Check expired", "This SSH check is unknown or has expired.", 404)
        if self.oidc is not None:
            return await self.oidc.ssh_check_page(req, auth_id)
        return page(
            "SSH check",
            f"An SSH connection from node {check.src} to node {check.dst} waits for a check. "
            f"Ask an administrator of this homescale server to run: homescale auth approve "
            f"--auth-id {auth_id}",
        )

    def pending_auth(self) -> list[dict[str, Any]]:
        """`auth list`: who waits for what -- logins, SSH checks, nodes awaiting approval."""
        from protocol.gojson import format_time

        if self.control is None:
            return []
        out = self.logins.listing()

        def owner_name(node_id: int) -> str:
            uid = self.node_owner(node_id)
            user = self.tailnet.users.get(uid) if uid is not None else None
            return user.name if user is not None else ""

        for c in self.control.ssh_checks.waiting():
            src = self.tailnet.nodes.get(c.src)
            dst = self.tailnet.nodes.get(c.dst)
            out.append(
                {
                    "authId": c.auth_id,
                    "kind": "ssh-check",
                    "hostname": f"{src.given_name if src else c.src} -> "
                    f"{dst.given_name if dst else c.dst}",
                    "machineKey": src.machine_key if src else "",
                    "user": owner_name(c.src),
                    "createdAt": format_time(c.created),
                }
            )
        for n in self.tailnet.nodes.values():
            if not n.approved:
                out.append(
                    {
                        "authId": "",
                        "nodeId": str(n.id),
                        "kind": "device-approval",
                        "hostname": n.given_name,
                        "machineKey": n.machine_key,
                        "user": owner_name(n.id) or (TAGGED_USER_NAME if n.tags else ""),
                        "createdAt": format_time(n.updated_at) if n.updated_at else "",
                    }
                )
        return out

    def node_owner(self, node_id: int) -> int | None:
        """The user owning a node; None for tagged or unknown nodes."""
        n = self.tailnet.nodes.get(node_id)
        return None if n is None or n.tags else n.user_id

    async def ts2021(self, upgrade: Upgrade) -> None:
        from .control_conn import serve_ts2021

        assert self.control is not None
        await serve_ts2021(
            upgrade,
            self.noise_key,
            self.control.handle,
            logger=self.log.getChild("noise"),
            boundary=self.boundary,
        )

    async def register_page(self, req: Request) -> Response:
        reg_id = req.path.rsplit("/", 1)[-1]
        if self.oidc is not None:  # with OIDC, the AuthURL leads to the identity provider
            from .oidc import CONFIRM_PATH

            if req.path.startswith(CONFIRM_PATH):
                return await self.oidc.confirm(req, reg_id)
            return await self.oidc.register_page(req, reg_id)
        pending = self.logins.get(reg_id)
        if pending is None:
            return Response.text(
                "unknown or expired registration; restart the login on the client\n", 404
            )
        host = html.escape(str(pending.hostinfo.get("Hostname") or "this machine"))
        cmd = f"homescale nodes register --user USERNAME --key {html.escape(reg_id)}"
        page = (
            f"<!doctype html><html><head><meta charset='utf-8'><title>homescale: register "
            f"{host}</title></head><body><h1>Register {host}</h1><p>Ask an administrator of "
            f"this homescale server to run:</p><pre>{cmd}</pre><p>(or <code>homescale auth "
            f"register --user USERNAME --auth-id {html.escape(reg_id)}</code>). The client "
            f"connects as soon as it is done.</p></body></html>"
        )
        return Response.text(page, content_type="text/html; charset=utf-8")

    # -- policy

    def load_policy(self) -> str | None:
        """(store thread) Read and check the policy; PolicyInvalid keeps the one in force."""
        text, source = read_policy(self.config, self.store)
        if text is not None:
            check_policy_text(text, source, self.store)
        if text != self.tailnet.policy_text:
            self.log.info(
                "policy loaded from %s", source if text is not None else "nowhere (allow all)"
            )
        return text

    async def reload_policy(self, why: str) -> None:
        """SIGHUP or the policy file changed: check the policy again and put it in force.
        Nothing here can stop the server: a failure keeps the policy in force and says why."""
        with self.boundary.guard("policy reload", why):
            try:
                text = await self.run_db(self.load_policy)
            except PolicyInvalid as e:
                self.log.error("policy reload refused, keeping the previous policy: %s", e)
                return
            if text != self.tailnet.policy_text:
                self.tailnet.apply([PolicyChanged(text)])

    # -- plain routes

    async def health(self, req: Request) -> Response:
        try:
            ok = await self.run_db(self.store.ping)
        except Exception:
            ok = False
        return Response.json(
            {"status": "pass" if ok else "fail", "databaseConnectivity": ok}, 200 if ok else 500
        )

    async def key(self, req: Request) -> Response:
        v = req.arg("v")
        if not v:
            return Response.text("missing capability version: GET /key?v=<capver>\n", 400)
        # ASCII digits only ("²".isdigit() is true), and a size an int holds.
        if not (v.isascii() and v.isdigit()) or len(v) > 9:
            return Response.text(f"malformed capability version {v[:40]!r}\n", 400)
        # Older clients than homescale supports are told so here, before they try Noise.
        if int(v) < tailcfg.MIN_SUPPORTED_CAPABILITY_VERSION:
            return Response.text(
                f"client too old: capability version "
                f"{tailcfg.MIN_SUPPORTED_CAPABILITY_VERSION} or newer required (Tailscale 1.56)\n",
                400,
            )
        return Response.json(
            {
                "legacyPublicKey": "mkey:" + "0" * 64,
                "publicKey": str(self.noise_key.machine_public()),
            }
        )

    async def version_route(self, req: Request) -> Response:
        return Response.json({"version": version(), "commit": commit()})

    async def metrics_route(self, req: Request) -> Response:
        # Every sample is read from memory: no reason to queue behind store writes.
        text = self.metrics.render()
        return Response.text(text, content_type="text/plain; version=0.0.4; charset=utf-8")


async def _tcp_listeners(addr: str, what: str) -> list[trio.SocketListener]:
    host, port = split_hostport(addr)
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as e:
        hint = " (another process is listening there)" if e.errno == errno.EADDRINUSE else ""
        raise ServeError(f"{what} {addr}: cannot listen: {e.strerror}{hint}") from None


def _prepare_socket(path: Path) -> None:
    """Refuse a live socket (another server runs); remove a stale one."""
    path.parent.mkdir(mode=STATE_DIR_MODE, parents=True, exist_ok=True)
    if not path.exists():
        return
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
    except OSError:
        path.unlink()
        return
    finally:
        s.close()
    raise ServeError(
        f"{path}: another homescale server is already running (its admin socket "
        f"answers); stop it first"
    )


def _ssl_context(config: Config) -> ssl.SSLContext | None:
    if config.tls_cert_path is None or config.tls_key_path is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(str(config.tls_cert_path), str(config.tls_key_path))
    except (OSError, ssl.SSLError) as e:
        raise ServeError(
            f"tls_cert_path/tls_key_path: cannot load {config.tls_cert_path} and "
            f"{config.tls_key_path}: {e}"
        ) from None
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def _first_start_cert(config: Config, log: logging.Logger) -> None:
    """The shipped config names a certificate under the state directory for the relay's
    TLS: make it (self-signed, pinned by clients) on first start. Only for a plain-http
    server_url: an https one needs a certificate clients trust, never a made-up one."""
    from urllib.parse import urlsplit

    from .tlscerts import TLSCertError, ensure_pinned_cert

    if config.tls_cert_path is None or config.tls_key_path is None:
        return
    host = urlsplit(config.server_url).hostname or "localhost"
    try:
        made = ensure_pinned_cert(
            config.tls_cert_path, config.tls_key_path, sorted({host, "localhost", "127.0.0.1"})
        )
    except (TLSCertError, OSError) as e:
        raise ServeError(f"tls_cert_path/tls_key_path: {e}") from None
    if made:
        log.info("generated %s for the DERP relay (clients pin it)", config.tls_cert_path)


# Thresholds of CPython's collector for a process holding thousands of connections
# (see _tune_gc); the load generator's workers use them too.
GC_THRESHOLDS = (50_000, 20, 20)


def _tune_gc() -> None:
    """Collect garbage less often: thousands of connections hold millions of long-lived
    objects, which CPython's default thresholds (700, 10, 10) rescan again and again
    while a tailnet grows, to free next to nothing."""
    gc.freeze()  # what is loaded at start lives as long as the process
    gc.set_threshold(*GC_THRESHOLDS)


def raise_open_files_limit(log: logging.Logger) -> int:
    """Lift the soft RLIMIT_NOFILE to the hard limit, as Go's runtime does at start.

    Every node holds two sockets (control + DERP); systemd's default soft limit of 1024
    would cap the tailnet near 500 nodes while the hard limit allows far more.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as e:
            log.warning("open files limit stays at %d (raising it to %d failed: %s)", soft, hard, e)
    return soft


async def serve(
    config: Config,
    log: logging.Logger,
    *,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the server until cancelled or signalled."""
    from hypercorn.config import Config as HypercornConfig
    from hypercorn.trio import serve as hypercorn_serve

    for w in config.warnings:
        log.warning("%s", w)
    raise_open_files_limit(log)
    server = Server(config, log)
    relay = None
    socket_ours = False  # never remove a socket another running server owns
    try:
        try:
            policy_text = await server.run_db(server.load_policy)
        except PolicyInvalid as e:
            raise ServeError(
                f"the policy is invalid, refusing to start:\n  {e}\n{recovery_steps(config.source)}"
            ) from None
        plain_url = config.server_url.startswith("http://")
        if plain_url:
            _first_start_cert(config, log)
        certs = None
        if config.acme is not None:  # Let's Encrypt: its context is renewed in place
            from .acme import AcmeError, CertManager

            try:
                certs = CertManager(config.acme, log.getChild("acme"))
            except AcmeError as e:
                raise ServeError(str(e)) from None
        ssl_ctx = certs.context if certs is not None else _ssl_context(config)
        if config.derp.server_enabled and plain_url and ssl_ctx is None:
            raise ServeError(
                "derp.server.enabled needs TLS: clients speak DERP only over TLS. Set "
                "tls_cert_path/tls_key_path (`homescale init` generates a local "
                "certificate), or use an https server_url behind a TLS proxy"
            )
        cert_pin = ""
        if ssl_ctx is not None and plain_url and config.tls_cert_path is not None:
            # No trusted name to check over plain http: clients pin our certificate instead.
            from .tlscerts import cert_name_pin

            cert_pin = cert_name_pin(config.tls_cert_path.read_bytes())
        relay = None
        if config.derp.server_enabled:
            from .relay import EmbeddedRelay

            relay = EmbeddedRelay(config, server.tailnet, log.getChild("derp"))
            server.upgrades["/derp"] = relay.server.handle_upgrade
            server.routes.update(relay.routes())
            for name, read in relay.metrics().items():
                # Prometheus naming: a `_total` only ever grows (a counter), the rest are levels.
                if name.endswith("_total"):
                    server.metrics.counter(name, read)
                else:
                    server.metrics.gauge(name, read)
        from .relay import map_builder, run_map_updates

        if config.oidc is not None:
            await _start_oidc(server, config.oidc, log)
        derp_maps = map_builder(config, cert_pin, log.getChild("derpmap"))
        try:
            await derp_maps.refresh()
        except DerpError as e:  # names the file or URL and what is wrong with it
            raise ServeError(f"DERP map: {e}") from None
        if not derp_maps.current.get("Regions"):
            # As headscale: with no relay, two clients behind NAT usually cannot connect.
            raise ServeError(
                "the DERP map is empty: clients behind NAT could not reach each other. "
                "Turn on the embedded relay (derp.server.enabled: true, with "
                "tls_cert_path/tls_key_path) or name DERP maps in derp.urls / derp.paths"
            )
        _prepare_socket(config.unix_socket)
        socket_ours = True
        main_listeners = await _tcp_listeners(config.listen_addr, "listen_addr")
        metrics_listeners = (
            await _tcp_listeners(config.metrics_listen_addr, "metrics_listen_addr")
            if config.metrics_listen_addr
            else []
        )

        def policy_check(text: str) -> None:
            check_policy_text(text, "policy", server.store)  # runs in the store's thread

        api_socket = AdminApi(
            server.admin,
            server.run_db,
            require_auth=False,
            policy_check=policy_check,
            policy_mode=config.policy_mode,
            logins=server,
            boundary=server.boundary,
        )
        api_remote = AdminApi(
            server.admin,
            server.run_db,
            require_auth=True,
            policy_check=policy_check,
            policy_mode=config.policy_mode,
            logins=server,
            boundary=server.boundary,
        )
        server.console = _start_console(
            server,
            policy_check,
            api_socket,
            api_remote,
            cert_not_after=certs.not_after if certs is not None else None,
        )
        main = HttpServer(
            routes=server.routes,
            upgrades=server.upgrades,
            asgi_prefix="/api/v1",
            asgi_app=api_remote,
            ssl_context=ssl_ctx,
            tls_optional=plain_url,
            logger=log.getChild("http"),
            boundary=server.boundary,
            max_connections_per_ip=config.max_connections_per_ip,
            upgrade_caps={
                "/derp": (config.max_derp_connections_per_ip, "limits.max_derp_connections_per_ip")
            },
            trusted_proxies=config.trusted_proxies,
        )
        server.metrics.gauge(
            "homescale_connections_refused_total",
            lambda: main.conn_cap.refused + sum(c.refused for c in main.upgrade_caps.values()),
            "connections refused because their IP already held limits.max_*connections_per_ip",
        )
        metrics = HttpServer(
            routes={"/metrics": server.metrics_route, **debug_routes(server)},
            upgrades={},
            logger=log.getChild("metrics"),
            boundary=server.boundary,
            max_connections_per_ip=config.max_connections_per_ip,
        )

        hc = HypercornConfig()
        hc.bind = [f"unix:{config.unix_socket}"]
        hc.accesslog = None
        hc.errorlog = log.getChild("api")
        hc.graceful_timeout = 1.0
        shutdown = trio.Event()

        users, nodes = await server.run_db(lambda: (server.store.users(), server.store.nodes()))
        server.tailnet.load(users, nodes, policy_text)
        _tune_gc()
        server.tailnet.set_derp_map(derp_maps.current)

        async def derp_map_changed(new_map: dict[str, Any]) -> None:
            log.info("DERP map changed: %d regions", len(new_map.get("Regions") or {}))
            server.tailnet.set_derp_map(new_map)

        async with trio.open_nursery() as nursery:
            server.control = ControlService(
                store=server.store,
                admin=server.admin,
                tailnet=server.tailnet,
                run_db=server.run_db,
                log=log.getChild("control"),
                nursery=nursery,
                logins=server.logins,
            )
            if server.console is not None:
                server.logins.added = server.console.events.pending
            if server.oidc is not None:
                server.oidc.ssh_checks = server.control.ssh_checks
                server.oidc.node_owner = server.node_owner
            nursery.start_soon(_watch_signals, server, nursery.cancel_scope, shutdown)
            server.control.reap_offline_ephemeral()
            await nursery.start(run_map_updates, derp_maps, config, derp_map_changed)
            if config.policy_mode == "file" and config.policy_path is not None:
                nursery.start_soon(_watch_policy_file, server, config.policy_path)
            if config.dns.extra_records_path is not None:
                nursery.start_soon(_watch_records_file, server, config.dns.extra_records_path)
            if config.ha_probe_interval:
                nursery.start_soon(server.ha_prober.run)
            if relay is not None:
                await nursery.start(relay.serve_stun)
            await nursery.start(main.serve, main_listeners)
            if certs is not None:  # first certificate (TLS-ALPN-01 needs main listening)
                await nursery.start(certs.run)
            if metrics_listeners:
                await nursery.start(metrics.serve, metrics_listeners)
            asgi_app: Any = api_socket  # an ASGI callable; hypercorn's stubs want its own types
            await nursery.start(
                lambda task_status: hypercorn_serve(
                    asgi_app, hc, shutdown_trigger=shutdown.wait, task_status=task_status
                )
            )
            os.chmod(config.unix_socket, config.unix_socket_permission)
            scheme = "http+tls" if ssl_ctx and plain_url else ("https" if ssl_ctx else "http")
            log.info(
                "homescale %s listening on %s://%s (server_url %s), admin socket %s%s",
                version(),
                scheme,
                config.listen_addr,
                config.server_url,
                config.unix_socket,
                f", metrics on {config.metrics_listen_addr}" if metrics_listeners else "",
            )
            task_status.started(server)
    finally:
        if relay is not None:
            relay.server.close()
        server.store_thread.stop()
        server.store.close()
        try:
            if socket_ours and config.unix_socket.is_socket():
                config.unix_socket.unlink()
        except OSError:
            pass
        log.info("stopped")


def _start_console(
    server: Server,
    policy_check: Callable[[str], None],
    *cli_apis: AdminApi,
    cert_not_after: Callable[[], datetime | None] | None = None,
) -> Console:
    """The web console at server_url/admin (appliance.web), live from the change path."""
    from .web import Console

    config = server.config
    console = Console(
        config,
        AdminApi(
            server.admin,
            server.run_db,
            require_auth=False,  # the console authorises each request itself
            policy_check=policy_check,
            policy_mode=config.policy_mode,
            logins=server,
            boundary=server.boundary,
        ),
        server.log.getChild("web"),
    )
    console.install(server.routes, server.upgrades)
    for api in cli_apis:
        console.add_cli_routes(api)
    server.tailnet.observers.append(console.changed)
    from .web.health import HealthSources

    console.health = HealthSources(config, server.tailnet, server.metrics, cert_not_after)
    if server.oidc is not None:  # sign in to the console through the provider too
        console.oidc_start = server.oidc.console_page
        server.oidc.console_signed_in = console.oidc_signed_in
    return console


async def _start_oidc(server: Server, settings: OIDCSettings, log: logging.Logger) -> None:
    """Discover the provider; unreachable stops the start only if the config says so."""
    from .oidc import CALLBACK_PATH, OIDCError, OIDCLogin

    server.oidc = OIDCLogin(
        settings,
        server_url=server.config.server_url,
        logins=server,
        store=server.store,
        run_db=server.run_db,
        log=log.getChild("oidc"),
    )
    server.routes[CALLBACK_PATH] = server.oidc.callback
    try:
        await server.oidc.start()
    except OIDCError as e:
        if settings.only_start_if_available:
            raise ServeError(
                f"oidc: {e}\n(set oidc.only_start_if_oidc_is_available: false to start "
                f"without the provider; logins then retry it)"
            ) from None
        log.warning("oidc: %s; starting anyway, each login retries the provider", e)


POLICY_POLL_INTERVAL = 1.0  # seconds between looks at the policy file (cheap: one stat)


async def _watch_policy_file(server: Server, path: Path) -> None:
    """Reload the policy when its file changes (mtime, size or inode), as headscale does."""

    def stamp() -> tuple[int, int, int] | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    last = stamp()
    while True:
        await trio.sleep(POLICY_POLL_INTERVAL)
        now = stamp()
        if now != last and now is not None:
            last = now
            server.log.info("policy file %s changed: reloading", path)
            await server.reload_policy(f"{path} changed")


def _file_stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


async def _watch_records_file(server: Server, path: Path) -> None:
    """dns.extra_records_path: when the file changes, its records reach every node as a
    new DNSConfig (as headscale watches it); a file that does not read keeps the old
    records and says why."""
    from .config import read_records_file
    from .errors import ConfigError

    last = _file_stamp(path)
    while True:
        await trio.sleep(POLICY_POLL_INTERVAL)
        now = _file_stamp(path)
        if now == last or now is None:
            continue
        last = now
        try:
            records = await trio.to_thread.run_sync(read_records_file, path)
        except ConfigError as e:
            server.log.warning("dns.extra_records_path: %s; keeping the records in use", e)
            continue
        server.log.info("%s changed: %d extra DNS records", path, len(records))
        server.tailnet.set_extra_records(records)


async def _watch_signals(server: Server, scope: trio.CancelScope, shutdown: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                server.log.info("SIGHUP: reloading the policy")
                await server.reload_policy("SIGHUP")
                continue
            server.log.info("%s: shutting down", signal.Signals(signum).name)
            # Stop accepting and cancel in-flight work (map streams, long polls): clients
            # reconnect to the next server; every store write is a transaction, so nothing
            # half-written remains.
            shutdown.set()
            scope.cancel()
            return
