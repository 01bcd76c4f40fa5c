"""headscale's auto_update.enabled: every node's default-auto-update attribute says
whether the client may update itself (tailcfg.NodeAttrDefaultAutoUpdate, a JSON bool
the client takes as its default on first netmap; headscale always sends it)."""

from __future__ import annotations

import dataclasses

from netmap.nodes import AUTO_UPDATE_CAP
from tests.appliance.test_tailnet_support import base_config, connect, make_tailnet, node, user


def self_caps(auto_update: bool, policy: str | None = None) -> dict[str, object]:
    config = dataclasses.replace(base_config(), auto_update_enabled=auto_update)
    tn = make_tailnet([user(1, "alice")], [node(1, user_id=1), node(2, user_id=1)], policy, config)
    caps: dict[str, object] = connect(tn, 1)[1]["Node"]["CapMap"]
    return caps


def test_off_by_default_as_headscale() -> None:
    assert base_config().auto_update_enabled is False
    assert self_caps(False)[AUTO_UPDATE_CAP] == [False]


def test_on_when_enabled_also_with_a_policy() -> None:
    assert self_caps(True)[AUTO_UPDATE_CAP] == [True]
    policy = (
        '{"nodeAttrs": [{"target": ["*"], "attr": ["magicdns-aaaa"]}],'
        ' "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}'
    )
    caps = self_caps(True, policy)
    assert caps[AUTO_UPDATE_CAP] == [True]
    assert "magicdns-aaaa" in caps
