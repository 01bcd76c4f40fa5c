"""The policy engine: Tailscale policy files, compiled per node.

Pure computation (no I/O, no trio). Entry points:

- :func:`parse_policy` -- HuJSON text to a validated :class:`Policy`
  (raises :class:`PolicyError` naming the JSON path and line);
- :func:`compile_policy` -- a policy (or None: allow all) against a tailnet
  snapshot, giving a :class:`CompiledPolicy` with per-node ``filter_for``,
  ``ssh_for``, ``visible_peers`` and ``may_see``;
- :func:`run_policy_tests` / :func:`load_policy` -- the policy's own
  ``tests`` block, which must pass for a policy to be accepted.
"""

from __future__ import annotations

from .compile import ALLOW_ALL, CompiledPolicy, FilterRule, compile_policy
from .errors import PolicyError
from .hujson import parse_hujson
from .model import Alias, AliasKind, Policy, PolicyNode, PolicyUser
from .parse import parse_policy
from .policytests import TestFailure, load_policy, run_policy_tests

__all__ = [
    "ALLOW_ALL",
    "Alias",
    "AliasKind",
    "CompiledPolicy",
    "FilterRule",
    "Policy",
    "PolicyError",
    "PolicyNode",
    "PolicyUser",
    "TestFailure",
    "compile_policy",
    "load_policy",
    "parse_hujson",
    "parse_policy",
    "run_policy_tests",
]
