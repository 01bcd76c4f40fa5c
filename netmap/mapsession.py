"""What one map stream has told its client, and the smallest message that brings it up to date.

Pure computation: the coordinator marks what changed (`mark_peer`, `mark_self`, ...)
and calls `next_message` when the session is ready to send. Pending marks coalesce,
so a slow client gets one message covering many changes instead of a queue of them.
Each peer's state is tracked by version: a peer whose changes since the client's
version are all patchable goes out as a PeersChangedPatch, anything else as the full
node (encoded once by the coordinator, spliced here).
"""

from __future__ import annotations

import functools
import itertools
import json
from array import array
from collections.abc import Callable, Collection, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from protocol.gojson import format_time
from protocol.mapframe import Segmented

PATCH_HISTORY = 16  # versions of patches kept per node; older clients get the full node
# A first map with this many peers goes out as pieces of the peers with ids in one span
# of PIECE_SPAN (protocol.mapframe.Segmented), each compressed once for every map.
SEGMENT_MIN_PEERS = 128
PIECE_SPAN = 64
NO_SSH_RULES = b'{"rules":[]}'


@dataclass
class NodeEntry:
    """One node's current state in the coordinator: version, encoded JSON, recent patches."""

    id: int
    user_id: int
    version: int
    json: bytes
    visible_to_peers: bool  # has a disco key: magicsock skips peers without one
    patches: dict[int, dict[str, Any]] = field(
        default_factory=dict
    )  # version -> patch from version-1
    # Which life of the node this is (a deleted node's id may come back with version 1
    # again): id, life and version name these exact bytes (first-map pieces are cached).
    life: int = 0
    # The node as it sees itself (its own policy CapMap); None: same as json.
    self_json: bytes | None = None
    # A router's JSON as one viewer gets it, with the routes that viewer may use
    # (headscale's ReduceRoutes): (variant key, json); None: `json` for everyone.
    for_viewer: Callable[[int], tuple[Hashable, bytes]] | None = None
    # version sent -> the PeersChangedPatch entry (JSON) that brings it to `version`:
    # every session that is as far behind sends the same bytes (a storm's thousands of
    # Online patches, to thousands of sessions, were each encoded per session).
    patch_json: dict[int, bytes | None] = field(default_factory=dict, repr=False, compare=False)

    def patch_from(self, have: int) -> bytes | None:
        """The patch entry from version `have` (b"": nothing a client sees changed; None:
        not patchable, send the node)."""
        if have in self.patch_json:
            return self.patch_json[have]
        patch = _merge_patches(self, have)
        out: bytes | None = None
        if patch is not None:
            patch.pop("NodeID", None)
            # Empty: only unpatchable detail changed (NetInfo latencies).
            out = _j({"NodeID": self.id, **patch}) if patch else b""
        self.patch_json[have] = out
        return out


class TailnetView(Protocol):
    """What a session reads from the coordinator (all cheap lookups)."""

    def entry(self, node_id: int) -> NodeEntry | None: ...
    def visible_peers(self, node_id: int) -> frozenset[int]: ...
    def filter_json(self, node_id: int) -> bytes: ...
    def ssh_json(self, node_id: int) -> bytes | None: ...
    def user_profile(self, user_id: int) -> dict[str, Any] | None: ...
    def routers(self) -> Collection[int]: ...
    def first_maps(self) -> FirstMapCache: ...
    def shared_deltas(self) -> SharedDeltas: ...
    def derp_map_json(self) -> tuple[int, bytes]: ...
    def dns_json(self) -> tuple[int, bytes]: ...


def _merge_patches(entry: NodeEntry, from_version: int) -> dict[str, Any] | None:
    merged: dict[str, Any] = {}
    for v in range(from_version + 1, entry.version + 1):
        p = entry.patches.get(v)
        if p is None:
            return None
        merged.update(p)
    return merged


class PeerVersions:
    """peer id -> the version a session sent, 4 bytes per id.

    Every session holds one entry per peer: as a dict that was ~50 bytes each, 1.2 GB
    for 5,000 sessions of 5,000 peers. Node ids are small dense integers, so an array
    indexed by id (0: not sent; versions start at 1) holds the same in a tenth; an id
    or version too big for it goes to a dict.

    Sessions in step hold equal arrays, so they share one (`share`, `adopt`), copied on
    the next write: a session taking a shared delta then costs no per-peer work. The
    array's length is a power of two, so equal contents have equal lengths.
    """

    __slots__ = ("_dense", "_shared", "_sparse")
    DENSE_IDS = 1 << 20
    MAX_VERSION = 0xFFFFFFFF
    MIN_LENGTH = 64

    def __init__(self) -> None:
        self._dense = array("I")
        self._sparse: dict[int, int] = {}
        self._shared = False  # _dense may be held by other sessions: copy before writing

    def get(self, pid: int) -> int | None:
        if 0 <= pid < len(self._dense) and self._dense[pid]:
            return self._dense[pid]
        return self._sparse.get(pid)

    def __contains__(self, pid: int) -> bool:
        return self.get(pid) is not None

    def _writable(self, end: int) -> array[int]:
        """The array, owned by this session and long enough for ids below `end`."""
        if self._shared:
            self._dense = array("I", self._dense)
            self._shared = False
        if end > len(self._dense):
            size = max(self.MIN_LENGTH, 1 << (end - 1).bit_length())
            self._dense.frombytes(bytes((size - len(self._dense)) * self._dense.itemsize))
        return self._dense

    def __setitem__(self, pid: int, version: int) -> None:
        if 0 <= pid < self.DENSE_IDS and 0 < version <= self.MAX_VERSION:
            self._writable(pid + 1)[pid] = version
            self._sparse.pop(pid, None)
        else:
            del self[pid]
            self._sparse[pid] = version

    def set_span(self, first: int, versions: array[int]) -> None:
        """Set the ids from `first` on to `versions` (0: not sent) at C speed: a first map
        sets thousands at once."""
        end = first + len(versions)
        self._writable(end)[first:end] = versions

    def __delitem__(self, pid: int) -> None:
        if 0 <= pid < len(self._dense) and self._dense[pid]:
            self._writable(0)[pid] = 0
        self._sparse.pop(pid, None)

    def share(self) -> array[int] | None:
        """The versions as an array other sessions may adopt (None: some are not in it)."""
        if self._sparse:
            return None
        self._shared = True
        return self._dense

    def same(self, dense: array[int]) -> bool:
        """Whether these are exactly the versions in `dense` (shared, or equal)."""
        return not self._sparse and (self._dense is dense or self._dense == dense)

    def adopt(self, dense: array[int]) -> None:
        """Hold the versions in `dense`, shared with the session that made them."""
        self._dense = dense
        self._shared = True
        self._sparse.clear()

    def __iter__(self) -> Iterator[int]:
        yield from (pid for pid, v in enumerate(self._dense) if v)
        yield from self._sparse

    def __len__(self) -> int:
        return len(self._dense) - self._dense.count(0) + len(self._sparse)


@dataclass
class _Span:
    """One span of peer ids as a first map lists them for one peer set."""

    visible: frozenset[int]
    generation: int
    key: int  # names `json` for MapFrameEncoder's piece cache
    json: bytes  # the peers' JSON, comma-separated
    versions: array[int]  # the version of each id of the span (0: not listed)
    users: frozenset[int]
    # `json` after a comma, as every span but a map's first is sent: made once, not
    # copied per first map (a storm would copy each span once per node).
    after_comma: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.after_comma = b"," + self.json

    def piece(self, lead: bool) -> tuple[Hashable, bytes]:
        """This span as a Segmented piece, keyed for MapFrameEncoder's piece cache."""
        return ((b",", self.key), self.after_comma) if lead else ((b"", self.key), self.json)


class FirstMapCache:
    """The peers of first maps, by span of PIECE_SPAN ids, shared by every first map
    with the same peer set: a first map then costs a lookup per span instead of work per
    peer (a 5,000-node storm is 5,000 first maps of 5,000 peers). A span is valid while
    none of its nodes changed (`changed`, called by the coordinator on every change);
    spans holding a router (JSON per viewer) or the viewer itself are not kept."""

    MAX_SPANS = 4096

    def __init__(self) -> None:
        self._generations: dict[int, int] = {}
        self._tokens = itertools.count(1)
        self._spans: dict[int, _Span] = {}
        self._layout: tuple[frozenset[int], list[tuple[int, list[int]]]] | None = None

    def changed(self, node_id: int) -> None:
        self._generations[node_id // PIECE_SPAN] = next(self._tokens)

    def layout(self, visible: frozenset[int]) -> list[tuple[int, list[int]]]:
        """`visible` as (span, its ids in order) in order; kept for the last peer set."""
        if self._layout is None or self._layout[0] is not visible:
            spans: dict[int, list[int]] = {}
            for pid in sorted(visible):
                spans.setdefault(pid // PIECE_SPAN, []).append(pid)
            self._layout = (visible, sorted(spans.items()))
        return self._layout[1]

    def get(self, span: int, visible: frozenset[int]) -> _Span | None:
        hit = self._spans.get(span)
        if hit is None or hit.visible is not visible:
            return None
        return hit if hit.generation == self._generations.get(span, 0) else None

    def put(
        self,
        span: int,
        visible: frozenset[int],
        json: bytes,
        sent: list[tuple[int, int]],
        users: frozenset[int],
    ) -> _Span:
        if len(self._spans) >= self.MAX_SPANS:
            self._spans.clear()
        versions = array("I", bytes(4 * PIECE_SPAN))
        for pid, version in sent:
            versions[pid - span * PIECE_SPAN] = version
        gen = self._generations.get(span, 0)
        entry = _Span(visible, gen, next(self._tokens), json, versions, users)
        self._spans[span] = entry
        return entry


@dataclass(frozen=True)
class LogRead:
    """What a session with nothing else pending read of the shared change log
    (`SessionRegistry`): the range, and the node ids in it. They are marked only if the
    session composes its own delta; one taking a shared delta never needs them as a set."""

    start: int
    end: int
    ids: Sequence[int]


@dataclass(frozen=True)
class _Delta:
    """A delta one session composed for a range of the shared change log, with what it
    assumed of the session: another session may send the same bytes if it had sent
    exactly the versions in `before` (then it holds `after`), already has the profiles
    of `users`, and is not itself among `peers` (the range's node ids)."""

    message: bytes | None
    before: array[int]
    after: array[int]
    peers: frozenset[int]
    users: frozenset[int]


class SharedDeltas:
    """Deltas for ranges of the shared change log (`SessionRegistry`), composed once for
    every session that reads the same range with the same peer set: in a churn of 50
    endpoint changes a second, 5,000 sessions composed the same message each, checking
    every changed peer in Python (a third of the server's CPU). Valid until any node
    changes (`changed`, called by the coordinator with every change, as FirstMapCache)."""

    MAX = 64
    # Deltas kept per range: a session that differs (one that fell behind, one that had
    # just reconnected) composes its own and must not push out what the rest share.
    PER_KEY = 4

    def __init__(self) -> None:
        self._deltas: dict[Hashable, list[_Delta]] = {}

    def changed(self) -> None:
        self._deltas.clear()

    def get(self, key: Hashable) -> list[_Delta]:
        return self._deltas.get(key, [])

    def put(self, key: Hashable, delta: _Delta) -> None:
        kept = self._deltas.get(key)
        if kept is None:
            if len(self._deltas) >= self.MAX:
                self._deltas.clear()
            self._deltas[key] = [delta]
        elif len(kept) < self.PER_KEY:
            kept.append(delta)
        else:
            kept[-1] = delta


_NOT_SHARED = object()


@dataclass
class MapSessionState:
    """The client's view as this session sent it, plus what is pending."""

    node_id: int
    domain: str
    disable_logtail: bool = True
    sent_peers: PeerVersions = field(default_factory=PeerVersions)  # peer id -> version sent
    sent_self: int = -1
    sent_filter: bytes | None = None
    sent_ssh: bytes | None = None
    sent_derp: int = -1
    sent_dns: int = -1
    sent_users: set[int] = field(default_factory=set)
    sent_variants: dict[int, Hashable] = field(default_factory=dict)  # router id -> variant
    pending_peers: set[int] = field(default_factory=set)
    pending_all: bool = True  # re-check every peer (first map, policy change)
    pending_self: bool = True
    started: bool = False
    # The peer set at the last message: a re-check of everything (a policy edit) that
    # finds it unchanged re-checks only routers (whose routes per viewer the policy
    # decides) and the peers marked, not every peer (O(N) per session).
    synced_visible: frozenset[int] | None = None
    log_seen: int = 0  # how far this session read SessionRegistry's shared change log
    ping: bytes | None = None  # a tailcfg.PingRequest to send with the next message

    # -- marks (called by the coordinator; cheap, never blocking)

    def mark_peers(self, peer_ids: Iterable[int]) -> None:
        self.pending_peers.update(peer_ids)

    def mark_all(self) -> None:
        self.pending_all = True

    def mark_self(self) -> None:
        self.pending_self = True

    # -- composing

    def _shared_delta(
        self, view: TailnetView, key: Hashable, visible: frozenset[int]
    ) -> bytes | object | None:
        """The delta another session composed for `key`, if it fits this session (it had
        sent the same versions, and nothing else is due); else _NOT_SHARED."""
        deltas = view.shared_deltas().get(key)
        if not deltas or self.ping is not None:
            return _NOT_SHARED
        me = view.entry(self.node_id)
        nid = self.node_id
        if (
            me is None
            or me.version != self.sent_self
            or view.filter_json(nid) != self.sent_filter
            or view.ssh_json(nid) != self.sent_ssh
            or view.derp_map_json()[0] != self.sent_derp
            or view.dns_json()[0] != self.sent_dns
        ):
            return _NOT_SHARED
        sent = self.sent_peers
        for delta in deltas:
            if (
                nid not in delta.peers
                and delta.users <= self.sent_users
                and sent.same(delta.before)
            ):
                break
        else:
            return _NOT_SHARED
        if self.sent_variants:
            for pid in delta.peers:
                if delta.before[pid] != delta.after[pid]:
                    self.sent_variants.pop(pid, None)
        sent.adopt(delta.after)
        self.pending_peers.clear()
        self.synced_visible = visible
        return delta.message

    def _first_peers(
        self, view: TailnetView, visible: frozenset[int], new_users: set[int]
    ) -> list[tuple[Hashable, bytes]]:
        """A first map's peers as pieces, one per span of ids, from the shared
        FirstMapCache where it holds the span (it never holds this node's own span or a
        router's, whose JSON depends on the viewer)."""
        cache = view.first_maps()
        own = self.node_id // PIECE_SPAN
        pieces: list[tuple[Hashable, bytes]] = []
        for span, pids in cache.layout(visible):
            hit = cache.get(span, visible) if span != own else None
            if hit is None:
                jsons: list[bytes] = []
                sent: list[tuple[int, int]] = []
                users: set[int] = set()
                viewer_bound = span == own
                for pid in pids:
                    entry = view.entry(pid)
                    if entry is None or not entry.visible_to_peers:
                        continue
                    if pid == self.node_id:  # kept as the others keep it, never sent
                        self.sent_peers[pid] = entry.version
                        continue
                    users.add(entry.user_id)
                    if entry.for_viewer is not None:
                        variant_key, json_bytes = entry.for_viewer(self.node_id)
                        self.sent_variants[pid] = variant_key
                        viewer_bound = True
                    else:
                        json_bytes = entry.json
                    jsons.append(json_bytes)
                    sent.append((pid, entry.version))
                    # Kept as an array of the span's versions: ids and versions must fit.
                    viewer_bound |= not (
                        pid < PeerVersions.DENSE_IDS and entry.version <= PeerVersions.MAX_VERSION
                    )
                if not jsons:
                    continue
                joined = b",".join(jsons)
                if viewer_bound:
                    for pid, version in sent:
                        self.sent_peers[pid] = version
                    new_users |= users
                    pieces.append((None, b"," + joined if pieces else joined))
                    continue
                hit = cache.put(span, visible, joined, sent, frozenset(users))
            self.sent_peers.set_span(span * PIECE_SPAN, hit.versions)
            new_users |= hit.users
            pieces.append(hit.piece(lead=bool(pieces)))
        return pieces

    def next_message(
        self, view: TailnetView, now: datetime, log: LogRead | None = None
    ) -> bytes | Segmented | None:
        """The JSON of the next MapResponse (in pieces for a big first map), or None
        when the client is up to date. `log`: what is pending is exactly that range of
        the shared change log, so the delta may be one another session composed
        (`SharedDeltas`), or be offered to the others."""
        # First: reading the peer set settles the policy, which may mark this session.
        visible = view.visible_peers(self.node_id)
        shared: Hashable | None = None
        if log is not None:
            if self.started and not (self.pending_all or self.pending_self):
                shared = ((log.start, log.end), visible, now.replace(microsecond=0))
                hit = self._shared_delta(view, shared, visible)
                if hit is not _NOT_SHARED:
                    assert hit is None or isinstance(hit, bytes)
                    return hit
            self.mark_peers(log.ids)
        me = view.entry(self.node_id)
        if me is None:
            return None
        fields: list[tuple[str, bytes]] = []
        first = not self.started
        # What a delta for the others (`shared`) assumes: the versions sent before, and
        # the users whose profiles it does not carry.
        before = self.sent_peers.share() if shared else None
        share = before is not None
        in_range = frozenset(log.ids) if share and log is not None else frozenset()
        delta_users: set[int] = set()

        self_changed = me.version != self.sent_self
        if self.pending_self or self_changed:
            if self_changed:
                fields.append(("Node", me.self_json or me.json))
                self.sent_self = me.version
        changed: list[bytes] = []
        removed: list[int] = []
        patches: list[bytes] = []
        new_users: set[int] = set()
        pieces: list[tuple[Hashable, bytes]] | None = None  # a big first map's peers
        candidates: Iterable[int]
        if first and len(visible) >= SEGMENT_MIN_PEERS:
            pieces = self._first_peers(view, visible, new_users)
            candidates = ()
        elif (
            self.pending_all and self.started and self.sent_users and visible == self.synced_visible
        ):
            candidates = self.pending_peers | (visible & set(view.routers()))
        elif self.pending_all:
            candidates = set(visible) | set(self.sent_peers)
        else:
            candidates = self.pending_peers
        for pid in sorted(candidates):
            entry = view.entry(pid)
            have = self.sent_peers.get(pid)
            show = entry is not None and pid in visible and entry.visible_to_peers
            if pid == self.node_id:
                # Never sent, but its version kept as the other sessions keep it: sessions
                # in step then hold equal versions (PeerVersions.share).
                if show:
                    assert entry is not None
                    self.sent_peers[pid] = entry.version
                elif have is not None:
                    del self.sent_peers[pid]
                share = False  # the others list this node
                continue
            if not show:
                if have is not None:
                    del self.sent_peers[pid]
                    self.sent_variants.pop(pid, None)
                    removed.append(pid)
                continue
            assert entry is not None
            if entry.user_id not in self.sent_users:
                # Also for unchanged peers: refresh_users forgets what was sent so that
                # renamed users' profiles go out again.
                new_users.add(entry.user_id)
            variant = entry.for_viewer(self.node_id) if entry.for_viewer is not None else None
            if variant is None:
                delta_users.add(entry.user_id)
            else:
                share = False  # a router's JSON depends on the viewer
            if have == entry.version and (
                variant is None or self.sent_variants.get(pid) == variant[0]
            ):
                continue
            if variant is not None and self.sent_variants.get(pid) != variant[0]:
                patch = None  # the routes this viewer may use changed: the whole node
            else:
                patch = entry.patch_from(have) if have is not None else None
            if patch is not None:
                if patch:
                    patches.append(patch)
            else:
                changed.append(entry.json if variant is None else variant[1])
            self.sent_peers[pid] = entry.version
            if variant is not None:
                self.sent_variants[pid] = variant[0]
            else:
                self.sent_variants.pop(pid, None)
        if me.user_id not in self.sent_users:
            new_users.add(me.user_id)

        peers_at: int | None = None  # where the Peers of a big first map go (pieces)
        if first:
            if pieces:
                peers_at = len(fields)
            elif changed:
                fields.append(("Peers", b"[" + b",".join(changed) + b"]"))
        else:
            if changed:
                fields.append(("PeersChanged", b"[" + b",".join(changed) + b"]"))
            if removed:
                fields.append(("PeersRemoved", _j(removed)))
            if patches:
                fields.append(("PeersChangedPatch", b"[" + b",".join(patches) + b"]"))

        delta_fields = len(fields)  # peers only, if nothing below is added
        if self_changed or new_users:
            share = False
        filt = view.filter_json(self.node_id)
        if filt != self.sent_filter:
            fields.append(("PacketFilter", filt))
            self.sent_filter = filt
        ssh = view.ssh_json(self.node_id)
        if ssh != self.sent_ssh:
            # An absent SSHPolicy means "unchanged" to the client (map.go), so a revoked
            # policy must go out as an empty rule list or the old rules stay in force.
            fields.append(("SSHPolicy", ssh if ssh is not None else NO_SSH_RULES))
            self.sent_ssh = ssh
        derp_version, derp = view.derp_map_json()
        if derp_version != self.sent_derp:
            fields.append(("DERPMap", derp))
            self.sent_derp = derp_version
        dns_version, dns = view.dns_json()
        if dns_version != self.sent_dns:
            fields.append(("DNSConfig", dns))
            self.sent_dns = dns_version
        profiles = [p for uid in sorted(new_users) if (p := view.user_profile(uid)) is not None]
        if profiles:
            fields.append(("UserProfiles", _j(profiles)))
            self.sent_users |= new_users

        # Every change of who sees whom is marked at the sessions it concerns, so what
        # was sent now matches `visible`.
        self.synced_visible = visible
        self.pending_peers.clear()
        self.pending_all = False
        self.pending_self = False
        if self.ping is not None:
            fields.append(("PingRequest", self.ping))
            self.ping = None
        share = share and len(fields) == delta_fields and not first

        def offer(message: bytes | None) -> None:
            after = self.sent_peers.share()
            if share and before is not None and after is not None:
                delta = _Delta(message, before, after, in_range, frozenset(delta_users))
                view.shared_deltas().put(shared, delta)

        if not fields and self.started:
            offer(None)
            return None
        if first:
            fields += [
                ("Domain", _j(self.domain)),
                ("CollectServices", b"false"),
                ("Debug", _j({"DisableLogTail": self.disable_logtail})),
            ]
            self.started = True
        # Whole seconds: the same delta to many peers is then the same bytes, framed once.
        fields.append(("ControlTime", _control_time(now.replace(microsecond=0))))
        if peers_at is None or pieces is None:
            message = b"{" + b",".join(_j(k) + b":" + v for k, v in fields) + b"}"
            offer(message)
            return message
        head = b"".join(_j(k) + b":" + v + b"," for k, v in fields[:peers_at])
        tail = b"".join(b"," + _j(k) + b":" + v for k, v in fields[peers_at:])
        return Segmented(
            (
                (None, b"{" + head + b'"Peers":['),
                *pieces,
                (None, b"]" + tail + b"}"),
            )
        )


@functools.lru_cache(maxsize=4)
def _control_time(second: datetime) -> bytes:
    """The ControlTime of a whole second (thousands of messages share each second)."""
    return _j(format_time(second))


def _j(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()
