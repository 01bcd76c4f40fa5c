"""The typed boundary between trio and the store's worker thread.

sqlite blocks, so every store call from the server runs in one worker thread, one at
a time (`StoreThread`, behind `Server.run_db`). `RunDb` is that call's type, shaped like trio's
`to_thread.run_sync`: the function's argument and result types pass through, so a
store result keeps its type on the trio side.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, TypeVarTuple

import outcome
import trio

R = TypeVar("R")
Ts = TypeVarTuple("Ts")


class RunDb(Protocol):
    """`run_db(fn, *args)`: `fn(*args)` in the store's thread, its result awaited."""

    def __call__(self, fn: Callable[[*Ts], R], /, *args: *Ts) -> Awaitable[R]: ...


async def run_inline(fn: Callable[[*Ts], R], /, *args: *Ts) -> R:
    """A `RunDb` for the CLI's direct-database path (no server, no other thread)."""
    return fn(*args)


class StoreThread:
    """The store's one worker thread: calls run back to back, in the order made.

    trio's `to_thread.run_sync` with a one-thread limiter hands every call over through
    the scheduler (the limiter passes on, the thread starts, the result comes back): with
    5,000 map streams a scheduler pass takes tens of milliseconds, so the store managed a
    few dozen calls a second while each took 0.4 ms, and endpoint updates waited seconds
    in the queue. Here the thread takes the next call as soon as one is done; only the
    result goes through trio (`run_sync_soon`), to the task that waits for it.
    """

    def __init__(self, name: str = "homescale-store") -> None:
        self._name = name
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    async def run(self, fn: Callable[[*Ts], R], /, *args: *Ts) -> R:
        """`fn(*args)` in the thread. Like `to_thread.run_sync`, a cancel before the call is
        queued cancels it; once queued it runs to its end and its result is taken (what
        it wrote is committed, and the caller announces it)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name=self._name, daemon=True)
            self._thread.start()
        self._calls.put(
            _Call(fn, args, trio.lowlevel.current_trio_token(), trio.lowlevel.current_task())
        )
        result: R = await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
        return result

    def stop(self) -> None:
        """End the thread once the calls already queued are done."""
        if self._thread is not None:
            self._calls.put(None)
            self._thread.join()
            self._thread = None

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            result = outcome.capture(call.fn, *call.args)
            try:
                call.token.run_sync_soon(trio.lowlevel.reschedule, call.task, result)
            except trio.RunFinishedError:
                pass  # the server is gone; nobody waits for this result


@dataclass(frozen=True)
class _Call:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    token: trio.lowlevel.TrioToken
    task: trio.lowlevel.Task
