"""appliance.accept: a queued herd is taken off the listen queue at once; running out of
file descriptors pauses accepting, never ends the server."""

from __future__ import annotations

import logging
import os
import resource
import socket

import pytest
import trio

from appliance.accept import ACCEPT_BURST, serve_in_bursts

HERD = 300


def _connect_all(port: int, n: int) -> list[socket.socket]:
    """n connections completed by the kernel (they wait in the listen queue)."""
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        socks.append(s)
    return socks


async def test_a_queued_herd_is_accepted_in_one_pass() -> None:
    """Every connection waiting when the server wakes is accepted before the first
    handler runs: one accept per scheduler pass let a storm overflow the queue."""
    assert HERD <= ACCEPT_BURST
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listener.socket.getsockname()[1]
    socks = _connect_all(port, HERD)
    handled: list[int] = []
    all_handled = trio.Event()

    async def handler(stream: trio.abc.Stream) -> None:
        nursery = trio.lowlevel.current_task().parent_nursery
        assert nursery is not None
        # This handler's wrapper task, its siblings, and the accept loop.
        handled.append(len(nursery.child_tasks))
        if len(handled) == HERD:
            all_handled.set()
        await trio.sleep_forever()

    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(serve_in_bursts, handler, [listener], logging.getLogger("t"))
                await all_handled.wait()
                nursery.cancel_scope.cancel()
    finally:
        for s in socks:
            s.close()
    assert handled[0] >= HERD + 1, f"the first handler ran after only {handled[0] - 1} accepts"


async def test_out_of_file_descriptors_pauses_accepting_and_recovers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """EMFILE is logged and retried: the clients queued behind it are served once
    descriptors are free again."""
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listener.socket.getsockname()[1]
    socks = _connect_all(port, 10)
    served = 0
    done = trio.Event()

    async def handler(stream: trio.abc.Stream) -> None:
        nonlocal served
        served += 1
        if served == len(socks):
            done.set()
        await stream.aclose()  # frees its descriptor at once

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd"))
    try:
        # Room for the accept loop's own descriptor and two connections at a time.
        resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 3, hard))
        with trio.fail_after(10), caplog.at_level(logging.ERROR, "t"):
            async with trio.open_nursery() as nursery:
                await nursery.start(serve_in_bursts, handler, [listener], logging.getLogger("t"))
                await done.wait()
                nursery.cancel_scope.cancel()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for s in socks:
            s.close()
    assert served == len(socks)
    assert any("Too many open files" in r.getMessage() for r in caplog.records)
