"""The session registry: each node's live map stream, and the marks that wake it.

The coordinator (`appliance.tailnet`) says what changed for whom; the registry
finds the node's current stream, records the mark in its `MapSessionState` and
wakes its task, which composes its own (coalesced) message. Nothing here waits.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import trio

from netmap.mapsession import MapSessionState


class SessionHandle:
    """One node's live map stream as the coordinator sees it: state plus a wake-up."""

    def __init__(self, node_id: int, state: MapSessionState) -> None:
        self.node_id = node_id
        self.state = state
        self.wake = trio.Event()
        self.cancel_scope: trio.CancelScope | None = None
        self.closed_reason = ""
        self.last_words: bytes | None = None  # a final MapResponse to send before closing

    def notify(self) -> None:
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
        for w in watchers:
            s = self._by_node.get(w)
            if s is not None:
                s.state.mark_peer(node_id)
                s.notify()

    def mark_peers(self, watchers: Iterable[int], node_ids: Iterable[int]) -> None:
        """These nodes changed: the sessions of `watchers` re-check them (one wake each)."""
        ids = list(node_ids)
        for w in watchers:
            s = self._by_node.get(w)
            if s is not None:
                s.state.pending_peers.update(ids)
                s.notify()

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
