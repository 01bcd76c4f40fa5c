"""Pending interactive logins: a client waiting until an admin (or the OIDC provider) says yes.

A client without an auth key gets an AuthURL and long-polls with `Followup`; the
login waits here until `homescale auth register` (or the sign-in) completes it, an
admin rejects it, or it expires. Kept apart from the map streams (as headscale's
auth.go from poll.go). Time is trio's clock, passed in: the TTL and the wait use
the same clock, so tests run a 15-minute expiry in no time (`autojump_clock`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import trio

from protocol.gojson import format_time
from protocol.keys import PrivateKey

from .errors import InvalidInput, NotFound
from .secrets import new_auth_id
from .store import NodeRow, utcnow

REGISTRATION_TTL = timedelta(minutes=15)  # pending interactive logins expire
REJECTED = "login rejected by an administrator of this homescale server"


@dataclass
class PendingRegistration:
    """An interactive login waiting for `homescale auth register --auth-id <id>`."""

    id: str
    machine_key: str
    node_key: str
    hostinfo: dict[str, Any]
    ephemeral: bool
    deadline: float  # on the logins' clock
    created: datetime = field(default_factory=utcnow)  # shown to admins
    done: trio.Event = field(default_factory=trio.Event)
    node: NodeRow | None = None
    rejected: bool = False
    reason: str = REJECTED

    @property
    def hostname(self) -> str:
        return str(self.hostinfo.get("Hostname") or "")


class PendingLogins:
    """Logins by auth ID; each expires `ttl` after it started."""

    def __init__(
        self,
        *,
        ttl: timedelta = REGISTRATION_TTL,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.ttl = ttl
        self.clock = clock
        self.pending: dict[str, PendingRegistration] = {}
        # Told when a login starts waiting (the web console's Pending view, live).
        self.added: Callable[[], None] = lambda: None

    def _add(self, reg: PendingRegistration) -> PendingRegistration:
        self.pending[reg.id] = reg
        self.added()
        return reg

    def start(
        self, machine: str, node_key: str, hostinfo: dict[str, Any], ephemeral: bool
    ) -> PendingRegistration:
        """A new login (the same client asking again keeps its URL)."""
        self.expire()
        for p in self.pending.values():
            if p.machine_key == machine and p.node_key == node_key and p.node is None:
                return p
        deadline = self.clock() + self.ttl.total_seconds()
        return self._add(
            PendingRegistration(new_auth_id(), machine, node_key, hostinfo, ephemeral, deadline)
        )

    def add_debug(self, auth_id: str, hostinfo: dict[str, Any]) -> tuple[str, str]:
        """`debug create-node`: a made-up machine waits under `auth_id` (no client polls
        it); `auth register` turns it into a node. Its (machine, node) keys."""
        self.expire()
        if auth_id in self.pending:
            raise InvalidInput(f"key: a login is already pending under {auth_id}")
        machine = str(PrivateKey.generate().machine_public())
        node_key = str(PrivateKey.generate().node_public())
        deadline = self.clock() + self.ttl.total_seconds()
        self._add(PendingRegistration(auth_id, machine, node_key, hostinfo, False, deadline))
        return machine, node_key

    def expire(self) -> None:
        now = self.clock()
        for rid in [r for r, p in self.pending.items() if p.deadline <= now]:
            del self.pending[rid]

    def get(self, reg_id: str) -> PendingRegistration | None:
        """The login under `reg_id` (an auth ID or the URL ending in it), if still pending."""
        self.expire()
        return self.pending.get(reg_id.strip().rstrip("/").rsplit("/", 1)[-1])

    def require(self, reg_id: str) -> PendingRegistration:
        reg = self.get(reg_id)
        if reg is None:
            raise NotFound(
                f"no pending registration {reg_id!r} (it may have expired after "
                f"{int(self.ttl.total_seconds() // 60)} minutes; restart the client's login)"
            )
        return reg

    async def wait(self, reg: PendingRegistration) -> None:
        """Until the login is completed or rejected, or it expires."""
        with trio.move_on_at(reg.deadline):
            await reg.done.wait()

    def complete(self, reg: PendingRegistration, node: NodeRow) -> None:
        """The node exists now: release the waiting client."""
        reg.node = node
        reg.done.set()
        self.pending.pop(reg.id, None)

    def reject(self, reg: PendingRegistration, reason: str = REJECTED) -> None:
        """The waiting client is told it was refused, and why."""
        reg.rejected, reg.reason = True, reason
        reg.done.set()
        self.pending.pop(reg.id, None)

    def forget(self, reg: PendingRegistration) -> None:
        self.pending.pop(reg.id, None)

    def listing(self) -> list[dict[str, Any]]:
        """Logins waiting for a sign-in or `auth register` (for `auth list`)."""
        self.expire()
        return [
            {
                "authId": p.id,
                "kind": "login",
                "hostname": p.hostname,
                "machineKey": p.machine_key,
                "user": "",
                "createdAt": format_time(p.created),
            }
            for p in self.pending.values()
            if p.node is None and not p.rejected
        ]

    def hostname(self, reg_id: str) -> str | None:
        """The hostname of a pending login (for the sign-in pages), None if unknown/expired."""
        reg = self.get(reg_id)
        return None if reg is None else (reg.hostname or "this machine")
