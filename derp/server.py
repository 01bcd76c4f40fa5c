"""The trio DERP relay: a thin I/O shell around ``derp.codec``.

Mounted on the main listener: the HTTP front end parses the request head and
hands the connection over (``handle_upgrade``). Behaviour follows tailscale
v1.90.9 ``derp/derpserver/{derpserver,handler}.go``, with one deliberate
simplification: a node key connecting twice keeps only the newest connection
(the Go server keeps both and lets the last writer win).

Per connection: one reader (parses frames, routes packets without ever
blocking on another client) and one writer (drains this client's own bounded
queue, sends keep-alives). A slow reader fills only its own queue, whose
oldest packets are dropped and counted, like derpserver.go ``sendPkt``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
import os
import random
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import h11
import trio
from nacl.public import PrivateKey

from derp import stun
from derp.codec import (
    KEEP_ALIVE_JITTER_SECONDS,
    KEEP_ALIVE_SECONDS,
    PROTOCOL_VERSION,
    ClientInfo,
    ClosePeer,
    DerpServerConnection,
    ForwardPacket,
    NotePreferred,
    PeerGoneReason,
    PeerPresentFlags,
    Ping,
    SendPacket,
    WatchConns,
)
from derp.errors import DerpConfigError, DerpError, FrameStalled, RemoteDerpError
from derp.streams import PrefixedStream, ReadWrapper
from protocol.keys import KeyParseError, load_or_create_private_key

# derpserver.go defaultPerClientSendQueueDepth is 32 packets, but there the
# reader and the writers run in parallel. Here one reader task routes a whole
# 64 KiB read (about 50 WireGuard packets) before any writer runs, so the
# queue must hold a couple of reads' worth per destination or a burst from a
# single fast sender would be dropped with no slow reader at all.
DEFAULT_SEND_QUEUE_DEPTH = 128
# derpserver.go DefaultTCPWiteTimeout: a client that does not read for this long
# is dropped rather than letting its socket buffer pin memory.
DEFAULT_WRITE_TIMEOUT = 2.0
# derpserver.go accept: ServerKey out and ClientInfo in within 10 s.
HANDSHAKE_TIMEOUT = 10.0
# derpserver.go verifyClient uses 5 s for its admission-controller call.
VERIFY_TIMEOUT = 5.0
# A frame (DERP or WebSocket) that has started must keep coming: a header and then
# silence would otherwise hold the connection and its buffer forever. The clock
# restarts at every completed frame, so a busy client is never cut; an idle one
# (no partial frame) may stay silent as long as it likes, as with the Go server.
# 64 KiB at a crawling 4 KiB/s still fits.
DEFAULT_FRAME_TIMEOUT = 15.0
# How long a refusal (Health frame) or a 426 may take to write before we hang up.
GOODBYE_TIMEOUT = 2.0
# "TS💬": disco messages; the Go server answers only these with PeerGone(NotHere)
# (disco.LooksLikeDiscoWrapper: magic + 32-byte key + 24-byte nonce at least).
DISCO_MAGIC = "TS💬".encode()
_DISCO_MIN_LEN = len(DISCO_MAGIC) + 32 + 24
# derpserver.go peerGoneLim: rate.Every(time.Second), burst 3.
_NOT_HERE_RATE = 1.0
_NOT_HERE_BURST = 3.0
_READ_SIZE = 65536

VerifyClient = Callable[[bytes], Awaitable[bool]]


class UpgradeLike(Protocol):
    """The shape of ``appliance.httpserver.Upgrade`` (kept structural: derp/ does
    not import the appliance)."""

    stream: trio.abc.Stream
    request: h11.Request
    head: bytes
    trailing: bytes
    peer: str


@dataclass
class DerpStats:
    """Counters for /metrics (names follow derpserver.go's expvars where they exist)."""

    accepts: int = 0
    current_connections: int = 0
    current_home_connections: int = 0
    refused: int = 0
    duplicate_replaced: int = 0
    packets_received: int = 0
    bytes_received: int = 0
    packets_sent: int = 0
    bytes_sent: int = 0
    packets_dropped: dict[str, int] = field(default_factory=dict)
    peer_gone_disconnected_frames: int = 0
    peer_gone_not_here_frames: int = 0
    got_ping: int = 0
    sent_pong: int = 0
    write_timeouts: int = 0
    websocket_accepts: int = 0
    # Connections ended by their client's fault (one log line each) or by a bug here.
    protocol_errors: int = 0
    frame_timeouts: int = 0
    internal_errors: int = 0
    stun_requests: int = 0
    stun_answered: int = 0

    def drop(self, reason: str, n: int = 1) -> None:
        self.packets_dropped[reason] = self.packets_dropped.get(reason, 0) + n

    @property
    def packets_dropped_total(self) -> int:
        return sum(self.packets_dropped.values())


def _looks_like_disco(data: bytes) -> bool:
    return len(data) >= _DISCO_MIN_LEN and data[: len(DISCO_MAGIC)] == DISCO_MAGIC


def _split_peer(peer: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address | None, int]:
    host, _, port = peer.rpartition(":")
    try:
        return ipaddress.ip_address(host.strip("[]")), int(port)
    except ValueError:
        return None, 0


class _Client:
    """One authenticated connection: its queues and the scope that ends it."""

    def __init__(
        self,
        key: bytes,
        conn: DerpServerConnection,
        stream: trio.abc.Stream,
        peer: str,
        *,
        depth: int,
        ideal: bool,
    ) -> None:
        self.key = key
        self.conn = conn
        self.stream = stream
        self.peer = peer
        self.ip, self.port = _split_peer(peer)
        self.depth = depth
        self.packets: deque[bytes] = deque()
        self.packet_bytes: deque[int] = deque()
        self.control: deque[bytes] = deque()
        self.pong_pending = False
        self.wakeup = trio.Event()
        self.scope = trio.CancelScope()
        self.saw_src: set[bytes] = set()
        self.preferred = False
        self.watcher = False
        self.ideal = ideal
        self.can_mesh = conn.can_mesh
        self.is_prober = bool(conn.client_info and conn.client_info.is_prober)
        self.not_here_tokens = _NOT_HERE_BURST
        self.not_here_at = 0.0

    def present_flags(self) -> int:
        # derpserver.go presentFlags.
        flags = 0
        if self.can_mesh:
            flags |= PeerPresentFlags.IS_MESH_PEER
        if self.is_prober:
            flags |= PeerPresentFlags.IS_PROBER
        if not self.ideal:
            flags |= PeerPresentFlags.NOT_IDEAL
        return flags or PeerPresentFlags.IS_REGULAR

    def push_control(self, frame: bytes) -> None:
        self.control.append(frame)
        self.wakeup.set()


class DerpServer:
    """The embedded DERP relay and STUN responder."""

    def __init__(
        self,
        private_key: bytes,
        *,
        verify_client: VerifyClient | None = None,
        logger: logging.Logger | None = None,
        mesh_key: bytes | None = None,
        send_queue_depth: int = DEFAULT_SEND_QUEUE_DEPTH,
        write_timeout: float = DEFAULT_WRITE_TIMEOUT,
        keep_alive: float = KEEP_ALIVE_SECONDS,
        rng: random.Random | None = None,
        frame_timeout: float = DEFAULT_FRAME_TIMEOUT,
    ) -> None:
        self._private_key = bytes(private_key)
        self.public_key = bytes(PrivateKey(self._private_key).public_key)
        self._verify_client = verify_client
        self._log = logger or logging.getLogger("homescale.derp")
        self._mesh_key = mesh_key
        self._depth = send_queue_depth
        self._write_timeout = write_timeout
        self._keep_alive = keep_alive
        self._frame_timeout = frame_timeout
        self._rng = rng or random.Random()
        self._clients: dict[bytes, _Client] = {}
        self._all: set[_Client] = set()
        self._handshaking: set[trio.CancelScope] = set()
        # src key -> clients that received packets from it (derpserver.go
        # peerGoneWatchers): they get PeerGone when src leaves.
        self._gone_watchers: dict[bytes, set[_Client]] = {}
        self._watchers: set[_Client] = set()
        self._closed = False
        self.stats = DerpStats()

    # ------------------------------------------------------------ HTTP entry

    async def handle_upgrade(self, upgrade: UpgradeLike) -> None:
        """Serve ``GET /derp``: ``Upgrade: DERP`` (optionally fast start) or WebSocket."""
        headers = {k.lower(): v for k, v in upgrade.request.headers}
        up = headers.get(b"upgrade", b"").strip().lower()
        protocols = headers.get(b"sec-websocket-protocol", b"")
        if up == b"websocket" and b"derp" in protocols:
            await self.handle_websocket(upgrade)
            return
        # handler.go: "websocket" without the derp subprotocol is a very early
        # client speaking plain DERP; anything else gets 426.
        if up not in (b"derp", b"websocket"):
            if up:
                self._log.info("derp: %s: weird upgrade %r", upgrade.peer, up)
            await self._send_plain_response(
                upgrade.stream, 426, b"DERP requires connection upgrade"
            )
            return
        prefix = b""
        if headers.get(b"derp-fast-start", b"").strip() != b"1":
            prefix = (
                b"HTTP/1.1 101 Switching Protocols\r\n"
                b"Upgrade: DERP\r\n"
                b"Connection: Upgrade\r\n"
                b"Derp-Version: %d\r\n"
                b"Derp-Public-Key: %s\r\n\r\n"
            ) % (PROTOCOL_VERSION, self.public_key.hex().encode())
        ideal = not headers.get(b"ideal-node")  # handler.go: a set header marks "not ideal"
        await self._serve(upgrade.stream, upgrade.trailing, upgrade.peer, prefix, ideal=ideal)

    async def handle_websocket(self, upgrade: UpgradeLike) -> None:
        """DERP over WebSocket (subprotocol ``derp``, binary messages, no compression)."""
        from trio_websocket import ConnectionClosed, wrap_server_stream

        problem = websocket_request_problem(upgrade.head, "derp")
        if problem is not None:
            status, why = problem
            self._log.info(
                "derp: %s: websocket upgrade refused (%d): %s", upgrade.peer, status, why
            )
            await self._send_plain_response(upgrade.stream, status, why.encode() + b"\n")
            return
        replay = WebSocketFrameDeadline(
            PrefixedStream(upgrade.stream, upgrade.head + upgrade.trailing),
            upgrade.head,
            self._frame_timeout,
        )
        async with trio.open_nursery() as nursery:
            with trio.move_on_after(HANDSHAKE_TIMEOUT) as hs:
                request = await wrap_server_stream(nursery, replay, max_message_size=1 << 21)
                ws = await request.accept(subprotocol="derp")
            if hs.cancelled_caught:
                self._log.info("derp: %s: websocket handshake timed out", upgrade.peer)
                nursery.cancel_scope.cancel()
                return
            self.stats.websocket_accepts += 1
            try:
                await self._serve(WebSocketByteStream(ws, ConnectionClosed), b"", upgrade.peer, b"")
                if replay.timed_out:
                    self.stats.frame_timeouts += 1
                    self._log.info(
                        "derp: %s: websocket frame stalled: %s", upgrade.peer, replay.timed_out
                    )
            finally:
                with trio.move_on_after(GOODBYE_TIMEOUT) as cs:
                    cs.shield = True
                    await ws.aclose()
                nursery.cancel_scope.cancel()

    async def _send_plain_response(self, stream: trio.abc.Stream, status: int, body: bytes) -> None:
        reason = {426: b"Upgrade Required", 400: b"Bad Request", 405: b"Method Not Allowed"}.get(
            status, b"Error"
        )
        data = (
            b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
        ) % (status, reason, len(body), body)
        with trio.move_on_after(GOODBYE_TIMEOUT), contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(data)

    # ------------------------------------------------------------ one connection

    async def _serve(
        self,
        stream: trio.abc.Stream,
        initial: bytes,
        peer: str,
        prefix: bytes,
        *,
        ideal: bool = True,
    ) -> None:
        if self._closed:
            return
        self.stats.accepts += 1
        conn = DerpServerConnection(self._private_key, mesh_key=self._mesh_key)
        try:
            info = await self._handshake(stream, conn, initial, prefix, peer)
            if info is None:
                return
            if not await self._admit(stream, conn, info, peer):
                return
            client = _Client(info.key, conn, stream, peer, depth=self._depth, ideal=ideal)
            client.push_control(conn.accept())
            self._register(client)
            try:
                with client.scope:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._writer, client, nursery.cancel_scope)
                        await self._reader(client)
                        nursery.cancel_scope.cancel()
            finally:
                self._unregister(client)
        except FrameStalled as e:
            self.stats.frame_timeouts += 1
            self._log.info("derp: %s: %s", peer, e)
        except RemoteDerpError as e:
            self.stats.protocol_errors += 1
            self._log.info("derp: %s: protocol error: %s", peer, e)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            self._log.debug("derp: %s: connection lost: %s", peer, e)
        except Exception as e:
            # The boundary of one DERP client: whatever it sent, a failure here
            # ends this connection only. A traceback, since it is a bug of ours.
            self.stats.internal_errors += 1
            self._log.error(
                "derp: %s: internal error, connection closed: %r", peer, e, exc_info=True
            )

    async def _handshake(
        self,
        stream: trio.abc.Stream,
        conn: DerpServerConnection,
        initial: bytes,
        prefix: bytes,
        peer: str,
    ) -> ClientInfo | None:
        scope = trio.CancelScope(deadline=trio.current_time() + HANDSHAKE_TIMEOUT)
        self._handshaking.add(scope)
        try:
            with scope:
                await stream.send_all(prefix + conn.start())
                events = conn.receive_data(initial)
                while not events:
                    data = bytes(await stream.receive_some(_READ_SIZE))
                    if not data:
                        return None
                    events = conn.receive_data(data)
                info = events[0]
                assert isinstance(info, ClientInfo)
                return info
        finally:
            self._handshaking.discard(scope)
            if scope.cancelled_caught and not self._closed:
                self._log.info("derp: %s: handshake timed out", peer)
        return None

    async def _admit(
        self, stream: trio.abc.Stream, conn: DerpServerConnection, info: ClientInfo, peer: str
    ) -> bool:
        # derpserver.go verifyClient: a mesh peer is trusted without asking.
        if self._verify_client is None or conn.can_mesh:
            return True
        allowed = False
        with trio.move_on_after(VERIFY_TIMEOUT):
            try:
                allowed = await self._verify_client(info.key)
            except Exception:  # the hook is the store's; never let it kill the relay
                self._log.exception("derp: verify_client failed for %s", info.key.hex())
        if allowed:
            return True
        self.stats.refused += 1
        reason = (
            f"homescale DERP: node key {info.key.hex()[:16]}… is not a registered, unexpired "
            "node of this tailnet (derp.server.verify_clients is on); register the node first"
        )
        self._log.info("derp: %s: refused: %s", peer, reason)
        # The Go client accepts a Health frame at any point and logs it, so the
        # refused node's log says why before the connection drops.
        with trio.move_on_after(GOODBYE_TIMEOUT):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(conn.refuse(reason))
        return False

    async def _reader(self, client: _Client) -> None:
        # Errors end this connection only; caught here, inside the nursery, so
        # they do not surface as an ExceptionGroup.
        try:
            await self._read_loop(client)
        except FrameStalled as e:
            self.stats.frame_timeouts += 1
            self._log.info("derp: %s: %s", client.peer, e)
        except RemoteDerpError as e:
            self.stats.protocol_errors += 1
            self._log.info("derp: %s: protocol error: %s", client.peer, e)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            self._log.debug("derp: %s: connection lost: %s", client.peer, e)

    async def _read_loop(self, client: _Client) -> None:
        conn, stream, stats = client.conn, client.stream, self.stats
        clients = self._clients
        events = conn.receive_data(b"")
        stalled_at = trio.current_time() + self._frame_timeout
        while True:
            for ev in events:
                t = type(ev)
                if t is SendPacket:
                    stats.packets_received += 1
                    stats.bytes_received += len(ev.data)  # type: ignore[attr-defined]
                    self._route(client, client.key, ev.dst, ev.data, clients)  # type: ignore[attr-defined]
                elif t is Ping:
                    stats.got_ping += 1
                    # derpserver.go handleFramePing: one pending pong; faster pings are ignored.
                    if not client.pong_pending:
                        client.pong_pending = True
                        client.push_control(conn.send_pong(ev.data))  # type: ignore[attr-defined]
                elif t is NotePreferred:
                    self._set_preferred(client, ev.preferred)  # type: ignore[attr-defined]
                elif t is ForwardPacket:
                    self._route(client, ev.src, ev.dst, ev.data, clients)  # type: ignore[attr-defined]
                elif t is WatchConns:
                    self._add_watcher(client)
                elif t is ClosePeer:
                    self._close_peer(client, ev.key)  # type: ignore[attr-defined]
                # Pong and unknown frames: nothing to do (as the Go server).
            if events or not conn.buffered:
                stalled_at = trio.current_time() + self._frame_timeout
            with trio.move_on_at(stalled_at if conn.buffered else math.inf):
                data = bytes(await stream.receive_some(_READ_SIZE))
                if not data:
                    return
                events = conn.receive_data(data)
                continue
            raise FrameStalled(
                f"a {conn.buffered}-byte partial DERP frame got no more bytes "
                f"for {self._frame_timeout:g} s; closing"
            )

    def _route(
        self, sender: _Client, src: bytes, dst: bytes, data: bytes, clients: dict[bytes, _Client]
    ) -> None:
        target = clients.get(dst)
        if target is None:
            self.stats.drop("unknown_dest")
            if _looks_like_disco(data) and self._allow_not_here(sender):
                self.stats.peer_gone_not_here_frames += 1
                sender.push_control(sender.conn.send_peer_gone(dst, PeerGoneReason.NOT_HERE))
            return
        frame = target.conn.send_packet(src, data)
        if src not in target.saw_src:
            target.saw_src.add(src)
            self._gone_watchers.setdefault(src, set()).add(target)
        q = target.packets
        q.append(frame)
        target.packet_bytes.append(len(data))
        if len(q) > target.depth:
            # derpserver.go sendPkt: drop at the queue head to keep fresher packets.
            q.popleft()
            target.packet_bytes.popleft()
            self.stats.drop("queue_head")
        target.wakeup.set()

    def _allow_not_here(self, c: _Client) -> bool:
        now = trio.current_time()
        c.not_here_tokens = min(
            _NOT_HERE_BURST, c.not_here_tokens + (now - c.not_here_at) * _NOT_HERE_RATE
        )
        c.not_here_at = now
        if c.not_here_tokens >= 1:
            c.not_here_tokens -= 1
            return True
        return False

    async def _writer(self, client: _Client, done: trio.CancelScope) -> None:
        stream, stats = client.stream, self.stats
        # derpserver.go sendLoop: a ticker of derp.KeepAlive + rand.N(5 s),
        # the jitter drawn once per connection.
        interval = self._keep_alive + self._rng.uniform(0, KEEP_ALIVE_JITTER_SECONDS)
        next_keep_alive = trio.current_time() + interval
        try:
            while True:
                if not client.control and not client.packets:
                    client.wakeup = trio.Event()
                    with trio.move_on_at(next_keep_alive):
                        await client.wakeup.wait()
                chunks: list[bytes] = []
                if trio.current_time() >= next_keep_alive:
                    chunks.append(client.conn.send_keep_alive())
                    next_keep_alive += interval
                if client.control:
                    chunks.extend(client.control)
                    client.control.clear()
                    client.pong_pending = False
                n = len(client.packets)
                if n:
                    chunks.extend(client.packets)
                    stats.packets_sent += n
                    stats.bytes_sent += sum(client.packet_bytes)
                    client.packets.clear()
                    client.packet_bytes.clear()
                if not chunks:
                    continue
                with trio.move_on_after(self._write_timeout) as cs:
                    await stream.send_all(b"".join(chunks) if len(chunks) > 1 else chunks[0])
                if cs.cancelled_caught:
                    stats.write_timeouts += 1
                    self._log.info("derp: %s: write timed out; dropping client", client.peer)
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            done.cancel()

    # ------------------------------------------------------------ registry

    def _register(self, c: _Client) -> None:
        old = self._clients.get(c.key)
        if old is not None:
            # Newest connection wins: the previous one is most likely dead
            # (a client reconnecting after a network change).
            self.stats.duplicate_replaced += 1
            self._log.info(
                "derp: %s: replaces older connection from %s for the same key", c.peer, old.peer
            )
            old.scope.cancel()
        self._clients[c.key] = c
        self._all.add(c)
        self.stats.current_connections = len(self._all)
        for w in self._watchers:
            if w is not c:
                w.push_control(w.conn.send_peer_present(c.key, c.ip, c.port, c.present_flags()))

    def _unregister(self, c: _Client) -> None:
        self._all.discard(c)
        self.stats.current_connections = len(self._all)
        if c.preferred:
            self.stats.current_home_connections -= 1
        self._watchers.discard(c)
        for src in c.saw_src:
            ws = self._gone_watchers.get(src)
            if ws is not None:
                ws.discard(c)
                if not ws:
                    del self._gone_watchers[src]
        if c.packets:
            self.stats.drop("gone_disconnected", len(c.packets))
        if self._clients.get(c.key) is not c:
            return  # replaced by a newer connection: the key is still here
        del self._clients[c.key]
        for w in self._gone_watchers.pop(c.key, ()):
            self.stats.peer_gone_disconnected_frames += 1
            w.push_control(w.conn.send_peer_gone(c.key, PeerGoneReason.DISCONNECTED))
        for w in self._watchers:
            w.push_control(w.conn.send_peer_gone(c.key, PeerGoneReason.DISCONNECTED))

    def _set_preferred(self, c: _Client, preferred: bool) -> None:
        if preferred != c.preferred:
            c.preferred = preferred
            self.stats.current_home_connections += 1 if preferred else -1

    def _add_watcher(self, c: _Client) -> None:
        if c.key == self.public_key:
            return  # derpserver.go addWatcher: connecting to ourself
        for key, other in self._clients.items():
            c.push_control(
                c.conn.send_peer_present(key, other.ip, other.port, other.present_flags())
            )
        self._watchers.add(c)

    def _close_peer(self, by: _Client, key: bytes) -> None:
        target = self._clients.get(key)
        if target is None:
            self._log.info("derp: ClosePeer from %s: no peer %s", by.peer, key.hex()[:16])
            return
        self._log.info("derp: ClosePeer from %s closes %s", by.peer, key.hex()[:16])
        target.scope.cancel()

    # ------------------------------------------------------------ introspection

    def is_connected(self, key: bytes) -> bool:
        return key in self._clients

    def health(self, problem: str) -> None:
        """Send a Health frame (``""`` = healthy again) to every client."""
        for c in self._all:
            c.push_control(c.conn.send_health(problem))

    def restarting(self, reconnect_in_ms: int, try_for_ms: int) -> None:
        """Tell every client we are about to restart (derp.go FrameRestarting)."""
        for c in self._all:
            c.push_control(c.conn.send_restarting(reconnect_in_ms, try_for_ms))

    def close(self) -> None:
        """End every connection and refuse new ones; each handler returns promptly."""
        self._closed = True
        for scope in list(self._handshaking):
            scope.cancel()
        for c in list(self._all):
            c.scope.cancel()

    # ------------------------------------------------------------ STUN

    async def serve_stun(
        self,
        sock: trio.socket.SocketType,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Answer STUN binding requests on a bound UDP socket until cancelled.

        Its own task, so relay load cannot starve it (issue 4); errors on one
        datagram (e.g. ICMP-induced ECONNREFUSED) are not fatal.
        """
        task_status.started()
        while True:
            try:
                data, addr = await sock.recvfrom(2048)
            except OSError as e:
                # Linux reports ICMP port-unreachable from an earlier sendto here.
                self._log.debug("stun: recvfrom: %s", e)
                await trio.lowlevel.checkpoint()
                continue
            self.stats.stun_requests += 1
            reply = stun.answer(data, addr[0], addr[1])
            if reply is None:
                continue
            self.stats.stun_answered += 1
            try:
                await sock.sendto(reply, addr)
            except OSError as e:
                self._log.debug("stun: sendto %s: %s", addr, e)


async def open_stun_socket(listen_addr: str) -> trio.socket.SocketType:
    """A bound UDP socket for ``derp.server.stun_listen_addr`` ("host:port", "[v6]:port")."""
    host, sep, port = listen_addr.rpartition(":")
    if not sep or not port.isdigit():
        raise DerpConfigError(
            f"derp.server.stun_listen_addr {listen_addr!r}: want host:port, e.g. 0.0.0.0:3478"
        )
    host = host.strip("[]") or "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_DGRAM)
    try:
        await sock.bind((host, int(port)))
    except OSError as e:
        sock.close()
        raise DerpConfigError(f"cannot listen for STUN on {listen_addr}: {e}") from e
    return sock


# ---------------------------------------------------------------- stream adapters


class WebSocketByteStream(trio.abc.Stream):
    """DERP's byte stream over WebSocket binary messages (frames may span messages)."""

    def __init__(self, ws: Any, closed_exc: type[Exception]) -> None:
        self._ws = ws
        self._closed_exc = closed_exc

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        try:
            msg = await self._ws.get_message()
        except self._closed_exc:
            return b""
        if isinstance(msg, str):
            raise RemoteDerpError("DERP over WebSocket needs binary messages, got text")
        return bytes(msg)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self._ws.send_message(bytes(data))
        except self._closed_exc as e:
            raise trio.BrokenResourceError(str(e)) from e

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        await self._ws.aclose()

    async def aclose(self) -> None:
        await self._ws.aclose()


def websocket_request_problem(head: bytes, subprotocol: str = "") -> tuple[int, str] | None:
    """Why this WebSocket opening handshake (the raw request head) is refused, as
    (HTTP status, reason), or None when it is a valid one offering ``subprotocol``.

    wsproto's own checks (RFC 6455 4.2.1: GET, Connection/Upgrade, version 13, a key),
    run before trio-websocket sees the request: on a bad one it writes the refusal but
    then waits for a request that never comes, so the caller refuses at once instead
    and says why."""
    from wsproto import ConnectionType
    from wsproto.events import RejectConnection, Request
    from wsproto.handshake import H11Handshake
    from wsproto.utilities import RemoteProtocolError

    handshake = H11Handshake(ConnectionType.SERVER)
    try:
        handshake.receive_data(head)
        events = list(handshake.events())
    except RemoteProtocolError as e:
        hint = e.event_hint
        status = hint.status_code if isinstance(hint, RejectConnection) else 400
        return status, str(e)
    requests = [ev for ev in events if isinstance(ev, Request)]
    if not requests:
        return 400, "not a whole WebSocket opening handshake"
    if subprotocol and subprotocol not in requests[0].subprotocols:
        return 400, f"client must speak the {subprotocol} subprotocol"
    return None


class WebSocketFrameTracker:
    """Follows the client's WebSocket frame boundaries (RFC 6455 5.2) in the raw bytes.

    trio-websocket waits for a whole message with no deadline; this tells the
    stream below it whether a frame (or a fragmented message) is in progress,
    so a frame header followed by silence can be timed out. ``skip`` is the
    HTTP request head that precedes the frames on the same stream.
    """

    __slots__ = ("_header", "_in_message", "_payload_left", "_skip", "frames")

    def __init__(self, skip: int = 0) -> None:
        self._skip = skip
        self._header = bytearray()
        self._payload_left = 0
        self._in_message = False  # a data frame without FIN was seen
        self.frames = 0  # frames completed so far

    @property
    def busy(self) -> bool:
        return bool(self._skip or self._header or self._payload_left or self._in_message)

    def feed(self, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n:
            if self._skip:
                take = min(self._skip, n - i)
                self._skip -= take
                i += take
            elif self._payload_left:
                take = min(self._payload_left, n - i)
                self._payload_left -= take
                i += take
                if not self._payload_left:
                    self.frames += 1
            else:
                self._header.append(data[i])
                i += 1
                self._parse_header()

    def _parse_header(self) -> None:
        h = self._header
        if len(h) < 2:
            return
        size = h[1] & 0x7F
        need = 2 + (2 if size == 126 else 8 if size == 127 else 0) + (4 if h[1] & 0x80 else 0)
        if len(h) < need:
            return
        if size == 126:
            size = int.from_bytes(h[2:4], "big")
        elif size == 127:
            size = int.from_bytes(h[2:10], "big")
        fin, opcode = h[0] & 0x80, h[0] & 0x0F
        if opcode < 0x8:  # data or continuation frame; control frames may interleave
            self._in_message = not fin
        self._header.clear()
        self._payload_left = size
        if not size:
            self.frames += 1


class WebSocketFrameDeadline(ReadWrapper):
    """The stream under trio-websocket: while a frame is in progress, bytes must keep
    coming (``timeout`` from the last completed frame), else the stream breaks."""

    def __init__(self, inner: trio.abc.Stream, head: bytes, timeout: float) -> None:
        self.inner = inner
        self._tracker = WebSocketFrameTracker(skip=len(head))
        self._timeout = timeout
        self._frames_seen = 0
        self._deadline = math.inf
        self.timed_out = ""

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        t = self._tracker
        if not t.busy:
            self._deadline = math.inf  # idle between messages: no limit, as for DERP
        elif t.frames != self._frames_seen or self._deadline == math.inf:
            self._frames_seen = t.frames  # progress: the clock restarts
            self._deadline = trio.current_time() + self._timeout
        deadline = self._deadline
        with trio.move_on_at(deadline):
            data = bytes(await self.inner.receive_some(max_bytes))
            t.feed(data)
            return data
        self.timed_out = f"a WebSocket frame got no more bytes for {self._timeout:g} s; closing"
        raise trio.BrokenResourceError(self.timed_out)


# ---------------------------------------------------------------- key file


def load_or_create_server_key(path: str | os.PathLike[str]) -> bytes:
    """The DERP server's private key from ``derp.server.private_key_path``.

    headscale's format (hscontrol/app.go readOrCreatePrivateKey): the text
    ``privkey:<64 hex>``, file mode 0600, created on first start -- by the same
    (atomic) loader as the Noise key, `protocol.keys.load_or_create_private_key`.
    """
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return load_or_create_private_key(path).raw
    except KeyParseError:
        raise DerpConfigError(
            f"{os.fspath(path)}: not a DERP private key (want 'privkey:' and 64 hex digits); "
            "move it away to have a new one generated"
        ) from None


__all__ = [
    "DerpError",
    "DerpServer",
    "DerpStats",
    "UpgradeLike",
    "WebSocketByteStream",
    "load_or_create_server_key",
    "open_stun_socket",
    "websocket_request_problem",
]
