"""The systemd unit: valid for systemd, hardened, and consistent with the binary's needs."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from tests import tiers

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "homescale.service"

needs_analyze = tiers.mark(
    "packaging",
    shutil.which("systemd-analyze") is not None,
    "systemd-analyze missing (apt-get install systemd; `make sysdeps` does)",
)


def _unit_with_stub_binary(tmp_path: Path) -> Path:
    """The unit, with /usr/bin/homescale replaced by an executable that exists here.

    `systemd-analyze verify` refuses a unit whose ExecStart is missing; this host
    has no /usr/bin/homescale. Nothing else in the unit is changed.
    """
    stub = tmp_path / "homescale"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    unit = tmp_path / "homescale.service"
    unit.write_text(UNIT.read_text().replace("/usr/bin/homescale", str(stub)))
    return unit


@needs_analyze
def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    unit = _unit_with_stub_binary(tmp_path)
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    out = proc.stdout + proc.stderr
    # verify only warns (exit 0) on a misspelt key or a bad value: read the text.
    assert "Unknown key" not in out, out
    assert "Unknown section" not in out, out
    assert "Failed to parse" not in out, out
    assert "ignoring" not in out, out
    assert proc.returncode == 0, out


@needs_analyze
def test_hardening_exposure_is_low(tmp_path: Path) -> None:
    unit = _unit_with_stub_binary(tmp_path)
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", proc.stdout + proc.stderr)
    assert m, proc.stdout + proc.stderr
    # headscale's unit scores about 1.5 ("OK"); 10 is an unhardened service.
    assert float(m.group(1)) <= 2.0, proc.stdout


def test_unpack_dir_is_the_units_own_cache(unit_service: dict[str, list[str]]) -> None:
    # The one-file binary unpacks into $TMPDIR at each start: that must be the
    # CacheDirectory (writable under ProtectSystem=strict, exec-able even when
    # /tmp is noexec), or the service cannot start.
    env = dict(e.split("=", 1) for v in unit_service["Environment"] for e in v.split())
    assert unit_service["CacheDirectory"] == ["homescale"]
    assert env["TMPDIR"] == "/var/cache/homescale"


def test_unit_runs_the_packaged_binary_as_its_user(unit_service: dict[str, list[str]]) -> None:
    assert unit_service["ExecStart"] == ["/usr/bin/homescale serve"]
    assert unit_service["User"] == ["homescale"]
    assert unit_service["Group"] == ["homescale"]
    # The database and the admin socket live where the packaged config puts them.
    assert unit_service["StateDirectory"] == ["homescale"]
    assert unit_service["RuntimeDirectory"] == ["homescale"]
    assert set(unit_service["ReadWritePaths"][0].split()) >= {
        "/var/lib/homescale",
        "/var/run/homescale",
    }
    assert unit_service["ProtectSystem"] == ["strict"]
    assert unit_service["PrivateTmp"] == ["true"]
