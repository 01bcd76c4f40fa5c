"""The main listener: HTTP/1.1 (h11) over TCP, optionally TLS, with connection take-over.

hypercorn cannot hand a socket over for non-WebSocket upgrades, and Tailscale needs
exactly that for `/ts2021` (Noise) and `/derp`, so this front end is ours: plain
routes answer small requests, upgrade routes take the raw stream after the request
head, and `/api/v1/...` is passed to the admin ASGI app.
"""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network, ip_address
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
import trio

from derp.streams import PrefixedStream

from .accept import serve_in_bursts
from .boundary import Boundary

HEAD_TIMEOUT = 10.0  # a client must send a whole request head within this
# ... and a whole body within this (4 MiB at ~140 KB/s; real bodies are a few KiB).
BODY_TIMEOUT = 30.0
IDLE_TIMEOUT = 75.0  # keep-alive connections idle longer are closed
TLS_HANDSHAKE_TIMEOUT = 10.0
SEND_TIMEOUT = 30.0  # a client that does not read its response within this is dropped
MAX_BODY = 4 * 1024 * 1024  # policies are the largest bodies we accept
MAX_HEAD = 64 * 1024
# One log line per refusing IP per this many seconds: a flood must not flood the log too.
CAP_LOG_INTERVAL = 60.0


@dataclass
class Request:
    method: str
    target: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-cased names; repeated headers joined with ", "
    body: bytes
    peer: str

    def arg(self, name: str, default: str = "") -> str:
        v = self.query.get(name)
        return v[0] if v else default


@dataclass
class Response:
    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def json(cls, obj: Any, status: int = 200) -> Response:
        return cls(status, json.dumps(obj).encode(), [("Content-Type", "application/json")])

    @classmethod
    def text(
        cls, text: str, status: int = 200, content_type: str = "text/plain; charset=utf-8"
    ) -> Response:
        return cls(status, text.encode(), [("Content-Type", content_type)])


@dataclass
class Upgrade:
    """A connection handed over after its HTTP/1.1 request head (for /ts2021 and /derp)."""

    stream: trio.abc.Stream  # the raw connection (TLS already terminated if any)
    request: h11.Request  # the parsed request head
    head: bytes  # the raw bytes of the request head, as received
    trailing: bytes  # bytes received after the head (already read off the stream)
    peer: str  # "ip:port" of the client


RouteHandler = Callable[[Request], Awaitable[Response]]
UpgradeHandler = Callable[[Upgrade], Awaitable[None]]
AsgiApp = Callable[..., Awaitable[None]]


def _peer(stream: trio.abc.Stream) -> tuple[str, str]:
    """(IP, "ip:port") of the client; ("local", "local") for a non-IP stream."""
    inner = getattr(stream, "transport_stream", stream)
    sock = getattr(inner, "socket", None)
    try:
        addr = sock.getpeername() if sock is not None else None
    except OSError:
        addr = None
    if isinstance(addr, tuple):
        ip = str(addr[0])
        return ip, (f"{ip}:{addr[1]}" if ":" not in ip else f"[{ip}]:{addr[1]}")
    return "local", "local"


class PerIpCap:
    """Counts open connections per client IP and refuses those over a limit (0: no limit).

    Bounds what one address can hold (file descriptors, buffers) so it cannot starve
    everyone else; the limit is per IP because a NAT may put many honest clients behind one.
    """

    def __init__(
        self,
        limit: int,
        what: str,
        log: logging.Logger,
        key: str,
        exempt: Sequence[IPv4Network | IPv6Network] = (),
    ) -> None:
        self.limit = limit
        # trusted_proxies: a reverse proxy carries every client's connection from one address.
        self.exempt = tuple(exempt)
        self.what = what
        self.key = key  # the config key that sets `limit`, for the log line
        self.log = log
        self.open: dict[str, int] = {}
        self._logged: dict[str, float] = {}
        self.refused = 0

    def acquire(self, ip: str) -> bool:
        n = self.open.get(ip, 0)
        if self.limit and n >= self.limit and not self._exempt(ip):
            self.refused += 1
            now = trio.current_time()
            if now - self._logged.get(ip, -CAP_LOG_INTERVAL) >= CAP_LOG_INTERVAL:
                self._logged[ip] = now
                self.log.warning(
                    "%s from %s refused: %d already open (limit %d, %s)",
                    self.what,
                    ip,
                    n,
                    self.limit,
                    self.key,
                )
            return False
        self.open[ip] = n + 1
        return True

    def _exempt(self, ip: str) -> bool:
        if not self.exempt:
            return False
        try:
            addr = ip_address(ip)
        except ValueError:  # "local" (a unix socket)
            return False
        return any(addr in net for net in self.exempt)

    def release(self, ip: str) -> None:
        n = self.open.get(ip, 0) - 1
        if n > 0:
            self.open[ip] = n
        else:
            self.open.pop(ip, None)
            self._logged.pop(ip, None)


class HttpServer:
    """Serves one listener set; routes by exact path, upgrades by path, ASGI by prefix."""

    def __init__(
        self,
        *,
        routes: dict[str, RouteHandler],
        upgrades: dict[str, UpgradeHandler],
        asgi_prefix: str = "",
        asgi_app: AsgiApp | None = None,
        ssl_context: ssl.SSLContext | None = None,
        tls_optional: bool = False,
        logger: logging.Logger,
        boundary: Boundary | None = None,
        max_connections_per_ip: int = 0,
        upgrade_caps: dict[str, tuple[int, str]] | None = None,
        trusted_proxies: Sequence[IPv4Network | IPv6Network] = (),
    ) -> None:
        self.routes = routes
        self.upgrades = upgrades
        self.asgi_prefix = asgi_prefix
        self.asgi_app = asgi_app
        self.ssl_context = ssl_context
        # tls_optional: a plain-http server_url with a certificate serves both on one port,
        # told apart by the first byte (0x16 opens a TLS handshake): the control protocol
        # is happy with plain HTTP, but clients insist on TLS for DERP.
        self.tls_optional = tls_optional
        self.log = logger
        self.boundary = boundary or Boundary(logger)
        self.conn_cap = PerIpCap(
            max_connections_per_ip,
            "connection",
            logger,
            "limits.max_connections_per_ip",
            trusted_proxies,
        )
        # Upgrades that hold a connection for long (DERP) get a tighter cap of their own.
        self.upgrade_caps = {
            path: PerIpCap(limit, f"{path} connection", logger, key, trusted_proxies)
            for path, (limit, key) in (upgrade_caps or {}).items()
        }

    async def serve(
        self,
        listeners: list[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with trio.open_nursery() as nursery:
            # Accept errors such as EMFILE are logged and retried, never fatal.
            await nursery.start(serve_in_bursts, self.handle_connection, listeners, self.log)
            task_status.started()

    async def handle_connection(self, stream: trio.abc.Stream) -> None:
        """One client connection, inside the boundary: nothing it sends can end the server."""
        ip, peer = _peer(stream)
        if not self.conn_cap.acquire(ip):
            await _close(stream)
            return
        try:
            with self.boundary.guard("http", peer) as unit:
                await self._serve_connection(stream, peer, unit)
        finally:
            self.conn_cap.release(ip)
            await _close(stream)

    async def _serve_connection(self, stream: trio.abc.Stream, peer: str, unit: Any) -> None:
        inner: trio.abc.Stream = stream
        use_tls = self.ssl_context is not None
        if use_tls and self.tls_optional:
            with trio.move_on_after(HEAD_TIMEOUT) as scope:
                first = await stream.receive_some(65536)
            if scope.cancelled_caught or not first:
                return
            inner = PrefixedStream(stream, bytes(first))
            use_tls = first[0] == 0x16
        if use_tls:
            assert self.ssl_context is not None
            tls = trio.SSLStream(inner, self.ssl_context, server_side=True)
            with trio.move_on_after(TLS_HANDSHAKE_TIMEOUT) as scope:
                try:
                    await tls.do_handshake()
                except trio.BrokenResourceError as e:
                    # trio wraps the ssl module's reason; that is the line worth logging.
                    cause = e.__cause__ if isinstance(e.__cause__, ssl.SSLError) else e
                    self.boundary.record(unit.kind, peer, cause)
                    return
            if scope.cancelled_caught:
                self.boundary.record(
                    unit.kind,
                    peer,
                    trio.TooSlowError(f"no TLS handshake in {TLS_HANDSHAKE_TIMEOUT:g} s"),
                )
                return
            inner = tls
        try:
            await self._serve_http(inner, peer, unit)
        finally:
            if inner is not stream:
                await _close(inner)

    async def _serve_http(self, stream: trio.abc.Stream, peer: str, unit: Any) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        raw = bytearray()  # bytes of the current request head, for upgrades
        first = True
        while True:
            timeout = HEAD_TIMEOUT if first else IDLE_TIMEOUT
            try:
                with trio.fail_after(timeout):
                    event, raw = await self._next_event(conn, stream, raw)
            except trio.TooSlowError:
                if first or raw:  # an idle keep-alive connection just ends, silently
                    self.boundary.record(
                        unit.kind,
                        peer,
                        trio.TooSlowError(f"no whole request head in {timeout:g} s"),
                    )
                return
            except h11.RemoteProtocolError as e:
                await self._refuse(conn, stream, unit, peer, e)
                return
            first = False
            if isinstance(event, h11.ConnectionClosed) or event is None:
                return
            if not isinstance(event, h11.Request):
                return
            if event.method == b"CONNECT":
                # h11 would take any 2xx answer as a tunnel opening; we are no proxy.
                await self._refuse(
                    conn,
                    stream,
                    unit,
                    peer,
                    h11.RemoteProtocolError("CONNECT is not supported", error_status_hint=405),
                )
                return
            req_path = urlsplit(event.target.decode("latin-1")).path
            upgrade = self.upgrades.get(req_path)
            if upgrade is not None:
                end = bytes(raw).find(b"\r\n\r\n")
                head = bytes(raw[: end + 4]) if end >= 0 else bytes(raw)
                trailing = bytes(raw[end + 4 :]) if end >= 0 else b""
                self.log.debug("%s %s upgrade from %s", event.method.decode(), req_path, peer)
                unit.kind = req_path.strip("/") or "upgrade"
                cap = self.upgrade_caps.get(req_path)
                ip = peer.rpartition(":")[0].strip("[]")
                if cap is not None and not cap.acquire(ip):
                    await self._send_error(conn, stream, 429, f"too many {req_path} connections")
                    return
                try:
                    await upgrade(Upgrade(stream, event, head, trailing, peer))
                finally:
                    if cap is not None:
                        cap.release(ip)
                return
            length = _content_length(event)
            if length is not None and length > MAX_BODY:
                await self._refuse(
                    conn,
                    stream,
                    unit,
                    peer,
                    h11.RemoteProtocolError(
                        f"Content-Length {length} over the {MAX_BODY}-byte limit",
                        error_status_hint=413,
                    ),
                )
                return
            try:
                with trio.fail_after(BODY_TIMEOUT):
                    body = await self._read_body(conn, stream)
            except trio.TooSlowError:
                self.boundary.record(
                    unit.kind, peer, trio.TooSlowError(f"no whole body in {BODY_TIMEOUT:g} s")
                )
                return
            except h11.RemoteProtocolError as e:
                await self._refuse(conn, stream, unit, peer, e)
                return
            except _TooLarge:
                await self._refuse(
                    conn,
                    stream,
                    unit,
                    peer,
                    h11.RemoteProtocolError("request body too large", error_status_hint=413),
                )
                return
            request = self._make_request(event, body, peer)
            response = await self._dispatch(request)
            if response.status >= 400:
                # A refused request is worth one line (who, what, why); a served one is not.
                reason = response.body[:120].decode("utf-8", "replace").strip().splitlines()
                self.log.info(
                    "%s: %s %s refused (%d): %s",
                    peer,
                    request.method,
                    request.target[:100],
                    response.status,
                    reason[0] if reason else "",
                )
            else:
                self.log.debug(
                    "%s %s -> %d (%s)", request.method, request.target, response.status, peer
                )
            with trio.fail_after(SEND_TIMEOUT):
                await self._send(conn, stream, response, head_only=request.method == "HEAD")
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return
            raw = bytearray(conn.trailing_data[0])

    async def _next_event(
        self, conn: h11.Connection, stream: trio.abc.Stream, raw: bytearray
    ) -> tuple[Any, bytearray]:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                raw += data
                if len(raw) > MAX_HEAD:
                    raise h11.RemoteProtocolError("request head too large", error_status_hint=431)
                conn.receive_data(bytes(data))
                continue
            return event, raw

    async def _read_body(self, conn: h11.Connection, stream: trio.abc.Stream) -> bytes:
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await stream.receive_some(65536)))
                continue
            if isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY:
                    raise _TooLarge
                continue
            if isinstance(event, h11.EndOfMessage):
                return bytes(body)
            if event is h11.PAUSED:
                return bytes(body)
            raise h11.RemoteProtocolError("unexpected end of request")

    @staticmethod
    def _make_request(event: h11.Request, body: bytes, peer: str) -> Request:
        target = event.target.decode("latin-1")
        parts = urlsplit(target)
        headers: dict[str, str] = {}
        for name, value in event.headers:
            key = name.decode("latin-1").lower()
            val = value.decode("latin-1")
            headers[key] = f"{headers[key]}, {val}" if key in headers else val
        return Request(
            method=event.method.decode("latin-1"),
            target=target,
            path=parts.path,
            query=parse_qs(parts.query),
            headers=headers,
            body=body,
            peer=peer,
        )

    async def _dispatch(self, request: Request) -> Response:
        try:
            if (
                self.asgi_app is not None
                and self.asgi_prefix
                and (
                    request.path == self.asgi_prefix
                    or request.path.startswith(self.asgi_prefix + "/")
                )
            ):
                return await call_asgi(self.asgi_app, request)
            handler = self.routes.get(request.path)
            if handler is None:
                # Keys ending in "/" are prefixes (e.g. "/register/" for /register/<id>).
                handler = next(
                    (
                        h
                        for p, h in self.routes.items()
                        if p.endswith("/") and request.path.startswith(p)
                    ),
                    None,
                )
            if handler is None:
                return Response.text("404 page not found\n", 404)
            return await handler(request)
        except Exception as e:
            # The request ends, the connection and the server carry on.
            cause = self.boundary.record("request", f"{request.peer} {request.method}", e)
            if cause == "peer":
                return Response.text(f"bad request: {e}\n", 400)
            return Response.text("internal error\n", 500)

    async def _send(
        self,
        conn: h11.Connection,
        stream: trio.abc.Stream,
        response: Response,
        head_only: bool = False,
    ) -> None:
        headers = [*response.headers, ("Content-Length", str(len(response.body)))]
        data = conn.send(
            h11.Response(
                status_code=response.status, headers=headers, reason=_reason(response.status)
            )
        )
        if not head_only and response.body:
            data += conn.send(h11.Data(data=response.body))
        data += conn.send(h11.EndOfMessage())
        await stream.send_all(data)

    async def _refuse(
        self,
        conn: h11.Connection,
        stream: trio.abc.Stream,
        unit: Any,
        peer: str,
        e: h11.RemoteProtocolError,
    ) -> None:
        """Answer a request we will not serve with its 4xx, log it once, close."""
        self.boundary.record(unit.kind, peer, e)
        status = e.error_status_hint if 400 <= e.error_status_hint < 600 else 400
        with trio.move_on_after(SEND_TIMEOUT):
            await self._send_error(conn, stream, status, f"bad request: {e}")

    async def _send_error(
        self, conn: h11.Connection, stream: trio.abc.Stream, status: int, message: str
    ) -> None:
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        try:
            await self._send(
                conn,
                stream,
                Response(
                    status,
                    (message + "\n").encode(),
                    [("Content-Type", "text/plain; charset=utf-8"), ("Connection", "close")],
                ),
            )
        except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass


class _TooLarge(Exception):
    pass


def _content_length(event: h11.Request) -> int | None:
    for name, value in event.headers:
        if name.lower() == b"content-length":
            return int(value)  # h11 checked it is digits only
    return None


async def _close(stream: trio.abc.Stream) -> None:
    with trio.move_on_after(1) as cs:
        cs.shield = True
        try:
            await stream.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError):
            pass


def _reason(status: int) -> bytes:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


async def call_asgi(app: AsgiApp, request: Request) -> Response:
    """Run one buffered HTTP request through an ASGI app (the admin API on the main listener)."""
    host, _, port = request.peer.rpartition(":")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http",
        "path": request.path,
        "raw_path": request.path.encode(),
        "query_string": urlsplit(request.target).query.encode(),
        "root_path": "",
        "headers": [(k.encode(), v.encode()) for k, v in request.headers.items()],
        "client": (host.strip("[]"), int(port)) if port.isdigit() else None,
        "server": None,
    }
    sent_body = False

    async def receive() -> dict[str, Any]:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    status = 500
    headers: list[tuple[str, str]] = []
    body = bytearray()

    async def send(message: dict[str, Any]) -> None:
        nonlocal status, headers
        if message["type"] == "http.response.start":
            status = message["status"]
            headers = [
                (k.decode(), v.decode())
                for k, v in message.get("headers", [])
                if k.lower() != b"content-length"
            ]
        elif message["type"] == "http.response.body":
            body.extend(message.get("body", b""))

    await app(scope, receive, send)
    return Response(status, bytes(body), headers)
