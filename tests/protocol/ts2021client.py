"""A small ts2021 client for tests: HTTP upgrade, Noise initiator, HTTP/2 client.

Behaves like the Go client where it matters to the server (POST /ts2021 with
the base64 initiation, reads the early payload, then HTTP/2 with prior
knowledge) and exposes flow control to the test: received DATA is only
acknowledged when the test consumes it, so a server that ignores our windows
trips h2's FlowControlError and a server that never resumes stalls.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.settings
import h11
import hyperframe.frame
import trio

from appliance.noise_stream import NoiseStream
from protocol import noise
from protocol.keys import MachinePublic, PrivateKey


# h2 formats every frame it receives for a trace log (`repr(frame)`, not lazily), and
# hyperframe's repr of a DATA frame hexlifies the whole payload to show ten bytes of
# it. A load generator receives gigabytes: show the size instead.
def _data_body_repr(frame: hyperframe.frame.DataFrame) -> str:
    return f"data=<{len(frame.data)} bytes>"


setattr(hyperframe.frame.DataFrame, "_body_repr", _data_body_repr)  # noqa: B010


class UpgradeRefused(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"ts2021 upgrade refused: {status} {body!r}")
        self.status = status
        self.body = body


@dataclass
class ClientStream:
    stream_id: int
    status: int | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    headers_ready: trio.Event = field(default_factory=trio.Event)
    send: trio.MemorySendChannel[bytes] | None = None
    recv: trio.MemoryReceiveChannel[bytes] | None = None
    ended: bool = False
    reset_code: int | None = None
    # Set by `consume`: each chunk goes to it as it arrives, acknowledged at once.
    on_data: Callable[[bytes], None] | None = None


def _text(header: str | bytes) -> str:
    """A header name or value: h2 decodes them (header_encoding) but is typed as bytes."""
    return header.decode() if isinstance(header, bytes) else header


class TS2021Client:
    def __init__(
        self,
        stream: NoiseStream,
        early: noise.EarlyPayload | None,
        leftover: bytes,
        window: int,
        conn_window: int = 65535,
    ) -> None:
        self.stream = stream
        self.early = early
        self._leftover = leftover
        cfg = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        self.h2 = h2.connection.H2Connection(config=cfg)
        self.h2.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window}
        )
        self.conn_window = conn_window
        self.streams: dict[int, ClientStream] = {}
        self._send_lock = trio.Lock()
        self.terminated = trio.Event()
        self.remote_settings: dict[int, int] = {}
        self._window = trio.Event()

    async def _flush(self) -> None:
        # Taken before the lock: the lock is fair, so whoever took bytes first sends
        # first. Nothing to send (most reads: h2 sends a WINDOW_UPDATE only once half a
        # window is read) costs no pass of the scheduler.
        data = self.h2.data_to_send()
        if data:
            async with self._send_lock:
                await self.stream.send_all(data)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.h2.initiate_connection()
        if self.conn_window > 65535:
            self.h2.increment_flow_control_window(self.conn_window - 65535)
        await self._flush()
        task_status.started()
        data = self._leftover
        try:
            while True:
                if data:
                    for ev in self.h2.receive_data(data):
                        self._on_event(ev)
                    await self._flush()
                data = await self.stream.receive_some(65536)
                if not data:
                    break
        finally:
            self.terminated.set()
            for st in self.streams.values():
                if st.send is not None:
                    st.send.close()
                st.headers_ready.set()

    def _on_event(self, ev: h2.events.Event) -> None:
        if isinstance(ev, h2.events.ResponseReceived):
            st = self.streams[ev.stream_id]
            for k, v in ev.headers:
                name, value = _text(k), _text(v)
                if name == ":status":
                    st.status = int(value)
                else:
                    st.headers.append((name, value))
            st.headers_ready.set()
        elif isinstance(ev, h2.events.DataReceived):
            st = self.streams[ev.stream_id]
            if st.on_data is not None:
                st.on_data(ev.data)  # consumed now: acked with this read's flush
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                return
            assert st.send is not None
            # The channel is unbounded: flow control, not the channel, bounds it.
            st.send.send_nowait(ev.data)
            # Account for padding at once; the data itself is acked on consume.
            pad = ev.flow_controlled_length - len(ev.data)
            if pad:
                self.h2.acknowledge_received_data(pad, ev.stream_id)
        elif isinstance(ev, h2.events.StreamEnded):
            st = self.streams[ev.stream_id]
            st.ended = True
            assert st.send is not None
            st.send.close()
        elif isinstance(ev, h2.events.StreamReset):
            reset = self.streams.get(ev.stream_id)
            if reset is not None:
                reset.reset_code = ev.error_code
                reset.headers_ready.set()
                if reset.send is not None:
                    reset.send.close()
        if isinstance(ev, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self._window.set()
            self._window = trio.Event()
        if isinstance(ev, h2.events.RemoteSettingsChanged):
            for code, ch in ev.changed_settings.items():
                self.remote_settings[int(code)] = ch.new_value
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.terminated.set()

    async def open(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: list[tuple[str, str]] | None = None,
    ) -> ClientStream:
        sid = self.h2.get_next_available_stream_id()
        send, recv = trio.open_memory_channel[bytes](math.inf)
        st = ClientStream(sid, send=send, recv=recv)
        self.streams[sid] = st
        hdrs = [
            (":method", method),
            (":scheme", "http"),
            (":authority", "127.0.0.1"),
            (":path", path),
            ("content-length", str(len(body))),
            *(headers or []),
        ]
        self.h2.send_headers(sid, hdrs, end_stream=not body)
        await self._flush()
        view = memoryview(body)
        while view:
            n = min(
                self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size, len(view)
            )
            if n <= 0:
                await self._window.wait()
                continue
            self.h2.send_data(sid, bytes(view[:n]), end_stream=n == len(view))
            view = view[n:]
            await self._flush()
        return st

    async def read(self, st: ClientStream) -> bytes:
        """Next chunk of the response body (b"" at the end); acks it to the server."""
        assert st.recv is not None
        try:
            chunk = await st.recv.receive()
        except trio.EndOfChannel:
            return b""
        if chunk:
            self.h2.acknowledge_received_data(len(chunk), st.stream_id)
            await self._flush()
        return chunk

    async def consume(self, st: ClientStream, on_data: Callable[[bytes], None]) -> None:
        """Hand each chunk of the body to `on_data` as it is received (in the connection's
        own task, no channel and no task switch per chunk: a load generator reads
        thousands of streams), until the stream ends. What `read` had not taken yet
        goes first. An exception from `on_data` ends the connection."""
        assert st.recv is not None
        while True:
            try:
                chunk = st.recv.receive_nowait()
            except trio.WouldBlock:
                break
            except trio.EndOfChannel:
                return
            on_data(chunk)
            self.h2.acknowledge_received_data(len(chunk), st.stream_id)
        st.on_data = on_data
        await self._flush()
        try:
            await st.recv.receive()  # nothing more comes this way: waits for the end
        except trio.EndOfChannel:
            return

    async def read_all(self, st: ClientStream) -> bytes:
        out = bytearray()
        while chunk := await self.read(st):
            out += chunk
        return bytes(out)

    async def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: list[tuple[str, str]] | None = None,
    ) -> tuple[int, bytes]:
        st = await self.open(method, path, body, headers)
        await st.headers_ready.wait()
        data = await self.read_all(st)
        assert st.status is not None, f"stream reset ({st.reset_code}) before headers"
        return st.status, data

    async def reset(self, st: ClientStream) -> None:
        self.h2.reset_stream(st.stream_id, 8)  # CANCEL, as Go does for an abandoned poll
        await self._flush()


async def upgrade(
    raw: trio.abc.Stream,
    server_public: MachinePublic,
    *,
    machine: PrivateKey | None = None,
    version: int = 130,
    method: str = "POST",
) -> tuple[NoiseStream, noise.EarlyPayload | None, bytes, noise.NoiseTransport]:
    """Do the HTTP upgrade and the Noise handshake; returns the plaintext stream."""
    ini = noise.Initiator(machine or PrivateKey.generate(), server_public, version)
    conn = h11.Connection(h11.CLIENT)
    req = h11.Request(
        method=method,
        target="/ts2021",
        headers=[
            ("Host", "127.0.0.1"),
            ("Upgrade", "tailscale-control-protocol"),
            ("Connection", "upgrade"),
            ("Content-Length", "0"),
            ("X-Tailscale-Handshake", base64.b64encode(ini.initiation).decode()),
        ],
    )
    await raw.send_all(conn.send(req) + conn.send(h11.EndOfMessage()))
    while True:
        ev = conn.next_event()
        if ev is h11.NEED_DATA:
            conn.receive_data(bytes(await raw.receive_some(65536)))
            continue
        if isinstance(ev, h11.InformationalResponse) and ev.status_code == 101:
            break
        if isinstance(ev, h11.Response):
            body = b""
            while True:
                ev2 = conn.next_event()
                if ev2 is h11.NEED_DATA:
                    conn.receive_data(bytes(await raw.receive_some(65536)))
                elif isinstance(ev2, h11.Data):
                    body += ev2.data
                else:
                    break
            raise UpgradeRefused(ev.status_code, body)
        raise AssertionError(f"unexpected {ev!r}")
    data: bytes | bytearray = conn.trailing_data[0]
    transport = None
    while transport is None:
        if data:
            transport = ini.receive_data(bytes(data))
        if transport is None:
            data = await raw.receive_some(65536)
            if not data:
                raise noise.RemoteNoiseError("server closed during handshake")
    ns = NoiseStream(raw, transport)
    # Read until we know whether there is an early payload.
    plain = b""
    while True:
        got = noise.parse_early_payload(plain)
        if got is not None:
            early, used = got
            return ns, early, plain[used:], transport
        chunk = await ns.receive_some()
        if not chunk:
            raise noise.RemoteNoiseError("server closed before HTTP/2")
        plain += chunk


async def connect(
    raw: trio.abc.Stream,
    server_public: MachinePublic,
    *,
    machine: PrivateKey | None = None,
    version: int = 130,
    method: str = "POST",
    window: int = 65535,
    conn_window: int = 65535,
) -> TS2021Client:
    """`window`, `conn_window`: our stream and connection receive windows (HTTP/2's
    defaults unless given; Go's client, as the load generator, uses 4 MiB and 1 GiB)."""
    ns, early, leftover, _ = await upgrade(
        raw, server_public, machine=machine, version=version, method=method
    )
    return TS2021Client(ns, early, leftover, window, conn_window)
