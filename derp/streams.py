"""A trio stream that first yields bytes already read from it.

Two readers need to look before they leap: the DERP WebSocket path replays the HTTP
head it was handed so trio-websocket can run the handshake itself, and the main
listener sniffs the first byte of a connection to tell TLS from plain HTTP.
"""

from __future__ import annotations

import trio


class PrefixedStream(trio.abc.Stream):
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

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        if isinstance(self.inner, trio.abc.HalfCloseableStream):
            await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()
