"""Fault isolation: the one wrapper around every task a peer (or one bad item) can feed.

A task started in the listeners' nursery (appliance.accept) that raises takes the whole
server with it, so each connection, request, DERP client, map session and each
item of background work runs inside `Boundary.guard`: any exception ends only
that unit of work, is logged as one line naming the peer (or item) and the
cause, and is counted in `/metrics` as
``homescale_isolated_errors_total{kind="...",cause="..."}``. Go's net/http does
the same per connection (`conn.serve` recovers a handler's panic and logs it).

Causes: ``disconnect`` (the peer went away), ``timeout`` (a partial read took too
long), ``peer`` (the peer broke a protocol or sent bad input: logged without a
traceback, it is not our bug), ``internal`` (anything else: a bug here, logged
with its traceback so it can be fixed).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import h2.exceptions
import h11
import trio

from derp.errors import RemoteDerpError
from protocol.gojson import RemoteWireError
from protocol.mapframe import RemoteMapFrameError
from protocol.noise import RemoteNoiseError
from protocol.safejson import JSONInputError

from .errors import HomescaleError
from .metrics import Metrics

METRIC = "homescale_isolated_errors_total"

_DISCONNECT = (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError, EOFError)
_TIMEOUT = (trio.TooSlowError, TimeoutError)
# What a peer can cause by sending bad bytes: its fault, so no traceback.
_PEER: tuple[type[BaseException], ...] = (
    h11.RemoteProtocolError,
    h2.exceptions.ProtocolError,
    ssl.SSLError,
    RemoteDerpError,
    RemoteNoiseError,
    RemoteWireError,
    RemoteMapFrameError,
    JSONInputError,
    HomescaleError,  # a refused input (InvalidInput, NotFound, ...) that reached the edge
)


def classify(exc: BaseException) -> str:
    """The cause label of an exception: disconnect, timeout, peer or internal."""
    if isinstance(exc, BaseExceptionGroup):
        causes = {classify(e) for e in exc.exceptions}
        for cause in ("internal", "peer", "timeout", "disconnect"):
            if cause in causes:
                return cause
        return "internal"
    if isinstance(exc, _DISCONNECT):
        return "disconnect"
    if isinstance(exc, _TIMEOUT):
        return "timeout"
    return "peer" if isinstance(exc, _PEER) else "internal"


def describe(exc: BaseException) -> str:
    """One line for the log: the innermost meaningful message of `exc`."""
    if isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        return describe(exc.exceptions[0])
    cause = exc.__cause__
    text = str(exc) or type(exc).__name__
    if cause is not None and str(cause) and str(cause) != text:
        text = f"{text}: {cause}"
    return f"{type(exc).__name__}: {text}"[:500]


@dataclass
class Guarded:
    """What `Boundary.guard` yields: the unit's kind (adjustable once known) and its outcome."""

    kind: str
    peer: str
    cause: str | None = None  # set when the unit ended by an exception


class Boundary:
    """Turns any exception of one unit of work into a log line and a counter, never a crash."""

    def __init__(self, log: logging.Logger, metrics: Metrics | None = None) -> None:
        self.log = log
        self.metrics = metrics
        if metrics is not None:
            metrics.help[METRIC] = (
                "units of work (connections, requests, sessions, background items) ended by "
                "an error, by kind and cause"
            )

    def record(self, kind: str, peer: str, exc: BaseException) -> str:
        """Log and count one failure of a unit of work; returns its cause label."""
        cause = classify(exc)
        if self.metrics is not None:
            self.metrics.inc(f'{METRIC}{{kind="{kind}",cause="{cause}"}}')
        if cause == "internal":
            self.log.error("%s %s: internal error: %s", kind, peer, describe(exc), exc_info=exc)
        elif cause == "disconnect":
            self.log.debug("%s %s: ended: %s", kind, peer, describe(exc))
        else:
            self.log.info("%s %s: dropped (%s): %s", kind, peer, cause, describe(exc))
        return cause

    @contextmanager
    def guard(self, kind: str, peer: str) -> Iterator[Guarded]:
        """Run the body; an Exception (or a group of them) ends only the body.

        Cancellation and KeyboardInterrupt pass through untouched (they are how the
        server shuts down), also when they share a group with a caught failure.
        """
        g = Guarded(kind, peer)
        try:
            yield g
        except Exception as e:
            g.cause = self.record(g.kind, g.peer, e)
        except BaseExceptionGroup as eg:
            failures, rest = eg.split(Exception)
            if failures is not None:
                g.cause = self.record(g.kind, g.peer, failures)
            if rest is not None:
                raise rest from None

    async def run(
        self, kind: str, peer: str, fn: Callable[..., Awaitable[Any]], *args: Any
    ) -> None:
        """`fn(*args)` inside a guard: for `nursery.start_soon(boundary.run, kind, peer, fn)`."""
        with self.guard(kind, peer):
            await fn(*args)
