"""Shared fixtures of the packaging tests: the frozen binary and the .deb.

Both are built by the same scripts `make binary` and `make deb` run; the
scripts skip the work when dist/ is already up to date with the tree.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests import tiers

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "homescale.service"
# Keep in step with packaging/prepare-testroot.sh.
TESTROOT_DEFAULT = Path("/var/cache/homescale-test/bookworm-root")
TESTROOT_MARKER = ".homescale-testroot-complete"


def run_script(*cmd: str | Path, timeout: float = 600, env: dict[str, str] | None = None) -> str:
    """Run a packaging script; on failure show its output in the test report."""
    proc = subprocess.run(
        [str(c) for c in cmd],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, **(env or {})},
    )
    if proc.returncode != 0:
        pytest.fail(f"{cmd[0]} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def _service_section(path: Path) -> dict[str, list[str]]:
    """The [Service] keys of a unit, every value of repeated keys kept in order."""
    values: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        if section == "Service":
            key, _, value = line.partition("=")
            values.setdefault(key.strip(), []).append(value.strip())
    return values


@pytest.fixture(scope="session")
def frozen_binary() -> Path:
    tiers.require_tier(
        "packaging",
        (REPO / ".venv" / "bin" / "pyinstaller").exists(),
        "no .venv/bin/pyinstaller: run `make` (pip install -e '.[build]')",
    )
    run_script(REPO / "packaging" / "build-binary.sh")
    return REPO / "dist" / "homescale"


@pytest.fixture(scope="session")
def deb_file(frozen_binary: Path) -> Path:
    tiers.require_tier(
        "packaging",
        shutil.which("dpkg-deb") is not None,
        "dpkg-deb missing (apt-get install dpkg-dev; packaging/sysdeps.sh does)",
    )
    # Package the binary this run built and tested (others may commit to the
    # tree meanwhile; that would rebuild it mid-run).
    out = run_script(REPO / "packaging" / "build-deb.sh", env={"DEB_USE_BUILT_BINARY": "1"})
    # The script's last line names the package it wrote.
    return Path(out.strip().splitlines()[-1].split()[-1])


@pytest.fixture(scope="session")
def unit_service() -> dict[str, list[str]]:
    """The [Service] section of systemd/homescale.service."""
    return _service_section(UNIT)


@pytest.fixture(scope="session")
def testroot() -> Path:
    """The cached clean bookworm root made by packaging/prepare-testroot.sh."""
    root = Path(os.environ.get("HOMESCALE_TESTROOT", TESTROOT_DEFAULT))
    tiers.require_tier(
        "chroot-install", os.geteuid() == 0, "not root: installing a .deb into a chroot needs root"
    )
    tiers.require_tier(
        "chroot-install",
        (root / TESTROOT_MARKER).exists(),
        f"no Debian test root at {root}: run packaging/prepare-testroot.sh "
        "(needs root, debootstrap and the network; `make test` runs it)",
    )
    return root
