"""The policy in force: parsed once per text, compiled per membership, cached per node.

Parsing (HuJSON, validation) depends only on the text, so it happens when the text
changes, not on every membership change; compiling resolves users, groups, tags
and hosts against the tailnet's current nodes and runs when those change. The
autoApprovers are resolved here too: advertised routes the policy approves count
as approved. Per-node results (visible peers, packet filter, SSH policy) are
cached until the next compile.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from netmap.nodes import cap_pairs
from netmap.policy import (
    CompiledPolicy,
    Policy,
    PolicyNode,
    PolicyUser,
    compile_policy,
    parse_policy,
)

from .quarantine import RowProblem
from .store import NodeRow, UserRow


def advertised(n: NodeRow) -> list[str]:
    """The routes the node advertises (Hostinfo.RoutableIPs)."""
    return [str(r) for r in (n.hostinfo.get("RoutableIPs") or [])]


def advertised_any(n: NodeRow) -> bool:
    """Whether the node advertises any route (cheaper than `advertised`)."""
    return bool(n.hostinfo.get("RoutableIPs"))


def policy_users(users: Iterable[UserRow]) -> list[PolicyUser]:
    return [PolicyUser(id=u.id, name=u.name, email=u.email, groups=tuple(u.groups)) for u in users]


def policy_node(
    n: NodeRow, users: Mapping[int, UserRow], auto_approved: tuple[str, ...] = ()
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
        routable_ips=tuple(advertised(n)),
        approved_routes=(*n.approved_routes, *auto_approved),
    )


class PolicyState:
    """The parsed and compiled policy and what the tailnet reads from it."""

    def __init__(self, server_url: str, *, base_caps: dict[str, Any] | None = None) -> None:
        self.server_url = server_url
        self.base_caps = base_caps or {}  # CapMap entries from the config, for every node
        self.text: str | None = None
        self._parsed: Policy | None = None
        self.compiled: CompiledPolicy | None = None
        self.auto_approved: dict[int, tuple[str, ...]] = {}  # node -> routes the policy approves
        self._filters: dict[int, bytes] = {}
        # node -> (row, owner name, auto-approved, PolicyNode): rows are immutable values,
        # so an unchanged row needs no new PolicyNode on the next compile (each join).
        self._pnodes: dict[int, tuple[NodeRow, str | None, tuple[str, ...], PolicyNode]] = {}
        self._ssh: dict[int, bytes | None] = {}

    def set_text(self, text: str | None) -> None:
        """A new policy text (None: no policy, allow all); parsed here, once."""
        self._parsed = parse_policy(text, "policy") if text else None
        self.text = text

    def node(self, n: NodeRow, users: Mapping[int, UserRow]) -> PolicyNode:
        return policy_node(n, users, self.auto_approved.get(n.id, ()))

    def compile(self, users: Mapping[int, UserRow], nodes: Mapping[int, NodeRow]) -> set[int]:
        """Compile against the tailnet; the nodes whose auto-approved routes changed."""
        pusers = policy_users(users.values())
        members = [n for n in nodes.values() if n.approved]
        pnodes: dict[int, tuple[NodeRow, str | None, tuple[str, ...], PolicyNode]] = {}
        previous = self.compiled

        def pnode(n: NodeRow, auto: tuple[str, ...]) -> PolicyNode:
            owner = users.get(n.user_id) if n.user_id is not None and not n.tags else None
            name = owner.name if owner else None
            hit = self._pnodes.get(n.id)
            if hit is not None and hit[0] is n and hit[1] == name and hit[2] == auto:
                pnodes[n.id] = hit
                return hit[3]
            p = policy_node(n, users, auto)
            pnodes[n.id] = (n, name, auto, p)
            return p

        def compiled_with(auto: Mapping[int, tuple[str, ...]]) -> CompiledPolicy:
            return compile_policy(
                self._parsed,
                pusers,
                [pnode(n, auto.get(n.id, ())) for n in members],
                server_url=self.server_url,
                node_cache=previous.node_cache if previous is not None else None,
            )

        compiled = compiled_with({})
        # autoApprovers: advertised routes the policy approves count as approved. They
        # change what others may reach, so compile once more when there are any.
        auto: dict[int, tuple[str, ...]] = {}
        if compiled.has_auto_approvers:
            for n in members:
                if not advertised_any(n):
                    continue
                pending = [
                    r
                    for r in advertised(n)
                    if r not in n.approved_routes and compiled.can_auto_approve(n.id, r)
                ]
                if pending:
                    auto[n.id] = tuple(pending)
        if auto:
            compiled = compiled_with(auto)
        before, self.auto_approved, self.compiled = self.auto_approved, auto, compiled
        self._pnodes = pnodes
        # A join under a policy whose rules did not change leaves every other node's
        # filter as it was: keep those (re-encoding 5,000 filters per join cost more
        # than the compile).
        if previous is not None and compiled.same_filters(previous):
            self._filters = {
                nid: f for nid, f in self._filters.items() if compiled.same_node(previous, nid)
            }
        else:
            self._filters = {}
        self._ssh.clear()
        return {nid for nid in before.keys() | auto.keys() if before.get(nid) != auto.get(nid)}

    def refusal(self, row: NodeRow, users: Mapping[int, UserRow]) -> RowProblem | None:
        """Why the policy does not compile with this node alone (None: it does). Raises
        when it does not compile without any node either: then the policy is at fault."""
        pusers = policy_users(users.values())
        compile_policy(self._parsed, pusers, [], server_url=self.server_url)
        try:
            pnode = policy_node(row, users)
            compile_policy(self._parsed, pusers, [pnode], server_url=self.server_url)
        except Exception as e:
            why = f"the policy does not compile with this node: {e}"
            return RowProblem(row.id, row.given_name, "policy", "", why)
        return None

    # -- what sessions read (cached until the next compile)

    def knows(self, node_id: int) -> bool:
        """Whether the compiled policy holds the node (known and, if need be, approved)."""
        return self.compiled is not None and self.compiled.knows(node_id)

    def visible_peers(self, node_id: int) -> frozenset[int]:
        """The node's peers, possibly with the node itself (`CompiledPolicy.reach`: one
        set shared by the nodes with the same view)."""
        c = self.compiled
        return c.reach(node_id) if c is not None and c.knows(node_id) else frozenset()

    def filter_json(self, node_id: int) -> bytes:
        f = self._filters.get(node_id)
        if f is None:
            c = self.compiled
            rules: list[Any] = c.filter_for(node_id) if c is not None and c.knows(node_id) else []
            f = json.dumps(rules, separators=(",", ":")).encode()
            self._filters[node_id] = f
        return f

    def ssh_json(self, node_id: int) -> bytes | None:
        if node_id not in self._ssh:
            c = self.compiled
            rules = c.ssh_for(node_id) if c is not None and c.knows(node_id) else []
            self._ssh[node_id] = (
                json.dumps({"rules": rules}, separators=(",", ":")).encode() if rules else None
            )
        return self._ssh[node_id]

    def caps(self, node_id: int, *, self_view: bool) -> tuple[tuple[str, str], ...]:
        """The node's CapMap entries from the policy (nodeAttrs), in its own or peers' view."""
        c = self.compiled
        base = self.base_caps
        if c is None or not c.knows(node_id):
            return cap_pairs(base)
        return cap_pairs({**base, **(c.cap_map(node_id) if self_view else c.peer_cap_map(node_id))})
