"""A headscale config as a drop-in: no key silently ignored, HEADSCALE_* honoured.

headscale's own config-example.yaml (tests/fixtures/headscale) must load with a
warning for exactly the keys homescale does not implement; keys whose silent
absence would be unsafe keep the server from starting; headscale's environment
names work as aliases of homescale's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from appliance.config import load_config
from appliance.errors import ConfigError

from .conftest import Site, run_cli

HEADSCALE_EXAMPLE = Path(__file__).parent.parent / "fixtures" / "headscale" / "config-example.yaml"


def warned_keys(messages: list[str]) -> list[str]:
    """`FILE:LINE: KEY is not supported ...` -> KEY."""
    return [m.split(": ", 1)[1].split()[0] for m in messages]


def test_configtest_names_exactly_the_unsupported_keys_of_headscales_example(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = Site(tmp_path, 0, 0)
    (tmp_path / "config.yaml").write_text(HEADSCALE_EXAMPLE.read_text())
    r = run_cli(capsys, site, "configtest")
    assert r.code == 0, r.err
    # Every key of headscale's example is now implemented: configtest has nothing to say.
    assert r.err.splitlines() == []


def test_keys_set_to_headscales_off_pass_quietly(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "dns:\n  base_domain: ts.example\n"
        "taildrop:\n  enabled: false\nauto_update:\n  enabled: false\n"
        "acme_email: ''\ntls_letsencrypt_hostname: ''\ntrusted_proxies: []\n"
        "database:\n  gorm:\n    slow_threshold: 1000\n  sqlite:\n    wal_autocheckpoint: 1000\n"
    )
    config = load_config(path, {})
    assert config.warnings == []


def test_letsencrypt_from_the_environment_needs_https(
    site: Site, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """headscale's name for the key works, and a plain-http server_url is refused rather
    than served without the certificate the user asked for."""
    monkeypatch.setenv("HEADSCALE_TLS_LETSENCRYPT_HOSTNAME", "hs.example.com")
    r = run_cli(capsys, site, "configtest")
    assert r.code == 2
    assert "tls_letsencrypt_hostname: needs an https:// server_url" in r.err


def test_headscale_environment_names_are_aliases(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("dns:\n  base_domain: ts.example\n")
    config = load_config(
        path,
        {
            "HEADSCALE_LISTEN_ADDR": "127.0.0.1:9999",
            "HEADSCALE_LOG_LEVEL": "debug",
            "HOMESCALE_LOG_LEVEL": "warn",  # homescale's own name wins
            "HEADSCALE_DNS_BASE_DOMAIN": "other.example",
            "HEADSCALE_DERP_SERVER_STUN_ENABLED": "false",
        },
    )
    assert config.listen_addr == "127.0.0.1:9999"
    assert config.log_level == "warn"
    assert config.dns.base_domain == "other.example"
    assert config.derp.stun_listen_addr == ""  # headscale's stun.enabled: false


def test_headscale_config_env_finds_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from appliance import cli

    path = tmp_path / "config.yaml"
    path.write_text("dns:\n  base_domain: ts.example\n")
    monkeypatch.setenv("HEADSCALE_CONFIG", str(path))
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert cli.run(["configtest"]) == 0
    assert f"{path}: configuration OK" in capsys.readouterr().out


async def test_cli_section_sends_commands_to_the_configured_server(
    site: Site, server: object, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """headscale's `cli:` section (address, api_key) is where the CLI sends commands."""
    r = await trio.to_thread.run_sync(lambda: run_cli(capsys, site, "apikeys", "create"))
    assert r.code == 0, r.err
    api_key = r.out.strip().splitlines()[-1]
    remote = tmp_path / "remote.yaml"
    remote.write_text(
        f"dns:\n  base_domain: ts.example\nunix_socket: {tmp_path}/none.sock\n"
        f"cli:\n  address: http://127.0.0.1:{site.port}\n  api_key: {api_key}\n  timeout: 5s\n"
    )
    other = Site(tmp_path, site.port, 0)
    (tmp_path / "config.yaml").write_text(remote.read_text())
    r = await trio.to_thread.run_sync(
        lambda: run_cli(capsys, other, "-v", "users", "create", "from-afar")
    )
    assert r.code == 0, r.err
    assert f"using the remote API at http://127.0.0.1:{site.port}" in r.err
    store = site.store()
    assert store.user_by_name("from-afar") is not None
    store.close()

    (tmp_path / "config.yaml").write_text(remote.read_text().replace(api_key, "hskey-api-x"))
    r = await trio.to_thread.run_sync(lambda: run_cli(capsys, other, "users", "list"))
    assert r.code != 0


def test_extra_records_file_is_read(tmp_path: Path) -> None:
    """headscale's dns.extra_records_path (JSON, Go field names in any case) adds records."""
    (tmp_path / "records.json").write_text(
        '[{"Name": "grafana.ts.example", "Type": "A", "Value": "100.64.0.3"},'
        ' {"name": "db.ts.example", "type": "AAAA", "value": "fd7a:115c:a1e0::3"}]'
    )
    path = tmp_path / "c.yaml"
    path.write_text(
        "dns:\n  base_domain: ts.example\n  extra_records_path: records.json\n"
        "  extra_records:\n    - {name: a.ts.example, type: A, value: 100.64.0.9}\n"
    )
    config = load_config(path, {})
    assert [r["name"] for r in config.dns.extra_records] == [
        "a.ts.example",
        "grafana.ts.example",
        "db.ts.example",
    ]
    # Watched by the server, as headscale does: nothing to warn about.
    assert warned_keys(config.warnings) == []
    assert config.dns.extra_records_path == tmp_path / "records.json"
    assert [r["name"] for r in config.dns.config_records] == ["a.ts.example"]

    (tmp_path / "records.json").write_text('[{"name": "x", "value": "100.64.0.1", "type": "MX"}]')
    with pytest.raises(ConfigError, match=r"records.json: record type 'MX': expected A or AAAA"):
        load_config(path, {})
