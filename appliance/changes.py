"""What a write changed, as a closed set of typed values: the one way a change reaches the tailnet.

Every store write that matters to clients records one of these (`Store.recorded`);
the server's `run_db` hands them to `Tailnet.apply` on the trio side once the write
has committed. Control code adds the one fact the store does not hold (a node's map
stream opening or closing: `NodeOnline`). There is no other path from a write to
the clients, so a new kind of write means a new type here, and mypy's exhaustiveness
check on `Tailnet.apply` names every place that must handle it (headscale's model:
hscontrol/types/change/change.go, returned by each hscontrol/state mutation).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .store import NodeRow, UserRow


@dataclass(frozen=True)
class NodeChanged:
    """The node was created or its stored record changed; `row` is the committed record."""

    row: NodeRow

    def __str__(self) -> str:
        return f"node {self.row.id} ({self.row.given_name}) changed"


@dataclass(frozen=True)
class NodeRemoved:
    node_id: int

    def __str__(self) -> str:
        return f"node {self.node_id} removed"


@dataclass(frozen=True)
class NodeOnline:
    """The node's map stream opened (online) or closed (offline, seen last at `last_seen`)."""

    node_id: int
    online: bool
    last_seen: datetime | None = None

    def __str__(self) -> str:
        return f"node {self.node_id} {'online' if self.online else 'offline'}"


@dataclass(frozen=True)
class UserChanged:
    """The user was created or renamed; `row` is the committed record."""

    row: UserRow

    def __str__(self) -> str:
        return f"user {self.row.id} ({self.row.name}) changed"


@dataclass(frozen=True)
class UserRemoved:
    user_id: int

    def __str__(self) -> str:
        return f"user {self.user_id} removed"


@dataclass(frozen=True)
class PolicyChanged:
    """A new policy is in force (None: no policy, allow all); already checked when written."""

    text: str | None

    def __str__(self) -> str:
        return "policy changed" if self.text is not None else "policy removed"


Change = NodeChanged | NodeRemoved | NodeOnline | UserChanged | UserRemoved | PolicyChanged
