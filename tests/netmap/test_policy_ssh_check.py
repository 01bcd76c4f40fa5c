"""SSH check periods the server applies when a destination asks (headscale's
SSHCheckParams): the first check rule covering the pair decides; none means no check."""

from __future__ import annotations

import json
from typing import Any

import pytest

from netmap.policy import PolicyNode, PolicyUser, compile_policy, parse_policy
from netmap.policy.compile import SSH_CHECK_PERIOD_DEFAULT

USERS = [PolicyUser(1, "alice"), PolicyUser(2, "bob")]
ALICE = PolicyNode(1, "alice-laptop", "alice", ipv4="100.64.0.1")
ALICE2 = PolicyNode(2, "alice-desk", "alice", ipv4="100.64.0.2")
BOB = PolicyNode(3, "bob-laptop", "bob", ipv4="100.64.0.3")
SERVER = PolicyNode(4, "web", None, tags=("tag:web",), ipv4="100.64.0.4")


def period(ssh: list[dict[str, Any]], src: int, dst: int) -> float | None:
    policy = {"tagOwners": {"tag:web": ["alice@"]}, "ssh": ssh}
    compiled = compile_policy(parse_policy(json.dumps(policy)), USERS, [ALICE, ALICE2, BOB, SERVER])
    return compiled.ssh_check_period(src, dst)


def rule(action: str, src: str, dst: str, **kw: Any) -> dict[str, Any]:
    return {"action": action, "src": [src], "dst": [dst], "users": ["root"], **kw}


@pytest.mark.parametrize(
    ("ssh", "src", "dst", "expected"),
    [
        ([rule("check", "alice@", "tag:web")], 1, 4, SSH_CHECK_PERIOD_DEFAULT),
        ([rule("check", "alice@", "tag:web", checkPeriod="1h30m")], 1, 4, 5400.0),
        ([rule("check", "alice@", "tag:web", checkPeriod="always")], 1, 4, 0.0),
        ([rule("check", "alice@", "tag:web")], 3, 4, None),  # bob is not a source
        ([rule("accept", "alice@", "tag:web")], 1, 4, None),  # no check rule
        ([rule("check", "autogroup:member", "autogroup:self")], 1, 2, SSH_CHECK_PERIOD_DEFAULT),
        ([rule("check", "autogroup:member", "autogroup:self")], 1, 3, None),  # other user
        (
            [
                rule("check", "bob@", "tag:web", checkPeriod="5m"),
                rule("check", "alice@", "tag:web", checkPeriod="2h"),
            ],
            1,
            4,
            7200.0,
        ),
    ],
)
def test_check_period(
    ssh: list[dict[str, Any]], src: int, dst: int, expected: float | None
) -> None:
    assert period(ssh, src, dst) == expected


def test_unknown_nodes_have_no_check() -> None:
    assert period([rule("check", "alice@", "tag:web")], 1, 99) is None
