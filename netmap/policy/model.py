"""The parsed policy and the tailnet snapshot it is compiled against.

Plain frozen values: the parser builds a :class:`Policy`, the appliance builds
:class:`PolicyUser` / :class:`PolicyNode` from its store, and the compiler
reads both. Nothing here does I/O.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from .ipset import IPNetwork, IPSet


class AliasKind(Enum):
    WILDCARD = "*"
    USER = "user"
    GROUP = "group"
    TAG = "tag"
    HOST = "host"
    PREFIX = "prefix"
    AUTOGROUP = "autogroup"
    IPSET = "ipset"
    USER_DOMAIN = "user-domain"  # user:*@domain: every user with a mail address there


# The autogroups homescale knows (headscale's list); others such as
# autogroup:admin need roles homescale does not model.
AUTOGROUP_INTERNET = "autogroup:internet"
AUTOGROUP_MEMBER = "autogroup:member"
AUTOGROUP_TAGGED = "autogroup:tagged"
AUTOGROUP_SELF = "autogroup:self"
AUTOGROUP_NONROOT = "autogroup:nonroot"
AUTOGROUP_DANGER_ALL = "autogroup:danger-all"
# A group member "oidc:<group>" stands for the users whose identity provider put
# them in <group> at their last sign-in (homescale's extension).
IDP_GROUP_PREFIX = "oidc:"
AUTOGROUPS = (
    AUTOGROUP_INTERNET,
    AUTOGROUP_MEMBER,
    AUTOGROUP_TAGGED,
    AUTOGROUP_SELF,
    AUTOGROUP_NONROOT,
    AUTOGROUP_DANGER_ALL,
)


# Every node's addresses are parsed on every policy compile (each join); the parsed
# objects are immutable, so each text is parsed once.
@functools.lru_cache(maxsize=1 << 16)
def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


@functools.lru_cache(maxsize=1 << 14)
def _network(text: str) -> IPNetwork:
    return ipaddress.ip_network(text, strict=False)


@dataclass(frozen=True)
class Alias:
    """One policy target: ``*``, a user, group, tag, host name, IP/CIDR or autogroup."""

    kind: AliasKind
    name: str
    network: IPNetwork | None = None

    def __str__(self) -> str:
        return self.name

    def is_autogroup(self, name: str) -> bool:
        return self.kind is AliasKind.AUTOGROUP and self.name == name


@dataclass(frozen=True)
class PortRange:
    first: int
    last: int

    def wire(self) -> dict[str, int]:
        return {"First": self.first, "Last": self.last}


ALL_PORTS = PortRange(0, 65535)


@dataclass(frozen=True)
class Destination:
    """An ACL ``dst`` entry: ``alias:ports``."""

    alias: Alias
    ports: tuple[PortRange, ...]


@dataclass(frozen=True)
class IPRule:
    """Protocols and ports of a grant's ``ip`` entry (an ACL becomes one).

    ``protos`` empty means Tailscale's default set (TCP, UDP, ICMP, ICMPv6),
    sent as an absent IPProto.
    """

    protos: tuple[int, ...]
    ports: tuple[PortRange, ...]


@dataclass(frozen=True)
class Grant:
    """A network grant; every ACL is compiled as one grant per destination.

    ``where`` is the JSON path of the rule, for messages.
    """

    src: tuple[Alias, ...]
    dst: tuple[Alias, ...]
    ip: tuple[IPRule, ...]
    where: str = ""
    # Capability grants (``app``): capability name -> its JSON values, passed
    # through to the destination's CapGrant untouched. Empty: no app part.
    app: dict[str, list[Any]] = field(default_factory=dict, hash=False, compare=False)
    # Route steering (``via``): only routers carrying one of these tags serve
    # the destinations' subnets (or, for autogroup:internet, the exit) to src.
    via: tuple[str, ...] = ()


@dataclass(frozen=True)
class NodeAttr:
    """A ``nodeAttrs`` entry: the nodes ``target`` names get ``attr`` (value
    null) and ``app`` (capability -> JSON values) in their CapMap."""

    target: tuple[Alias, ...]
    attr: tuple[str, ...] = ()
    app: dict[str, list[Any]] = field(default_factory=dict, hash=False, compare=False)
    where: str = ""


@dataclass(frozen=True)
class SSHTest:
    """An ``sshTests`` entry: from ``src``, SSH to each of ``dst`` as the
    ``accept`` users must be allowed, as ``check`` users must need a check,
    as ``deny`` users must be refused."""

    src: Alias
    dst: tuple[Alias, ...]
    accept: tuple[str, ...] = ()
    check: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    where: str = ""
    line: int | None = None


@dataclass(frozen=True)
class ACL:
    action: str
    src: tuple[Alias, ...]
    dst: tuple[Destination, ...]
    protos: tuple[int, ...]
    proto_name: str = ""
    where: str = ""


@dataclass(frozen=True)
class SSHRule:
    action: str  # "accept" or "check"
    src: tuple[Alias, ...]
    dst: tuple[Alias, ...]
    users: tuple[str, ...]
    check_period: str | None = None  # as written ("1h", "always"); None = default
    accept_env: tuple[str, ...] = ()
    where: str = ""


@dataclass(frozen=True)
class AutoApprovers:
    routes: dict[IPNetwork, tuple[Alias, ...]] = field(default_factory=dict)
    exit_node: tuple[Alias, ...] = ()


@dataclass(frozen=True)
class PolicyTest:
    """One entry of the policy's ``tests``: from ``src``, ``accept`` must be
    reachable and ``deny`` must not be (each ``host:port``)."""

    src: str
    proto: str = ""
    protos: tuple[int, ...] = ()
    accept: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    where: str = ""
    line: int | None = None


@dataclass(frozen=True)
class Policy:
    """A validated policy. Build it with :func:`parse_policy`."""

    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)
    hosts: dict[str, IPNetwork] = field(default_factory=dict)
    tag_owners: dict[str, tuple[Alias, ...]] = field(default_factory=dict)
    acls: tuple[ACL, ...] | None = None
    grants: tuple[Grant, ...] | None = None
    ssh: tuple[SSHRule, ...] = ()
    auto_approvers: AutoApprovers = field(default_factory=AutoApprovers)
    tests: tuple[PolicyTest, ...] = ()
    ssh_tests: tuple[SSHTest, ...] = ()
    node_attrs: tuple[NodeAttr, ...] = ()
    # ``ipset:name`` -> its addresses, resolved at parse time (IP sets hold
    # only addresses, hosts, other IP sets and autogroup:internet).
    ipsets: dict[str, IPSet] = field(default_factory=dict)
    randomize_client_port: bool = False
    source: str = "<policy>"

    @property
    def has_network_rules(self) -> bool:
        """False when neither ``acls`` nor ``grants`` is present: allow all.

        headscale (compileFilterRules) treats a policy without both sections
        as FilterAllowAll; an *empty* ``acls: []`` denies everything.
        """
        return self.acls is not None or self.grants is not None


@dataclass(frozen=True)
class PolicyUser:
    """A tailnet user as the policy sees it."""

    id: int
    name: str
    email: str = ""
    groups: tuple[str, ...] = ()  # the identity provider's groups ("oidc:<group>" members)


@dataclass(frozen=True)
class PolicyNode:
    """A node as the policy sees it.

    ``user`` is the owning user's *name*, or None for a tagged node: tagged
    nodes are owned by their tags (Tailscale), whoever registered them.
    ``routable_ips`` are the routes the node advertises; ``approved_routes``
    those an admin or autoApprovers approved. Only advertised-and-approved
    routes count, as in headscale's Node.SubnetRoutes/ExitRoutes.
    """

    id: int
    hostname: str
    user: str | None
    tags: tuple[str, ...] = ()
    ipv4: str | None = None
    ipv6: str | None = None
    routable_ips: tuple[str, ...] = ()
    approved_routes: tuple[str, ...] = ()

    @property
    def is_tagged(self) -> bool:
        return bool(self.tags)

    def addresses(self) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        return [_address(a) for a in (self.ipv4, self.ipv6) if a]

    def _served_routes(self) -> list[IPNetwork]:
        approved = {_network(r) for r in self.approved_routes}
        return [net for net in map(_network, self.routable_ips) if net in approved]

    def subnet_routes(self) -> list[IPNetwork]:
        """Advertised and approved routes, exit routes excluded."""
        return [n for n in self._served_routes() if n.prefixlen != 0]

    def is_exit_node(self) -> bool:
        """Advertises and has approval for 0.0.0.0/0 or ::/0."""
        return any(n.prefixlen == 0 for n in self._served_routes())
