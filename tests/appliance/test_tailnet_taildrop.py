"""Taildrop (issue 12): the file-sharing capability reaches every node, per taildrop.enabled.

The Tailscale client offers Taildrop only when its own node carries
tailcfg.CapabilityFileSharing, and sends files to peers whose node carries it too
(ipn/ipnlocal: hasCapFileSharing, peer checks); headscale grants it to all nodes
when `taildrop.enabled` (the default).
"""

from __future__ import annotations

import dataclasses

from netmap.nodes import FILE_SHARING_CAP
from tests.appliance.test_tailnet_support import base_config, connect, make_tailnet, node, user


def caps_seen(
    taildrop: bool, policy: str | None = None
) -> tuple[dict[str, object], dict[str, object]]:
    config = dataclasses.replace(base_config(), taildrop_enabled=taildrop)
    tn = make_tailnet([user(1, "alice")], [node(1, user_id=1), node(2, user_id=1)], policy, config)
    first = connect(tn, 1)[1]
    peer = next(p for p in first["Peers"] if p["ID"] == 2)
    return first["Node"]["CapMap"], peer["CapMap"]


def test_on_by_default_for_self_and_peers() -> None:
    assert base_config().taildrop_enabled is True
    self_caps, peer_caps = caps_seen(True)
    assert self_caps[FILE_SHARING_CAP] == []
    assert peer_caps[FILE_SHARING_CAP] == []
    # With a policy's nodeAttrs too: the server's grant stays.
    policy = (
        '{"nodeAttrs": [{"target": ["*"], "attr": ["magicdns-aaaa"]}],'
        ' "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}'
    )
    self_caps, _ = caps_seen(True, policy)
    assert FILE_SHARING_CAP in self_caps
    assert "magicdns-aaaa" in self_caps


def test_off_when_disabled() -> None:
    self_caps, peer_caps = caps_seen(False)
    assert FILE_SHARING_CAP not in self_caps
    assert FILE_SHARING_CAP not in peer_caps
    assert "https://tailscale.com/cap/ssh" in self_caps  # the rest of the baseline stays
