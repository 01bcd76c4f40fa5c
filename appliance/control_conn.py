"""The ts2021 control connection: HTTP upgrade, Noise handshake, then HTTP/2.

Flow (control/controlhttp/controlhttpserver and hs:hscontrol/noise.go):
``POST /ts2021`` with ``Upgrade: tailscale-control-protocol`` and the Noise
initiation in ``X-Tailscale-Handshake`` -> ``101`` + Noise response + early
payload in one write -> the node speaks HTTP/2 (prior knowledge) over Noise,
and we are the HTTP/2 server. Each request stream runs ``handler(req, resp)``
in its own task; a client RST_STREAM or a dropped connection cancels it.

Output is written by one writer task only: a handler cancelled in the middle
of a socket write would otherwise leave half a Noise record on the wire and
kill every other stream of the connection.

DATA frames are framed here, not by h2: a map stream sends thousands of messages
(a storm, a megabyte each), and h2's per-frame objects cost more than the Noise
sealing. h2 keeps everything else (HEADERS, SETTINGS, WINDOW_UPDATE, resets, the
end of a stream) and the flow-control accounting, which ``_queue_data`` debits as
its own ``send_data`` would. One ordered queue holds both, so no DATA overtakes
the HEADERS before it or the END_STREAM after it.
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
import struct
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import trio

from appliance.boundary import Boundary, classify
from appliance.httpserver import Upgrade
from appliance.noise_stream import NoiseStream
from protocol import noise
from protocol.keys import MachinePublic, PrivateKey

UPGRADE_VALUE = "tailscale-control-protocol"
HANDSHAKE_HEADER = "x-tailscale-handshake"
# The client gives the whole dial ~10 s (controlhttp); a peer that has not sent
# its HTTP/2 preface by then is not a Tailscale client.
PREFACE_TIMEOUT = 10.0
# Register and map requests are a few KiB (Hostinfo dominates); 4 MiB is far
# above any real one and bounds what a hostile client can make us buffer.
DEFAULT_MAX_BODY = 4 << 20
# Go's http2 server allows 250 concurrent streams; the client assumes 100
# until it sees our SETTINGS. Long poll + lite updates + register need few.
MAX_CONCURRENT_STREAMS = 250
# Our receive window per stream and for the connection. Bigger than HTTP/2's
# 65,535 default so request uploads never wait for a WINDOW_UPDATE round trip.
RECEIVE_WINDOW = 1 << 20
_READ_SIZE = 65536
# Once an HTTP/2 frame has begun, its rest must follow within this. h2 itself
# checks a frame's length only once the whole frame is in, so a header that
# announces 16 MiB and then silence would otherwise hold the connection (and
# make us buffer whatever trickles in) forever.
PARTIAL_FRAME_TIMEOUT = 15.0
# A request (HEADERS without END_STREAM yet) must be complete within this.
REQUEST_TIMEOUT = 30.0
# Request bodies buffered at once on one connection, over all its streams:
# 250 streams each holding up to max_body would be 1 GiB.
MAX_BUFFERED_BODIES = 2 * DEFAULT_MAX_BODY
# What we queued (ACKs, responses) is written before we read more, so a peer that
# floods PINGs and never reads makes us buffer one read's worth of answers, not
# more; if it reads nothing for this long it is dropped. Generous: a first map of
# a few hundred KB to a phone on a bad link may take a while to drain.
WRITE_BACKLOG_TIMEOUT = 120.0
# A sender that does not wait for its data to be written (a map stream) waits once the
# connection has this much not yet written: a client that reads slowly still slows its
# own map stream down.
UNFLUSHED_LIMIT = 256 << 10
# What the writer seals and writes at once: bounds the ciphertext one connection holds
# however big the messages queued (a storm queues a megabyte per connection).
WRITE_BATCH = 64 << 10
# An HTTP/2 frame header (RFC 9113 4.1): 24-bit length, type, flags, stream id.
_FRAME_HEADER = struct.Struct(">BHBBI")
_DATA = 0x0
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class FrameTracker:
    """Where the incoming byte stream is relative to HTTP/2 frame boundaries.

    Sans-IO: fed the same bytes as h2, it checks each frame header's length
    against our SETTINGS_MAX_FRAME_SIZE as soon as the 9 header bytes are in (h2
    checks only once the whole body arrived) and says whether a frame is half
    received, for the partial-frame timeout.
    """

    def __init__(self, max_frame_size: int) -> None:
        self.max_frame_size = max_frame_size
        self._preface_left = len(_PREFACE)
        self._header = bytearray()
        self._body_left = 0

    @property
    def partial(self) -> bool:
        return bool(self._header) or self._body_left > 0 or 0 < self._preface_left < len(_PREFACE)

    def feed(self, data: bytes) -> None:
        """Advance over `data`; h2.exceptions.FrameTooLargeError for an oversized frame."""
        view = memoryview(data)
        while view:
            if self._preface_left:
                n = min(self._preface_left, len(view))
                self._preface_left -= n
                view = view[n:]
            elif self._body_left:
                n = min(self._body_left, len(view))
                self._body_left -= n
                view = view[n:]
            else:
                n = min(9 - len(self._header), len(view))
                self._header += view[:n]
                view = view[n:]
                if len(self._header) == 9:
                    length = int.from_bytes(self._header[:3], "big")
                    self._header.clear()
                    if length > self.max_frame_size:
                        raise h2.exceptions.FrameTooLargeError(
                            f"frame of {length} bytes announced, over our "
                            f"SETTINGS_MAX_FRAME_SIZE of {self.max_frame_size}"
                        )
                    self._body_left = length


class ControlConnError(Exception):
    """Root of errors from the control connection layer."""


class StreamClosedError(ControlConnError):
    """The client reset this stream or the connection is gone; stop sending."""


class ResponseStateError(ControlConnError):
    """A handler used ControlResponse out of order (e.g. data before headers)."""


@dataclass
class ControlRequest:
    """One HTTP/2 request from a node, bound to its Noise machine key."""

    method: str
    path: str
    headers: list[tuple[str, str]]  # lower-case names, pseudo-headers removed
    body: bytes
    machine_key: MachinePublic
    version: int  # the client's capability version (Noise protocol version)
    peer: str
    authority: str = ""
    stream_id: int = 0

    def header(self, name: str, default: str = "") -> str:
        name = name.lower()
        for k, v in self.headers:
            if k == name:
                return v
        return default


ControlHandler = Callable[[ControlRequest, "ControlResponse"], Awaitable[None]]


@dataclass
class _StreamState:
    stream_id: int
    headers: list[tuple[str, str]]
    body: bytearray = field(default_factory=bytearray)
    too_large: bool = False
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    reset: bool = False
    complete: bool = False  # END_STREAM seen: the request is whole
    started: float = field(default_factory=trio.current_time)


class ControlResponse:
    """The response side of one stream: headers, then data, then end.

    ``send_data`` honours the client's flow-control windows and returns once
    the bytes are handed to the socket, so a slow client slows its own
    producer (the map stream) and nobody else.
    """

    def __init__(self, conn: _H2Server, stream_id: int) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self.headers_sent = False
        self.ended = False
        self.status: int | None = None

    async def send_headers(self, status: int, headers: Iterable[tuple[str, str]] = ()) -> None:
        if self.headers_sent:
            raise ResponseStateError("headers already sent")
        self.status = status
        hdrs = [(":status", str(status)), *((k.lower(), v) for k, v in headers)]
        self._conn.call(self.stream_id, lambda c: c.send_headers(self.stream_id, hdrs))
        self.headers_sent = True
        # Queued, and the writer woken: what follows (the data, the end) waits for the
        # socket. Waiting here too cost every request a pass of the scheduler or two.
        await trio.lowlevel.checkpoint()

    async def send_data(self, data: bytes | Sequence[bytes], *, wait: bool = True) -> None:
        """Send `data`, or its parts in order (flow control permitting); the parts are
        queued without a copy. With `wait=False` return once it is
        queued for the connection's writer, unless the writer is more than
        UNFLUSHED_LIMIT behind: a map stream then does not wait on every message
        (thousands of streams x a message per tick)."""
        if not self.headers_sent:
            raise ResponseStateError("send_headers before send_data")
        if self.ended:
            raise ResponseStateError("response already ended")
        await self._conn.send_data(self.stream_id, data, wait=wait)

    def send_now(self, data: Sequence[bytes]) -> bool:
        """Send `data` without waiting if the client's window and the connection allow
        it (True); False, with nothing sent, if not: then `send_data`."""
        if not self.headers_sent or self.ended:
            return False
        return self._conn.send_now(self.stream_id, data)

    async def end(self) -> None:
        if self.ended:
            return
        if not self.headers_sent:
            await self.send_headers(200)
        self.ended = True
        self._conn.call(self.stream_id, lambda c: c.end_stream(self.stream_id))
        await self._conn.flush()

    async def respond(
        self, status: int, body: bytes = b"", headers: Iterable[tuple[str, str]] = ()
    ) -> None:
        """Send a whole small response at once."""
        hdrs = list(headers)
        if not any(k.lower() == "content-length" for k, _ in hdrs):
            hdrs.append(("content-length", str(len(body))))
        await self.send_headers(status, hdrs)
        if body:
            await self.send_data(body)
        await self.end()


class _H2Server:
    """HTTP/2 server state for one Noise connection (h2 engine + trio tasks)."""

    def __init__(
        self,
        stream: NoiseStream,
        handler: ControlHandler,
        *,
        machine_key: MachinePublic,
        version: int,
        peer: str,
        logger: logging.Logger,
        max_body: int,
        boundary: Boundary | None = None,
    ) -> None:
        self.stream = stream
        self.handler = handler
        self.machine_key = machine_key
        self.version = version
        self.peer = peer
        self.log = logger
        self.max_body = max_body
        self.boundary = boundary or Boundary(logger)
        cfg = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.h2 = h2.connection.H2Connection(config=cfg)
        self.frames = FrameTracker(self.h2.max_inbound_frame_size)
        self.buffered = 0  # body bytes held by incomplete requests
        self.streams: dict[int, _StreamState] = {}
        self._wake_writer = trio.Event()
        self._window_changed = trio.Event()
        # Output in order: h2's bytes as it produced them, and our DATA frames.
        self._out: deque[bytes | memoryview] = deque()
        self._queued = 0  # bytes ever put in _out
        self._written = 0  # bytes ever written to the socket
        self._written_event: trio.Event | None = None  # made by a flush waiting for it
        # Sealed by `send_now` but not taken by the socket: the writer sends it first.
        self._ciphertext: memoryview | None = None
        self._ciphertext_plain = 0  # the plaintext bytes it holds (counted written after)
        self._writing = False  # the writer is between taking output and having sent it
        self._dead: BaseException | None = None
        self._nursery: trio.Nursery | None = None

    # -- output ------------------------------------------------------------

    def call(self, stream_id: int, fn: Callable[[h2.connection.H2Connection], Any]) -> None:
        """Run an h2 send-side call; a closed stream becomes StreamClosedError."""
        if self._dead is not None:
            raise StreamClosedError("control connection is gone") from self._dead
        try:
            fn(self.h2)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError) as e:
            raise StreamClosedError(f"stream {stream_id} is closed: {e}") from e
        self._kick()

    @property
    def _unflushed(self) -> int:
        """Bytes queued or being written, not yet on the socket."""
        return self._queued - self._written

    async def flush(self) -> None:
        """Wait until everything queued so far was written to the socket."""
        target = self._queued
        while self._written < target:
            if self._dead is not None:
                raise StreamClosedError("control connection is gone") from self._dead
            if self._written_event is None:
                self._written_event = trio.Event()
            await self._written_event.wait()

    def _take_h2_output(self) -> None:
        """Move what h2 produced into the queue: called before anything of ours is
        queued, so the order on the wire is the order of the calls."""
        data = self.h2.data_to_send()
        if data:
            self._out.append(data)
            self._queued += len(data)

    async def _writer(self) -> None:
        out = self._out
        while True:
            await self._wake_writer.wait()
            self._wake_writer = trio.Event()
            self._writing = True
            try:
                if self._ciphertext is not None:
                    rest, self._ciphertext = self._ciphertext, None
                    await self.stream.send_ciphertext(rest)
                    del rest
                    self._count_written(self._ciphertext_plain)
                self._take_h2_output()
                while out:
                    await self._write_batch()
            finally:
                self._writing = False

    async def _write_batch(self) -> None:
        """Seal and write the next batch. Its chunks are views of pieces that every first
        map shares: a local of the writer's loop held each connection's last batch while
        it waited (43 MB at 5,000 nodes)."""
        batch, size = self._take_batch()
        await self.stream.send_all(b"".join(batch))
        self._count_written(size)

    def _take_batch(self) -> tuple[list[bytes | memoryview], int]:
        out, batch, size = self._out, [], 0
        while out and size < WRITE_BATCH:
            item = out.popleft()
            batch.append(item)
            size += len(item)
        return batch, size

    def _count_written(self, size: int) -> None:
        self._written += size
        self._wake_flushers()

    def _wake_flushers(self) -> None:
        event, self._written_event = self._written_event, None
        if event is not None:
            event.set()

    def _write_now(self) -> None:
        """Seal and write what is queued from this task, without waiting, when the writer
        is idle and it fits one batch; otherwise (and for what the socket does not take)
        wake the writer."""
        if self._writing or self._ciphertext is not None or self._unflushed > WRITE_BATCH:
            self._wake_writer.set()
            return
        self._take_h2_output()
        batch, size = self._take_batch()
        try:
            rest = self.stream.send_now(b"".join(batch))
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
            self._out.extendleft(reversed(batch))  # the writer meets the error and ends us
            self._wake_writer.set()
            return
        if rest:
            self._ciphertext, self._ciphertext_plain = rest, size
            self._wake_writer.set()
        else:
            self._count_written(size)

    def _kick(self) -> None:
        """Queue whatever h2 produced (a response head, ACKs, window updates)."""
        self._take_h2_output()
        self._wake_writer.set()

    def _queue_data(self, stream_id: int, chunk: memoryview) -> None:
        """One DATA frame, debited from the windows h2 keeps (as h2's send_data would)."""
        self._take_h2_output()
        n = len(chunk)
        self.h2.outbound_flow_control_window -= n
        self.h2.streams[stream_id].outbound_flow_control_window -= n
        self._out.append(_FRAME_HEADER.pack(n >> 16, n & 0xFFFF, _DATA, 0, stream_id))
        self._out.append(chunk)
        self._queued += _FRAME_HEADER.size + n

    def _window(self, stream_id: int) -> int:
        """How many bytes of the stream's data the client's windows take now;
        StreamClosedError if the stream or the connection is gone."""
        st = self.streams.get(stream_id)
        if st is None or st.reset:
            raise StreamClosedError(f"stream {stream_id} was reset by the client")
        if self._dead is not None:
            raise StreamClosedError("control connection is gone") from self._dead
        try:
            window = self.h2.local_flow_control_window(stream_id)
            if not self.h2.streams[stream_id].open:
                raise h2.exceptions.StreamClosedError(stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError) as e:
            raise StreamClosedError(f"stream {stream_id} is closed: {e}") from e
        return window

    def send_now(self, stream_id: int, data: Sequence[bytes]) -> bool:
        """Queue `data` for the stream and write it from this task if the stream's window
        takes all of it and the connection is not behind; False (nothing queued) if not,
        or if the stream or connection is gone: then `send_data` waits or raises."""
        try:
            window = self._window(stream_id)
        except StreamClosedError:
            return False
        if sum(len(part) for part in data) > window or self._unflushed > UNFLUSHED_LIMIT:
            return False
        frame = self.h2.max_outbound_frame_size
        for part in data:
            view = memoryview(part)
            for start in range(0, len(view), frame):
                self._queue_data(stream_id, view[start : start + frame])
        self._write_now()
        return True

    async def send_data(
        self, stream_id: int, data: bytes | Sequence[bytes], *, wait: bool = True
    ) -> None:
        for part in [data] if isinstance(data, bytes) else data:
            view = memoryview(part)
            while view:
                n = min(self._window(stream_id), self.h2.max_outbound_frame_size, len(view))
                if n <= 0:
                    # Blocked on the client's window: wait for WINDOW_UPDATE/SETTINGS/reset.
                    self._wake_writer.set()
                    await self._window_changed.wait()
                    continue
                self._queue_data(stream_id, view[:n])
                view = view[n:]
        self._wake_writer.set()
        if wait or self._unflushed > UNFLUSHED_LIMIT:
            await self.flush()

    def _signal_window(self) -> None:
        self._window_changed.set()
        self._window_changed = trio.Event()

    # -- input -------------------------------------------------------------

    async def run(self, initial_settings_timeout: float = PREFACE_TIMEOUT) -> None:
        self.h2.initiate_connection()
        self.h2.update_settings(
            {
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: RECEIVE_WINDOW,
            }
        )
        # Connection-level window is only raised by WINDOW_UPDATE, not SETTINGS.
        self.h2.increment_flow_control_window(RECEIVE_WINDOW)
        preface_deadline = trio.current_time() + initial_settings_timeout
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._writer)
                self._kick()
                first = True
                while True:
                    if self._written < self._queued:
                        with trio.move_on_after(WRITE_BACKLOG_TIMEOUT) as cs:
                            await self.flush()
                        if cs.cancelled_caught:
                            raise trio.TooSlowError(
                                f"the client read none of our output for "
                                f"{WRITE_BACKLOG_TIMEOUT:g} s"
                            )
                    deadline, why = self._read_deadline(first, preface_deadline)
                    with trio.move_on_at(deadline) as cs:
                        data = await self.stream.receive_some(_READ_SIZE)
                    if cs.cancelled_caught:
                        if why == "stream":
                            self._reset_stalled_streams()
                            self._kick()
                            continue
                        raise trio.TooSlowError(why)
                    first = False
                    if not data:
                        self.log.debug("ts2021 %s: connection closed by client", self.peer)
                        break
                    try:
                        # h2 first: its own errors (a bad preface) say more than ours.
                        events = self.h2.receive_data(data)
                        self.frames.feed(data)
                    except h2.exceptions.ProtocolError as e:
                        self.log.info("ts2021 %s: HTTP/2 protocol error: %s", self.peer, e)
                        self._goaway(e)
                        self._kick()  # h2 queued a GOAWAY; try to send it
                        with trio.move_on_after(1):
                            await self.flush()
                        break
                    if not self._handle_events(events, nursery):
                        break
                    self._kick()
                nursery.cancel_scope.cancel()
        finally:
            self._dead = self._dead or StreamClosedError("connection ended")
            self._signal_window()
            self._wake_flushers()

    def _read_deadline(self, first: bool, preface_deadline: float) -> tuple[float, str]:
        """When the next read must have brought something, and what it is waiting for."""
        if first:
            return preface_deadline, "no HTTP/2 preface in time"
        if self.frames.partial:
            return (
                trio.current_time() + PARTIAL_FRAME_TIMEOUT,
                f"partial HTTP/2 frame: the rest did not come within {PARTIAL_FRAME_TIMEOUT:g} s",
            )
        waiting = [st.started for st in self.streams.values() if not st.complete and not st.reset]
        if waiting:
            return min(waiting) + REQUEST_TIMEOUT, "stream"
        return math.inf, ""

    def _reset_stalled_streams(self) -> None:
        now = trio.current_time()
        for st in list(self.streams.values()):
            if not st.complete and not st.reset and now - st.started >= REQUEST_TIMEOUT:
                self.log.info(
                    "ts2021 %s: stream %d: request not complete within %g s, reset",
                    self.peer,
                    st.stream_id,
                    REQUEST_TIMEOUT,
                )
                self._drop_stream(st, h2.errors.ErrorCodes.CANCEL)

    def _drop_stream(self, st: _StreamState, code: h2.errors.ErrorCodes) -> None:
        st.reset = True
        self.buffered -= len(st.body)
        st.body = bytearray()
        self.streams.pop(st.stream_id, None)
        try:
            self.h2.reset_stream(st.stream_id, code)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass

    def _goaway(self, e: h2.exceptions.ProtocolError) -> None:
        """h2 sends GOAWAY itself for errors it detects; ours (FrameTracker) need one too."""
        if isinstance(e, h2.exceptions.FrameTooLargeError):
            try:
                self.h2.close_connection(h2.errors.ErrorCodes.FRAME_SIZE_ERROR)
            except h2.exceptions.ProtocolError:
                pass

    def _handle_events(self, events: list[h2.events.Event], nursery: trio.Nursery) -> bool:
        for ev in events:
            if isinstance(ev, h2.events.RequestReceived):
                sid = ev.stream_id
                hdrs = [(_s(k), _s(v)) for k, v in (ev.headers or [])]
                self.streams[sid] = _StreamState(sid, hdrs)
            elif isinstance(ev, h2.events.DataReceived):
                sid = ev.stream_id
                # Always give the window back, even for data we drop: the
                # connection window is shared by every stream.
                if ev.flow_controlled_length:
                    try:
                        self.h2.acknowledge_received_data(ev.flow_controlled_length, sid)
                    except h2.exceptions.StreamClosedError:
                        pass
                st = self.streams.get(sid)
                if st is not None and ev.data and not st.complete:
                    if len(st.body) + len(ev.data) > self.max_body:
                        st.too_large = True
                        self.buffered -= len(st.body)
                        st.body = bytearray()
                    elif self.buffered + len(ev.data) > MAX_BUFFERED_BODIES:
                        self.log.info(
                            "ts2021 %s: stream %d refused: %d bytes of request bodies "
                            "already buffered on this connection",
                            self.peer,
                            sid,
                            self.buffered,
                        )
                        self._drop_stream(st, h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
                    elif not st.too_large:
                        st.body += ev.data
                        self.buffered += len(ev.data)
            elif isinstance(ev, h2.events.StreamEnded):
                # The request is complete (END_STREAM on HEADERS, DATA or trailers).
                st = self.streams.get(ev.stream_id)
                if st is not None and not st.complete:
                    st.complete = True
                    self.buffered -= len(st.body)
                    nursery.start_soon(self._run_stream, st)
            elif isinstance(ev, h2.events.StreamReset):
                st = self.streams.get(ev.stream_id)
                if st is not None:
                    if not st.complete:
                        self.buffered -= len(st.body)
                        st.body = bytearray()
                    st.reset = True
                    st.scope.cancel()
                self._signal_window()
            elif isinstance(ev, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
                self._signal_window()
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.log.debug("ts2021 %s: client sent GOAWAY (%s)", self.peer, ev.error_code)
                return False
        return True

    async def _run_stream(self, st: _StreamState) -> None:
        sid = st.stream_id
        resp = ControlResponse(self, sid)
        pseudo = {k: v for k, v in st.headers if k.startswith(":")}
        req = ControlRequest(
            method=pseudo.get(":method", ""),
            path=pseudo.get(":path", ""),
            authority=pseudo.get(":authority", ""),
            headers=[(k, v) for k, v in st.headers if not k.startswith(":")],
            body=bytes(st.body),
            machine_key=self.machine_key,
            version=self.version,
            peer=self.peer,
            stream_id=sid,
        )
        try:
            with st.scope:
                if st.too_large:
                    self.log.info(
                        "ts2021 %s: %s %s body over %d bytes refused",
                        self.peer,
                        req.method,
                        req.path,
                        self.max_body,
                    )
                    await resp.respond(413, b"request body too large\n")
                    return
                try:
                    await self.handler(req, resp)
                    if not resp.ended:
                        await resp.end()
                except StreamClosedError:
                    pass
                except Exception as e:
                    # One bad request must not take down the node's other streams.
                    self.boundary.record("ts2021-request", f"{self.peer} {req.path}", e)
                    await self._fail_stream(resp)
            if st.scope.cancelled_caught:
                self.log.debug(
                    "ts2021 %s: %s %s cancelled by client reset", self.peer, req.method, req.path
                )
        finally:
            self.streams.pop(sid, None)

    async def _fail_stream(self, resp: ControlResponse) -> None:
        try:
            if not resp.headers_sent:
                await resp.respond(500, b"internal error\n", [("content-type", "text/plain")])
            elif not resp.ended:
                sid = resp.stream_id
                self.call(sid, lambda c: c.reset_stream(sid, h2.errors.ErrorCodes.INTERNAL_ERROR))
                await self.flush()
        except StreamClosedError:
            pass


def _s(v: bytes | str) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else v


# --- the upgrade ----------------------------------------------------------------


def _initiation(b64: str) -> bytes:
    """The Noise initiation an upgrade carries in base64 (header or query); b"" when
    it is missing or not strict base64 (the caller refuses the upgrade)."""
    try:
        return base64.b64decode(b64, validate=True) if b64 else b""
    except (binascii.Error, ValueError):
        return b""


def _plain_response(status: int, reason: str, body: str) -> bytes:
    b = body.encode()
    return (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(b)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + b


def _request_header(upgrade: Upgrade, name: str) -> str:
    want = name.lower().encode()
    for k, v in upgrade.request.headers:
        if k.lower() == want:
            return v.decode("latin-1")
    return ""


async def serve_ts2021(
    upgrade: Upgrade,
    server_private_key: PrivateKey,
    handler: ControlHandler,
    *,
    logger: logging.Logger,
    max_body: int = DEFAULT_MAX_BODY,
    send_early_payload: bool = True,
    boundary: Boundary | None = None,
) -> None:
    """Upgrade handler for ``/ts2021``: handshake, then serve HTTP/2 until the node leaves."""
    peer = upgrade.peer
    if _request_header(upgrade, "upgrade").lower() == "websocket":
        await _serve_websocket(
            upgrade,
            server_private_key,
            handler,
            logger=logger,
            max_body=max_body,
            boundary=boundary,
        )
        return
    method = upgrade.request.method.decode("latin-1").upper()
    if method not in ("POST", "GET"):
        await _refuse(upgrade, 405, "Method Not Allowed", "ts2021 needs POST (or GET)\n", logger)
        return
    if _request_header(upgrade, "upgrade").lower() != UPGRADE_VALUE:
        # controlhttpserver: "missing next protocol" unless Upgrade names ours.
        await _refuse(
            upgrade,
            400,
            "Bad Request",
            f"missing next protocol: expected 'Upgrade: {UPGRADE_VALUE}'\n",
            logger,
        )
        return
    initiation = _initiation(_request_header(upgrade, HANDSHAKE_HEADER))
    if not initiation:
        await _refuse(
            upgrade,
            400,
            "Bad Request",
            "invalid tailscale handshake header: X-Tailscale-Handshake must hold the "
            "base64 Noise initiation\n",
            logger,
        )
        return

    head = (
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"Upgrade: " + UPGRADE_VALUE.encode() + b"\r\n"
        b"Connection: upgrade\r\n\r\n"
    )
    try:
        accepted = noise.respond(server_private_key, initiation)
    except noise.HandshakeRejected as e:
        # As controlbase.Server: the 101 goes out, then an error frame (or just close).
        logger.info("ts2021 %s: handshake refused: %s", peer, e)
        with trio.move_on_after(5):
            await upgrade.stream.send_all(head + (e.refusal or b""))
        return
    except noise.NoiseError as e:
        logger.info("ts2021 %s: handshake failed: %s", peer, e)
        return

    transport = accepted.transport
    out = head + accepted.response
    if send_early_payload and accepted.version >= noise.EARLY_PAYLOAD_MIN_VERSION:
        # A fresh challenge per connection, as headscale does; v1.90.9 parses it
        # but does not answer it yet.
        challenge = PrivateKey.generate().challenge_public()
        out += transport.send(noise.encode_early_payload(challenge))
    logger.info(
        "ts2021 %s: noise handshake ok, machine %s, capver %d",
        peer,
        accepted.machine_key.short(),
        accepted.version,
    )
    with trio.move_on_after(PREFACE_TIMEOUT) as cs:
        await upgrade.stream.send_all(out)
    if cs.cancelled_caught:
        logger.info("ts2021 %s: could not send the handshake response in time", peer)
        return
    ns = NoiseStream(upgrade.stream, transport, initial_ciphertext=upgrade.trailing)
    await _run_h2(ns, accepted, handler, peer, logger=logger, max_body=max_body, boundary=boundary)


async def _run_h2(
    ns: NoiseStream,
    accepted: noise.Accepted,
    handler: ControlHandler,
    peer: str,
    *,
    logger: logging.Logger,
    max_body: int,
    boundary: Boundary | None,
) -> None:
    """HTTP/2 over an established Noise stream, for the plain and the WebSocket upgrade."""
    server = _H2Server(
        ns,
        handler,
        machine_key=accepted.machine_key,
        version=accepted.version,
        peer=peer,
        logger=logger,
        max_body=max_body,
        boundary=boundary,
    )
    try:
        await server.run()
    except* (trio.BrokenResourceError, trio.ClosedResourceError) as eg:
        # The node went away mid-write or mid-read (its handlers were cancelled), or the
        # Noise layer refused what it sent: then the cause is worth its one line.
        first = eg.exceptions[0]
        cause = first.__cause__
        if cause is not None and classify(cause) != "disconnect":
            server.boundary.record("ts2021", peer, cause)
        else:
            logger.debug("ts2021 %s: connection ended: %s", peer, cause or first)


WS_FRAME_TIMEOUT = 30.0  # a WebSocket frame that starts must finish within this
_REASONS = {400: "Bad Request", 405: "Method Not Allowed", 426: "Upgrade Required"}


async def _serve_websocket(
    upgrade: Upgrade,
    server_private_key: PrivateKey,
    handler: ControlHandler,
    *,
    logger: logging.Logger,
    max_body: int,
    boundary: Boundary | None,
) -> None:
    """``/ts2021`` over WebSocket, as browser and WASM clients speak it (controlhttp
    acceptWebsocket): subprotocol ``tailscale-control-protocol``, the Noise initiation
    in the ``X-Tailscale-Handshake`` query parameter, then binary messages carry the
    Noise stream (no early payload), and HTTP/2 runs inside as on the plain upgrade."""
    from urllib.parse import parse_qs, urlsplit

    from trio_websocket import ConnectionClosed, wrap_server_stream

    from derp.server import (
        WebSocketByteStream,
        WebSocketFrameDeadline,
        websocket_request_problem,
    )
    from derp.streams import PrefixedStream

    peer = upgrade.peer
    problem = websocket_request_problem(upgrade.head, UPGRADE_VALUE)
    if problem is not None:
        status, why = problem
        reason = _REASONS.get(status, "Bad Request")
        await _refuse(upgrade, status, reason, f"bad WebSocket upgrade: {why}\n", logger)
        return
    query = parse_qs(urlsplit(upgrade.request.target.decode("latin-1")).query)
    initiation = _initiation((query.get("X-Tailscale-Handshake") or [""])[0])
    if not initiation:
        await _refuse(
            upgrade,
            400,
            "Bad Request",
            "X-Tailscale-Handshake must hold the base64 Noise initiation\n",
            logger,
        )
        return
    replay = WebSocketFrameDeadline(
        PrefixedStream(upgrade.stream, upgrade.head + upgrade.trailing),
        upgrade.head,
        WS_FRAME_TIMEOUT,
    )
    async with trio.open_nursery() as nursery:
        with trio.move_on_after(PREFACE_TIMEOUT) as hs:
            request = await wrap_server_stream(nursery, replay, max_message_size=1 << 21)
            ws = await request.accept(subprotocol=UPGRADE_VALUE)
        if hs.cancelled_caught:
            logger.info("ts2021 %s: websocket handshake timed out", peer)
            nursery.cancel_scope.cancel()
            return
        stream = WebSocketByteStream(ws, ConnectionClosed)
        try:
            try:
                accepted = noise.respond(server_private_key, initiation)
            except noise.NoiseError as e:
                logger.info("ts2021 %s (websocket): handshake failed: %s", peer, e)
                return
            with trio.move_on_after(PREFACE_TIMEOUT):
                await stream.send_all(accepted.response)
            logger.info(
                "ts2021 %s: noise handshake ok over websocket, machine %s, capver %d",
                peer,
                accepted.machine_key.short(),
                accepted.version,
            )
            await _run_h2(
                NoiseStream(stream, accepted.transport),
                accepted,
                handler,
                peer,
                logger=logger,
                max_body=max_body,
                boundary=boundary,
            )
        finally:
            with trio.move_on_after(2) as cs:
                cs.shield = True
                await ws.aclose()
            nursery.cancel_scope.cancel()


async def _refuse(
    upgrade: Upgrade, status: int, reason: str, body: str, logger: logging.Logger
) -> None:
    logger.info("ts2021 %s: refused (%d): %s", upgrade.peer, status, body.strip())
    with trio.move_on_after(5):
        try:
            await upgrade.stream.send_all(_plain_response(status, reason, body))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
