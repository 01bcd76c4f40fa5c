"""Suite-wide hooks: the test tiers (tests/tiers.py) and their summary."""

from __future__ import annotations

import pytest

from tests import tiers


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "tier(name, available, reason): the test needs a real part (tests/tiers.py); "
        "skipped without it locally, failed without it under HOMESCALE_REQUIRE_ALL=1",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # Before fixtures (and outside any trio run), so the skip keeps its reason.
    for m in item.iter_markers("tier"):
        tiers.require_tier(*m.args, **m.kwargs)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if tiers.unchecked() and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    terminalreporter.section("tiers (tests/tiers.py)")
    if tiers.required():
        terminalreporter.write_line(f"{tiers.REQUIRE_ALL_ENV}=1: every tier must run")
    for line in tiers.summary_lines():
        terminalreporter.write_line(line)
    missing = tiers.unchecked()
    if missing:
        terminalreporter.write_line(
            f"{tiers.EVERY_TIER_ENV}=1 but no test ran these tiers: {', '.join(missing)} "
            "-- the run fails",
            red=True,
        )
