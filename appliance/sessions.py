"""The session registry: each node's live map stream, and the marks that wake it.

The coordinator (`appliance.tailnet`) says what changed for whom; the registry
finds the node's current stream, records the mark in its `MapSessionState` and
wakes its task, which composes its own (coalesced) message. For the shared log the
broadcaster composes and sends it instead while the task waits
(`SessionHandle.deliver_or_notify`). Nothing here waits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sized

import trio

from netmap.mapsession import LogRead, MapSessionState

# A change that at least half of the sessions (and BROADCAST_MIN of them) must hear of goes
# into one shared log instead of a mark per session: a reconnect storm of 5,000 nodes was
# 25 million marks. Each session reads the log when it composes; the broadcaster goes
# through all of them in a round after the first entry (`broadcast_batches`, a batch per
# pass of the scheduler; appliance.control `_broadcaster`). Sessions read the log up to
# where it stood at the start of the broadcast's latest batch, so those of one batch (and
# of the batches between two new entries) read the same range and send one shared delta
# (netmap.mapsession.SharedDeltas). LOG_MAX bounds the log: a session that fell behind
# its start re-checks everything.
BROADCAST_MIN = 128
LOG_MAX = 1 << 16


class SessionHandle:
    """One node's live map stream as the coordinator sees it: state plus a wake-up."""

    def __init__(self, node_id: int, state: MapSessionState) -> None:
        self.node_id = node_id
        self.state = state
        self.wake = trio.Event()
        self.cancel_scope: trio.CancelScope | None = None
        self.closed_reason = ""
        self.last_words: bytes | None = None  # a final MapResponse to send before closing
        # Keep-alives: the stream says when it last sent and how long a silence it keeps
        # (`wake_for_keepalives` marks it due); no timer per stream.
        self.last_sent = 0.0
        self.quiet_for = float("inf")
        self.keepalive_due = False
        # Set by the stream task while it waits for a wake-up: composes and sends the
        # session's next message from the caller's task if the connection takes it at
        # once (True). The broadcaster sends thousands of messages a round this way.
        self.deliver: Callable[[], bool] | None = None
        self.unsent: list[bytes] | None = None  # composed by `deliver`, for the task to send

    def notify(self) -> None:
        self.wake.set()

    def sent(self, now: float) -> None:
        """A message went out: the silence before the next keep-alive starts again."""
        self.keepalive_due = False
        self.last_sent = now

    def deliver_or_notify(self) -> None:
        """Send the session's next message now if its stream is waiting and its
        connection takes it at once; otherwise wake its task to do it."""
        deliver = self.deliver
        if deliver is None or not deliver():
            self.wake.set()

    def close(self, reason: str, last_words: bytes | None = None) -> None:
        self.closed_reason = reason
        self.last_words = last_words
        if self.cancel_scope is not None:
            self.cancel_scope.cancel()


class SessionRegistry:
    """node ID -> its current map stream (a new stream replaces the old one)."""

    def __init__(self, *, domain: str, disable_logtail: bool) -> None:
        self.domain = domain
        self.disable_logtail = disable_logtail
        self._by_node: dict[int, SessionHandle] = {}
        self._log: list[int] = []  # node ids changed, for every session to re-check
        self._log_base = 0  # the position of _log[0] since the start
        self._published = 0  # sessions read the log up to here (the last broadcast batch)
        self._broadcast_due = False
        # Told when the log gains its first entry since the last broadcast; None: no log, every
        # mark goes to its sessions (tests, tools without a server).
        self.on_broadcast: Callable[[], None] | None = None

    def __contains__(self, node_id: int) -> bool:
        return node_id in self._by_node

    def __getitem__(self, node_id: int) -> SessionHandle:
        return self._by_node[node_id]

    def get(self, node_id: int) -> SessionHandle | None:
        return self._by_node.get(node_id)

    def __iter__(self) -> Iterator[SessionHandle]:
        return iter(list(self._by_node.values()))

    def __len__(self) -> int:
        return len(self._by_node)

    def open(self, node_id: int) -> SessionHandle:
        """A new map stream for the node; it replaces (closes) the previous one."""
        old = self._by_node.get(node_id)
        if old is not None:
            old.close("replaced by a new map stream")
        state = MapSessionState(
            node_id=node_id, domain=self.domain, disable_logtail=self.disable_logtail
        )
        state.log_seen = self._log_base + len(self._log)  # its first map holds all that
        handle = SessionHandle(node_id, state)
        self._by_node[node_id] = handle
        return handle

    def close(self, handle: SessionHandle) -> bool:
        """Forget the session; True if it was the node's current one (the node goes offline)."""
        if self._by_node.get(handle.node_id) is handle:
            del self._by_node[handle.node_id]
            return True
        return False

    def hang_up(self, node_id: int, reason: str, last_words: bytes | None = None) -> None:
        """The node left the tailnet: end its stream (after `last_words`, if any)."""
        handle = self._by_node.pop(node_id, None)
        if handle is not None:
            handle.close(reason, last_words)

    # -- marks

    def mark_peer(self, watchers: Iterable[int], node_id: int) -> None:
        """`node_id` changed: the sessions of `watchers` re-check it."""
        self.mark_peers(watchers, (node_id,))

    def mark_peers(self, watchers: Iterable[int], node_ids: Iterable[int]) -> None:
        """These nodes changed: the sessions of `watchers` re-check them (one wake each)."""
        ids = list(node_ids)
        if self._broadcasts(watchers):
            for node_id in ids:
                self._append(node_id)
            return
        for w in watchers:
            s = self._by_node.get(w)
            if s is not None:
                s.state.mark_peers(ids)
                s.notify()

    def _broadcasts(self, watchers: Iterable[int]) -> bool:
        n = len(self._by_node)
        return (
            self.on_broadcast is not None
            and n >= BROADCAST_MIN
            and isinstance(watchers, Sized)
            and 2 * len(watchers) >= n
        )

    def _append(self, node_id: int) -> None:
        self._log.append(node_id)
        if len(self._log) > LOG_MAX:
            drop = len(self._log) // 2
            del self._log[:drop]
            self._log_base += drop
        if not self._broadcast_due and self.on_broadcast is not None:
            self._broadcast_due = True
            self.on_broadcast()

    def broadcast_batches(self, size: int) -> Iterator[list[SessionHandle]]:
        """The sessions to wake for the shared log, `size` at a time: a server waking
        thousands at once runs all their composes in one pass of the scheduler, and every
        other task (a request, a handshake) waits for that whole pass.

        The log is published up to its end at each batch: what comes during a round goes
        to the rest of this round's sessions, and to the earlier ones in the next round
        (a change waits at most about one round, not for the next to begin and then its
        turn in it). The sessions of one batch read the same range, and those of the
        batches between two new entries do too, so a round holds a few distinct deltas."""
        self._broadcast_due = False
        handles = list(self._by_node.values())
        for i in range(0, len(handles), size):
            self._published = self._log_base + len(self._log)
            yield handles[i : i + size]

    def wake_for_keepalives(self, now: float) -> None:
        """Mark due and wake every session silent for its `quiet_for` since `now`: one
        sweep instead of a timeout per stream (a cancel scope with a deadline around
        every wait was a tenth of the server's CPU in a churn at 5,000 nodes)."""
        for h in self._by_node.values():
            if not h.keepalive_due and now - h.last_sent >= h.quiet_for:
                h.keepalive_due = True
                h.notify()

    def catch_up(self, handle: SessionHandle) -> LogRead | None:
        """Give the session what the shared log holds since it last read it, up to the
        last broadcast batch. When that is all the session has pending, it is returned instead
        of marked (`MapSessionState.next_message` takes it): its delta is then the same
        as every other such session's with the same peers."""
        state = handle.state
        start, end = state.log_seen, self._published
        if start >= end:
            return None
        state.log_seen = end
        if start < self._log_base:
            state.mark_all()
            return None
        ids = self._log[start - self._log_base : end - self._log_base]
        if state.pending_peers or state.pending_all or state.pending_self:
            state.mark_peers(ids)
            return None
        return LogRead(start, end, ids)

    def mark_self(self, node_id: int) -> None:
        s = self._by_node.get(node_id)
        if s is not None:
            s.state.mark_self()
            s.notify()

    def mark_all(self, *, resend_profiles: bool = False, only: int | None = None) -> None:
        """Every session (or `only` this node's) re-checks everything (policy or users
        changed)."""
        targets = self._by_node.values() if only is None else [self._by_node.get(only)]
        for s in targets:
            if s is None:
                continue
            if resend_profiles:
                s.state.sent_users.clear()  # names may have changed
            s.state.mark_all()
            s.notify()

    def wake_all(self) -> None:
        """Every session re-checks its own part (DERP map, DNS)."""
        for s in self._by_node.values():
            s.state.mark_self()
            s.notify()
