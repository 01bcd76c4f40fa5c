"""Where the policy comes from (file or database) and how it is checked before use."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .config import Config
from .errors import HomescaleError
from .store import Store

if TYPE_CHECKING:
    from netmap.policy import CompiledPolicy


class PolicyInvalid(HomescaleError):
    """The policy does not parse or validate; the message is located (path and line)."""


def recovery_steps(config_path: Path | None) -> str:
    """How to repair an invalid stored policy with the server down (for its refusal)."""
    hs = f"homescale -c {config_path}" if config_path is not None else "homescale"
    return (
        f"To recover:\n"
        f"  1. dump the stored policy:   {hs} policy get > policy.hujson\n"
        f"  2. fix it, then check it:    {hs} policy check --file policy.hujson\n"
        f"  3. store it:                 {hs} policy set --file policy.hujson\n"
        f"(these commands work with the server stopped: they open the database directly)"
    )


def check_policy_text(text: str, source: str = "<policy>", store: Store | None = None) -> None:
    """Parse, validate and compile a policy and run its `tests`, against the tailnet in
    `store` when given (so users, tags and hosts resolve as they will); PolicyInvalid
    names what is wrong, with its JSON path and line."""
    compile_policy_text(text, source, store)


def compile_policy_text(
    text: str, source: str = "<policy>", store: Store | None = None
) -> CompiledPolicy:
    """`check_policy_text`, returning the compiled policy (the console's preview)."""
    from netmap.policy import PolicyError, load_policy

    from .policystate import policy_node, policy_users
    from .quarantine import node_row_problems

    users, nodes = [], []
    if store is not None:
        rows = {u.id: u for u in store.users()}
        users = policy_users(rows.values())
        # Rows the server quarantines (appliance.quarantine) are not checked against either.
        nodes = [policy_node(n, rows) for n in store.nodes() if not node_row_problems(n)]
    try:
        return load_policy(text, users, nodes, source)
    except PolicyError as e:
        raise PolicyInvalid(str(e)) from None


def read_policy(config: Config, store: Store) -> tuple[str | None, str]:
    """The current policy text (None: no policy, allow all) and where it came from."""
    if config.policy_mode == "database":
        row = store.policy()
        return (row.data if row else None), "database"
    if config.policy_path is None:
        return None, "none"
    path = Path(config.policy_path)
    try:
        return path.read_text(), str(path)
    except FileNotFoundError:
        raise PolicyInvalid(f"{path}: policy file not found (policy.path)") from None
    except OSError as e:
        raise PolicyInvalid(f"{path}: cannot read the policy file: {e.strerror}") from None
