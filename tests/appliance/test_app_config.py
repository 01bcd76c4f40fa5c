"""Configuration: headscale's keys, located errors, env overrides, search order, configtest."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from appliance import config as config_mod
from appliance.config import find_config, load_config
from appliance.errors import ConfigError

from .conftest import Site, run_cli

BASE = """\
server_url: http://127.0.0.1:8080
listen_addr: 127.0.0.1:8080
noise:
  private_key_path: noise_private.key
database:
  sqlite:
    path: db.sqlite
dns:
  base_domain: tailnet.internal
"""


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def load_error(path: Path, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, environ or {})
    return str(info.value)


# ---------------------------------------------------------------- malformed YAML


@pytest.mark.parametrize(
    ("text", "where", "problem"),
    [
        # an unclosed flow sequence: the parser notices at the next key
        (BASE + "log:\n  level: [info\nunix_socket: s.sock\n", ":12:", "expected ','"),
        # a tab used for indentation
        (
            "server_url: http://127.0.0.1:8080\nprefixes:\n  v4: 100.64.0.0/10\n\tv6: fd7a:115c:a1e0::/48\n",
            ":4:1:",
            "'\\t'",
        ),
        # a second colon on one line
        ("server_url: http://127.0.0.1:8080\nlisten_addr: a: b\n", ":2:15:", "mapping values"),
        # a duplicate key
        ("listen_addr: 127.0.0.1:1\nlisten_addr: 127.0.0.1:2\n", ":2:1:", "duplicate key"),
    ],
)
def test_malformed_yaml_names_file_line_and_column(
    tmp_path: Path, text: str, where: str, problem: str
) -> None:
    path = write(tmp_path, text)
    msg = load_error(path)
    assert msg.startswith(f"{path}{where}"), msg
    assert "malformed YAML" in msg
    assert problem in msg


def test_non_utf8_file_is_located(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(b'server_url: http://127.0.0.1:8080\nlisten_addr: "ab\xff"\n')
    msg = load_error(path)
    assert msg.startswith(f"{path}:2:17:"), msg
    assert "UTF-8" in msg


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "- a\n- b\n")
    msg = load_error(path)
    assert str(path) in msg
    assert "mapping" in msg


def test_missing_file_says_how_to_make_one(tmp_path: Path) -> None:
    msg = load_error(tmp_path / "nope.yaml")
    assert "nope.yaml" in msg
    assert "homescale init" in msg


# ---------------------------------------------------------------- wrong types and values


@pytest.mark.parametrize(
    ("snippet", "key", "value", "expected"),
    [
        ("prefixes:\n  v4: 100.64.0.0/33\n", "prefixes.v4", "100.64.0.0/33", "CIDR"),
        (
            "prefixes:\n  v4: fd7a:115c:a1e0::/48\n",
            "prefixes.v4",
            "fd7a:115c:a1e0::/48",
            "IPv4 CIDR",
        ),
        ("prefixes:\n  v6: not-a-net\n", "prefixes.v6", "not-a-net", "CIDR"),
        ("metrics_listen_addr: localhost\n", "metrics_listen_addr", "localhost", "host:port"),
        (
            "metrics_listen_addr: 127.0.0.1:99999\n",
            "metrics_listen_addr",
            "127.0.0.1:99999",
            "host:port",
        ),
        ("node:\n  expiry: 30 minutes\n", "node.expiry", "30 minutes", "30m"),
        (
            "node:\n  ephemeral:\n    inactivity_timeout: 5\n",
            "node.ephemeral.inactivity_timeout",
            "5",
            "30m",
        ),
        ("derp:\n  update_frequency: soon\n", "derp.update_frequency", "soon", "duration"),
        ("derp:\n  server:\n    enabled: maybe\n", "derp.server.enabled", "maybe", "true or false"),
        ("derp:\n  server:\n    region_id: nine\n", "derp.server.region_id", "nine", "integer"),
        (
            "derp:\n  urls:\n    - ftp://example.com/map\n",
            "derp.urls",
            "ftp://example.com/map",
            "URL",
        ),
        ("log:\n  level: loud\n", "log.level", "loud", "one of"),
        ("unix_socket_permission: rwx\n", "unix_socket_permission", "rwx", "octal"),
        ("prefixes:\n  allocation: lottery\n", "prefixes.allocation", "lottery", "sequential"),
    ],
)
def test_bad_value_names_key_value_and_expectation(
    tmp_path: Path, snippet: str, key: str, value: str, expected: str
) -> None:
    path = write(tmp_path, BASE + snippet)
    msg = load_error(path)
    assert key in msg
    assert value in msg
    assert expected in msg
    # located: the file and the line of the offending key (the snippet starts at line 10)
    assert f"{path}:" in msg
    line = int(msg.split(f"{path}:")[1].split(":")[0])
    assert line >= 10


def test_bad_value_message_says_got_once(tmp_path: Path) -> None:
    msg = load_error(write(tmp_path, BASE + "node:\n  expiry: 30 minutes\n"))
    assert msg.count("got") == 1, msg


def test_bad_server_url(tmp_path: Path) -> None:
    path = write(tmp_path, BASE.replace("http://127.0.0.1:8080", "hs.example.com"))
    msg = load_error(path)
    assert f"{path}:1:" in msg
    assert "server_url" in msg
    assert "hs.example.com" in msg
    assert "URL" in msg


def test_mapping_where_a_value_belongs(tmp_path: Path) -> None:
    msg = load_error(write(tmp_path, BASE + "listen_addr_x: 1\nlog:\n  level:\n    x: 1\n"))
    assert "log.level" in msg
    assert "mapping" in msg


def test_magic_dns_needs_a_base_domain(tmp_path: Path) -> None:
    msg = load_error(
        write(tmp_path, BASE.replace("  base_domain: tailnet.internal\n", '  base_domain: ""\n'))
    )
    assert "dns.base_domain" in msg


@pytest.mark.parametrize("host", ["tailnet.internal", "hs.tailnet.internal"])
def test_server_url_must_not_be_under_base_domain(tmp_path: Path, host: str) -> None:
    msg = load_error(write(tmp_path, BASE.replace("127.0.0.1:8080\nlisten", f"{host}\nlisten")))
    assert "dns.base_domain" in msg
    assert host in msg


# ---------------------------------------------------------------- removed and unknown keys


@pytest.mark.parametrize(
    ("snippet", "key", "hint"),
    [
        ("randomize_client_port: true\n", "randomize_client_port", "randomizeClientPort"),
        ("acl_policy_path: /etc/headscale/acl.hujson\n", "acl_policy_path", "policy.path"),
        (
            "dns_config:\n  magic_dns: true\n  base_domain: x.example\n",
            "dns_config",
            "dns.magic_dns",
        ),
    ],
)
def test_removed_key_says_where_it_moved(tmp_path: Path, snippet: str, key: str, hint: str) -> None:
    path = write(tmp_path, BASE + snippet)
    msg = load_error(path)
    assert f"{path}:10:" in msg
    assert repr(key) in msg
    assert "removed" in msg
    assert hint in msg


def test_unknown_keys_are_warnings_with_key_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "listen_adr: 127.0.0.1:1\ndns2:\n  x: 1\nlog:\n  levle: debug\n")
    config = load_config(path, {})
    joined = "\n".join(config.warnings)
    assert f"{path}:10: unknown configuration key 'listen_adr'" in joined
    assert f"{path}:12: unknown configuration key 'dns2.x'" in joined
    assert f"{path}:14: unknown configuration key 'log.levle'" in joined
    assert len(config.warnings) == 3


def test_old_ephemeral_alias_still_works_with_a_warning(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "ephemeral_node_inactivity_timeout: 45m\n")
    config = load_config(path, {})
    assert config.ephemeral_inactivity_timeout == timedelta(minutes=45)
    assert any("ephemeral_node_inactivity_timeout" in w and ":10:" in w for w in config.warnings)


# ---------------------------------------------------------------- environment overrides


def test_env_overrides_win_over_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "derp:\n  server:\n    enabled: false\ndns2_unused: 1\n")
    env = {
        "HOMESCALE_LISTEN_ADDR": "127.0.0.1:18080",
        "HOMESCALE_DNS_BASE_DOMAIN": "ts.example.net",
        "HOMESCALE_DERP_SERVER_ENABLED": "true",
        "HOMESCALE_DNS_NAMESERVERS_GLOBAL": "9.9.9.9, 149.112.112.112",
        "HOMESCALE_NODE_EXPIRY": "90d",
    }
    config = load_config(path, env)
    assert config.listen_addr == "127.0.0.1:18080"
    assert config.dns.base_domain == "ts.example.net"
    assert config.derp.server_enabled is True
    assert config.dns.nameservers_global == ["9.9.9.9", "149.112.112.112"]
    assert config.node_expiry == timedelta(days=90)
    # and without the variables the file's values are used
    plain = load_config(path, {})
    assert plain.listen_addr == "127.0.0.1:8080"
    assert plain.dns.base_domain == "tailnet.internal"
    assert plain.derp.server_enabled is False


def test_env_override_reads_the_process_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOMESCALE_DNS_MAGIC_DNS", "false")
    config = load_config(write(tmp_path, BASE))
    assert config.dns.magic_dns is False


def test_bad_env_override_names_the_variable(tmp_path: Path) -> None:
    msg = load_error(write(tmp_path, BASE), {"HOMESCALE_LISTEN_ADDR": "everywhere"})
    assert "environment variable HOMESCALE_LISTEN_ADDR" in msg
    assert "everywhere" in msg
    assert "host:port" in msg


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, BASE), {})
    assert config.database_path == tmp_path.resolve() / "db.sqlite"
    assert config.noise_private_key_path == tmp_path.resolve() / "noise_private.key"


# ---------------------------------------------------------------- search order


def test_search_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    etc, home, cwd = (write(tmp_path, BASE, f"{n}.yaml") for n in ("etc", "home", "cwd"))
    monkeypatch.setattr(config_mod, "SEARCH_PATHS", (etc, home, cwd))
    explicit = write(tmp_path, BASE, "explicit.yaml")
    from_env = write(tmp_path, BASE, "env.yaml")
    assert find_config(explicit, {"HOMESCALE_CONFIG": str(from_env)}) == explicit
    assert find_config(None, {"HOMESCALE_CONFIG": str(from_env)}) == from_env
    assert find_config(None, {}) == etc
    etc.unlink()
    assert find_config(None, {}) == home
    home.unlink()
    assert find_config(None, {}) == cwd
    cwd.unlink()
    assert find_config(None, {}) is None


def test_cli_uses_homescale_config_then_dash_c(
    site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from appliance import cli

    other = write(tmp_path, BASE, "other.yaml")
    monkeypatch.setenv("HOMESCALE_CONFIG", str(other))
    capsys.readouterr()
    assert cli.run(["configtest"]) == 0
    assert str(other) in capsys.readouterr().out
    # -c wins over $HOMESCALE_CONFIG
    res = run_cli(capsys, site, "configtest")
    assert res.code == 0
    assert str(site.config_path) in res.out


def test_cli_without_any_config_says_how_to_get_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from appliance import cli

    monkeypatch.setattr(config_mod, "SEARCH_PATHS", (tmp_path / "a.yaml",))
    capsys.readouterr()
    assert cli.run(["configtest"]) == 2
    err = capsys.readouterr().err
    assert "-c FILE" in err
    assert "homescale init" in err


# ---------------------------------------------------------------- a real headscale config

# headscale's config-example.yaml (main, 2026), comments trimmed, with the optional
# blocks an existing install carries switched on: OIDC, gRPC (older releases), ACME,
# Postgres settings, HA route probing, CLI and tuning.
HEADSCALE_CONFIG = """\
---
server_url: https://headscale.example.net:443
listen_addr: 127.0.0.1:8080
metrics_listen_addr: 127.0.0.1:9090
grpc_listen_addr: 127.0.0.1:50443
grpc_allow_insecure: false
trusted_proxies: []
noise:
  private_key_path: /var/lib/headscale/noise_private.key
prefixes:
  v4: 100.64.0.0/10
  v6: fd7a:115c:a1e0::/48
  allocation: sequential
derp:
  server:
    enabled: false
    region_id: 999
    region_code: "headscale"
    region_name: "Headscale Embedded DERP"
    verify_clients: true
    stun_listen_addr: "0.0.0.0:3478"
    private_key_path: /var/lib/headscale/derp_server_private.key
    automatically_add_embedded_derp_region: true
    ipv4: 198.51.100.1
    ipv6: 2001:db8::1
  urls:
    - https://controlplane.tailscale.com/derpmap/default
  paths: []
  auto_update_enabled: true
  update_frequency: 3h
disable_check_updates: false
node:
  expiry: 0
  ephemeral:
    inactivity_timeout: 30m
  routes:
    ha:
      probe_interval: 10s
      probe_timeout: 5s
database:
  type: sqlite
  debug: false
  gorm:
    prepare_stmt: true
    parameterized_queries: true
    skip_err_record_not_found: true
    slow_threshold: 1000
  sqlite:
    path: /var/lib/headscale/db.sqlite
    write_ahead_log: true
    wal_autocheckpoint: 1000
  postgres:
    host: localhost
    port: 5432
    name: headscale
    user: foo
    pass: bar
    max_open_conns: 10
    max_idle_conns: 10
    conn_max_idle_time_secs: 3600
    ssl: false
acme_url: https://acme-v02.api.letsencrypt.org/directory
acme_email: "admin@example.com"
tls_letsencrypt_hostname: "headscale.example.com"
tls_letsencrypt_cache_dir: /var/lib/headscale/cache
tls_letsencrypt_challenge_type: HTTP-01
tls_letsencrypt_listen: ":http"
tls_cert_path: ""
tls_key_path: ""
log:
  level: info
  format: text
policy:
  mode: file
  path: ""
dns:
  magic_dns: true
  base_domain: example.com
  override_local_dns: true
  nameservers:
    global:
      - 1.1.1.1
      - 1.0.0.1
      - 2606:4700:4700::1111
      - 2606:4700:4700::1001
    split:
      foo.bar.com:
        - 1.1.1.1
  search_domains: []
  extra_records:
    - name: "grafana.myvpn.example.com"
      type: "A"
      value: "100.64.0.3"
unix_socket: /var/run/headscale/headscale.sock
unix_socket_permission: "0770"
oidc:
  only_start_if_oidc_is_available: true
  issuer: "https://your-oidc.issuer.com/path"
  client_id: "your-oidc-client-id"
  client_secret: "your-oidc-client-secret"
  use_expiry_from_token: false
  scope: ["openid", "profile", "email"]
  email_verified_required: true
  extra_params:
    domain_hint: example.com
  allowed_domains:
    - example.com
  allowed_users:
    - alice@example.com
  allowed_groups:
    - /headscale
  pkce:
    enabled: false
    method: S256
logtail:
  enabled: false
taildrop:
  enabled: true
auto_update:
  enabled: false
"""


def test_headscale_config_example_loads(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, HEADSCALE_CONFIG), {})
    # Every key homescale does not implement is named (tests/appliance/test_migrate_config.py).
    assert [w.split(": ")[1].split()[0] for w in config.warnings] == [
        "grpc_listen_addr",
    ]
    assert (config.ha_probe_interval, config.ha_probe_timeout) == (
        timedelta(seconds=10),
        timedelta(seconds=5),
    )
    assert config.taildrop_enabled is True
    assert config.acme is not None
    assert config.acme.hostname == "headscale.example.com"
    assert config.server_url == "https://headscale.example.net:443"
    assert str(config.prefix_v4) == "100.64.0.0/10"
    assert config.database_path == Path("/var/lib/headscale/db.sqlite")
    assert config.dns.nameservers_split == {"foo.bar.com": ["1.1.1.1"]}
    assert config.dns.extra_records == [
        {"name": "grafana.myvpn.example.com", "type": "A", "value": "100.64.0.3"}
    ]
    assert config.derp.urls == ["https://controlplane.tailscale.com/derpmap/default"]
    assert config.ephemeral_inactivity_timeout == timedelta(minutes=30)
    assert config.node_expiry == timedelta(0)


def test_shipped_example_config_loads(tmp_path: Path) -> None:
    from appliance.setup import example_config

    config = load_config(write(tmp_path, example_config()), {})
    assert config.warnings == []


# ---------------------------------------------------------------- configtest


def test_configtest_exit_codes(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    ok = run_cli(capsys, site, "configtest")
    assert ok.code == 0
    assert "OK" in ok.out
    site.config_path.write_text(site.config_path.read_text() + "randomize_client_port: true\n")
    bad = run_cli(capsys, site, "configtest")
    assert bad.code == 2
    assert "randomize_client_port" in bad.err
    assert bad.out == ""


def test_configtest_prints_warnings_and_passes(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    site.config_path.write_text(site.config_path.read_text() + "listen_adr: 1\n")
    res = run_cli(capsys, site, "configtest")
    assert res.code == 0
    assert "warning:" in res.err
    assert "listen_adr" in res.err


def test_configtest_malformed_yaml(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    site.config_path.write_text("server_url: [\n")
    res = run_cli(capsys, site, "configtest")
    assert res.code == 2
    assert f"{site.config_path}:" in res.err
    assert "malformed YAML" in res.err


@pytest.mark.parametrize(
    ("interval", "timeout", "says"),
    [
        ("1s", "500ms", "probe_interval: 0:00:01 is under 2s"),
        ("10s", "10s", "probe_timeout: 0:00:10 must be at least 1s and less than"),
        ("10s", "500ms", "probe_timeout: 0:00:00.500000 must be at least 1s"),
    ],
)
def test_ha_probe_timings_checked(tmp_path: Path, interval: str, timeout: str, says: str) -> None:
    text = (
        BASE
        + f"node:\n  routes:\n    ha:\n      probe_interval: {interval}\n      probe_timeout: {timeout}\n"
    )
    assert says in load_error(write(tmp_path, text))


def test_ha_probes_off(tmp_path: Path) -> None:
    text = BASE + "node:\n  routes:\n    ha:\n      probe_interval: 0\n"
    assert load_config(write(tmp_path, text), {}).ha_probe_interval == timedelta(0)
