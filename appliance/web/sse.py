"""Live updates for the console: server-sent events fed by the tailnet's change path.

`Tailnet.apply` calls `Broker.publish` with every committed change; each open event
stream (one per signed-in browser tab) gets a one-line summary and the page fetches
what it shows again. The stream is an HTTP upgrade route so it can stay open; it
answers 401 without a valid session and ends when the session does.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import trio

from ..changes import Change, NodeChanged, NodeOnline, NodeRemoved, PolicyChanged, UserChanged
from ..changes import UserRemoved as UserGone
from ..httpserver import Upgrade
from .sessions import Session, cookie_value

HEARTBEAT = 20.0  # a comment line this often keeps proxies from closing an idle stream
SEND_TIMEOUT = 10.0  # a browser that does not read its stream within this is dropped
QUEUE = 64  # events waiting for one slow stream; past this it is closed (it reconnects)
MAX_STREAMS = 256
MAX_PER_SESSION = 8  # tabs of one browser; one session cannot take every stream


def summary(change: Change) -> dict[str, Any]:
    """What a page needs to know to refresh: the kind of thing and its ID (no secrets)."""
    match change:
        case NodeChanged(row=row):
            return {"kind": "node", "id": row.id}
        case NodeRemoved(node_id=nid):
            return {"kind": "node", "id": nid, "removed": True}
        case NodeOnline(node_id=nid, online=online):
            return {"kind": "node", "id": nid, "online": online}
        case UserChanged(row=row):
            return {"kind": "user", "id": row.id}
        case UserGone(user_id=uid):
            return {"kind": "user", "id": uid, "removed": True}
        case PolicyChanged():
            return {"kind": "policy"}
    return {"kind": "other"}


class Broker:
    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self.streams: set[trio.MemorySendChannel[bytes]] = set()
        self.per_session: dict[str, int] = {}

    def publish(self, change: Change) -> None:
        """Called synchronously from `Tailnet.apply`; never blocks, never raises."""
        if self.streams:
            self._send(b"event: change\ndata: " + json.dumps(summary(change)).encode() + b"\n\n")

    def pending(self) -> None:
        """A login started waiting (not a stored change: it lives in the control service)."""
        if self.streams:
            self._send(b'event: change\ndata: {"kind": "pending"}\n\n')

    def recheck(self) -> None:
        """Every stream checks its session now (a sign-out ends its streams at once)."""
        self._send(b": session check\n\n")

    def _send(self, data: bytes) -> None:
        for s in list(self.streams):
            try:
                s.send_nowait(data)
            except (trio.WouldBlock, trio.ClosedResourceError):
                self.streams.discard(s)  # too slow: its stream ends, the page reconnects
                s.close()

    async def serve(self, up: Upgrade, session_of: Callable[[str], Session | None]) -> None:
        """The `/admin/events` upgrade route: an event stream for a signed-in session."""
        cookie = ""
        for name, value in up.request.headers:
            if name.lower() == b"cookie":
                cookie = cookie_value(value.decode("latin-1"))
        token = cookie
        session = session_of(token)
        if (
            session is None
            or len(self.streams) >= MAX_STREAMS
            or self.per_session.get(session.id, 0) >= MAX_PER_SESSION
        ):
            status = b"401 Unauthorized" if session is None else b"503 Service Unavailable"
            body = b"sign in first\n" if session is None else b"too many event streams\n"
            with trio.move_on_after(SEND_TIMEOUT):
                await up.stream.send_all(
                    b"HTTP/1.1 " + status + b"\r\nContent-Type: text/plain\r\n"
                    b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
                )
            return
        send, receive = trio.open_memory_channel[bytes](QUEUE)
        self.streams.add(send)
        self.per_session[session.id] = self.per_session.get(session.id, 0) + 1
        try:
            with trio.fail_after(SEND_TIMEOUT):
                await up.stream.send_all(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                    b"Cache-Control: no-store\r\nX-Accel-Buffering: no\r\n"
                    b"Connection: close\r\n\r\nretry: 2000\n\nevent: hello\ndata: {}\n\n"
                )
            async with receive:
                while True:
                    data = b": keep-alive\n\n"
                    with trio.move_on_after(HEARTBEAT):
                        try:
                            data = await receive.receive()
                        except trio.EndOfChannel:
                            return
                    if session_of(token) is None:  # signed out or expired: the stream ends
                        return
                    with trio.fail_after(SEND_TIMEOUT):
                        await up.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            return
        finally:
            self.streams.discard(send)
            send.close()
            left = self.per_session.pop(session.id, 1) - 1
            if left:
                self.per_session[session.id] = left
