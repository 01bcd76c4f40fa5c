"""`homescale init`: a data directory with a commented config and the noise key."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import pytest

from appliance import cli
from appliance.config import load_config


def init(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.run(["init", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_init_writes_config_and_private_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "data"
    code, out, _ = init(capsys, "--data-dir", str(d))
    assert code == 0
    config, key = d / "config.yaml", d / "noise_private.key"
    assert config.is_file()
    assert re.fullmatch(r"privkey:[0-9a-f]{64}\s*", key.read_text())
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert "generated" in out
    # commented, so a person can find their way
    assert config.read_text().count("\n#") > 10
    # paths point into the data directory
    loaded = load_config(config, {})
    assert loaded.database_path == d.resolve() / "db.sqlite"
    assert loaded.noise_private_key_path == d.resolve() / "noise_private.key"


def test_init_never_overwrites(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "data"
    assert init(capsys, "--data-dir", str(d))[0] == 0
    config, key = d / "config.yaml", d / "noise_private.key"
    config.write_text(config.read_text() + "# my edit\n")
    before = {p.relative_to(d).as_posix(): p.read_bytes() for p in d.rglob("*") if p.is_file()}
    assert {"config.yaml", "noise_private.key"} <= set(before)
    code, out, _ = init(capsys, "--data-dir", str(d), "--server-url", "https://other.example.net")
    assert code == 0
    assert {
        p.relative_to(d).as_posix(): p.read_bytes() for p in d.rglob("*") if p.is_file()
    } == before
    assert f"{config}: exists, left as it is" in out
    assert f"{key}: exists, left as it is" in out
    assert "written" not in out
    assert "generated" not in out


def test_written_config_passes_configtest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "data"
    assert init(capsys, "--data-dir", str(d), "--server-url", "https://hs.example.net")[0] == 0
    capsys.readouterr()
    assert cli.run(["-c", str(d / "config.yaml"), "configtest"]) == 0
    out, err = capsys.readouterr()
    assert "OK" in out
    assert "warning" not in err
    loaded = load_config(d / "config.yaml", {})
    assert loaded.server_url == "https://hs.example.net"
    assert loaded.listen_addr.endswith(":443")


def test_init_refuses_a_bad_server_url(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "data"
    code, _, err = init(capsys, "--data-dir", str(d), "--server-url", "hs.example.net")
    assert code == 2
    assert "--server-url" in err
    assert not (d / "config.yaml").exists()
    assert not (d / "noise_private.key").exists()


def test_existing_headscale_key_is_kept(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "data"
    d.mkdir()
    headscale_key = "privkey:" + "ab" * 32 + "\n"  # headscale writes it with a newline
    (d / "noise_private.key").write_text(headscale_key)
    assert init(capsys, "--data-dir", str(d))[0] == 0
    assert (d / "noise_private.key").read_text() == headscale_key


def test_init_keeps_state_private(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 9: the data folder 0750, the config 0640 (it may hold secrets), keys 0600."""
    d = tmp_path / "data"
    assert init(capsys, "--data-dir", str(d))[0] == 0
    assert stat.S_IMODE(d.stat().st_mode) == 0o750
    assert stat.S_IMODE((d / "config.yaml").stat().st_mode) == 0o640
    assert stat.S_IMODE((d / "noise_private.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((d / "tls").stat().st_mode) == 0o750
    assert stat.S_IMODE((d / "tls" / "server.key").stat().st_mode) == 0o600
