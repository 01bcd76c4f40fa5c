"""Console sign-in state: one-time sign-in links, sessions, CSRF tokens, sign-in rate limits.

All of it lives in the running server's memory: a restart signs everyone out, and
nothing secret is ever written to disk. Tokens are 32 random bytes (URL-safe base64)
compared in constant time; a session is found by the SHA-256 of its cookie so a
timing difference in the dict lookup says nothing about a valid token.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

LOGIN_LINK_TTL = 600.0  # `homescale web login-url`: valid 10 minutes, one use
SESSION_TTL = 12 * 3600.0  # a session ends 12 hours after sign-in ...
SESSION_IDLE = 2 * 3600.0  # ... or after 2 hours without a request
MAX_SESSIONS = 1000  # the oldest session ends when a new one would pass this
MAX_LINKS = 100  # pending sign-in links
COOKIE = "homescale_console"

# Sign-in attempts per client IP: a burst of this many, refilled at one per REFILL seconds.
SIGNIN_BURST = 10
SIGNIN_REFILL = 6.0

ADMIN = "admin"
USER = "user"  # an OIDC-signed-in user who is no admin: their own devices only


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class Session:
    """A signed-in browser: who (shown in the audit log), their role, their CSRF token."""

    who: str
    role: str  # ADMIN or USER
    csrf: str
    created: float
    seen: float
    user_id: int | None = None  # USER sessions: the homescale user whose devices they manage
    id: str = field(default_factory=lambda: secrets.token_hex(4))  # short, for the audit log

    def csrf_ok(self, sent: str) -> bool:
        return bool(sent) and hmac.compare_digest(sent.encode(), self.csrf.encode())


class RateLimit:
    """A token bucket per client IP for sign-in attempts (bounded: old entries are dropped)."""

    def __init__(
        self,
        burst: int = SIGNIN_BURST,
        refill: float = SIGNIN_REFILL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.burst, self.refill, self.clock = burst, refill, clock
        self.buckets: dict[str, tuple[float, float]] = {}

    def allow(self, ip: str) -> bool:
        now = self.clock()
        tokens, last = self.buckets.get(ip, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) / self.refill)
        if len(self.buckets) > 10_000:
            self.buckets.clear()  # a flood of addresses: start over rather than grow
        if tokens < 1:
            self.buckets[ip] = (tokens, now)
            return False
        self.buckets[ip] = (tokens - 1, now)
        return True


class Sessions:
    """Sign-in links and sessions of the console."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.links: dict[str, tuple[float, str]] = {}  # digest -> (expires, who)
        self.sessions: dict[str, Session] = {}  # digest of the cookie -> session

    # -- one-time sign-in links

    def new_link(self, who: str = "admin (homescale web login-url)") -> tuple[str, float]:
        """A fresh one-time sign-in token and when it expires (a Unix time)."""
        now = self.clock()
        self.links = {d: v for d, v in self.links.items() if v[0] > now}
        while len(self.links) >= MAX_LINKS:
            self.links.pop(next(iter(self.links)))
        token = secrets.token_urlsafe(32)
        expires = now + LOGIN_LINK_TTL
        self.links[_digest(token)] = (expires, who)
        return token, expires

    def use_link(self, token: str) -> tuple[str, Session] | None:
        """The session a sign-in token opens (cookie, session), once; None if unknown,
        used or expired."""
        found = self.links.pop(_digest(token), None)
        if found is None or found[0] <= self.clock():
            return None
        return self.open(found[1], ADMIN)

    # -- sessions

    def open(self, who: str, role: str, user_id: int | None = None) -> tuple[str, Session]:
        """A new session: (the cookie value, the session)."""
        now = self.clock()
        self._expire(now)
        while len(self.sessions) >= MAX_SESSIONS:
            self.sessions.pop(next(iter(self.sessions)))
        cookie = secrets.token_urlsafe(32)
        s = Session(who, role, secrets.token_urlsafe(32), now, now, user_id)
        self.sessions[_digest(cookie)] = s
        return cookie, s

    def get(self, cookie: str) -> Session | None:
        if not cookie:
            return None
        d = _digest(cookie)
        s = self.sessions.get(d)
        now = self.clock()
        if s is None:
            return None
        if now - s.created > SESSION_TTL or now - s.seen > SESSION_IDLE:
            del self.sessions[d]
            return None
        s.seen = now
        return s

    def close(self, cookie: str) -> Session | None:
        return self.sessions.pop(_digest(cookie), None) if cookie else None

    def _expire(self, now: float) -> None:
        self.sessions = {
            d: s
            for d, s in self.sessions.items()
            if now - s.created <= SESSION_TTL and now - s.seen <= SESSION_IDLE
        }


def cookie_value(header: str, name: str = COOKIE) -> str:
    """The value of cookie `name` in a Cookie header ("" if absent)."""
    for part in header.split(";"):
        k, _, v = part.strip().partition("=")
        if k == name:
            return v.strip()
    return ""


def set_cookie(value: str, *, secure: bool, max_age: int | None = None) -> str:
    """The Set-Cookie header value for the session cookie (HttpOnly, SameSite=Strict)."""
    parts = [f"{COOKIE}={value}", "Path=/", "HttpOnly", "SameSite=Strict"]
    if secure:
        parts.append("Secure")
    if max_age is not None:
        parts.append(f"Max-Age={max_age}")
    return "; ".join(parts)
