"""The live tailnet: nodes, users and policy in memory, turning each change into deltas.

Every change arrives through `apply` (typed changes from `appliance.changes`): the
node's JSON is encoded once, and only the sessions of nodes that can see it are
marked; their tasks compose their own (coalesced) messages. Nothing here rebuilds
every node's map, and nothing here waits on a client.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import json
import logging
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, assert_never

import trio

from netmap.dns import dns_config
from netmap.mapsession import PATCH_HISTORY, MapSessionState, NodeEntry
from netmap.nodes import (
    AUTO_UPDATE_CAP,
    EXIT_ROUTES,
    FILE_SHARING_CAP,
    PeerNode,
    cap_pairs,
    encode_node,
    patch_between,
)
from netmap.policy import CompiledPolicy, PolicyNode, PolicyUser, compile_policy, parse_policy

from .boundary import Boundary
from .changes import (
    Change,
    NodeChanged,
    NodeOnline,
    NodeRemoved,
    PolicyChanged,
    UserChanged,
    UserRemoved,
)
from .config import Config
from .quarantine import RowProblem, node_row_problems
from .store import NodeRow, Store, UserRow, utcnow

TAGGED_USER_ID = 2147455555  # headscale's TaggedDevices pseudo-user


@dataclass(frozen=True)
class Quarantined:
    """A stored node the tailnet does not serve, and why (see appliance.quarantine)."""

    row: NodeRow
    problems: tuple[RowProblem, ...]


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


@dataclass
class Tailnet:
    config: Config
    log: logging.Logger
    nodes: dict[int, NodeRow] = field(default_factory=dict)
    users: dict[int, UserRow] = field(default_factory=dict)
    peers: dict[int, PeerNode] = field(default_factory=dict)
    entries: dict[int, NodeEntry] = field(default_factory=dict)
    sessions: dict[int, SessionHandle] = field(default_factory=dict)
    online: set[int] = field(default_factory=set)
    policy_text: str | None = None
    compiled: CompiledPolicy | None = None
    derp_map: tuple[int, bytes] = (0, b"null")
    dns: tuple[int, bytes] = (0, b"null")
    _visible: dict[int, frozenset[int]] = field(default_factory=dict)
    _filters: dict[int, bytes] = field(default_factory=dict)
    _ssh: dict[int, bytes | None] = field(default_factory=dict)
    auto_approved: dict[int, tuple[str, ...]] = field(default_factory=dict)
    by_node_key: dict[str, int] = field(default_factory=dict)  # for DERP's verify_clients
    primaries: dict[str, int] = field(default_factory=dict)  # subnet route -> primary router
    unhealthy: set[int] = field(default_factory=set)  # routers that missed an HA probe
    # A router's last reduced encoding (appliance.tailnet._routes_for_viewer).
    _reduced: dict[int, tuple[int, dict[Hashable, bytes]]] = field(default_factory=dict)
    quarantined: dict[int, Quarantined] = field(default_factory=dict)  # rows not served
    # Told every change after it is applied (the web console's live updates); must not block.
    observers: list[Callable[[Change], None]] = field(default_factory=list)
    boundary: Boundary = field(default=None)  # type: ignore[assignment]  # set in __post_init__

    def __post_init__(self) -> None:
        if self.boundary is None:
            self.boundary = Boundary(self.log)

    # ------------------------------------------------------------ loading

    def load(self, users: list[UserRow], nodes: list[NodeRow], policy_text: str | None) -> None:
        """Start from the store. A row that cannot be served is quarantined with a warning
        naming node and field (issue 9: one bad row must not keep the server down)."""
        self.users = {u.id: u for u in users}
        servable = [n for n in nodes if not self._quarantine_if_bad(n)]
        self.nodes = {n.id: n for n in servable}
        self.by_node_key = {n.node_key: n.id for n in servable}
        for n in servable:
            self._encode(n)
        self.policy_text = policy_text
        try:
            self._recompile()
        except Exception:
            # Fields all valid, yet the policy does not compile: find the rows it fails on.
            for n in self._rows_the_policy_refuses():
                self._drop(n.id)
            self._recompile()
        self.set_dns()

    def _quarantine_if_bad(self, row: NodeRow) -> bool:
        problems = node_row_problems(row)
        if problems:
            self._quarantine(row, problems)
        return bool(problems)

    def _quarantine(self, row: NodeRow, problems: list[RowProblem]) -> None:
        self.quarantined[row.id] = Quarantined(row, tuple(problems))
        for p in problems:
            self.log.warning(
                "quarantined %s; the node is not served until repaired (homescale doctor --fix)", p
            )

    def _rows_the_policy_refuses(self) -> list[NodeRow]:
        """(start only) The nodes the policy fails to compile with, each quarantined."""
        refused = []
        for n in self.nodes.values():
            refusal = self._policy_refusal(n)
            if refusal is not None:
                self._quarantine(n, [refusal])
                refused.append(n)
        return refused

    def _policy_refusal(self, row: NodeRow) -> RowProblem | None:
        """Why the policy does not compile with this node alone (None: it does). Raises
        when it does not compile without any node either: then the policy is at fault."""
        policy = parse_policy(self.policy_text, "policy") if self.policy_text else None
        users = [PolicyUser(id=u.id, name=u.name, email=u.email) for u in self.users.values()]
        compile_policy(policy, users, [], server_url=self.config.server_url)
        try:
            compile_policy(
                policy, users, [self._policy_node(row)], server_url=self.config.server_url
            )
        except Exception as e:
            why = f"the policy does not compile with this node: {e}"
            return RowProblem(row.id, row.given_name, "policy", "", why)
        return None

    def _drop(self, node_id: int) -> None:
        row = self.nodes.pop(node_id)
        self.by_node_key.pop(row.node_key, None)
        self.peers.pop(node_id, None)
        self.entries.pop(node_id, None)
        self.online.discard(node_id)

    def quarantine_of(self, node_key: str) -> Quarantined | None:
        """The quarantine record of the node with this key, if it is quarantined."""
        return next((q for q in self.quarantined.values() if q.row.node_key == node_key), None)

    def set_extra_records(self, file_records: list[dict[str, str]]) -> None:
        """dns.extra_records_path changed: its records replace the file's old ones, and
        every node gets the new DNSConfig (a delta)."""
        d = self.config.dns
        self.config = dataclasses.replace(
            self.config, dns=dataclasses.replace(d, extra_records=d.config_records + file_records)
        )
        self.set_dns()

    def set_dns(self) -> None:
        d = self.config.dns
        prefixes = [str(p) for p in (self.config.prefix_v4, self.config.prefix_v6) if p]
        cfg = dns_config(
            magic_dns=d.magic_dns,
            base_domain=d.base_domain,
            override_local_dns=d.override_local_dns,
            nameservers=d.nameservers_global,
            split=d.nameservers_split,
            search_domains=d.search_domains,
            extra_records=d.extra_records,
            prefixes=prefixes,
        )
        self.dns = (self.dns[0] + 1, json.dumps(cfg, separators=(",", ":")).encode())
        self._wake_all()

    def set_derp_map(self, derp_map: dict[str, Any]) -> None:
        self.derp_map = (self.derp_map[0] + 1, json.dumps(derp_map, separators=(",", ":")).encode())
        self._wake_all()

    # ------------------------------------------------------------ TailnetView (for sessions)

    def entry(self, node_id: int) -> NodeEntry | None:
        return self.entries.get(node_id)

    def in_policy(self, node_id: int) -> bool:
        """Whether the compiled policy holds the node (known and, if need be, approved)."""
        return self.compiled is not None and self.compiled.knows(node_id)

    def visible_peers(self, node_id: int) -> frozenset[int]:
        v = self._visible.get(node_id)
        if v is None:
            v = (
                self.compiled.visible_peers(node_id)
                if self.compiled and self.in_policy(node_id)
                else frozenset()
            )
            self._visible[node_id] = v
        return v

    def filter_json(self, node_id: int) -> bytes:
        f = self._filters.get(node_id)
        if f is None:
            rules = (
                self.compiled.filter_for(node_id)
                if self.compiled and self.in_policy(node_id)
                else []
            )
            f = json.dumps(rules, separators=(",", ":")).encode()
            self._filters[node_id] = f
        return f

    def ssh_json(self, node_id: int) -> bytes | None:
        if node_id not in self._ssh:
            rules = (
                self.compiled.ssh_for(node_id) if self.compiled and self.in_policy(node_id) else []
            )
            self._ssh[node_id] = (
                json.dumps({"rules": rules}, separators=(",", ":")).encode() if rules else None
            )
        return self._ssh[node_id]

    def user_profile(self, user_id: int) -> dict[str, Any] | None:
        if user_id == TAGGED_USER_ID:
            return {
                "ID": TAGGED_USER_ID,
                "LoginName": "tagged-devices",
                "DisplayName": "Tagged Devices",
            }
        u = self.users.get(user_id)
        if u is None:
            return None
        profile = {
            "ID": u.id,
            "LoginName": u.email or u.name,
            "DisplayName": u.display_name or u.name,
        }
        if u.profile_pic_url:
            profile["ProfilePicURL"] = u.profile_pic_url
        return profile

    def derp_map_json(self) -> tuple[int, bytes]:
        return self.derp_map

    def dns_json(self) -> tuple[int, bytes]:
        return self.dns

    # ------------------------------------------------------------ node conversion

    def _served(self, n: NodeRow) -> list[str]:
        """Routes the node advertises and has approved (by an admin or autoApprovers); one
        approved exit route approves both (as headscale: rows approved before, imported)."""
        approved = {*n.approved_routes, *self.auto_approved.get(n.id, ())}
        if approved & set(EXIT_ROUTES):
            approved |= set(EXIT_ROUTES)
        return [r for r in _advertised(n) if r in approved]

    def _elect_primaries(self) -> None:
        """One primary router per subnet, as headscale's electPrimaryRoutes: the current
        primary while it is up (online, answering probes: no flapping back), else the
        lowest-ID router that is up; with none up, the current one or the lowest ID.
        Re-encode the routers whose primary routes changed (HA failover)."""

        def up(nid: int) -> bool:
            return nid in self.online and nid not in self.unhealthy

        candidates: dict[str, list[int]] = {}
        for nid in sorted(self.nodes):
            for r in self._served(self.nodes[nid]):
                if r not in EXIT_ROUTES:  # every exit node offers them; no election
                    candidates.setdefault(r, []).append(nid)
        elected: dict[str, int] = {}
        for r, ids in candidates.items():
            cur = self.primaries.get(r)
            if cur in ids and up(cur):
                elected[r] = cur
                continue
            first_up = next((n for n in ids if up(n)), None)
            elected[r] = first_up if first_up is not None else (cur if cur in ids else ids[0])
        moved = {
            nid
            for r in elected.keys() | self.primaries.keys()
            if elected.get(r) != self.primaries.get(r)
            for nid in (elected.get(r), self.primaries.get(r))
            if nid is not None
        }
        self.primaries = elected
        for nid in moved:
            row = self.nodes.get(nid)
            if row is not None and self._encode(row):
                self._mark_peer(self.visible_peers(nid), nid)

    def ha_routers(self) -> set[int]:
        """Online routers sharing a subnet route with another router (the ones to probe)."""
        serving: dict[str, list[int]] = {}
        for nid, row in self.nodes.items():
            for r in self._served(row):
                if r not in EXIT_ROUTES:
                    serving.setdefault(r, []).append(nid)
        return {n for ids in serving.values() if len(ids) > 1 for n in ids if n in self.online}

    def set_router_health(self, node_id: int, healthy: bool) -> None:
        """A probe's verdict: an unhealthy router is passed over in the election (it does
        not take its routes back when it answers again, unless it is the only one)."""
        if healthy == (node_id not in self.unhealthy):
            return
        if healthy:
            self.unhealthy.discard(node_id)
        else:
            self.unhealthy.add(node_id)
        self._elect_primaries()

    def send_ping(self, node_id: int, ping: dict[str, Any]) -> SessionHandle | None:
        """Send the node a tailcfg.PingRequest with its next message; its session (None:
        not connected)."""
        session = self.sessions.get(node_id)
        if session is not None:
            session.state.ping = json.dumps(ping, separators=(",", ":")).encode()
            session.notify()
        return session

    def _is_router(self, n: NodeRow) -> bool:
        return bool(self._served(n)) or n.id in self.primaries.values()

    def _peer_node(self, n: NodeRow) -> PeerNode:
        served = self._served(n)
        netinfo = n.hostinfo.get("NetInfo") or {}
        return PeerNode(
            id=n.id,
            given_name=n.given_name,
            user_id=TAGGED_USER_ID if n.tags else (n.user_id or TAGGED_USER_ID),
            node_key=n.node_key,
            machine_key=n.machine_key,
            disco_key=n.disco_key,
            tags=tuple(n.tags),
            ipv4=n.ipv4,
            ipv6=n.ipv6,
            endpoints=tuple(n.endpoints),
            hostinfo=n.hostinfo,
            home_derp=int(netinfo.get("PreferredDERP") or 0),
            created=n.created_at,
            key_expiry=n.expiry,
            last_seen=n.last_seen,
            online=n.id in self.online,
            primary_routes=tuple(r for r in served if self.primaries.get(r) == n.id),
            exit_routes=tuple(r for r in served if r in EXIT_ROUTES),
            served_routes=tuple(r for r in served if r not in EXIT_ROUTES),
            self_caps=self._policy_caps(n.id, self_view=True),
            peer_caps=self._policy_caps(n.id, self_view=False),
            authorized=n.approved,
        )

    def _policy_caps(self, node_id: int, *, self_view: bool) -> tuple[tuple[str, str], ...]:
        """The node's CapMap entries from the policy (nodeAttrs), in its own or peers' view."""
        c = self.compiled
        base: dict[str, Any] = {FILE_SHARING_CAP: []} if self.config.taildrop_enabled else {}
        if self.config.auto_update_enabled:
            base[AUTO_UPDATE_CAP] = [True]  # over the baseline's [False]
        if c is None or not c.knows(node_id):
            return cap_pairs(base)
        return cap_pairs({**base, **(c.cap_map(node_id) if self_view else c.peer_cap_map(node_id))})

    def _policy_node(self, n: NodeRow) -> PolicyNode:
        return policy_node(n, self.users, self.auto_approved.get(n.id, ()))

    def _encode(self, n: NodeRow) -> bool:
        """Encode the node if what peers see of it changed; False when nothing did."""
        old = self.peers.get(n.id)
        new = self._peer_node(n)
        if old == new and n.id in self.entries:
            # A write that changed nothing peers see (a second stream marking the node
            # online again, a re-login with the same key): no version, so no empty patch.
            return False
        self.peers[n.id] = new
        prev = self.entries.get(n.id)
        version = prev.version + 1 if prev else 1
        patches = dict(prev.patches) if prev else {}
        patch = patch_between(old, new) if old is not None else None
        if patch is not None:
            patches[version] = patch
        else:
            patches = {}
        for v in [v for v in patches if v <= version - PATCH_HISTORY]:
            del patches[v]
        self.entries[n.id] = NodeEntry(
            id=n.id,
            user_id=new.user_id,
            version=version,
            json=encode_node(new, self.config.dns.base_domain),
            visible_to_peers=new.has_disco,
            patches=patches,
            self_json=(
                encode_node(new, self.config.dns.base_domain, self_view=True)
                if new.self_caps != new.peer_caps
                else None
            ),
            for_viewer=(
                functools.partial(self._routes_for_viewer, n.id)
                if new.primary_routes or new.exit_routes or new.served_routes
                else None
            ),
        )
        return True

    def _routes_for_viewer(self, router_id: int, viewer_id: int) -> tuple[Hashable, bytes]:
        """The router as `viewer_id` gets it: only the routes the viewer's policy lets it
        use (headscale's ReduceRoutes); the exit routes stay a pair (a client needs both).
        Viewers with the same routes share one encoding."""
        peer, entry = self.peers[router_id], self.entries[router_id]
        c = self.compiled
        if c is None or not c.knows(viewer_id):
            return (), entry.json
        primary = tuple(r for r in peer.primary_routes if c.can_access_route(viewer_id, r))
        steered = self._steered_routes(viewer_id)
        if steered:
            # via grants: the route goes through the router picked for this viewer.
            primary = tuple(r for r in primary if steered.get(r, router_id) == router_id)
            primary += tuple(
                r for r in peer.served_routes if steered.get(r) == router_id and r not in primary
            )
        exits = peer.exit_routes
        if exits and not any(c.can_access_route(viewer_id, r) for r in exits):
            exits = ()
        if primary == peer.primary_routes and exits == peer.exit_routes:
            return (), entry.json
        primary = tuple(sorted(primary, key=lambda r: ipaddress.ip_network(r, strict=False)))
        version, variants = self._reduced.get(router_id, (entry.version, {}))
        if version != entry.version:
            variants = {}
        data = variants.get((primary, exits))
        if data is None:
            reduced = dataclasses.replace(peer, primary_routes=primary, exit_routes=exits)
            data = variants[(primary, exits)] = encode_node(reduced, self.config.dns.base_domain)
        self._reduced[router_id] = (entry.version, variants)
        return (primary, exits), data

    def _steered_routes(self, viewer_id: int) -> dict[str, int]:
        """Subnet route -> the router a via grant sends this viewer through: the first
        online of the via-tagged routers serving it, else the first (HA order)."""
        c = self.compiled
        if c is None or not c.knows(viewer_id):
            return {}
        out = {}
        for route, routers in c.via_routes(viewer_id).items():
            online = [r for r in routers if r in self.online]
            out[str(route)] = (online or routers)[0]
        return out

    # ------------------------------------------------------------ changes

    def apply(self, changes: Iterable[Change]) -> None:
        """Announce committed changes to every session they affect: the one way in.

        Each change is applied on its own: one that fails (a bug, a row the policy cannot
        place) is logged with the change and skipped, and the rest still reach clients.
        """
        for change in changes:
            with self.boundary.guard("change", str(change)):
                self._apply(change)
            for observe in self.observers:
                with self.boundary.guard("change observer", str(change)):
                    observe(change)

    def _apply(self, change: Change) -> None:
        match change:
            case NodeChanged(row=row):
                self._node_changed(row.id, row)
            case NodeRemoved(node_id=node_id):
                self._node_changed(node_id, None)
            case NodeOnline(node_id=node_id, online=online, last_seen=last_seen):
                self._set_online(node_id, online, last_seen)
            case UserChanged(row=row):
                self._users_changed({**self.users, row.id: row})
            case UserRemoved(user_id=user_id):
                self._users_changed({k: u for k, u in self.users.items() if k != user_id})
            case PolicyChanged(text=text):
                self._set_policy(text)
            case _:
                assert_never(change)

    def _node_changed(self, node_id: int, row: NodeRow | None) -> None:
        """The node's stored record changed (None: deleted); tell whoever can see it."""
        if row is None:
            self.quarantined.pop(node_id, None)
        elif self._quarantine_if_bad(row):
            self._node_removed(node_id, "quarantined: its stored record cannot be served")
            return
        elif self.quarantined.pop(node_id, None) is not None:
            self.log.info("node %d (%s) is served again", node_id, row.given_name)
        if row is None:
            self._node_removed(node_id, "node deleted", last_words=True)
            return
        try:
            self._node_stored(node_id, row)
        except Exception:
            refusal = self._policy_refusal(row)
            if refusal is None:
                raise  # not the row's fault: a bug, for the boundary to report
            # Its values are valid, yet the policy cannot place it: hide it, serve the rest.
            self._quarantine(row, [refusal])
            self._node_removed(node_id, "quarantined: the policy cannot place it")

    def _node_removed(self, node_id: int, reason: str, *, last_words: bool = False) -> None:
        """The node leaves the tailnet (deleted, or quarantined); its watchers are told."""
        if node_id not in self.nodes:
            return
        watchers = self.visible_peers(node_id)
        peer = self.peers.get(node_id)
        self._drop(node_id)
        session = self.sessions.pop(node_id, None)
        if session is not None:
            # Tell a deleted node's client before hanging up: its own node with an expired
            # key sends it to NeedsLogin, instead of polling on with a stale netmap.
            expired = None
            if peer is not None and last_words:
                gone = dataclasses.replace(peer, key_expiry=utcnow())
                expired = b'{"Node":' + encode_node(gone, self.config.dns.base_domain) + b"}"
            session.close(reason, expired)
        self._recompile()
        self._mark_peer(watchers, node_id)

    def _node_stored(self, node_id: int, row: NodeRow) -> None:
        old_row = self.nodes.get(node_id)
        self.nodes[node_id] = row
        if old_row is not None and old_row.node_key != row.node_key:
            self.by_node_key.pop(old_row.node_key, None)
        self.by_node_key[row.node_key] = node_id
        changed = self._encode(row)
        if (
            old_row is None
            or old_row.approved != row.approved
            or self._policy_node(old_row) != self._policy_node(row)
        ):
            # Membership, tags, addresses or routes changed: the policy resolves differently.
            before = self.visible_peers(node_id) if old_row is not None else frozenset()
            self._recompile()
            affected = before | self.visible_peers(node_id) | {node_id}
            # Only these can have a different view now: a node's filter admits the node only
            # if traffic may flow between them, and then they see each other (before or after).
            for nid in affected:
                s = self.sessions.get(nid)
                if s is not None:
                    s.state.mark_visibility()
                    s.state.mark_peer(node_id)
                    s.notify()
            own = self.sessions.get(node_id)
            if own is not None:
                own.state.mark_all()  # which routers' routes it may use can change too
        elif changed:
            self._mark_peer(self.visible_peers(node_id), node_id)
        else:
            return
        if self._is_router(row) or (old_row is not None and self._is_router(old_row)):
            self._elect_primaries()
        session = self.sessions.get(node_id)
        if session is not None:
            session.state.mark_self()
            session.notify()

    def _set_online(self, node_id: int, online: bool, last_seen: datetime | None) -> None:
        row = self.nodes.get(node_id)
        if row is None:
            return
        if online:
            self.online.add(node_id)
        else:
            self.online.discard(node_id)
            self.unhealthy.discard(node_id)  # a new session starts trusted
        if last_seen is not None:
            row = dataclasses.replace(row, last_seen=last_seen)
        self._node_changed(node_id, row)
        served = set(self._served(row)) - set(EXIT_ROUTES)
        if served and self.compiled is not None and self.compiled.steers_routes:
            # A via router came or went: the viewers it serves may switch to another
            # router of the same routes (HA), so those are re-checked too.
            for other in self.nodes.values():
                if other.id != node_id and served & set(self._served(other)):
                    self._mark_peer(self.visible_peers(other.id), other.id)

    def _users_changed(self, users: dict[int, UserRow]) -> None:
        if users == self.users:
            return
        self.users = users
        for s in self.sessions.values():
            s.state.sent_users.clear()  # resend profiles: names may have changed
        self._recompile()
        self._mark_all_sessions()

    def _set_policy(self, text: str | None) -> None:
        self.policy_text = text
        self._recompile()
        self._mark_all_sessions()

    def _recompile(self) -> None:
        policy = parse_policy(self.policy_text, "policy") if self.policy_text else None
        users = [
            PolicyUser(id=u.id, name=u.name, email=u.email, groups=tuple(u.groups))
            for u in self.users.values()
        ]
        before = self.auto_approved
        self.auto_approved = {}
        nodes = [self._policy_node(n) for n in self.nodes.values() if n.approved]
        compiled = compile_policy(policy, users, nodes, server_url=self.config.server_url)
        # autoApprovers: advertised routes the policy approves count as approved. They
        # change what others may reach, so compile once more when there are any.
        for n in self.nodes.values():
            if not n.approved:
                continue
            pending = [
                r
                for r in _advertised(n)
                if r not in n.approved_routes and compiled.can_auto_approve(n.id, r)
            ]
            if pending:
                self.auto_approved[n.id] = tuple(pending)
        if self.auto_approved:
            nodes = [self._policy_node(n) for n in self.nodes.values() if n.approved]
            compiled = compile_policy(policy, users, nodes, server_url=self.config.server_url)
        # Re-encode the nodes whose auto-approved routes changed either way: a revoked
        # approval must leave their AllowedIPs/PrimaryRoutes too.
        for nid in before.keys() | self.auto_approved.keys():
            if before.get(nid) != self.auto_approved.get(nid) and nid in self.nodes:
                self._encode(self.nodes[nid])
        self.compiled = compiled
        self._elect_primaries()
        self._visible.clear()
        self._filters.clear()
        self._ssh.clear()
        # nodeAttrs may have changed what a node's CapMap holds: it and its peers hear.
        for n in list(self.nodes.values()):
            if self._encode(n):
                self._mark_peer(self.visible_peers(n.id) | {n.id}, n.id)

    def _mark_peer(self, watchers: frozenset[int] | set[int], node_id: int) -> None:
        for w in watchers:
            s = self.sessions.get(w)
            if s is not None:
                s.state.mark_peer(node_id)
                s.notify()

    def _mark_all_sessions(self) -> None:
        for s in self.sessions.values():
            s.state.mark_all()
            s.notify()

    def _wake_all(self) -> None:
        for s in self.sessions.values():
            s.state.mark_self()
            s.notify()

    # ------------------------------------------------------------ sessions

    def open_session(self, node_id: int) -> SessionHandle:
        """A new map stream for the node; it replaces (closes) the previous one."""
        old = self.sessions.get(node_id)
        if old is not None:
            old.close("replaced by a new map stream")
        state = MapSessionState(
            node_id=node_id,
            domain=self.config.dns.base_domain,
            disable_logtail=not self.config.logtail_enabled,
        )
        handle = SessionHandle(node_id, state)
        self.sessions[node_id] = handle
        return handle

    def close_session(self, handle: SessionHandle) -> bool:
        """Forget the session; True if it was the node's current one (the node goes offline)."""
        if self.sessions.get(handle.node_id) is handle:
            del self.sessions[handle.node_id]
            return True
        return False


def _advertised(n: NodeRow) -> list[str]:
    return [str(r) for r in (n.hostinfo.get("RoutableIPs") or [])]


def policy_node(
    n: NodeRow, users: dict[int, UserRow], auto_approved: tuple[str, ...] = ()
) -> PolicyNode:
    """A node as the policy sees it: tagged nodes are owned by their tags, not a user."""
    owner = users.get(n.user_id) if n.user_id is not None and not n.tags else None
    return PolicyNode(
        id=n.id,
        hostname=n.given_name,
        user=owner.name if owner else None,
        tags=tuple(n.tags),
        ipv4=n.ipv4,
        ipv6=n.ipv6,
        routable_ips=tuple(_advertised(n)),
        approved_routes=(*n.approved_routes, *auto_approved),
    )


def node_is_expired(row: NodeRow, now: datetime | None = None) -> bool:
    return row.expiry is not None and row.expiry <= (now or utcnow())


def offline_tailnet(config: Config, store: Store) -> Tailnet:
    """The tailnet the stored state makes, with nobody online (for the CLI without a
    server: the routes, approvals and elections a starting server would have)."""
    from .policies import read_policy

    tn = Tailnet(config=config, log=logging.getLogger("homescale.tailnet.offline"))
    tn.load(store.users(), store.nodes(), read_policy(config, store)[0])
    return tn
