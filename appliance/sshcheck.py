"""SSH check mode: the `/machine/ssh/action/...` calls Tailscale SSH makes for `action: check`.

A check rule reaches the destination node as an SSHAction whose holdAndDelegate
URL is `/machine/ssh/action/$SRC_NODE_ID/to/$DST_NODE_ID?local_user=...`
(netmap/policy/compile.py). When someone connects, the destination's tailscaled
GETs that URL over Noise (tailssh fetchSSHAction). We answer at once with
`accept` if this source passed a check to this destination within the rule's
checkPeriod; otherwise with another holdAndDelegate (the same path plus an
auth_id) and a message telling the user to open `server_url/auth/<auth_id>`.
The client GETs that URL and waits (a long poll) until the check is decided:
by signing in at the identity provider as the owner of the source machine, or,
without a provider, by an admin running `homescale auth approve --auth-id ID`
(or `auth reject`). The facts follow headscale's hscontrol/noise.go
(SSHActionHandler, sshActionFollowUp).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import trio

from .errors import HomescaleError, NotFound
from .secrets import new_auth_id

CHECK_TTL = 15 * 60.0  # seconds a check waits for its verdict (headscale: auth cache 15 min)
MAX_CHECKS = 1024  # pending checks kept; the oldest go first
MAX_CHECK_PERIOD = 168 * 3600.0  # the longest checkPeriod a policy may set (parse.py)
# What an accepted check allows, as headscale's sshAction answers.
_ACCEPT = {
    "accept": True,
    "allowAgentForwarding": True,
    "allowLocalPortForwarding": True,
    "allowRemotePortForwarding": True,
}


class SSHCheckError(HomescaleError):
    """A check request that cannot be answered (unknown nodes, a foreign auth_id)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class SSHCheck:
    """One pending check: who connects (src) to where (dst), and its verdict."""

    auth_id: str
    src: int
    dst: int
    started: float = field(default_factory=time.monotonic)
    created: datetime = field(default_factory=lambda: datetime.now(UTC).replace(microsecond=0))
    done: trio.Event = field(default_factory=trio.Event)
    accepted: bool = False
    by: str = ""


class SSHChecks:
    """Pending SSH checks and the pairs that recently passed one."""

    def __init__(self, *, server_url: str, log: logging.Logger) -> None:
        self.server_url = server_url.rstrip("/")
        self.log = log
        self.pending: OrderedDict[str, SSHCheck] = OrderedDict()
        self.passed: dict[tuple[int, int], float] = {}  # (src, dst) -> monotonic time

    def auth_url(self, auth_id: str) -> str:
        return f"{self.server_url}/auth/{auth_id}"

    def _expire(self) -> None:
        now = time.monotonic()
        while self.pending:
            auth_id, first = next(iter(self.pending.items()))
            if now - first.started <= CHECK_TTL and len(self.pending) <= MAX_CHECKS:
                break
            del self.pending[auth_id]
            first.done.set()  # a waiting client hears "rejected", not silence

    def waiting(self) -> list[SSHCheck]:
        """The checks still waiting for a verdict (for `auth list`)."""
        self._expire()
        return [c for c in self.pending.values() if not c.done.is_set()]

    def get(self, auth_id: str) -> SSHCheck | None:
        self._expire()
        return self.pending.get(auth_id)

    def _hold(self, src: int, dst: int, local_user: str) -> dict[str, Any]:
        self._expire()
        check = SSHCheck(new_auth_id(), src, dst)
        self.pending[check.auth_id] = check
        self.log.info("SSH check %s: node %d -> node %d waits for sign-in", check.auth_id, src, dst)
        from urllib.parse import urlencode

        query = urlencode({"local_user": local_user, "auth_id": check.auth_id})
        return {
            "holdAndDelegate": f"{self.server_url}/machine/ssh/action/{src}/to/{dst}?{query}",
            "message": (
                "# homescale SSH requires an additional check.\n"
                f"# To authenticate, visit: {self.auth_url(check.auth_id)}\n"
                "# Authentication checked with homescale SSH.\n"
            ),
        }

    async def action(
        self, src: int, dst: int, *, period: float | None, auth_id: str, local_user: str
    ) -> dict[str, Any]:
        """The SSHAction for one request; a follow-up (auth_id) waits for the verdict."""
        if not auth_id:
            last = self.passed.get((src, dst))
            if period is not None and period > 0 and last is not None:
                if time.monotonic() - last < period:
                    return dict(_ACCEPT)  # passed a check within checkPeriod
            return self._hold(src, dst, local_user)
        check = self.get(auth_id)
        if check is None:
            if period is not None:  # expired or lost (a restart): ask again
                return self._hold(src, dst, local_user)
            raise SSHCheckError(f"no pending SSH check {auth_id!r}", 400)
        if (check.src, check.dst) != (src, dst):
            # An auth_id is bound to its pair: a verdict cannot be carried to another.
            raise SSHCheckError("this SSH check belongs to another source/destination", 401)
        with trio.move_on_after(max(0.0, CHECK_TTL - (time.monotonic() - check.started))):
            await check.done.wait()
        self.pending.pop(auth_id, None)
        if not check.accepted:
            self.log.info("SSH check %s: rejected %s", auth_id, check.by or "(expired)")
            return {"reject": True, "message": "# homescale SSH check was refused.\n"}
        if period is not None:
            now = time.monotonic()
            # Passes older than any checkPeriod can be are useless: drop them.
            for pair in [p for p, t in self.passed.items() if now - t > MAX_CHECK_PERIOD]:
                del self.passed[pair]
            self.passed[(src, dst)] = now
        self.log.info("SSH check %s: node %d -> node %d accepted %s", auth_id, src, dst, check.by)
        return dict(_ACCEPT)

    def finish(self, auth_id: str, *, accept: bool, by: str) -> SSHCheck:
        """Decide a pending check (the provider sign-in, or an admin); the client hears it."""
        check = self.get(auth_id)
        if check is None or check.done.is_set():
            raise NotFound(f"no pending SSH check {auth_id!r} (it may have expired)")
        check.accepted = accept
        check.by = by
        check.done.set()
        return check
