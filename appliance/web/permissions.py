"""What a console session may do, decided on the server for every request.

Admins may call every admin API route. A signed-in user who is no admin (OIDC, not
named in `web.admins`) may list, rename, expire and delete their own devices and
list and create pre-auth keys for themselves (untagged); everything else is a 403.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .sessions import ADMIN, Session

_OWN_NODE = [
    ("DELETE", re.compile(r"/api/v1/node/(\d+)$")),
    ("POST", re.compile(r"/api/v1/node/(\d+)/expire$")),
    ("POST", re.compile(r"/api/v1/node/(\d+)/rename/[^/]+$")),
]


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str = ""
    node_id: int | None = None  # allowed only if this node belongs to the session's user
    own_keys: bool = False  # pre-auth key routes: restricted to the session's user


DENY_ADMIN = Decision(False, "only admins may do this")


def decide(session: Session, method: str, path: str) -> Decision:
    if session.role == ADMIN:
        return Decision(True)
    if session.user_id is None:
        return DENY_ADMIN
    for m, pattern in _OWN_NODE:
        found = pattern.match(path)
        if m == method and found:
            return Decision(True, node_id=int(found.group(1)))
    if path == "/api/v1/preauthkey" and method in ("GET", "POST"):
        return Decision(True, own_keys=True)
    if path == "/api/v1/preauthkey/expire" and method == "POST":
        return Decision(True, own_keys=True)
    return DENY_ADMIN
