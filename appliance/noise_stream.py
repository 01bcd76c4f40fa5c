"""``NoiseStream``: a trio Stream carrying plaintext over a Noise transport.

Modelled on trio's SSLStream: the sans-IO engine (protocol.noise.NoiseTransport)
does the cryptography, this class moves bytes between it and the inner stream.
Protocol errors from the peer (tampering, an oversized record) surface as
``trio.BrokenResourceError`` chained to the ``RemoteNoiseError``, which is what
every trio stream user already handles.
"""

from __future__ import annotations

import operator
import os

import trio

from derp.streams import ReadWrapper
from protocol.noise import NoiseError, NoiseTransport

# What one receive_some reads from the inner stream: one maximal record plus
# its successor's header, so a busy stream usually decrypts a record per read.
_READ_SIZE = 65536
# Once a record has begun, its rest (at most 4 KiB) must follow within this: a
# peer that sends a record header and then nothing holds no connection for long.
# An idle stream between records waits as long as its user wants.
PARTIAL_RECORD_TIMEOUT = 15.0


class NoiseStream(trio.abc.Stream):
    """Plaintext view of ``inner`` once the Noise handshake is done.

    ``initial_ciphertext`` is record bytes already read off ``inner`` (e.g. what
    arrived together with the handshake); ``transport.read()`` may also already
    hold plaintext -- both are delivered first.
    """

    def __init__(
        self,
        inner: trio.abc.Stream,
        transport: NoiseTransport,
        *,
        initial_ciphertext: bytes = b"",
    ) -> None:
        self.inner = inner
        self.transport = transport
        self._pending_ciphertext = initial_ciphertext
        self._closed = False
        self._sending = False
        self._receiving = False
        self._broken: BaseException | None = None
        self._socket = _socket_under(inner)

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("NoiseStream was closed")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._check_open()
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this NoiseStream")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            if not data:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return
            try:
                records = self.transport.send(bytes(data))
            except NoiseError as e:
                raise trio.BrokenResourceError(str(e)) from e
            # Sealed: while the socket is full, hold the ciphertext only (in a storm
            # thousands of writers wait at once, 64 KiB of plaintext each).
            del data
            await self.inner.send_all(records)
        finally:
            self._sending = False

    def send_now(self, data: bytes) -> memoryview:
        """Seal `data` and write what the socket takes without waiting; the ciphertext it
        did not take is returned, for `send_ciphertext` (before anything else is sent).

        A map stream's broadcast message goes out this way from the broadcaster's own
        pass: no writer task to wake, no scheduler pass per message. A write error is
        left to `send_ciphertext`, which meets it again and raises as send_all would.
        """
        self._check_open()
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this NoiseStream")
        try:
            records = memoryview(self.transport.send(data))
        except NoiseError as e:
            raise trio.BrokenResourceError(str(e)) from e
        if self._socket is None:
            return records  # not over a plain socket (TLS, a WebSocket, a memory stream)
        try:
            sent = os.write(self._socket.fileno(), records)
        except OSError:  # EAGAIN: the writer waits for room; an error: it raises it
            return records
        return records[sent:]

    async def send_ciphertext(self, records: bytes | memoryview) -> None:
        """Write records `send_now` sealed and could not write."""
        self._check_open()
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this NoiseStream")
        self._sending = True
        try:
            await self.inner.send_all(records)
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        self._check_open()
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this NoiseStream")
        self._sending = True
        try:
            await self.inner.wait_send_all_might_not_block()
        finally:
            self._sending = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        self._check_open()
        if max_bytes is not None:
            max_bytes = operator.index(max_bytes)
            if max_bytes < 1:
                raise ValueError("max_bytes must be >= 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this NoiseStream")
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            if self._broken is not None:
                raise trio.BrokenResourceError("Noise stream is broken") from self._broken
            while True:
                if self.transport.plaintext_pending:
                    out = self.transport.read(max_bytes)
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    return out
                if self._pending_ciphertext:
                    data, self._pending_ciphertext = self._pending_ciphertext, b""
                elif self.transport.has_partial_record:
                    with trio.move_on_after(PARTIAL_RECORD_TIMEOUT) as scope:
                        data = bytes(await self.inner.receive_some(_READ_SIZE))
                    if scope.cancelled_caught:
                        self._broken = trio.TooSlowError(
                            f"partial Noise record: the rest did not come within "
                            f"{PARTIAL_RECORD_TIMEOUT:g} s"
                        )
                        raise trio.BrokenResourceError(str(self._broken)) from self._broken
                else:
                    data = bytes(await self.inner.receive_some(_READ_SIZE))
                if not data:
                    if self.transport.has_partial_record:
                        raise trio.BrokenResourceError("peer closed mid-record")
                    return b""
                try:
                    self.transport.receive_data(data)
                except NoiseError as e:
                    self._broken = e
                    raise trio.BrokenResourceError(str(e)) from e
        finally:
            self._receiving = False

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        await self.inner.aclose()


def _socket_under(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    """The socket that `stream` sends on unchanged, if it is a plain TCP stream (under
    wrappers that change only how it is read)."""
    while isinstance(stream, ReadWrapper):
        stream = stream.inner
    return stream.socket if isinstance(stream, trio.SocketStream) else None
