"""Admin operations, shared by the REST API and the CLI's direct-database path.

Every operation validates its input before it writes, so a refused call changes
nothing, and returns headscale's REST v1 JSON shape (lowerCamelCase, 64-bit IDs as
decimal strings, RFC 3339 times) so that headscale's API clients work unchanged.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeGuard

from netmap.nodes import ZERO_DISCO
from netmap.routes import EXIT_ROUTES
from protocol.gojson import ZERO_TIME, is_zero_time

from . import secrets
from .config import Config
from .errors import InvalidInput, NotFound
from .fields import is_numeric_id, parse_id
from .store import ApiKeyRow, NodeRow, PreAuthKeyRow, Store, UserRow, to_iso, utcnow
from .users import tagged_devices_json

_TAG = re.compile(r"^tag:[A-Za-z][A-Za-z0-9-]*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
if TYPE_CHECKING:
    from .tailnet import Tailnet

# A node's (auto-approved, served) routes: what the tailnet decided (autoApprovers, the
# HA election), for the API to show with the stored approvals.
NodeRoutes = Callable[[int], tuple[tuple[str, ...], tuple[str, ...]]]


def tailnet_routes(tailnet: Tailnet) -> NodeRoutes:
    """The routes each node has in `tailnet`: served means sent to peers as its
    primary (subnet) or exit routes -- the one rule, wherever routes are shown."""

    def routes(node_id: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
        peer = tailnet.entries.peers.get(node_id)
        served = (*peer.primary_routes, *peer.exit_routes) if peer is not None else ()
        return tailnet.policy.auto_approved.get(node_id, ()), served

    return routes


REGISTER_METHODS = {
    "authkey": "REGISTER_METHOD_AUTH_KEY",
    "cli": "REGISTER_METHOD_CLI",
    "oidc": "REGISTER_METHOD_OIDC",
}


def _expires(t: datetime | None) -> TypeGuard[datetime]:
    """Whether a key with this expiration expires at all (None and Go's zero time: never)."""
    return t is not None and not is_zero_time(t)


def _route_order(route: str) -> tuple[int, Any]:
    """Go's netip.Prefix.Compare order (IPv4 first, then address, then length)."""
    import ipaddress

    net = ipaddress.ip_network(route, strict=False)
    return net.version, (net.network_address, net.prefixlen)


def validate_username(name: str) -> str:
    """headscale's rule (hscontrol/util/dns.go ValidateUsername)."""
    if len(name) < 2:
        raise InvalidInput(f"user name {name!r} is too short: at least 2 characters")
    if not name[0].isalpha():
        raise InvalidInput(f"user name {name!r} must start with a letter")
    if name.count("@") > 1:
        raise InvalidInput(f"user name {name!r} has more than one '@'")
    for ch in name:
        if not (ch.isalnum() or ch in "-._@"):
            raise InvalidInput(
                f"user name {name!r} has an invalid character {ch!r} "
                f"(letters, digits, '-', '.', '_' and one '@')"
            )
    return name


def validate_tags(tags: list[str]) -> list[str]:
    out: list[str] = []
    for t in tags:
        t = t.strip()
        if not _TAG.match(t):
            raise InvalidInput(
                f"malformed tag {t!r}: expected tag:<name>, a letter then letters, "
                f"digits or '-' (e.g. tag:server)"
            )
        if t not in out:
            out.append(t)
    return sorted(out)


def validate_given_name(name: str) -> str:
    if not _DNS_LABEL.match(name):
        raise InvalidInput(
            f"invalid node name {name!r}: a DNS label of lowercase letters, digits "
            f"and '-', at most 63 characters, not starting or ending with '-'"
        )
    return name


def sanitize_hostname(hostname: str) -> str:
    """A MagicDNS label from a client hostname, as Tailscale does (dnsname.SanitizeHostname)."""
    s = unicodedata.normalize("NFKD", hostname).encode("ascii", "ignore").decode().lower()
    s = s.split(".")[0]
    s = re.sub(r"[^a-z0-9-]+", "-", s).strip("-")
    s = s[:63].strip("-")
    return s or "node"


class Admin:
    """The admin operations over one store. Their writes reach the running server's clients
    through the store's recorded changes (`Store.recorded`, `Tailnet.apply`)."""

    def __init__(
        self,
        store: Store,
        *,
        online: Callable[[int], bool] | None = None,
        config: Config | None = None,
        routes: NodeRoutes | None = None,
    ) -> None:
        self.store = store
        self._online = online or (lambda node_id: False)
        self._routes = routes or (lambda node_id: ((), ()))
        self.config = config  # prefixes (backfill) and where the policy is (tags, file mode)

    # -- shapes

    @staticmethod
    def user_json(u: UserRow) -> dict[str, Any]:
        return {
            "id": str(u.id),
            "name": u.name,
            "createdAt": to_iso(u.created_at),
            "displayName": u.display_name,
            "email": u.email,
            "providerId": u.provider_id,
            "provider": u.provider,
            "profilePicUrl": u.profile_pic_url,
        }

    def pre_auth_key_json(
        self, k: PreAuthKeyRow, full_key: str | None = None, *, in_node: bool = False
    ) -> dict[str, Any]:
        """headscale's PreAuthKey: a key without expiration shows Go's zero instant, except
        inside a node, where it is null (apiv1 preAuthKeyToResponse, nodePreAuthKeyFromView)."""
        user = self.user_json(self.store.user(k.user_id)) if k.user_id is not None else None
        expiration = k.expiration if in_node or k.expiration is not None else ZERO_TIME
        return {
            "user": user,
            "id": str(k.id),
            "key": full_key or secrets.display_prefix("auth", k.prefix),
            "reusable": k.reusable,
            "ephemeral": k.ephemeral,
            "used": k.used,
            "expiration": to_iso(expiration),
            "createdAt": to_iso(k.created_at),
            "aclTags": list(k.tags),
        }

    @staticmethod
    def api_key_json(k: ApiKeyRow) -> dict[str, Any]:
        return {
            "id": str(k.id),
            "prefix": secrets.display_prefix("api", k.prefix),
            "expiration": to_iso(k.expiration),
            "createdAt": to_iso(k.created_at),
            "lastSeen": to_iso(k.last_seen),
        }

    def node_json(self, n: NodeRow, *, listed: bool = False) -> dict[str, Any]:
        """headscale's Node; `listed` (`GET /node`) shows a tagged node's owner as the
        tagged-devices pseudo-user, a single node's answer as null (as headscale does)."""
        user: dict[str, Any] | None = None
        if n.tags:
            user = tagged_devices_json() if listed else None
        elif n.user_id is not None:
            user = self.user_json(self.store.user(n.user_id))
        pak = None
        if n.auth_key_id is not None:
            try:
                pak = self.pre_auth_key_json(self.store.pre_auth_key(n.auth_key_id), in_node=True)
            except NotFound:
                pak = None
        available = list(n.hostinfo.get("RoutableIPs") or [])
        auto, served = self._routes(n.id)
        return {
            "id": str(n.id),
            "machineKey": n.machine_key,
            "nodeKey": n.node_key,
            "discoKey": n.disco_key or ZERO_DISCO,
            "ipAddresses": [a for a in (n.ipv4, n.ipv6) if a],
            "name": n.hostname,
            "user": user,
            "lastSeen": to_iso(n.last_seen),
            "expiry": to_iso(n.expiry),
            "preAuthKey": pak,
            "createdAt": to_iso(n.created_at),
            "registerMethod": REGISTER_METHODS.get(
                n.register_method, "REGISTER_METHOD_UNSPECIFIED"
            ),
            "givenName": n.given_name,
            "online": self._online(n.id),
            # Approved by an admin or by the policy's autoApprovers.
            "approvedRoutes": sorted({*n.approved_routes, *auto}, key=_route_order),
            "availableRoutes": available,
            "subnetRoutes": list(served),
            "tags": list(n.tags),
            # homescale's device approval (node.require_approval): false = pending.
            "approved": n.approved,
        }

    # -- lookups

    def resolve_user_name(self, name: str) -> UserRow:
        """A user by name only (headscale's GetUserByName: register, debug create)."""
        u = self.store.user_by_name(name.strip())
        if u is None:
            raise NotFound(f"no user named {name[:40]!r} (see `homescale users list`)")
        return u

    def resolve_user(self, ref: str | int) -> UserRow:
        """A user by ID (digits) or name."""
        s = str(ref).strip()
        if is_numeric_id(s):  # names start with a letter (validate_username)
            return self.store.user(parse_id(s, "user ID"))
        u = self.store.user_by_name(s)
        if u is None:
            raise NotFound(f"no user named {s!r} (see `homescale users list`)")
        return u

    # -- users

    def create_user(
        self, name: str, display_name: str = "", email: str = "", picture_url: str = ""
    ) -> dict[str, Any]:
        validate_username(name)
        u = self.store.create_user(name, display_name, email, picture_url)
        return self.user_json(u)

    def list_users(self, *, name: str = "", id: str = "", email: str = "") -> list[dict[str, Any]]:
        want = parse_id(id, "id") if id else None  # a malformed ID is a 400, as in headscale
        users = self.store.users()
        if name:
            users = [u for u in users if u.name == name]
        if want is not None:
            users = [u for u in users if u.id == want]
        if email:
            users = [u for u in users if u.email == email]
        return [self.user_json(u) for u in users]

    def rename_user(self, ref: str | int, new_name: str) -> dict[str, Any]:
        u = self.resolve_user(ref)
        validate_username(new_name)
        out = self.user_json(self.store.rename_user(u.id, new_name))
        return out

    def delete_user(self, ref: str | int) -> None:
        u = self.resolve_user(ref)
        self.store.delete_user(u.id)

    # -- pre-auth keys

    def create_pre_auth_key(
        self,
        *,
        user: str | int | None,
        reusable: bool = False,
        ephemeral: bool = False,
        expiration: datetime | None = None,
        tags: list[str] | None = None,
    ) -> dict[str, Any]:
        tags = validate_tags(tags or [])
        if user in (None, "", 0, "0") and not tags:
            raise InvalidInput(
                "a pre-auth key needs a user (--user) or tags (--tags tag:x): "
                "a node must be owned by someone"
            )
        u = self.resolve_user(user) if user not in (None, "", 0, "0") else None
        if expiration is not None and expiration <= utcnow():
            raise InvalidInput(f"expiration {to_iso(expiration)} is in the past")
        key = secrets.new_key("auth")
        row = self.store.create_pre_auth_key(
            prefix=key.prefix,
            hash=key.hash,
            user_id=u.id if u else None,
            reusable=reusable,
            ephemeral=ephemeral,
            tags=tags,
            expiration=expiration,
        )
        return self.pre_auth_key_json(row, full_key=key.full)

    def list_pre_auth_keys(self, user: str | int | None = None) -> list[dict[str, Any]]:
        uid = self.resolve_user(user).id if user not in (None, "", 0, "0") else None
        return [self.pre_auth_key_json(k) for k in self.store.pre_auth_keys(uid)]

    def _pak_by_ref(self, ref: str | int) -> PreAuthKeyRow:
        """A key by its ID (an int, or digits as typed) or its prefix."""
        s = str(ref).strip()
        if isinstance(ref, int) or secrets.names_a_key_id(s):
            return self.store.pre_auth_key(parse_id(s, "pre-auth key ID"))
        row = self.store.pre_auth_key_by_prefix(secrets.parse_prefix("auth", s))
        if row is None:
            raise NotFound(f"no pre-auth key {s!r}")
        return row

    def expire_pre_auth_key(self, ref: str | int) -> None:
        k = self._pak_by_ref(ref)
        self.store.update_pre_auth_key(k.id, expiration=utcnow())

    def delete_pre_auth_key(self, ref: str | int) -> None:
        self.store.delete_pre_auth_key(self._pak_by_ref(ref).id)

    def check_pre_auth_key(self, full_key: str) -> PreAuthKeyRow:
        """The key row if `full_key` is a valid, unexpired, unspent key; InvalidInput says why not."""
        prefix, secret = secrets.split_key("auth", full_key)
        row = self.store.pre_auth_key_by_prefix(prefix)
        if row is None or not secrets.verify_secret(secret, row.hash):
            raise InvalidInput("authkey not found")
        if secrets.needs_rehash(row.hash):
            self.store.update_pre_auth_key(row.id, hash=secrets.hash_secret(secret))
        if row.expiration is not None and row.expiration <= utcnow():
            raise InvalidInput("authkey expired")
        if row.used and not row.reusable:
            raise InvalidInput("authkey already used")
        return row

    # -- API keys

    def create_api_key(self, expiration: datetime | None) -> str:
        """`expiration` None or Go's zero time: the key never expires (headscale stores and
        shows the zero instant for it)."""
        key = secrets.new_key("api")
        self.store.create_api_key(prefix=key.prefix, hash=key.hash, expiration=expiration)
        return key.full

    def list_api_keys(self) -> list[dict[str, Any]]:
        return [self.api_key_json(k) for k in self.store.api_keys()]

    def _api_key(self, id: int, prefix: str) -> ApiKeyRow:
        """The key named by exactly one of `id` (0: none) and `prefix`, as headscale's
        lookupApiKey: both or neither is a 400, an unknown one a 404."""
        prefix = prefix.strip()
        if id and prefix:
            raise InvalidInput("name the API key by id or by prefix, not both")
        if id:
            return self.store.api_key(id)
        if not prefix:
            raise InvalidInput("name the API key: id or prefix")
        try:
            row = self.store.api_key_by_prefix(secrets.parse_prefix("api", prefix))
        except InvalidInput:
            row = None  # not a prefix homescale ever made: no such key
        if row is None:
            raise NotFound(f"no API key with prefix {prefix[:40]!r} (see `homescale apikeys list`)")
        return row

    def expire_api_key(self, prefix: str = "", id: int = 0) -> None:
        self.store.update_api_key(self._api_key(id, prefix).id, expiration=utcnow())

    def delete_api_key(self, prefix: str = "", id: int = 0) -> None:
        self.store.delete_api_key(self._api_key(id, prefix).id)

    def check_api_key(self, full_key: str) -> bool:
        try:
            prefix, secret = secrets.split_key("api", full_key)
        except InvalidInput:
            return False
        row = self.store.api_key_by_prefix(prefix)
        if row is None or not secrets.verify_secret(secret, row.hash):
            return False
        if _expires(row.expiration) and row.expiration <= utcnow():
            return False
        if secrets.needs_rehash(row.hash):
            self.store.update_api_key(row.id, hash=secrets.hash_secret(secret))
        self.store.update_api_key(row.id, last_seen=utcnow())
        return True

    # -- nodes

    def _node(self, ref: str | int) -> NodeRow:
        s = str(ref).strip()
        if not is_numeric_id(s):
            raise InvalidInput(
                f"node identifier {s[:40]!r}: expected a numeric ID (see `homescale nodes list`)"
            )
        return self.store.node(parse_id(s, "node ID"))

    def get_node(self, ref: str | int) -> dict[str, Any]:
        return self.node_json(self._node(ref))

    def list_nodes(self, user: str | None = None) -> list[dict[str, Any]]:
        uid = self.resolve_user(user).id if user else None
        return [self.node_json(n, listed=True) for n in self.store.nodes(uid)]

    def delete_node(self, ref: str | int) -> None:
        n = self._node(ref)
        self.store.delete_node(n.id)

    def expire_node(
        self, ref: str | int, expiry: datetime | None = None, disable: bool = False
    ) -> dict[str, Any]:
        n = self._node(ref)
        # Go's zero time is "unset": expire now, as headscale does for a request without expiry.
        when = None if disable else (utcnow() if expiry is None or is_zero_time(expiry) else expiry)
        out = self.node_json(self.store.update_node(n.id, expiry=when))
        return out

    def approve_node(self, ref: str | int) -> dict[str, Any]:
        """Device approval: let a logged-in node into the tailnet (its client hears it)."""
        n = self._node(ref)
        if n.approved:
            raise InvalidInput(f"node {n.id} ({n.given_name}) is already approved")
        return self.node_json(self.store.update_node(n.id, approved=True))

    def reject_node(self, ref: str | int) -> None:
        """Device approval: refuse a pending node (it is deleted; its client must log in again)."""
        n = self._node(ref)
        if n.approved:
            raise InvalidInput(
                f"node {n.id} ({n.given_name}) is approved; use `nodes delete` to remove it"
            )
        self.store.delete_node(n.id)

    def rename_node(self, ref: str | int, new_name: str) -> dict[str, Any]:
        n = self._node(ref)
        validate_given_name(new_name)
        other = self.store.node_by("given_name", new_name)
        if other is not None and other.id != n.id:
            raise InvalidInput(f"node name {new_name!r} is already taken by node {other.id}")
        out = self.node_json(self.store.update_node(n.id, given_name=new_name))
        return out

    def tag_node(self, ref: str | int, tags: list[str]) -> dict[str, Any]:
        """Make the node owned by `tags`, as headscale's SetNodeTags: at least one tag, each
        defined in the policy's tagOwners; the node then belongs to its tags, not a user."""
        if not tags:
            raise InvalidInput(
                "tags: a node keeps at least one tag (tagged nodes are owned by their tags)"
            )
        tags = validate_tags(tags)
        n = self._node(ref)
        defined = self.defined_tags()
        unknown = [t for t in tags if t not in defined]
        if unknown:
            raise InvalidInput(
                f"tags: {', '.join(unknown)} not defined in the policy's tagOwners "
                f"(define them there first)"
            )
        out = self.node_json(self.store.update_node(n.id, tags=tags, user_id=None))
        return out

    def policy_text(self) -> str | None:
        """The policy as configured (database or file); None when there is none."""
        from .policies import PolicyInvalid, read_policy

        if self.config is None:
            row = self.store.policy()
            return row.data if row else None
        try:
            return read_policy(self.config, self.store)[0]
        except PolicyInvalid as e:
            raise InvalidInput(str(e)) from None

    def defined_tags(self) -> set[str]:
        """The tags the current policy's tagOwners define (none without a policy)."""
        from netmap.policy import PolicyError, parse_policy

        text = self.policy_text()
        if text is None:
            return set()
        try:
            return set(parse_policy(text, "policy").tag_owners)
        except PolicyError as e:
            raise InvalidInput(f"the current policy does not parse: {e}") from None

    @staticmethod
    def parse_route(text: str, field: str = "routes") -> str:
        """A route prefix as Go's netip.ParsePrefix takes it (host bits are masked)."""
        import ipaddress

        try:
            return str(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError:
            shown = text if len(text) <= 60 else text[:57] + "..."
            raise InvalidInput(f"{field}: {shown!r} is not a CIDR like 10.0.0.0/8") from None

    def approve_routes(self, ref: str | int, routes: list[str]) -> dict[str, Any]:
        """Set the approved routes; one exit route approves both families, as headscale
        does (a client treats a peer as an exit node only with 0.0.0.0/0 and ::/0)."""
        n = self._node(ref)
        clean = {self.parse_route(r) for r in routes if r.strip()}
        if clean & set(EXIT_ROUTES):
            clean |= set(EXIT_ROUTES)
        approved = sorted(clean, key=_route_order)
        out = self.node_json(self.store.update_node(n.id, approved_routes=approved))
        return out

    def echo_node_json(
        self, owner: UserRow, machine: str, node_key: str, hostinfo: dict[str, Any]
    ) -> dict[str, Any]:
        """The node a debug registration will become (headscale's DebugCreateNode echo:
        not stored, so no ID, addresses or times)."""
        zero = to_iso(ZERO_TIME)
        return {
            "id": "0",
            "machineKey": machine,
            "nodeKey": node_key,
            "discoKey": ZERO_DISCO,
            "ipAddresses": [],
            "name": hostinfo.get("Hostname", ""),
            "user": self.user_json(owner),
            "lastSeen": zero,
            "expiry": zero,
            "preAuthKey": None,
            "createdAt": zero,
            "registerMethod": "REGISTER_METHOD_UNSPECIFIED",
            "givenName": "",
            "online": False,
            "approvedRoutes": [],
            "availableRoutes": list(hostinfo.get("RoutableIPs") or []),
            "subnetRoutes": [],
            "tags": [],
        }

    def backfill_ips(self) -> list[str]:
        """Give every node an address from each configured prefix it lacks, and take away
        those of a prefix no longer configured (headscale's BackfillNodeIPs)."""
        from netmap.addresses import PrefixExhausted

        if self.config is None:
            raise InvalidInput("backfilling addresses needs the server's configuration")
        c = self.config
        changes: list[str] = []
        with self.store.transaction():
            for n in self.store.nodes():
                values: dict[str, Any] = {}
                for fam, prefix, have in (
                    ("ipv4", c.prefix_v4, n.ipv4),
                    ("ipv6", c.prefix_v6, n.ipv6),
                ):
                    name = "IPv4" if fam == "ipv4" else "IPv6"
                    if prefix is not None and not have:
                        try:
                            values[fam] = self.store.fresh_address(prefix, c.ip_allocation)
                        except PrefixExhausted as e:
                            raise InvalidInput(f"cannot backfill node {n.id}: {e}") from None
                        changes.append(
                            f'assigned {name} "{values[fam]}" to Node({n.id}) "{n.hostname}"'
                        )
                    elif prefix is None and have:
                        values[fam] = None
                        changes.append(f'removing {name} "{have}" from Node({n.id}) "{n.hostname}"')
                if values:
                    self.store.update_node(n.id, **values)
        return changes

    # -- policy

    def get_policy(self) -> dict[str, Any]:
        """The stored policy, or in file mode the file's text (as headscale: `updatedAt` is
        then Go's zero instant)."""
        if self.config is not None and self.config.policy_mode != "database":
            text = self.policy_text()
            if text is None:
                raise NotFound("no policy file is configured (policy.path)")
            return {"policy": text, "updatedAt": to_iso(ZERO_TIME)}
        row = self.store.policy()
        if row is None:
            raise NotFound("no policy is stored in the database (policy.mode: database)")
        return {"policy": row.data, "updatedAt": to_iso(row.created_at)}

    def set_policy(self, text: str, check: Callable[[str], None]) -> dict[str, Any]:
        check(text)  # raises with the located error; nothing is stored then
        row = self.store.set_policy(text)
        return {"policy": row.data, "updatedAt": to_iso(row.created_at)}
