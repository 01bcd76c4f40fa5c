"""Smoke test of the frozen binary itself (dist/homescale, not the source tree):
it runs without the venv, names its version and commit, checks configs, starts
fast, and two builds of the same tree are the same bytes."""

from __future__ import annotations

import os
import subprocess
import time
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_frozen(binary: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # A bare environment and a cwd outside the repo: the binary must not lean
    # on the venv, PYTHONPATH or the source tree.
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(cwd)}
    return subprocess.run(
        [str(binary), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_help_lists_the_commands(frozen_binary: Path, tmp_path: Path) -> None:
    proc = run_frozen(frozen_binary, "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for command in ("serve", "configtest", "version", "init"):
        assert command in proc.stdout, proc.stdout


def test_version_names_release_and_commit(frozen_binary: Path, tmp_path: Path) -> None:
    proc = run_frozen(frozen_binary, "version", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    release = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    built = (REPO / "dist" / "homescale.version").read_text().strip()
    commit = built.split("+g", 1)[1].split(".", 1)[0]
    assert release in proc.stdout
    assert commit in proc.stdout, f"{proc.stdout!r} does not name commit {commit}"


def test_configtest_accepts_example_and_rejects_broken(frozen_binary: Path, tmp_path: Path) -> None:
    example = REPO / "appliance" / "config-example.yaml"
    good = run_frozen(frozen_binary, "configtest", "-c", str(example), cwd=tmp_path)
    assert good.returncode == 0, good.stdout + good.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        example.read_text().replace("listen_addr: 127.0.0.1:8080", "listen_addr: not-an-address", 1)
    )
    bad = run_frozen(frozen_binary, "configtest", "-c", str(broken), cwd=tmp_path)
    assert bad.returncode != 0
    assert "listen_addr" in bad.stdout + bad.stderr


def test_starts_fast(frozen_binary: Path, tmp_path: Path) -> None:
    # One-file binaries unpack at every start; this bounds that cost (about
    # 0.4 s measured; the bound leaves room for a loaded shared machine).
    run_frozen(frozen_binary, "version", cwd=tmp_path)  # page cache warm
    start = time.monotonic()
    proc = run_frozen(frozen_binary, "version", cwd=tmp_path)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0
    assert elapsed < 5, f"`homescale version` took {elapsed:.1f} s"


@pytest.mark.slow
def test_two_builds_of_one_commit_are_byte_identical(frozen_binary: Path, tmp_path: Path) -> None:
    # Two clean checkouts of HEAD at different paths (this tree may have
    # uncommitted edits, and others may be editing it while the suite runs).
    # `--shared` borrows the objects: no copy, no network.
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    env = {**os.environ, "VENV": str(REPO / ".venv")}
    env.pop("HOMESCALE_DIST", None)
    built = []
    for name in ("one", "second-checkout"):
        tree = tmp_path / name
        subprocess.run(
            ["git", "clone", "-q", "--shared", "--no-checkout", str(REPO), str(tree)],
            check=True,
            timeout=120,
        )
        subprocess.run(
            ["git", "checkout", "-q", "--detach", head], cwd=tree, check=True, timeout=120
        )
        proc = subprocess.run(
            [str(tree / "packaging" / "build-binary.sh"), "--force"],
            cwd=tree,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        built.append(tree / "dist" / "homescale")
    assert (built[0].parent / "homescale.version").read_text() == f"{_release()}+g{head[:12]}\n"
    assert built[0].read_bytes() == built[1].read_bytes()


def _release() -> str:
    return str(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"])
