"""Node records: creation with addresses and a unique MagicDNS name, in one store call.

These run in the store's worker thread (one at a time), so address allocation and
name choice cannot race between concurrent registrations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from netmap.addresses import PrefixExhausted

from .admin import sanitize_hostname
from .config import Config
from .errors import InvalidInput
from .store import NodeRow, Store, utcnow

MAX_NAME_SUFFIX = 10_000  # bounded search for a free `name-N`


def unique_given_name(store: Store, hostname: str, *, exclude_id: int | None = None) -> str:
    """The sanitised hostname, or `name-1`, `name-2`, ... when taken (as headscale does)."""
    base = sanitize_hostname(hostname)
    for n in range(MAX_NAME_SUFFIX):
        candidate = base if n == 0 else f"{base[: 63 - len(str(n)) - 1]}-{n}"
        other = store.node_by("given_name", candidate)
        if other is None or other.id == exclude_id:
            return candidate
    raise InvalidInput(f"no free node name for hostname {hostname!r}")


@dataclass(frozen=True)
class Login:
    """Who a node logs in as, and how: what creating or re-logging a node records."""

    node_key: str
    hostinfo: dict[str, Any] = field(default_factory=dict)
    user_id: int | None = None  # None: owned by its tags
    tags: tuple[str, ...] = ()
    ephemeral: bool = False
    auth_key_id: int | None = None
    register_method: str = "authkey"  # authkey | cli | oidc
    expiry: datetime | None = (
        None  # None: node.expiry from now (oidc.use_expiry_from_token sets it)
    )


def key_expiry(config: Config, now: datetime) -> datetime | None:
    return now + config.node_expiry if config.node_expiry > timedelta(0) else None


def create_node(store: Store, config: Config, machine_key: str, login: Login) -> NodeRow:
    """Insert a node with fresh addresses; the caller then announces it."""
    v4, v6, how = config.prefix_v4, config.prefix_v6, config.ip_allocation
    try:
        ipv4 = store.fresh_address(v4, how) if v4 else None
        ipv6 = store.fresh_address(v6, how) if v6 else None
    except PrefixExhausted as e:
        raise InvalidInput(f"cannot register the node: {e}") from None
    now = utcnow()
    hostname = str(login.hostinfo.get("Hostname") or "")
    with store.transaction():
        row = store.create_node(
            machine_key=machine_key,
            node_key=login.node_key,
            hostinfo=login.hostinfo,
            hostname=hostname,
            given_name=unique_given_name(store, hostname or "node"),
            ipv4=ipv4,
            ipv6=ipv6,
            user_id=login.user_id,
            tags=list(login.tags),
            ephemeral=login.ephemeral,
            auth_key_id=login.auth_key_id,
            register_method=login.register_method,
            expiry=login.expiry or key_expiry(config, now),
            created_at=now,
            approved=not config.node_require_approval,
            last_seen=now,  # as headscale: a registered node was seen when it registered
        )
        if login.auth_key_id is not None:
            store.update_pre_auth_key(login.auth_key_id, used=1)
    return row


def relogin_node(store: Store, config: Config, node: NodeRow, login: Login) -> NodeRow:
    """A known machine logs in again (new key or new owner): keep its ID and addresses."""
    with store.transaction():
        row = store.update_node(
            node.id,
            node_key=login.node_key,
            hostinfo=login.hostinfo or node.hostinfo,
            hostname=str(login.hostinfo.get("Hostname") or node.hostname),
            user_id=login.user_id,
            tags=list(login.tags),
            ephemeral=login.ephemeral,
            auth_key_id=login.auth_key_id,
            register_method=login.register_method,
            expiry=login.expiry or key_expiry(config, utcnow()),
        )
        if login.auth_key_id is not None:
            store.update_pre_auth_key(login.auth_key_id, used=1)
    return row


def log_in(
    store: Store, config: Config, machine_key: str, existing: NodeRow | None, login: Login
) -> NodeRow:
    """Create the node, or re-login the machine's existing one."""
    if existing is not None:
        return relogin_node(store, config, existing, login)
    return create_node(store, config, machine_key, login)
