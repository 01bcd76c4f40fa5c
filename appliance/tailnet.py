"""The live tailnet: nodes, users and policy in memory, turning each change into deltas.

Every change arrives through `apply` (typed changes from `appliance.changes`); the
coordinator decides who is affected and delegates the rest: `PolicyState` (the
policy, parsed once, compiled per membership), `NodeEntries` (each node encoded
once per change, with versions and patches), `netmap.routes` (served routes and
primary routers, pure) and `SessionRegistry` (the live map streams, marked and
woken). Nothing here rebuilds every node's map, and nothing here waits on a client.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import json
import logging
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, assert_never

from netmap.dns import dns_config
from netmap.mapsession import FirstMapCache, NodeEntry, SharedDeltas
from netmap.nodes import AUTO_UPDATE_CAP, FILE_SHARING_CAP, PeerNode
from netmap.policy import CompiledPolicy
from netmap.routes import (
    EXIT_ROUTES,
    elect_primaries,
    routers_moved,
    served_routes,
    subnet_routers,
)

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
from .nodeentries import NodeEntries
from .policystate import PolicyState, advertised, advertised_any
from .quarantine import RowProblem, node_row_problems
from .sessions import SessionHandle, SessionRegistry
from .store import NodeRow, Store, UserRow, utcnow
from .users import TAGGED_USER_ID, tagged_devices_profile


@dataclass(frozen=True)
class Quarantined:
    """A stored node the tailnet does not serve, and why (see appliance.quarantine)."""

    row: NodeRow
    problems: tuple[RowProblem, ...]


class Tailnet:
    """The coordinator: what the store holds, in memory, and who must hear of a change."""

    def __init__(
        self, *, config: Config, log: logging.Logger, boundary: Boundary | None = None
    ) -> None:
        self.config = config
        self.log = log
        self.boundary = boundary or Boundary(log)
        self.nodes: dict[int, NodeRow] = {}  # the nodes served (quarantined ones are not)
        self.users: dict[int, UserRow] = {}
        self.online: set[int] = set()  # nodes with an open map stream
        self.by_node_key: dict[str, int] = {}  # map requests and DERP's verify_clients
        self.primaries: dict[str, int] = {}  # subnet route -> primary router
        self.unhealthy: set[int] = set()  # routers that missed an HA probe
        self.quarantined: dict[int, Quarantined] = {}
        self.policy = PolicyState(config.server_url, base_caps=_config_caps(config))
        self.entries = NodeEntries(config.dns.base_domain)
        self.sessions = SessionRegistry(
            domain=config.dns.base_domain, disable_logtail=not config.logtail_enabled
        )
        self.derp_map: tuple[int, bytes] = (0, b"null")
        self.dns: tuple[int, bytes] = (0, b"null")
        # A router's last reduced encodings (`_routes_for_viewer`): version, variant -> JSON.
        self._reduced: dict[int, tuple[int, dict[Hashable, bytes]]] = {}
        # Told every change after it is applied (the web console's live updates); must not block.
        self.observers: list[Callable[[Change], None]] = []
        # Nodes whose place in the policy changed (joined, tags, routes, approval) since the
        # policy was last compiled, with the peers each had before: `settle` compiles once
        # for all of them. The server defers settling (`defer_settle`, woken through
        # `on_stale`) so that a burst of joins costs one compile, not one per join; reads
        # of the policy settle first, so nobody sees a stale view.
        self._moved: list[tuple[int, frozenset[int]]] = []
        self._stale = False
        self.defer_settle = False
        self.on_stale: Callable[[], None] | None = None

    @property
    def policy_text(self) -> str | None:
        return self.policy.text

    @property
    def compiled(self) -> CompiledPolicy | None:
        self.settle()
        return self.policy.compiled

    @property
    def peers(self) -> dict[int, PeerNode]:
        """What peers see of each node (read-only; `NodeEntries` keeps it)."""
        return self.entries.peers

    @property
    def auto_approved(self) -> dict[int, tuple[str, ...]]:
        """node -> the advertised routes the policy's autoApprovers approve (read-only)."""
        self.settle()
        return self.policy.auto_approved

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
        self.policy.set_text(policy_text)
        try:
            self._recompile()
        except Exception:
            # Fields all valid, yet the policy does not compile: find the rows it fails on.
            for n in list(self.nodes.values()):
                refusal = self.policy.refusal(n, self.users)
                if refusal is not None:
                    self._quarantine(n, [refusal])
                    self._drop(n.id)
            self._recompile()
        self.set_dns()

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
        self.sessions.wake_all()

    def set_derp_map(self, derp_map: dict[str, Any]) -> None:
        self.derp_map = (self.derp_map[0] + 1, json.dumps(derp_map, separators=(",", ":")).encode())
        self.sessions.wake_all()

    # ------------------------------------------------------------ quarantine

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

    def quarantine_of(self, node_key: str) -> Quarantined | None:
        """The quarantine record of the node with this key, if it is quarantined."""
        return next((q for q in self.quarantined.values() if q.row.node_key == node_key), None)

    # ------------------------------------------------------------ TailnetView (for sessions)

    def entry(self, node_id: int) -> NodeEntry | None:
        return self.entries.get(node_id)

    def in_policy(self, node_id: int) -> bool:
        self.settle()
        return self.policy.knows(node_id)

    def visible_peers(self, node_id: int) -> frozenset[int]:
        """The node's peers, possibly with the node itself (one set shared by every node
        with the same view; `PolicyState.visible_peers`)."""
        self.settle()
        return self.policy.visible_peers(node_id)

    def filter_json(self, node_id: int) -> bytes:
        self.settle()
        return self.policy.filter_json(node_id)

    def ssh_json(self, node_id: int) -> bytes | None:
        self.settle()
        return self.policy.ssh_json(node_id)

    def user_profile(self, user_id: int) -> dict[str, Any] | None:
        if user_id == TAGGED_USER_ID:
            return tagged_devices_profile()
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

    def routers(self) -> set[int]:
        return self.entries.routers

    def first_maps(self) -> FirstMapCache:
        return self.entries.first_maps

    def shared_deltas(self) -> SharedDeltas:
        return self.entries.deltas

    def derp_map_json(self) -> tuple[int, bytes]:
        return self.derp_map

    def dns_json(self) -> tuple[int, bytes]:
        return self.dns

    # ------------------------------------------------------------ node conversion

    def _served(self, n: NodeRow) -> list[str]:
        """Routes the node advertises and has approved (by an admin or autoApprovers)."""
        return served_routes(
            advertised(n), (*n.approved_routes, *self.policy.auto_approved.get(n.id, ()))
        )

    def _elect_primaries(self) -> None:
        """One primary router per subnet, as headscale elects it (netmap.routes); re-encode
        the routers whose primary routes changed (HA failover)."""
        elected = elect_primaries(
            # Only nodes that advertise routes can serve any (one pass, no route parsing).
            {nid: self._served(n) for nid, n in self.nodes.items() if advertised_any(n)},
            up=self.online - self.unhealthy,
            current=self.primaries,
        )
        moved = routers_moved(self.primaries, elected)
        self.primaries = elected
        for nid in moved:
            row = self.nodes.get(nid)
            if row is not None and self._encode(row):
                self.sessions.mark_peer(self.visible_peers(nid), nid)

    def ha_routers(self) -> set[int]:
        """Online routers sharing a subnet route with another router (the ones to probe)."""
        serving = subnet_routers({nid: self._served(n) for nid, n in self.nodes.items()})
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
            self_caps=self.policy.caps(n.id, self_view=True),
            peer_caps=self.policy.caps(n.id, self_view=False),
            authorized=n.approved,
        )

    def _encode(self, n: NodeRow) -> bool:
        """Encode the node if what peers see of it changed; False when nothing did."""
        peer = self._peer_node(n)
        router = peer.primary_routes or peer.exit_routes or peer.served_routes
        for_viewer = functools.partial(self._routes_for_viewer, n.id) if router else None
        return self.entries.update(peer, for_viewer=for_viewer)

    def _routes_for_viewer(self, router_id: int, viewer_id: int) -> tuple[Hashable, bytes]:
        """The router as `viewer_id` gets it: only the routes the viewer's policy lets it
        use (headscale's ReduceRoutes); the exit routes stay a pair (a client needs both).
        Viewers with the same routes share one encoding."""
        peer, entry = self.entries.peers[router_id], self.entries.get(router_id)
        assert entry is not None
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
            data = variants[(primary, exits)] = self.entries.encode(reduced)
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

        Each change is applied inside the fault boundary: one that fails (a bug) is
        logged with the change and counted, and the rest still reach clients.
        """
        for change in changes:
            with self.boundary.guard("change", str(change)):
                self._apply(change)
            for observe in self.observers:
                with self.boundary.guard("change observer", str(change)):
                    observe(change)
        if not self.defer_settle:
            self.settle()

    @property
    def stale(self) -> bool:
        """Whether nodes moved since the policy was last compiled (`settle` is due)."""
        return self._stale

    def settle(self) -> None:
        """Compile the policy for the nodes that moved since the last compile and tell
        whom it concerns: each moved node's peers before and after hear of it (only pairs
        with a moved node can see each other differently; one pass over the sessions per
        distinct view, not per node), and each moved node re-checks everything."""
        while self._stale:
            self._stale = False
            moved, self._moved = self._moved, []
            with self.boundary.guard("policy compile", f"{len(moved)} moved nodes") as g:
                self._recompile()
            if g.cause is not None:
                # Its values are valid, yet the policy cannot place a node: hide those,
                # serve the rest (and compile again without them).
                self._refuse_unplaceable([nid for nid, _ in moved])
                self._moved.extend(m for m in moved if m[0] in self.nodes)
                if self._moved and not self._stale:
                    return  # no node is at fault: the error is logged, the old view stays
                continue
            groups: dict[tuple[int, int], tuple[frozenset[int], frozenset[int], list[int]]] = {}
            for nid, before in moved:
                if nid not in self.nodes:
                    continue
                after = self.policy.visible_peers(nid)
                group = groups.setdefault((id(before), id(after)), (before, after, []))
                group[2].append(nid)
            for before, after, nids in groups.values():
                self.sessions.mark_peers(before | after | set(nids), nids)
                for nid in nids:
                    self.sessions.mark_all(only=nid)

    def _refuse_unplaceable(self, node_ids: list[int]) -> None:
        for nid in node_ids:
            row = self.nodes.get(nid)
            refusal = self.policy.refusal(row, self.users) if row is not None else None
            if row is not None and refusal is not None:
                self._quarantine(row, [refusal])
                self._node_removed(nid, "quarantined: the policy cannot place it")

    def _mark_stale(self, node_id: int | None = None, before: frozenset[int] = frozenset()) -> None:
        if node_id is not None:
            self._moved.append((node_id, before))
        if not self._stale:
            self._stale = True
            if self.defer_settle and self.on_stale is not None:
                self.on_stale()

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
            self._node_removed(node_id, "node deleted", last_words=True)
            return
        if self._quarantine_if_bad(row):
            self._node_removed(node_id, "quarantined: its stored record cannot be served")
            return
        if self.quarantined.pop(node_id, None) is not None:
            self.log.info("node %d (%s) is served again", node_id, row.given_name)
        self._node_stored(node_id, row)

    def _drop(self, node_id: int) -> PeerNode | None:
        row = self.nodes.pop(node_id)
        self.by_node_key.pop(row.node_key, None)
        self.online.discard(node_id)
        return self.entries.remove(node_id)

    def _node_removed(self, node_id: int, reason: str, *, last_words: bool = False) -> None:
        """The node leaves the tailnet (deleted, or quarantined); its watchers are told."""
        if node_id not in self.nodes:
            return
        watchers = self.visible_peers(node_id)
        peer = self._drop(node_id)
        # A deleted node's client hears that its key expired before the stream ends.
        words = self.entries.expired_message(peer, utcnow()) if peer and last_words else None
        self.sessions.hang_up(node_id, reason, words)
        self._mark_stale()
        self.sessions.mark_peer(watchers, node_id)

    def _node_stored(self, node_id: int, row: NodeRow) -> None:
        old_row = self.nodes.get(node_id)
        # Membership, tags, addresses or routes changed: the policy resolves differently.
        moved = (
            old_row is None
            or old_row.approved != row.approved
            or self.policy.node(old_row, self.users) != self.policy.node(row, self.users)
        )
        # Whom it saw before, from the settled policy (before the row changes).
        before = self.visible_peers(node_id) if moved and old_row is not None else _NOBODY
        self.nodes[node_id] = row
        if old_row is not None and old_row.node_key != row.node_key:
            self.by_node_key.pop(old_row.node_key, None)
        self.by_node_key[row.node_key] = node_id
        changed = self._encode(row)
        if moved:
            self._mark_stale(node_id, before)  # `settle` tells its peers, old and new
        elif changed:
            # Its peers as last compiled, without settling (which would compile per join
            # again): a peer that moved since hears of this node when it is settled
            # (each moved node re-checks every peer then).
            self.sessions.mark_peer(self.policy.visible_peers(node_id), node_id)
        else:
            return
        if self._is_router(row) or (old_row is not None and self._is_router(old_row)):
            self._elect_primaries()
        self.sessions.mark_self(node_id)

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
                    self.sessions.mark_peer(self.visible_peers(other.id), other.id)

    def _users_changed(self, users: dict[int, UserRow]) -> None:
        if users == self.users:
            return
        self.users = users
        self._recompile()
        self.sessions.mark_all(resend_profiles=True)

    def _set_policy(self, text: str | None) -> None:
        self.policy.set_text(text)
        self._recompile()
        self.sessions.mark_all()

    def _recompile(self) -> None:
        """Compile the policy against the current nodes and re-encode what it changed."""
        before = self.policy.compiled
        # Re-encode the nodes whose auto-approved routes changed either way: a revoked
        # approval must leave their AllowedIPs/PrimaryRoutes too.
        for nid in self.policy.compile(self.users, self.nodes):
            if nid in self.nodes and self._encode(self.nodes[nid]):
                self.sessions.mark_peer(self.policy.visible_peers(nid) | {nid}, nid)
        self._elect_primaries()
        # nodeAttrs may have changed what a node's CapMap holds: it and its peers hear.
        # Only when the old or new policy gives capabilities at all, and comparing the
        # CapMap before encoding: a join must not re-encode every node (1,000 nodes:
        # ~450 ms instead of ~200 ms per join in tests/bench_netmap.py).
        if not _gives_caps(before, self.policy.compiled):
            return
        for n in list(self.nodes.values()):
            old = self.peers.get(n.id)
            now = (self.policy.caps(n.id, self_view=True), self.policy.caps(n.id, self_view=False))
            if old is not None and (old.self_caps, old.peer_caps) == now:
                continue
            if self._encode(n):
                self.sessions.mark_peer(self.visible_peers(n.id) | {n.id}, n.id)


_NOBODY: frozenset[int] = frozenset()


def _gives_caps(*compiled: CompiledPolicy | None) -> bool:
    """Whether any of these policies puts capabilities in a CapMap (nodeAttrs,
    randomizeClientPort)."""
    return any(
        c is not None
        and c.policy is not None
        and bool(c.policy.node_attrs or c.policy.randomize_client_port)
        for c in compiled
    )


def _config_caps(config: Config) -> dict[str, Any]:
    """CapMap entries every node gets from the config, under the policy's nodeAttrs."""
    base: dict[str, Any] = {FILE_SHARING_CAP: []} if config.taildrop_enabled else {}
    if config.auto_update_enabled:
        base[AUTO_UPDATE_CAP] = [True]  # over the baseline's [False]
    return base


def node_is_expired(row: NodeRow, now: datetime | None = None) -> bool:
    return row.expiry is not None and row.expiry <= (now or utcnow())


def offline_tailnet(config: Config, store: Store) -> Tailnet:
    """The tailnet the stored state makes, with nobody online (for the CLI without a
    server: the routes, approvals and elections a starting server would have)."""
    from .policies import read_policy

    tn = Tailnet(config=config, log=logging.getLogger("homescale.tailnet.offline"))
    tn.load(store.users(), store.nodes(), read_policy(config, store)[0])
    return tn
