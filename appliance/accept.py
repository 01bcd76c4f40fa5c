"""Accepting TCP connections in bursts, so a thundering herd is taken off the queue.

``trio.serve_listeners`` accepts one connection per pass of the scheduler (each
``accept`` ends with a checkpoint). While thousands of map streams are runnable,
a pass takes tens of milliseconds, the kernel's accept queue (``somaxconn``)
fills, and every SYN beyond it is dropped: the client retries after 1, 3, 7,
15, 31 s -- in a 5,000-node reconnect storm the median handshake took 26 s on
an idle-enough CPU. Here each wake-up drains the queue (up to ACCEPT_BURST) and
starts a task per connection, which then waits its turn like any other.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Awaitable, Callable

import trio

# Connections taken per wake-up: enough to empty a full queue in a few passes,
# few enough that one pass never spends long accepting.
ACCEPT_BURST = 512
# accept(2) errors that mean the system is out of something: wait, then retry.
_CAPACITY = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
CAPACITY_PAUSE = 0.1

Handler = Callable[[trio.abc.Stream], Awaitable[None]]


async def _run(handler: Handler, stream: trio.SocketStream) -> None:
    try:
        await handler(stream)
    finally:
        await trio.aclose_forcefully(stream)


async def _accept_loop(
    listener: trio.SocketListener, handler: Handler, nursery: trio.Nursery, log: logging.Logger
) -> None:
    # Our own descriptor of the listening socket (a dup: the listener's owner still
    # closes the original); non-blocking, as the shared file description already is.
    tsock = listener.socket
    sock = socket.socket(tsock.family, tsock.type, tsock.proto, fileno=os.dup(tsock.fileno()))
    sock.setblocking(False)
    with sock:
        while True:
            await trio.lowlevel.wait_readable(sock)
            for _ in range(ACCEPT_BURST):
                try:
                    conn, _addr = sock.accept()
                except BlockingIOError:
                    break
                except OSError as e:
                    if e.errno not in _CAPACITY:
                        raise
                    log.error("accept: %s; retrying in %g s", os.strerror(e.errno), CAPACITY_PAUSE)
                    await trio.sleep(CAPACITY_PAUSE)
                    break
                conn.setblocking(False)
                stream = trio.SocketStream(trio.socket.from_stdlib_socket(conn))
                nursery.start_soon(_run, handler, stream)


async def serve_in_bursts(
    handler: Handler,
    listeners: list[trio.SocketListener],
    log: logging.Logger,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``handler`` on every listener until cancelled; closes the listeners."""
    try:
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(_accept_loop, listener, handler, nursery, log)
            task_status.started()
    finally:
        for listener in listeners:
            await trio.aclose_forcefully(listener)
