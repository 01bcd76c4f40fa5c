"""Compile a policy against a tailnet snapshot: filters, SSH rules, peers.

Two stages, so a change costs what it touches (no whole-world recompute):

1. :func:`compile_policy` resolves every alias once per policy or
   membership change into an intermediate form: the global FilterRules
   (headscale's "unreduced" filter), the per-grant data autogroup:self needs,
   and one *matcher* per rule -- the nodes it lets send and the nodes it lets
   receive.
2. ``filter_for`` / ``ssh_for`` / ``visible_peers`` derive one node's result
   from that form on demand and cache it. A node's peers are the union of the
   receivers of matchers it sends on and the senders of matchers it receives
   on: O(its matchers), not O(nodes²).

Semantics follow what Tailscale's service sends (the golden captures) as
reproduced by headscale's hscontrol/policy/v2 (filter.go, compiled.go,
policyutil/reduce.go, types/node.go canAccess).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .ipset import EMPTY, EVERYTHING, INTERNET, TAILNET, IPAddress, IPNetwork, IPSet
from .model import (
    ACL,
    ALL_PORTS,
    AUTOGROUP_DANGER_ALL,
    AUTOGROUP_INTERNET,
    AUTOGROUP_MEMBER,
    AUTOGROUP_NONROOT,
    AUTOGROUP_SELF,
    AUTOGROUP_TAGGED,
    IDP_GROUP_PREFIX,
    Alias,
    AliasKind,
    Destination,
    Grant,
    IPRule,
    Policy,
    PolicyNode,
    PolicyUser,
    SSHRule,
)
from .parse import _go_duration_seconds

FilterRule = dict[str, Any]

# tailcfg.FilterAllowAll: what a node gets when there is no policy.
ALLOW_ALL: list[FilterRule] = [
    {"SrcIPs": ["*"], "DstPorts": [{"IP": "*", "Ports": {"First": 0, "Last": 65535}}]}
]

# tailcfg.SSHAction for "accept": Tailscale allows forwarding with it.
_SSH_ACCEPT = {
    "accept": True,
    "allowAgentForwarding": True,
    "allowLocalPortForwarding": True,
    "allowRemotePortForwarding": True,
}
# The client substitutes these; the server answers the hold-and-delegate
# callback (headscale sshCheck, Tailscale's own URL shape).
_SSH_CHECK_PATH = "/machine/ssh/action/$SRC_NODE_ID/to/$DST_NODE_ID?local_user=$LOCAL_USER"
SSH_CHECK_PERIOD_DEFAULT = 12 * 3600.0  # headscale's SSHCheckPeriodDefault


@dataclass
class _Node:
    node: PolicyNode
    addrs: list[IPAddress]
    ips: IPSet
    subnet_routes: list[IPNetwork]
    is_exit: bool
    user_id: int | None  # owning user for untagged nodes; None when tagged

    @property
    def id(self) -> int:
        return self.node.id


@dataclass
class _DstEntry:
    wire: dict[str, Any]
    ips: IPSet


@dataclass
class _CapGrant:
    """One tailcfg.CapGrant: capabilities (JSON values as given) on prefixes."""

    dsts: list[IPNetwork]
    cap_map: dict[str, Any]

    @property
    def ips(self) -> IPSet:
        return IPSet.of(self.dsts)

    def reduce(self, info: _Node) -> _CapGrant | None:
        """Only this node's own addresses and the served subnets it overlaps
        (headscale reduceCapGrantRule, as Tailscale sends it)."""
        kept: set[IPNetwork] = set()
        for net in self.dsts:
            for addr in info.addrs:
                if addr in net:
                    kept.add(ipaddress.ip_network(addr))
            if any(net.overlaps(r) for r in info.subnet_routes):
                kept.add(net)
        if not kept:
            return None
        order = sorted(kept, key=lambda n: (n.version, n.network_address, n.prefixlen))
        return _CapGrant(order, self.cap_map)

    def wire(self) -> dict[str, Any]:
        return {"Dsts": [str(n) for n in self.dsts], "CapMap": self.cap_map}


@dataclass
class _Rule:
    """One unreduced FilterRule with its parsed destinations.

    A capability rule has ``caps`` (CapGrant) and no ``dsts``; it is never
    merged with other rules.
    """

    src_ips: list[str]
    protos: tuple[int, ...]
    dsts: list[_DstEntry]
    caps: list[_CapGrant] = field(default_factory=list)

    def key(self) -> tuple[tuple[str, ...], tuple[int, ...]]:
        return (tuple(self.src_ips), self.protos)

    def dst_ips(self) -> IPSet:
        out = EMPTY
        for d in self.dsts:
            out |= d.ips
        for c in self.caps:
            out |= c.ips
        return out

    def wire(self, dsts: Iterable[_DstEntry] | None = None) -> FilterRule:
        if self.caps:
            return {"SrcIPs": list(self.src_ips), "CapGrant": [c.wire() for c in self.caps]}
        out: FilterRule = {
            "SrcIPs": list(self.src_ips),
            "DstPorts": [d.wire for d in (self.dsts if dsts is None else dsts)],
        }
        if self.protos:
            out["IPProto"] = list(self.protos)
        return out


@dataclass
class _SelfGrant:
    """The autogroup:self part of a grant, expanded per user."""

    srcs: list[IPSet]
    ip: tuple[IPRule, ...]
    app: dict[str, list[Any]] = field(default_factory=dict)


@dataclass
class _ViaGrant:
    """A grant steered through routers carrying one of ``tags``: per router."""

    tags: tuple[str, ...]
    src_ips: list[str]
    dsts: list[IPNetwork]
    internet: bool
    ip: tuple[IPRule, ...]


@dataclass
class _CompiledGrant:
    rules: list[_Rule] = field(default_factory=list)
    self_part: _SelfGrant | None = None
    via: _ViaGrant | None = None


# Capabilities that come with a reversed companion, sent to the sources
# (Tailscale: a drive grant makes the sources drive-sharers of the
# destinations; a relay grant makes them relay targets).
_COMPANION_CAPS = {
    "tailscale.com/cap/drive": "tailscale.com/cap/drive-sharer",
    "tailscale.com/cap/relay": "tailscale.com/cap/relay-target",
}


def _merge_rules(rules: Iterable[_Rule]) -> list[_Rule]:
    """Rules with equal SrcIPs and IPProto become one (headscale mergeFilterRules).

    Capability rules stay as they are.
    """
    out: dict[tuple[tuple[str, ...], tuple[int, ...]], _Rule] = {}
    caps: list[_Rule] = []
    for rule in rules:
        if rule.caps:
            caps.append(rule)
            continue
        key = rule.key()
        if key in out:
            out[key] = _Rule(out[key].src_ips, out[key].protos, out[key].dsts + rule.dsts)
        else:
            out[key] = _Rule(rule.src_ips, rule.protos, list(rule.dsts))
    return list(out.values()) + caps


@dataclass
class _Matcher:
    """Who may send (by IP or served subnet) to whom, for peer visibility."""

    srcs: set[int]
    dsts: set[int]


class CompiledPolicy:
    """A policy resolved against one tailnet snapshot; per-node views on demand.

    Results are cached and shared between calls: treat them as read-only
    (serialise them, do not edit them). A new snapshot (policy, user or node
    change) means a new CompiledPolicy; diffing old and new per-node results
    tells which nodes need a delta.
    """

    def __init__(
        self,
        policy: Policy | None,
        users: Sequence[PolicyUser],
        nodes: Sequence[PolicyNode],
        *,
        server_url: str = "",
        node_cache: dict[tuple[PolicyNode, int | None], _Node] | None = None,
    ) -> None:
        self.policy = policy
        self.server_url = server_url.rstrip("/")
        self._users = list(users)
        by_name = {u.name: u for u in users}
        self._nodes: dict[int, _Node] = {}
        # A node's resolved form depends only on itself and its owner: a caller that
        # compiles again and again (every join) passes a cache and pays for new nodes only.
        # `node_cache` is what the previous compile kept (its own `node_cache`).
        cache = {} if node_cache is None else node_cache
        self.node_cache: dict[tuple[PolicyNode, int | None], _Node] = {}
        for n in nodes:
            owner = None if n.is_tagged or n.user is None else by_name.get(n.user)
            key = (n, None if owner is None else owner.id)
            info = cache.get(key)
            if info is None:
                addrs = n.addresses()
                info = _Node(n, addrs, IPSet.of(addrs), n.subnet_routes(), n.is_exit_node(), key[1])
            self._nodes[n.id] = self.node_cache[key] = info
        self._by_user: dict[int, list[_Node]] = {}
        for info in self._nodes.values():
            if info.user_id is not None:
                self._by_user.setdefault(info.user_id, []).append(info)
        self._filters: dict[int, list[FilterRule]] = {}
        self._ssh: dict[int, list[dict[str, Any]]] = {}
        self._peers: dict[int, frozenset[int]] = {}
        # Nodes that send and receive on the same matchers see the same nodes: one set
        # for all of them (with allow-all, one set for the tailnet instead of N sets of N).
        self._reach: dict[tuple[tuple[int, ...], tuple[int, ...]], frozenset[int]] = {}
        self._reach_of: dict[int, frozenset[int]] = {}
        self._caps: dict[int, dict[str, list[Any] | None]] = {}
        self._via_cache: dict[int, dict[IPNetwork, list[int]]] = {}
        self._alias_cache: dict[Alias, IPSet] = {}
        # Keyed by id() of rules owned by self.policy, which outlives us.
        self._ssh_src_cache: dict[
            int, tuple[dict[int, list[dict[str, str]]], list[dict[str, str]]]
        ] = {}
        # No policy at all: headscale's FilterAllowAll. A policy without
        # acls and grants: Tailscale sends what {"src": ["*"], "dst": ["*:*"]}
        # compiles to (the tailnet ranges and approved subnets as sources),
        # as its captures show (ssh-acceptenv-omitted and others).
        self.allow_all = policy is None
        self._grants: list[_CompiledGrant] = []
        self._matchers: list[_Matcher] = []
        # The same matchers by address (headscale's matcher.Match), for route access.
        self._ip_matchers: list[tuple[IPSet, IPSet]] = []
        self._route_access: dict[tuple[int, str], bool] = {}
        # node -> the matchers it sends / receives on (absent: none).
        self._sends_on: dict[int, list[int]] = {}
        self._receives_on: dict[int, list[int]] = {}
        if not self.allow_all:
            assert policy is not None
            self._compile_grants(policy)
            self._compile_matchers()

    # -- alias resolution ---------------------------------------------------
    def _user_ids(self, token: str) -> set[int]:
        """Users a ``user@``/``user@domain`` token names: by email, else by name.

        headscale strips the trailing "@" and matches email or name; a
        token matching nobody resolves to no addresses (not an error: the
        user may simply not exist yet).
        """
        if token.startswith(IDP_GROUP_PREFIX):
            group = token[len(IDP_GROUP_PREFIX) :]
            return {u.id for u in self._users if group in u.groups}
        bare = token[:-1] if token.endswith("@") else token
        by_email = {u.id for u in self._users if u.email and u.email == bare}
        if by_email:
            return by_email
        return {u.id for u in self._users if u.name == bare}

    def _nodes_of_users(self, ids: set[int]) -> IPSet:
        return IPSet.of(a for uid in ids for n in self._by_user.get(uid, ()) for a in n.addrs)

    def resolve(self, alias: Alias) -> IPSet:
        """The addresses an alias stands for (autogroup:self resolves to none)."""
        cached = self._alias_cache.get(alias)
        if cached is not None:
            return cached
        kind = alias.kind
        if kind is AliasKind.WILDCARD:
            out = TAILNET | IPSet.of(self._approved_subnets())
        elif kind is AliasKind.USER:
            out = self._nodes_of_users(self._user_ids(alias.name))
        elif kind is AliasKind.GROUP:
            assert self.policy is not None
            ids: set[int] = set()
            for member in self.policy.groups.get(alias.name, ()):
                ids |= self._user_ids(member)
            out = self._nodes_of_users(ids)
        elif kind is AliasKind.TAG:
            out = IPSet.of(
                a for n in self._nodes.values() if alias.name in n.node.tags for a in n.addrs
            )
        elif kind is AliasKind.HOST:
            assert self.policy is not None
            net = self.policy.hosts.get(alias.name)
            out = EMPTY if net is None else IPSet.of([net])
        elif kind is AliasKind.PREFIX:
            assert alias.network is not None
            out = IPSet.of([alias.network])
        elif kind is AliasKind.IPSET:
            assert self.policy is not None
            out = self.policy.ipsets.get(alias.name, EMPTY)
        elif kind is AliasKind.USER_DOMAIN:
            domain = alias.name.rpartition("@")[2]
            out = self._nodes_of_users(
                {u.id for u in self._users if u.email.rpartition("@")[2] == domain}
            )
        elif alias.name == AUTOGROUP_MEMBER:
            out = IPSet.of(
                a for n in self._nodes.values() if n.user_id is not None for a in n.addrs
            )
        elif alias.name == AUTOGROUP_TAGGED:
            out = IPSet.of(a for n in self._nodes.values() if n.node.is_tagged for a in n.addrs)
        elif alias.name == AUTOGROUP_INTERNET:
            out = INTERNET
        elif alias.name == AUTOGROUP_DANGER_ALL:
            out = EVERYTHING
        else:  # autogroup:self is per node; autogroup:nonroot is an SSH user
            out = EMPTY
        self._alias_cache[alias] = out
        return out

    def _approved_subnets(self) -> list[IPNetwork]:
        """Approved non-exit routes of all nodes, each once, in node order.

        Tailscale counts them as part of "*" as a source and lists each route
        on its own in SrcIPs (10.33.0.0/16 next to the CGNAT ranges).
        """
        seen: dict[IPNetwork, None] = {}
        for n in self._nodes.values():
            for route in n.subnet_routes:
                seen.setdefault(route, None)
        return list(seen)

    # -- stage 1: grants -> rules --------------------------------------------
    def _compile_grants(self, policy: Policy) -> None:
        if not policy.has_network_rules:
            everyone = (Alias(AliasKind.WILDCARD, "*"),)
            self._grants.append(
                self._compile_grant(Grant(everyone, everyone, (IPRule((), (ALL_PORTS,)),)))
                or _CompiledGrant()
            )
            return
        grants: list[Grant] = list(policy.grants or ())
        for acl in policy.acls or ():
            grants.extend(_acl_to_grants(acl))
        for grant in grants:
            compiled = self._compile_grant(grant)
            if compiled is not None:
                self._grants.append(compiled)

    def _compile_grant(self, grant: Grant) -> _CompiledGrant | None:
        if not grant.src or not grant.dst:
            return None  # literally empty src/dst: no rules (Tailscale, headscale)
        srcs = [self.resolve(a) for a in grant.src]
        merged = EMPTY
        for s in srcs:
            merged |= s
        if not merged and not grant.app:
            return None
        # Sources matching nobody still give an app grant's CapGrant, with
        # empty SrcIPs (grant-h6).
        src_ips = self._src_strings(grant, srcs) if merged else []
        if grant.via:
            dsts: list[IPNetwork] = []
            for alias in grant.dst:
                if not alias.is_autogroup(AUTOGROUP_INTERNET):
                    dsts += self.resolve(alias).prefixes()
            internet = any(a.is_autogroup(AUTOGROUP_INTERNET) for a in grant.dst)
            return _CompiledGrant(via=_ViaGrant(grant.via, src_ips, dsts, internet, grant.ip))
        compiled = _CompiledGrant()
        others = [a for a in grant.dst if not a.is_autogroup(AUTOGROUP_SELF)]
        for ip in grant.ip:
            dst_entries: list[_DstEntry] = []
            for alias in others:
                if alias.kind is AliasKind.WILDCARD:
                    dst_entries += [
                        _DstEntry({"IP": "*", "Ports": p.wire()}, EVERYTHING) for p in ip.ports
                    ]
                    continue
                for net in self.resolve(alias).prefixes():
                    text = str(net.network_address) if net.num_addresses == 1 else str(net)
                    single = IPSet.of([net])
                    dst_entries += [
                        _DstEntry({"IP": text, "Ports": p.wire()}, single) for p in ip.ports
                    ]
            if dst_entries and src_ips:
                compiled.rules.append(_Rule(src_ips, ip.protos, dst_entries))
        if grant.app and others:
            # Companions go back to the sources' own nodes ("*": the tailnet).
            back = EMPTY
            for alias, resolved in zip(grant.src, srcs, strict=True):
                back |= TAILNET if alias.kind is AliasKind.WILDCARD else resolved
            compiled.rules += self._cap_rules(grant.app, src_ips, back, others)
        if len(others) != len(grant.dst):
            compiled.self_part = _SelfGrant(srcs, grant.ip, grant.app)
        return compiled

    def _cap_rules(
        self, app: dict[str, list[Any]], src_ips: list[str], srcs: IPSet, dsts: list[Alias]
    ) -> list[_Rule]:
        """An app grant: one CapGrant per destination, plus the reversed
        companion rules (drive-sharer, relay-target) the sources receive."""
        caps: list[_CapGrant] = []
        dst_ips = EMPTY
        for alias in dsts:
            # "*" grants capabilities on the tailnet's nodes, not on the
            # subnets routed into it (grant-a1: a router gets its own /32s).
            ips = TAILNET if alias.kind is AliasKind.WILDCARD else self.resolve(alias)
            caps.append(_CapGrant(ips.prefixes(), app))
            dst_ips |= ips
        rules = [_Rule(src_ips, (), [], caps)]
        companion_src = dst_ips.strings()
        if any(a.kind is AliasKind.WILDCARD for a in dsts):
            companion_src += [str(r) for r in self._approved_subnets()]
        for cap, companion in sorted(_COMPANION_CAPS.items()):
            if cap in app:
                rules.append(
                    _Rule(companion_src, (), [], [_CapGrant(srcs.prefixes(), {companion: None})])
                )
        return rules

    def _src_strings(self, grant: Grant, srcs: list[IPSet]) -> list[str]:
        """SrcIPs as Tailscale writes them for a grant's sources."""
        wildcard = any(a.kind is AliasKind.WILDCARD for a in grant.src)
        if any(a.is_autogroup(AUTOGROUP_DANGER_ALL) for a in grant.src):
            return ["*"]
        base = EMPTY
        for alias, resolved in zip(grant.src, srcs, strict=True):
            base |= TAILNET if alias.kind is AliasKind.WILDCARD else resolved
        src_ips = base.strings()
        if wildcard:
            src_ips += [str(r) for r in self._approved_subnets()]
            # With "*" Tailscale still lists the explicit sources' own
            # addresses next to the CGNAT ranges that contain them.
            for alias, resolved in zip(grant.src, srcs, strict=True):
                if alias.kind is not AliasKind.WILDCARD:
                    src_ips += [s for s in resolved.strings() if s not in src_ips]
        return src_ips

    def _self_rules(self, part: _SelfGrant, user_id: int) -> list[_Rule]:
        """autogroup:self for one user: that user's untagged devices only."""
        same = self._by_user.get(user_id, [])
        allowed = IPSet.of(
            a for n in same if any(s.contains_any(n.addrs) for s in part.srcs) for a in n.addrs
        )
        if not allowed:
            return []
        rules = []
        for ip in part.ip:
            dsts = [
                _DstEntry({"IP": str(addr), "Ports": p.wire()}, IPSet.of([addr]))
                for n in same
                for p in ip.ports
                for addr in n.addrs
            ]
            if dsts:
                rules.append(_Rule(allowed.strings(), ip.protos, dsts))
        if part.app and same:
            own = [ipaddress.ip_network(a) for n in same for a in n.addrs]
            rules.append(_Rule(allowed.strings(), (), [], [_CapGrant(own, part.app)]))
            for cap, companion in sorted(_COMPANION_CAPS.items()):
                if cap in part.app:
                    back = _CapGrant(allowed.prefixes(), {companion: None})
                    rules.append(_Rule(IPSet.of(own).strings(), (), [], [back]))
        return rules

    @staticmethod
    def _via_serves(via: _ViaGrant, info: _Node) -> list[IPNetwork]:
        """What a router serves of a via grant: nothing unless it carries a via tag."""
        if not any(t in info.node.tags for t in via.tags):
            return []
        nets = [d for d in via.dsts if any(d.overlaps(r) for r in info.subnet_routes)]
        if via.internet and info.is_exit:
            nets += INTERNET.prefixes()
        return nets

    def _via_rules(self, via: _ViaGrant, info: _Node) -> list[_Rule]:
        """A via grant on one router: rules for the destinations it serves."""
        nets = self._via_serves(via, info)
        rules = []
        for ip in via.ip:
            dsts = [
                _DstEntry({"IP": str(net), "Ports": p.wire()}, IPSet.of([net]))
                for net in nets
                for p in ip.ports
            ]
            if dsts:
                rules.append(_Rule(via.src_ips, ip.protos, dsts))
        return rules

    # -- stage 1: matchers for peer visibility ---------------------------------
    def _members(self, ips: IPSet, *, as_dst: bool) -> set[int]:
        """Nodes an address set covers: by IP or by an approved subnet route.

        As a destination an exit node also counts when the set is "the
        internet" (headscale Match.DestsIsTheInternet).
        """
        internet = as_dst and (
            ips.covers(ipaddress.ip_network("0.0.0.0/0"))
            or ips.covers(ipaddress.ip_network("::/0"))
            or INTERNET.issubset(ips)
        )
        return {
            nid
            for nid, n in self._nodes.items()
            if ips.contains_any(n.addrs)
            or ips.overlaps_any(n.subnet_routes)
            or (internet and n.is_exit)
        }

    def _add_matcher(self, src: IPSet, dst: IPSet, dst_nodes: set[int] | None = None) -> None:
        if dst:
            self._ip_matchers.append((src, dst))
        m = _Matcher(
            self._members(src, as_dst=False),
            self._members(dst, as_dst=True) if dst_nodes is None else dst_nodes,
        )
        if not m.srcs or not m.dsts:
            return
        idx = len(self._matchers)
        self._matchers.append(m)
        for nid in m.srcs:
            self._sends_on.setdefault(nid, []).append(idx)
        for nid in m.dsts:
            self._receives_on.setdefault(nid, []).append(idx)

    def _compile_matchers(self) -> None:
        for rule in _merge_rules(r for g in self._grants for r in g.rules):
            self._add_matcher(IPSet.of(rule.src_ips), rule.dst_ips())
        for g in self._grants:
            if g.self_part is not None:
                for uid in self._by_user:
                    for rule in self._self_rules(g.self_part, uid):
                        self._add_matcher(IPSet.of(rule.src_ips), rule.dst_ips())
            if g.via is not None:
                # Route steering: the sources see the via routers serving the
                # destinations, not every router advertising them.
                routers = {nid for nid, n in self._nodes.items() if self._via_serves(g.via, n)}
                if routers:
                    self._add_matcher(IPSet.of(g.via.src_ips), EMPTY, routers)

    # -- stage 2: per node ---------------------------------------------------
    def knows(self, node_id: int) -> bool:
        """Whether the node is in this snapshot."""
        return node_id in self._nodes

    def _info(self, node_id: int) -> _Node:
        try:
            return self._nodes[node_id]
        except KeyError:
            raise KeyError(f"node {node_id} is not in this tailnet snapshot") from None

    def filter_for(self, node_id: int) -> list[FilterRule]:
        """The PacketFilter for a node: only rules it is a destination of.

        Allow-all when the policy has neither ``acls`` nor ``grants``; an
        empty list means all inbound traffic is blocked.
        """
        if self.allow_all:
            self._info(node_id)
            return [dict(r) for r in ALLOW_ALL]
        cached = self._filters.get(node_id)
        if cached is not None:
            return cached
        info = self._info(node_id)
        rules: list[_Rule] = []
        for g in self._grants:
            rules += g.rules
            if g.self_part is not None and info.user_id is not None:
                rules += self._self_rules(g.self_part, info.user_id)
            if g.via is not None:
                rules += self._via_rules(g.via, info)
        out = []
        for rule in _merge_rules(rules):
            if rule.caps:
                caps = [c for c in (c.reduce(info) for c in rule.caps) if c is not None]
                if caps:
                    out.append(_Rule(rule.src_ips, (), [], caps).wire())
                continue
            kept = [d for d in rule.dsts if self._dst_applies(d.ips, info)]
            if kept:
                out.append(rule.wire(kept))
        self._filters[node_id] = out
        return out

    @staticmethod
    def _dst_applies(ips: IPSet, info: _Node) -> bool:
        """headscale policyutil.ReduceFilterRules for one destination."""
        if ips.contains_any(info.addrs) or ips.overlaps_any(info.subnet_routes):
            return True
        # Exit nodes forward to the internet, so they keep those rules.
        return info.is_exit and ips.issubset(INTERNET)

    def visible_peers(self, node_id: int) -> frozenset[int]:
        """Nodes this node sees: traffic may flow between them either way."""
        cached = self._peers.get(node_id)
        if cached is None:
            cached = self._peers[node_id] = self.reach(node_id) - {node_id}
        return cached

    def reach(self, node_id: int) -> frozenset[int]:
        """The node's peers, possibly with the node itself: one set shared by every node
        with the same matchers, so a caller that can skip the node itself (map sessions)
        holds one set per distinct view instead of one per node."""
        cached = self._reach_of.get(node_id)
        if cached is not None:
            return cached
        self._info(node_id)
        if self.allow_all:
            key: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())
        else:
            key = (
                tuple(self._sends_on.get(node_id, ())),
                tuple(self._receives_on.get(node_id, ())),
            )
        out = self._reach.get(key)
        if out is None:
            if self.allow_all:
                out = frozenset(self._nodes)
            else:
                seen: set[int] = set()
                for idx in key[0]:
                    seen |= self._matchers[idx].dsts
                for idx in key[1]:
                    seen |= self._matchers[idx].srcs
                out = frozenset(seen)
            self._reach[key] = out
        self._reach_of[node_id] = out
        return out

    def may_see(self, a: int, b: int) -> bool:
        """Whether a and b are peers of each other (symmetric)."""
        return a != b and b in self.visible_peers(a)

    # -- route reduction ---------------------------------------------------------
    def can_access_route(self, node_id: int, route: str) -> bool:
        """Whether the policy lets this node use a peer's route (headscale's
        CanAccessRoute, which ReduceRoutes applies to each peer's routes): it may send
        into the route or receive from it, itself or for the subnets it routes."""
        if self.allow_all:
            return True
        key = (node_id, route)
        known = self._route_access.get(key)
        if known is not None:
            return known
        info = self._info(node_id)
        net = ipaddress.ip_network(route, strict=False)
        subnets = info.subnet_routes
        ok = any(
            (src.contains_any(info.addrs) and dst.overlaps(net))
            or (src.overlaps(net) and dst.contains_any(info.addrs))
            or (subnets and src.overlaps_any(subnets) and dst.overlaps(net))
            or (subnets and src.overlaps(net) and dst.overlaps_any(subnets))
            for src, dst in self._ip_matchers
        )
        self._route_access[key] = ok
        return ok

    # -- route steering ----------------------------------------------------------
    @property
    def steers_routes(self) -> bool:
        """Whether any grant has ``via`` (route choice then depends on the viewer)."""
        return any(g.via is not None for g in self._grants)

    def via_routes(self, viewer_id: int) -> dict[IPNetwork, list[int]]:
        """Routes a via grant steers for this viewer: route -> the routers that
        should serve it to the viewer (lowest ID first, the HA order), in place
        of the tailnet-wide primary (via-grant-v37, -v44)."""
        cached = self._via_cache.get(viewer_id)
        if cached is not None:
            return cached
        info = self._info(viewer_id)
        out: dict[IPNetwork, list[int]] = {}
        for g in self._grants:
            via = g.via
            if via is None or not IPSet.of(via.src_ips).contains_any(info.addrs):
                continue
            for nid, router in sorted(self._nodes.items()):
                if nid == viewer_id:
                    continue
                for net in self._via_serves(via, router):
                    for route in router.subnet_routes:
                        if route in info.subnet_routes or not route.overlaps(net):
                            continue  # a router serves its own routes itself
                        if nid not in out.setdefault(route, []):
                            out[route].append(nid)
        # A plain grant to the same route from this viewer keeps the
        # tailnet-wide primary (via-grant-v43, -v45).
        plain = [
            r
            for g in self._grants
            for r in g.rules
            if not r.caps and IPSet.of(r.src_ips).contains_any(info.addrs)
        ]
        result = {
            route: routers
            for route, routers in out.items()
            if not any(d.ips.overlaps(route) for r in plain for d in r.dsts)
        }
        self._via_cache[viewer_id] = result
        return result

    # -- node attributes -------------------------------------------------------
    def cap_map(self, node_id: int) -> dict[str, list[Any] | None]:
        """The capabilities the policy gives a node (its own CapMap entries).

        ``nodeAttrs`` ``attr`` entries come with a null value (as Tailscale
        sends them), ``app`` entries with their JSON values; the top-level
        ``randomizeClientPort`` is the randomize-client-port attribute.
        The server adds its own defaults (is-admin, ssh, ...) around these.
        """
        cached = self._caps.get(node_id)
        if cached is not None:
            return cached
        info = self._info(node_id)
        out: dict[str, list[Any] | None] = {}
        policy = self.policy
        if policy is not None:
            if policy.randomize_client_port:
                out["randomize-client-port"] = None
            for attr in policy.node_attrs:
                target = EMPTY
                for alias in attr.target:
                    target |= self.resolve(alias)
                if not target.contains_any(info.addrs):
                    continue
                for name in attr.attr:
                    out.setdefault(name, None)
                for name, values in attr.app.items():
                    out[name] = [*(out.get(name) or []), *values]
        self._caps[node_id] = out
        return out

    def peer_cap_map(self, node_id: int) -> dict[str, list[Any] | None]:
        """The part of a node's CapMap its peers see: suggest-exit-node on
        every exit node (advertised and approved), so clients can suggest
        one. Tailscale's service sends it for every approved exit node,
        with or without the attribute (routes-ea1, nodeattrs-attr-c14)."""
        if self._info(node_id).is_exit:
            return {"suggest-exit-node": self.cap_map(node_id).get("suggest-exit-node")}
        return {}

    # -- SSH -----------------------------------------------------------------
    def ssh_for(self, node_id: int) -> list[dict[str, Any]]:
        """tailcfg SSHRule dicts for a node (as SSH destination), in order."""
        cached = self._ssh.get(node_id)
        if cached is not None:
            return cached
        info = self._info(node_id)
        rules: list[dict[str, Any]] = []
        for rule in self.policy.ssh if self.policy is not None else ():
            rules += self._ssh_rule_for(rule, info)
        # Check rules come before accept rules: Tailscale evaluates the most
        # restrictive first (ssh-f2: accept then check is sent check first).
        rules.sort(key=lambda r: "holdAndDelegate" not in r["action"])
        self._ssh[node_id] = rules
        return rules

    def ssh_check_period(self, src_id: int, dst_id: int) -> float | None:
        """Seconds a passed SSH check from `src` to `dst` stays valid, or None when no
        check rule covers the pair (headscale's SSHCheckParams: the first check rule
        whose sources hold src and whose destinations hold dst; no checkPeriod is
        12 h, "always" is 0). The wire always says 0: the server decides."""
        if self.policy is None or src_id not in self._nodes or dst_id not in self._nodes:
            return None
        src, dst = self._nodes[src_id], self._nodes[dst_id]
        for rule in self.policy.ssh:
            if rule.action != "check":
                continue
            sources = EMPTY
            for a in rule.src:
                sources |= self.resolve(a)
            if not sources.contains_any(src.addrs):
                continue
            for a in rule.dst:
                if a.is_autogroup(AUTOGROUP_SELF):
                    hit = src.user_id is not None and src.user_id == dst.user_id
                else:
                    hit = self.resolve(a).contains_any(dst.addrs)
                if hit:
                    if rule.check_period is None:
                        return SSH_CHECK_PERIOD_DEFAULT
                    if rule.check_period == "always":
                        return 0.0
                    return _go_duration_seconds(rule.check_period) or 0.0
        return None

    def _ssh_rule_for(self, rule: SSHRule, info: _Node) -> list[dict[str, Any]]:
        src = EMPTY
        for a in rule.src:
            src |= self.resolve(a)
        if not src:
            return []
        if rule.action == "check":
            action: dict[str, Any] = {"holdAndDelegate": self.server_url + _SSH_CHECK_PATH}
        else:
            action = dict(_SSH_ACCEPT)
        users: dict[str, str] = {}
        if AUTOGROUP_NONROOT in rule.users:
            users["*"] = "="
        users["root"] = "root" if "root" in rule.users else ""
        localparts = [u for u in rule.users if _localpart(u) is not None]
        for u in rule.users:
            if u not in ("root", AUTOGROUP_NONROOT) and u not in localparts:
                users[u] = u
        local_of: dict[int, str] = {}
        for entry in localparts:
            domain = _localpart(entry)
            for user in self._users:
                local, at, dom = user.email.rpartition("@")
                if at and domain is not None and dom.lower() == domain.lower():
                    local_of[user.id] = local

        principals, tagged = self._ssh_sources(rule, src)
        out: list[dict[str, Any]] = []

        def emit(who: list[dict[str, str]], uid: int | None) -> None:
            body: dict[str, Any] = {"principals": who, "sshUsers": dict(users), "action": action}
            if rule.accept_env:
                body["acceptEnv"] = list(rule.accept_env)
            out.append(body)
            if uid is not None and uid in local_of:
                lp = local_of[uid]
                extra: dict[str, Any] = {"principals": who, "sshUsers": {lp: lp}, "action": action}
                if rule.accept_env:
                    extra["acceptEnv"] = list(rule.accept_env)
                out.append(extra)

        if any(a.is_autogroup(AUTOGROUP_SELF) for a in rule.dst) and info.user_id is not None:
            if principals.get(info.user_id):
                emit(principals[info.user_id], info.user_id)
        others = [a for a in rule.dst if not a.is_autogroup(AUTOGROUP_SELF)]
        if not others:
            return out
        dst = EMPTY
        for a in others:
            dst |= self.resolve(a)
        if dst.contains_any(info.addrs):
            if localparts:
                # One rule (plus its localpart rule) per source user, by user
                # id: the first-match order Tailscale sends (ssh-d12).
                for uid in sorted(principals):
                    emit(principals[uid], uid)
                if tagged:
                    emit(tagged, None)
            else:
                everyone = [p for uid in sorted(principals) for p in principals[uid]] + tagged
                if everyone:
                    emit(everyone, None)
        elif localparts and src.contains_any(info.addrs):
            # A source device outside the destinations still gets its own
            # user's rules when localpart users are in play (ssh-f5).
            if info.node.is_tagged:
                emit([{"nodeIP": str(a)} for a in info.addrs], None)
            elif info.user_id is not None and principals.get(info.user_id):
                emit(principals[info.user_id], info.user_id)
        return out

    def _ssh_sources(
        self, rule: SSHRule, src: IPSet
    ) -> tuple[dict[int, list[dict[str, str]]], list[dict[str, str]]]:
        """A rule's source devices grouped by owner; the same for every node.

        A tagged device appears once per tag: Tailscale expands
        autogroup:tagged through tag membership lists, so a device with two
        tags is listed twice (ssh-b6).
        """
        cached = self._ssh_src_cache.get(id(rule))
        if cached is not None:
            return cached
        per_user: dict[int, IPSet] = {}
        tagged: list[dict[str, str]] = []
        for n in self._nodes.values():
            if not src.contains_any(n.addrs):
                continue
            if n.node.is_tagged:
                tagged += [{"nodeIP": str(a)} for _ in n.node.tags for a in n.addrs]
            elif n.user_id is not None:
                per_user[n.user_id] = per_user.get(n.user_id, EMPTY) | n.ips
        principals = {
            uid: [{"nodeIP": str(a)} for a in s.addresses()] for uid, s in per_user.items()
        }
        self._ssh_src_cache[id(rule)] = (principals, tagged)
        return principals, tagged

    # -- tag ownership ---------------------------------------------------------
    def user_owns_tag(self, user_id: int, tag: str) -> bool:
        """Whether tagOwners let this user's own devices take `tag` (a login's
        --advertise-tags; headscale NodeCanHaveTag for a node being registered)."""
        if self.policy is None:
            return False
        for owner in self.policy.tag_owners.get(tag, ()):
            if owner.kind is AliasKind.USER and user_id in self._user_ids(owner.name):
                return True
            if owner.kind is AliasKind.GROUP and any(
                user_id in self._user_ids(m) for m in self.policy.groups.get(owner.name, ())
            ):
                return True
            if owner.kind is AliasKind.USER_DOMAIN:
                domain = owner.name.rpartition("@")[2]
                if any(
                    u.id == user_id and u.email.rpartition("@")[2] == domain for u in self._users
                ):
                    return True
            if owner.is_autogroup(AUTOGROUP_MEMBER):
                return True
        return False

    # -- auto approval ---------------------------------------------------------
    def _approver_nodes(self, approvers: Iterable[Alias]) -> set[int]:
        ips = EMPTY
        for a in approvers:
            ips |= self.resolve(a)
        return {nid for nid, n in self._nodes.items() if ips.contains_any(n.addrs)}

    @property
    def has_auto_approvers(self) -> bool:
        aa = self.policy.auto_approvers if self.policy is not None else None
        return aa is not None and bool(aa.exit_node or aa.routes)

    def same_filters(self, other: CompiledPolicy) -> bool:
        """Whether a node unchanged between `other` and this snapshot has the same filter
        here: the same resolved rules, and none that depend on other nodes per viewer
        (autogroup:self, via)."""
        if self.allow_all or other.allow_all:
            return self.allow_all and other.allow_all
        return (
            self.policy is other.policy
            and not any(g.self_part is not None or g.via is not None for g in self._grants)
            and self._grants == other._grants
        )

    def same_node(self, other: CompiledPolicy, node_id: int) -> bool:
        """Whether the node resolved to the same form in `other` (its cached results may
        carry over when `same_filters`)."""
        mine = self._nodes.get(node_id)
        return mine is not None and other._nodes.get(node_id) is mine

    def can_auto_approve(self, node_id: int, route: str) -> bool:
        """Whether autoApprovers let this node's advertised route in unreviewed.

        Exit routes (0.0.0.0/0, ::/0) need ``exitNode``; a subnet route needs
        a ``routes`` entry that contains it (headscale NodeCanApproveRoute).
        """
        self._info(node_id)
        if self.policy is None:
            return False
        net = ipaddress.ip_network(route, strict=False)
        aa = self.policy.auto_approvers
        if net.prefixlen == 0:
            return node_id in self._approver_nodes(aa.exit_node)
        return any(
            net.version == prefix.version
            and net.subnet_of(prefix)  # type: ignore[arg-type]
            and node_id in self._approver_nodes(approvers)
            for prefix, approvers in aa.routes.items()
        )


def _localpart(user: str) -> str | None:
    if not user.startswith("localpart:"):
        return None
    local, at, domain = user[len("localpart:") :].rpartition("@")
    return domain if at and local == "*" and domain else None


def _acl_to_grants(acl: ACL) -> list[Grant]:
    """One grant per ACL destination (headscale aclToGrants).

    The order is kept except that, when the ACL names anything but
    autogroups, autogroup:self destinations go last (Tailscale's order).
    """

    def grant(dst: Destination) -> Grant:
        return Grant(acl.src, (dst.alias,), (IPRule(acl.protos, dst.ports),), acl.where)

    dsts = list(acl.dst)
    if any(d.alias.kind is not AliasKind.AUTOGROUP for d in dsts):
        dsts.sort(key=lambda d: d.alias.is_autogroup(AUTOGROUP_SELF))
    return [grant(d) for d in dsts]


def compile_policy(
    policy: Policy | None,
    users: Sequence[PolicyUser],
    nodes: Sequence[PolicyNode],
    *,
    server_url: str = "",
    node_cache: dict[tuple[PolicyNode, int | None], _Node] | None = None,
) -> CompiledPolicy:
    """Resolve a policy (None = allow all) against the tailnet snapshot.

    ``server_url`` prefixes the SSH "check" callback URL.
    """
    return CompiledPolicy(policy, users, nodes, server_url=server_url, node_cache=node_cache)
