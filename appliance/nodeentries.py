"""Node entries: each node's peer JSON, encoded once per change, with its version and patches.

A node's peer JSON does not depend on who receives it, so it is encoded once here
and every session splices the bytes. Each change that peers can see bumps the
version and records the patch from the previous one (PeersChangedPatch), so a
session that is a few versions behind gets the merged patches instead of the node.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Hashable
from datetime import datetime

from netmap.mapsession import PATCH_HISTORY, FirstMapCache, NodeEntry, SharedDeltas
from netmap.nodes import PeerNode, encode_node, patch_between


class NodeEntries:
    """node ID -> (what peers see of it, its encoded entry)."""

    def __init__(self, domain: str) -> None:
        self.domain = domain
        self.peers: dict[int, PeerNode] = {}
        self._entries: dict[int, NodeEntry] = {}
        self._lives = itertools.count(1)  # NodeEntry.life: a re-added node starts a new one
        self.routers: set[int] = set()  # nodes whose JSON depends on the viewer (for_viewer)
        self.first_maps = FirstMapCache()  # told of every change below
        self.deltas = SharedDeltas()  # told of every change below

    def get(self, node_id: int) -> NodeEntry | None:
        return self._entries.get(node_id)

    def encode(self, peer: PeerNode) -> bytes:
        return encode_node(peer, self.domain)

    def update(
        self, new: PeerNode, *, for_viewer: Callable[[int], tuple[Hashable, bytes]] | None = None
    ) -> bool:
        """Encode the node if what peers see of it changed; False when nothing did."""
        old = self.peers.get(new.id)
        if old == new and new.id in self._entries:
            # A write that changed nothing peers see (a second stream marking the node
            # online again, a re-login with the same key): no version, so no empty patch.
            return False
        self.peers[new.id] = new
        self.first_maps.changed(new.id)
        self.deltas.changed()
        if for_viewer is not None:
            self.routers.add(new.id)
        else:
            self.routers.discard(new.id)
        prev = self._entries.get(new.id)
        version = prev.version + 1 if prev else 1
        patches = dict(prev.patches) if prev else {}
        patch = patch_between(old, new) if old is not None else None
        if patch is not None:
            patches[version] = patch
        else:
            patches = {}
        for v in [v for v in patches if v <= version - PATCH_HISTORY]:
            del patches[v]
        self._entries[new.id] = NodeEntry(
            id=new.id,
            user_id=new.user_id,
            version=version,
            life=prev.life if prev else next(self._lives),
            json=encode_node(new, self.domain),
            visible_to_peers=new.has_disco,
            patches=patches,
            self_json=(
                encode_node(new, self.domain, self_view=True)
                if new.self_caps != new.peer_caps
                else None
            ),
            for_viewer=for_viewer,
        )
        return True

    def remove(self, node_id: int) -> PeerNode | None:
        self._entries.pop(node_id, None)
        self.routers.discard(node_id)
        self.first_maps.changed(node_id)
        self.deltas.changed()
        return self.peers.pop(node_id, None)

    def expired_message(self, peer: PeerNode, now: datetime) -> bytes:
        """A MapResponse giving the node its own entry with an expired key: sent to a
        deleted node's client before hanging up, it goes to NeedsLogin instead of polling
        on with a stale netmap."""
        gone = dataclasses.replace(peer, key_expiry=now)
        return b'{"Node":' + encode_node(gone, self.domain) + b"}"
