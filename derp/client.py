"""A small trio DERP client over any stream: for tests, benchmarks and probes.

It speaks what derphttp's client speaks: ``GET /derp`` with ``Upgrade: DERP``
(optionally ``Derp-Fast-Start: 1`` when the server key is already known),
then the DERP handshake.
"""

from __future__ import annotations

from collections import deque

import trio

from derp.codec import (
    ClientState,
    DerpClientConnection,
    Event,
    ServerInfo,
    ServerKey,
)
from derp.errors import RemoteDerpError

_READ_SIZE = 65536
_MAX_HEAD = 16384


class DerpClient:
    """One client connection; ``recv()`` yields codec events in order."""

    def __init__(self, stream: trio.abc.Stream, conn: DerpClientConnection) -> None:
        self.stream = stream
        self.conn = conn
        self._events: deque[Event] = deque()
        self._send_lock = trio.Lock()

    @property
    def public_key(self) -> bytes:
        return self.conn.public_key

    @classmethod
    async def connect(
        cls,
        stream: trio.abc.Stream,
        private_key: bytes,
        *,
        host: str = "localhost",
        server_key: bytes | None = None,
        fast_start: bool = False,
        upgrade: bool = True,
        mesh_key: bytes | None = None,
        wait_server_info: bool = True,
    ) -> DerpClient:
        """Upgrade ``stream`` and finish the handshake (up to ServerInfo, if asked).

        ``upgrade=False`` skips HTTP (a stream already speaking DERP, e.g. WebSocket).
        """
        conn = DerpClientConnection(private_key, server_key=server_key)
        self = cls(stream, conn)
        rest = b""
        if upgrade:
            req = (
                f"GET /derp HTTP/1.1\r\nHost: {host}\r\nUpgrade: DERP\r\n"
                "Connection: Upgrade\r\nUser-Agent: Go-http-client/1.1\r\n"
            )
            if fast_start:
                req += "Derp-Fast-Start: 1\r\n"
            out = (req + "\r\n").encode()
            if fast_start and server_key is not None:
                # The point of fast start: identity proof rides with the request.
                out += conn.send_client_info(mesh_key=mesh_key)
            await stream.send_all(out)
            if not fast_start:
                rest = await self._read_101()
        self._feed(rest)
        while conn.state is ClientState.AWAIT_SERVER_KEY:
            await self._fill()
        if not conn._sent_info:
            await stream.send_all(conn.send_client_info(mesh_key=mesh_key))
        if wait_server_info:
            while conn.state is not ClientState.ESTABLISHED:
                await self._fill()
        # ServerKey and ServerInfo are handshake, not traffic.
        self._events = deque(e for e in self._events if not isinstance(e, ServerKey | ServerInfo))
        return self

    async def _read_101(self) -> bytes:
        buf = b""
        while b"\r\n\r\n" not in buf:
            if len(buf) > _MAX_HEAD:
                raise RemoteDerpError("DERP upgrade response head too large")
            data = await self.stream.receive_some(_READ_SIZE)
            if not data:
                raise RemoteDerpError(f"connection closed during upgrade; got {buf[:200]!r}")
            buf += data
        head, _, rest = buf.partition(b"\r\n\r\n")
        status_line = head.split(b"\r\n", 1)[0]
        if status_line.split(b" ")[1:2] != [b"101"]:
            raise RemoteDerpError(f"DERP upgrade refused: {status_line.decode(errors='replace')}")
        return rest

    def _feed(self, data: bytes) -> None:
        self._events.extend(self.conn.receive_data(data))

    async def _fill(self) -> None:
        data = bytes(await self.stream.receive_some(_READ_SIZE))
        if not data:
            raise trio.EndOfChannel("DERP server closed the connection")
        self._feed(data)

    async def recv(self) -> Event:
        """The next event; ``trio.EndOfChannel`` when the server hangs up."""
        while not self._events:
            await self._fill()
        return self._events.popleft()

    def pending(self) -> list[Event]:
        """Events already parsed, without waiting."""
        out = list(self._events)
        self._events.clear()
        return out

    async def send(self, data: bytes) -> None:
        async with self._send_lock:
            await self.stream.send_all(data)

    async def send_packet(self, dst: bytes, data: bytes) -> None:
        await self.send(self.conn.send_packet(dst, data))

    async def aclose(self) -> None:
        self.conn.close()
        await self.stream.aclose()
