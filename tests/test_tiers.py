"""The tier rules themselves: what turns a CI run red (tests/tiers.py, .ci/run)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

ONE_TIER_TEST = """
from tests import tiers

pytestmark = tiers.mark("acme", {available}, "pebble missing (in this test)")


def test_needs_acme() -> None:
    pass
"""


def run_pytest(tmp: Path, available: bool, **env: str) -> subprocess.CompletedProcess[str]:
    test = tmp / "test_one_tier.py"
    test.write_text(ONE_TIER_TEST.format(available=available))
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HOMESCALE_")}
    return subprocess.run(
        # The repo's conftest (the tier hooks) is loaded through -p, the test from tmp.
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", str(test)],
        cwd=REPO,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_missing_tier_skips_locally_and_fails_in_ci(tmp_path: Path) -> None:
    local = run_pytest(tmp_path, False)
    assert local.returncode == 0, local.stdout
    assert "acme: skipped" in local.stdout
    assert "pebble missing" in local.stdout
    ci = run_pytest(tmp_path, False, HOMESCALE_REQUIRE_ALL="1")
    assert ci.returncode == 1, ci.stdout
    assert "tier acme is required" in ci.stdout


def test_ci_fails_when_no_test_checked_a_tier(tmp_path: Path) -> None:
    """HOMESCALE_EXPECT_EVERY_TIER=1 (.ci/run): a tier nobody ran is a red run."""
    ran = run_pytest(tmp_path, True, HOMESCALE_REQUIRE_ALL="1")
    assert ran.returncode == 0, ran.stdout  # no rule about unchecked tiers without the flag
    every = run_pytest(tmp_path, True, HOMESCALE_REQUIRE_ALL="1", HOMESCALE_EXPECT_EVERY_TIER="1")
    assert every.returncode == 1, every.stdout
    assert "1 passed" in every.stdout
    assert "no test ran these tiers: realclient" in every.stdout
    assert "acme" not in every.stdout.split("no test ran these tiers:")[1].split("--")[0]
