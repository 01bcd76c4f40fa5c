"""Test and benchmark plumbing for the DERP relay: a tiny HTTP/1.1 upgrade front
end with the shape of ``appliance.httpserver.Upgrade``, loopback listeners and TLS.

Only loopback addresses and in-memory streams; nothing here reaches outside.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import h11
import trio
import trio.testing

from appliance.tlscerts import make_server_cert
from derp.client import DerpClient
from derp.server import DerpServer


@dataclass
class Upgrade:
    """Local stand-in for appliance.httpserver.Upgrade (same fields)."""

    stream: trio.abc.Stream
    request: h11.Request
    head: bytes
    trailing: bytes
    peer: str


Handler = Callable[[Upgrade], Awaitable[None]]


async def front_end(stream: trio.abc.Stream, peer: str, handler: Handler) -> None:
    """Read one request head with h11 and hand the connection to ``handler``."""
    conn = h11.Connection(h11.SERVER)
    raw = b""
    try:
        with trio.fail_after(10):
            while True:
                event = conn.next_event()
                if event is not h11.NEED_DATA:
                    break
                data = await stream.receive_some(65536)
                raw += data
                conn.receive_data(bytes(data))
        if not isinstance(event, h11.Request):
            return
        trailing, _closed = conn.trailing_data
        head = raw[: len(raw) - len(trailing)] if trailing else raw
        await handler(Upgrade(stream, event, head, bytes(trailing), peer))
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def memory_client(
    nursery: trio.Nursery,
    server: DerpServer,
    private_key: bytes,
    *,
    lockstep: bool = False,
    peer: str = "127.0.0.1:40000",
    **connect_kw: object,
) -> DerpClient:
    """A DerpClient wired to ``server`` through an in-memory stream pair."""
    pair = trio.testing.lockstep_stream_pair if lockstep else trio.testing.memory_stream_pair
    client_end, server_end = pair()
    nursery.start_soon(front_end, server_end, peer, server.handle_upgrade)
    return await DerpClient.connect(client_end, private_key, **connect_kw)  # type: ignore[arg-type]


@dataclass
class TLSFiles:
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert, self.key)
        # DERP clients speak HTTP/1.1 and send no ALPN (PROTOCOL.md 5.8).
        return ctx

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.cert))
        return ctx


def make_tls(directory: Path) -> TLSFiles:
    cert, key = make_server_cert(["127.0.0.1", "localhost"])
    files = TLSFiles(directory / "server.pem", directory / "server.key")
    files.cert.write_bytes(cert)
    files.key.write_bytes(key)
    return files


async def serve_loopback(
    nursery: trio.Nursery,
    handler: Handler,
    *,
    ssl_context: ssl.SSLContext | None = None,
) -> int:
    """Listen on 127.0.0.1:0 (optionally TLS) with ``front_end``; return the port."""

    async def on_connection(stream: trio.SocketStream) -> None:
        host, port = stream.socket.getpeername()[:2]
        s: trio.abc.Stream = stream
        if ssl_context is not None:
            tls = trio.SSLStream(stream, ssl_context, server_side=True)
            try:
                with trio.fail_after(10):
                    await tls.do_handshake()
            except (trio.BrokenResourceError, trio.TooSlowError):
                await trio.aclose_forcefully(stream)
                return
            s = tls
        await front_end(s, f"{host}:{port}", handler)

    listeners = await nursery.start(partial(trio.serve_tcp, on_connection, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1]


async def tcp_client(
    port: int,
    private_key: bytes,
    *,
    ssl_context: ssl.SSLContext | None = None,
    **connect_kw: object,
) -> DerpClient:
    stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", port)
    if ssl_context is not None:
        stream = trio.SSLStream(stream, ssl_context, server_hostname="127.0.0.1")
        await stream.do_handshake()
    return await DerpClient.connect(stream, private_key, host="127.0.0.1", **connect_kw)  # type: ignore[arg-type]
