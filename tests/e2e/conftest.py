"""Shared fixtures for end-to-end tests with real Tailscale clients."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import realclient


@pytest.fixture
def realclient_ready() -> None:
    """Skips (with the reason) unless real clients can run hermetically here."""
    realclient.require_realclient()


@pytest.fixture
def throwaway_ca(tmp_path: Path) -> realclient.ThrowawayCA:
    return realclient.make_test_ca(tmp_path / "tls")
