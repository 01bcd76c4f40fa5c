"""Trio streams that wrap another and change only how it is read.

Two readers need to look before they leap: the DERP WebSocket path replays the HTTP
head it was handed so trio-websocket can run the handshake itself, and the main
listener sniffs the first byte of a connection to tell TLS from plain HTTP
(`PrefixedStream`). The WebSocket frame deadline (derp/server.py) wraps a stream
the same way (`ReadWrapper`).
"""

from __future__ import annotations

import trio


class ReadWrapper(trio.abc.Stream):
    """A stream over `inner` whose subclass changes `receive_some`; sending,
    half-closing and closing go straight to `inner`."""

    inner: trio.abc.Stream

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        if isinstance(self.inner, trio.abc.HalfCloseableStream):
            await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


class PrefixedStream(ReadWrapper):
    """`prefix` comes out of `receive_some` first, then whatever `inner` receives."""

    def __init__(self, inner: trio.abc.Stream, prefix: bytes) -> None:
        self.inner = inner
        self.transport_stream = inner  # as trio.SSLStream names its inner stream
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            n = len(self._prefix) if max_bytes is None else max_bytes
            out, self._prefix = self._prefix[:n], self._prefix[n:]
            await trio.lowlevel.checkpoint()
            return out
        return bytes(await self.inner.receive_some(max_bytes))
