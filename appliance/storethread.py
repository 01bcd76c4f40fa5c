"""The typed boundary between trio and the store's worker thread.

sqlite blocks, so every store call from the server runs in one worker thread at a
time (`Server.run_db`). `RunDb` is that call's type, shaped like trio's
`to_thread.run_sync`: the function's argument and result types pass through, so a
store result keeps its type on the trio side.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar, TypeVarTuple

R = TypeVar("R")
Ts = TypeVarTuple("Ts")


class RunDb(Protocol):
    """`run_db(fn, *args)`: `fn(*args)` in the store's thread, its result awaited."""

    def __call__(self, fn: Callable[[*Ts], R], /, *args: *Ts) -> Awaitable[R]: ...


async def run_inline(fn: Callable[[*Ts], R], /, *args: *Ts) -> R:
    """A `RunDb` for the CLI's direct-database path (no server, no other thread)."""
    return fn(*args)
