"""Configuration: headscale's `config-example.yaml` keys, typed, with located errors.

A headscale config file works unchanged: every key headscale knows is either
implemented or named in a warning that says what the user does not get; keys
headscale removed are refused with where they moved, and unknown keys are warnings naming the key and
its line. Every key can be overridden by `HOMESCALE_<KEY>` (dots as `_`), or by
headscale's `HEADSCALE_<KEY>` (homescale's name wins when both are set).
Relative paths are resolved against the config file's directory.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from .durations import parse_duration
from .errors import ConfigError

SEARCH_PATHS = (
    Path("/etc/homescale/config.yaml"),
    Path("~/.homescale/config.yaml"),
    Path("config.yaml"),
)

# ---------------------------------------------------------------- value parsers
# Each parser takes the raw YAML (or environment string) value and returns the typed
# value, or raises ValueError whose text says what was expected.


def _str(v: Any) -> str:
    if isinstance(v, bool | dict | list):
        raise ValueError("expected a string")
    return "" if v is None else str(v)


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "false", "1", "0", "yes", "no"):
        return v.lower() in ("true", "1", "yes")
    raise ValueError("expected true or false")


def _int(v: Any) -> int:
    if isinstance(v, bool):
        raise ValueError("expected an integer")
    try:
        return int(v)
    except (TypeError, ValueError):
        raise ValueError("expected an integer") from None


def _count(v: Any) -> int:
    n = _int(v)
    if n < 0:
        raise ValueError("expected 0 (no limit) or a positive number")
    return n


def _hostport(v: Any) -> str:
    s = _str(v)
    host, sep, port = s.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("expected a host:port like 127.0.0.1:8080 or [::]:8080")
    if host.startswith("[") != host.endswith("]"):
        raise ValueError("expected a host:port like 127.0.0.1:8080 or [::]:8080")
    return s


def _optional_hostport(v: Any) -> str:
    return "" if v in (None, "") else _hostport(v)


def _url(v: Any) -> str:
    s = _str(v)
    parts = urlsplit(s)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an http:// or https:// URL like https://hs.example.com")
    return s.rstrip("/")


def _prefix(version: int) -> Callable[[Any], ipaddress.IPv4Network | ipaddress.IPv6Network | None]:
    def parse(v: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
        if v in (None, ""):
            return None
        try:
            net = ipaddress.ip_network(_str(v), strict=True)
        except ValueError as e:
            raise ValueError(
                f"expected an IPv{version} CIDR like "
                f"{'100.64.0.0/10' if version == 4 else 'fd7a:115c:a1e0::/48'} ({e})"
            ) from None
        if net.version != version:
            raise ValueError(f"expected an IPv{version} CIDR, got an IPv{net.version} one")
        return net

    return parse


def _networks(v: Any) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """A list of IPs or CIDRs (headscale's `trusted_proxies`); host bits must be zero."""
    nets = []
    for item in _str_list(v):
        try:
            nets.append(ipaddress.ip_network(item, strict=True))
        except ValueError as e:
            raise ValueError(
                f"expected IPs or CIDRs like 127.0.0.1 or 10.0.0.0/8, got {item!r} ({e})"
            ) from None
    return tuple(nets)


def _ip(version: int) -> Callable[[Any], str]:
    def parse(v: Any) -> str:
        if v in (None, ""):
            return ""
        try:
            addr = ipaddress.ip_address(_str(v))
        except ValueError:
            raise ValueError(f"expected an IPv{version} address") from None
        if addr.version != version:
            raise ValueError(f"expected an IPv{version} address")
        return str(addr)

    return parse


def _duration(v: Any) -> timedelta:
    return parse_duration(v)


def _choice(*options: str) -> Callable[[Any], str]:
    def parse(v: Any) -> str:
        s = _str(v).lower()
        if s not in options:
            raise ValueError(f"expected one of {', '.join(options)}")
        return s

    return parse


def _str_list(v: Any) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        return [p.strip() for p in v.split(",") if p.strip()] if v.strip() else []
    if not isinstance(v, list):
        raise ValueError("expected a list of strings")
    return [_str(x) for x in v]


def _url_list(v: Any) -> list[str]:
    return [_url(x) for x in _str_list(v)]


def _split_ns(v: Any) -> dict[str, list[str]]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ValueError("expected a map of domain -> list of nameserver addresses")
    return {str(k): _str_list(x) for k, x in v.items()}


def _records(v: Any) -> list[dict[str, str]]:
    if v is None:
        return []
    if not isinstance(v, list):
        raise ValueError("expected a list of {name, type, value} records")
    out = []
    for rec in v:
        if not isinstance(rec, dict) or not {"name", "value"} <= set(rec):
            raise ValueError("expected each record to have name, type and value")
        rtype = str(rec.get("type", "A")).upper()
        if rtype not in ("A", "AAAA"):
            raise ValueError(f"record type {rtype!r}: expected A or AAAA")
        out.append({"name": str(rec["name"]), "type": rtype, "value": str(rec["value"])})
    return out


def _str_map(v: Any) -> dict[str, str]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ValueError("expected a map of name -> value")
    return {str(k): _str(x) for k, x in v.items()}


def _pkce_method(v: Any) -> str:
    s = _str(v)
    if s not in ("S256", "plain"):
        raise ValueError("expected S256 or plain")
    return s


def read_records_file(path: Path) -> list[dict[str, str]]:
    """headscale's extra records file: JSON, Go's case-insensitive field names."""
    import json

    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"dns.extra_records_path: cannot read {path}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not JSON ({e})") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ConfigError(f"{path}: expected a JSON list of {{name, type, value}} records")
    try:
        return _records([{str(k).lower(): v for k, v in r.items()} for r in data])
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None


def _octal_mode(v: Any) -> int:
    s = _str(v).lower().removeprefix("0o")
    try:
        mode = int(s, 8)
    except ValueError:
        raise ValueError('expected an octal file mode like "0770"') from None
    if not 0 <= mode <= 0o777:
        raise ValueError('expected an octal file mode like "0770"')
    return mode


def _level(v: Any) -> str:
    return _choice(
        "trace", "debug", "info", "warn", "warning", "error", "fatal", "panic", "disabled"
    )(v)


def _acme_challenge(v: Any) -> str:
    s = _str(v).upper()
    if s not in ("HTTP-01", "TLS-ALPN-01"):
        raise ValueError("expected HTTP-01 or TLS-ALPN-01")
    return s


def _acme_listen(v: Any) -> str:
    from .acme import listen_address

    s = _str(v)
    listen_address(s)  # ValueError says what is wrong
    return s


# ---------------------------------------------------------------- the schema
# key -> (parser, default). Defaults are headscale's (hscontrol/types/config.go and
# config-example.yaml), with homescale's own names for paths.

SCHEMA: dict[str, tuple[Callable[[Any], Any], Any]] = {
    "server_url": (_url, "http://127.0.0.1:8080"),
    "listen_addr": (_hostport, "127.0.0.1:8080"),
    "metrics_listen_addr": (_optional_hostport, "127.0.0.1:9090"),
    "tls_cert_path": (_str, ""),
    "tls_key_path": (_str, ""),
    "noise.private_key_path": (_str, "/var/lib/homescale/noise_private.key"),
    "prefixes.v4": (_prefix(4), "100.64.0.0/10"),
    "prefixes.v6": (_prefix(6), "fd7a:115c:a1e0::/48"),
    "prefixes.allocation": (_choice("sequential", "random"), "sequential"),
    "derp.server.enabled": (_bool, False),
    "derp.server.region_id": (_int, 999),
    "derp.server.region_code": (_str, "headscale"),
    "derp.server.region_name": (_str, "Headscale Embedded DERP"),
    "derp.server.verify_clients": (_bool, True),
    "derp.server.stun_listen_addr": (_optional_hostport, "0.0.0.0:3478"),
    "derp.server.private_key_path": (_str, "/var/lib/homescale/derp_server_private.key"),
    "derp.server.automatically_add_embedded_derp_region": (_bool, True),
    "derp.server.ipv4": (_ip(4), ""),
    "derp.server.ipv6": (_ip(6), ""),
    "derp.urls": (_url_list, []),
    "derp.paths": (_str_list, []),
    "derp.auto_update_enabled": (_bool, True),
    "derp.update_frequency": (_duration, "3h"),
    "database.type": (_choice("sqlite", "sqlite3"), "sqlite"),
    "database.sqlite.path": (_str, "/var/lib/homescale/db.sqlite"),
    "database.sqlite.write_ahead_log": (_bool, True),
    "unix_socket": (_str, "/var/run/homescale/homescale.sock"),
    "unix_socket_permission": (_octal_mode, "0770"),
    "policy.mode": (_choice("file", "database"), "file"),
    "policy.path": (_str, ""),
    "dns.magic_dns": (_bool, True),
    "dns.base_domain": (_str, ""),
    "dns.override_local_dns": (_bool, True),
    "dns.nameservers.global": (_str_list, []),
    "dns.nameservers.split": (_split_ns, {}),
    "dns.search_domains": (_str_list, []),
    "dns.extra_records": (_records, []),
    # A JSON list of {name, type, value} (Go's tailcfg.DNSRecord), added to the above.
    "dns.extra_records_path": (_str, ""),
    "log.level": (_level, "info"),
    "log.format": (_choice("text", "json"), "text"),
    "logtail.enabled": (_bool, False),
    # Taildrop: clients may send files to their own devices (headscale's default: on).
    "taildrop.enabled": (_bool, True),
    # The web console (/admin): who signs in through OIDC as an admin (emails, IdP groups).
    "web.admins": (_str_list, []),
    "web.admin_groups": (_str_list, []),
    # Tell clients they may update themselves (their default-auto-update node attribute).
    "auto_update.enabled": (_bool, False),
    "node.expiry": (_duration, "0"),
    # HA subnet routers are pinged this often (0: never) and fail over when one does not
    # answer within probe_timeout while still connected (a hung router).
    "node.routes.ha.probe_interval": (_duration, "10s"),
    "node.routes.ha.probe_timeout": (_duration, "5s"),
    "node.require_approval": (_bool, False),
    "node.ephemeral.inactivity_timeout": (_duration, "120s"),
    "disable_check_updates": (_bool, False),
    "oidc.only_start_if_oidc_is_available": (_bool, True),
    "oidc.issuer": (_str, ""),
    "oidc.client_id": (_str, ""),
    "oidc.client_secret": (_str, ""),
    "oidc.client_secret_path": (_str, ""),
    "oidc.scope": (_str_list, ["openid", "profile", "email"]),
    "oidc.extra_params": (_str_map, {}),
    "oidc.allowed_domains": (_str_list, []),
    "oidc.allowed_users": (_str_list, []),
    "oidc.allowed_groups": (_str_list, []),
    "oidc.email_verified_required": (_bool, True),
    "oidc.pkce.enabled": (_bool, False),
    "oidc.pkce.method": (_pkce_method, "S256"),
    "oidc.use_expiry_from_token": (_bool, False),
    # headscale's `cli:` section: where the CLI sends commands when not on the server.
    "cli.address": (_str, ""),
    "cli.api_key": (_str, ""),
    "cli.timeout": (_duration, "5s"),
    "cli.insecure": (_bool, False),
    # false: no STUN listener (homescale's other spelling: stun_listen_addr: "").
    "derp.server.stun.enabled": (_bool, True),
    # Let's Encrypt (appliance/acme.py): headscale's keys and defaults, but the cache's.
    "tls_letsencrypt_hostname": (_str, ""),
    "tls_letsencrypt_challenge_type": (_acme_challenge, "HTTP-01"),
    "tls_letsencrypt_listen": (_acme_listen, ":http"),
    "tls_letsencrypt_cache_dir": (_str, "/var/lib/homescale/cache"),
    "acme_url": (_url, "https://acme-v02.api.letsencrypt.org/directory"),
    "acme_email": (_str, ""),
    # homescale's own (headscale has no such key): per-IP caps on open connections.
    "limits.max_connections_per_ip": (_count, 1024),
    "limits.max_derp_connections_per_ip": (_count, 512),
    # headscale's reverse proxies: every client behind one shares its address, so the
    # per-IP caps above do not apply to them (X-Forwarded-For is not read; see below).
    "trusted_proxies": (_networks, []),
}


@dataclass(frozen=True)
class Unsupported:
    """A headscale key for a feature homescale does not have."""

    loss: str  # what the user does not get, said in the warning
    # True when the value asks for nothing homescale does not do (headscale's "off").
    inert: Callable[[Any, Callable[[str], Any]], bool] = lambda v, get: False


def _off(*values: Any) -> Callable[[Any, Callable[[str], Any]], bool]:
    return lambda v, get: v in values or str(v).lower() in {str(x).lower() for x in values}


def _always(v: Any, get: Callable[[str], Any]) -> bool:
    return True


_GRPC = "no gRPC API: use the REST API under /api/v1 (homescale's CLI does: cli.address)"
_GORM = "a setting of headscale's Go ORM (gorm); homescale has no such layer"

# Keys headscale reads (hscontrol/types/config.go) that homescale does not implement.
# An entry ending in "." covers its whole section. A key whose value asks for nothing
# (its `inert` test) passes quietly; any other gets a warning naming the key, its file
# and line, and what is lost. (None is unsafe to ignore: TLS and OIDC are built in.)
UNSUPPORTED: dict[str, Unsupported] = {
    "grpc_listen_addr": Unsupported(_GRPC, inert=_off("", None)),
    "grpc_allow_insecure": Unsupported(_GRPC, inert=_off(False, None)),
    "database.debug": Unsupported("SQL statements are not logged", inert=_off(False, None)),
    "database.gorm.prepare_stmt": Unsupported(_GORM, inert=_off(True, None)),
    "database.gorm.parameterized_queries": Unsupported(_GORM, inert=_off(True, None)),
    "database.gorm.skip_err_record_not_found": Unsupported(_GORM, inert=_off(True, None)),
    "database.gorm.slow_threshold": Unsupported(
        "slow queries are not logged", inert=_off(1000, None)
    ),
    # Read by headscale only with database.type: postgres, which homescale refuses.
    "database.postgres.": Unsupported("no PostgreSQL", inert=_always),
    "database.sqlite.wal_autocheckpoint": Unsupported(
        "homescale runs with SQLite's default (1000 pages)", inert=_off(1000, None)
    ),
    "preauth_keys.revoked_retention": Unsupported(
        "expired pre-auth keys are kept until deleted (homescale preauthkeys delete)"
    ),
    "tuning.": Unsupported("tunes headscale's internals; homescale has no such knob"),
    "policy.v1": Unsupported("headscale's v1 policy format is gone; homescale reads v2"),
}


def unsupported(key: str) -> Unsupported | None:
    """The entry for `key`: its own, else its section's."""
    if key in UNSUPPORTED:
        return UNSUPPORTED[key]
    sections = [p for p in UNSUPPORTED if p.endswith(".") and key.startswith(p)]
    return UNSUPPORTED[max(sections, key=len)] if sections else None


# Keys headscale removed, with where they went (hscontrol/types/config.go).
REMOVED = {
    "randomize_client_port": 'moved to the policy: set "randomizeClientPort": true at the top '
    "level of your policy file",
    "acl_policy_path": "renamed to policy.path",
    "dns_config": "moved to dns (dns.magic_dns, dns.base_domain, dns.nameservers.global, ...)",
    "dns.use_username_in_magic_dns": "removed; MagicDNS names are the node's given name",
    "oidc.strip_email_domain": "removed in headscale 0.26",
    "oidc.map_legacy_users": "removed in headscale 0.26",
    "oidc.expiry": "moved to node.expiry",
    "private_key_path": "removed; homescale uses noise.private_key_path only",
    "db_type": "moved to database.type",
    "db_path": "moved to database.sqlite.path",
}

_PATH_KEYS = (
    "tls_cert_path",
    "tls_key_path",
    "noise.private_key_path",
    "derp.server.private_key_path",
    "database.sqlite.path",
    "unix_socket",
    "policy.path",
    "tls_letsencrypt_cache_dir",
)


# ---------------------------------------------------------------- typed settings


@dataclass(frozen=True)
class DerpSettings:
    server_enabled: bool
    region_id: int
    region_code: str
    region_name: str
    verify_clients: bool
    stun_listen_addr: str
    private_key_path: Path
    automatically_add_embedded_region: bool
    ipv4: str
    ipv6: str
    urls: list[str]
    paths: list[Path]
    auto_update_enabled: bool
    update_frequency: timedelta


@dataclass(frozen=True)
class DNSSettings:
    magic_dns: bool
    base_domain: str
    override_local_dns: bool
    nameservers_global: list[str]
    nameservers_split: dict[str, list[str]]
    search_domains: list[str]
    extra_records: list[dict[str, str]]  # in effect at start: the config's, then the file's
    # dns.extra_records_path, watched by the server (the file's records replace its own);
    # `config_records` are the ones written in the config itself.
    extra_records_path: Path | None = None
    config_records: list[dict[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class OIDCSettings:
    """headscale's `oidc` block; present only when `oidc.issuer` is set."""

    issuer: str
    client_id: str
    client_secret: str
    scope: list[str]
    extra_params: dict[str, str]
    allowed_domains: list[str]
    allowed_users: list[str]
    allowed_groups: list[str]
    email_verified_required: bool
    pkce_enabled: bool
    pkce_method: str
    use_expiry_from_token: bool
    only_start_if_available: bool


@dataclass(frozen=True)
class AcmeSettings:
    """Let's Encrypt: present only when `tls_letsencrypt_hostname` is set."""

    hostname: str
    challenge_type: str  # HTTP-01 or TLS-ALPN-01
    listen: str  # where HTTP-01 is answered (headscale's ":http")
    cache_dir: Path
    directory_url: str
    email: str


@dataclass(frozen=True)
class CliSettings:
    """headscale's `cli:` section: the server the CLI talks to when not on its machine."""

    address: str
    api_key: str
    timeout: timedelta
    insecure: bool


@dataclass(frozen=True)
class Config:
    """The settings homescale runs with; built only by `load_config`/`config_from_values`."""

    source: Path | None
    server_url: str
    listen_addr: str
    metrics_listen_addr: str
    tls_cert_path: Path | None
    tls_key_path: Path | None
    noise_private_key_path: Path
    prefix_v4: ipaddress.IPv4Network | None
    prefix_v6: ipaddress.IPv6Network | None
    ip_allocation: str
    derp: DerpSettings
    database_path: Path
    write_ahead_log: bool
    unix_socket: Path
    unix_socket_permission: int
    policy_mode: str
    policy_path: Path | None
    dns: DNSSettings
    log_level: str
    log_format: str
    logtail_enabled: bool
    taildrop_enabled: bool  # offer Taildrop (tailcfg.CapabilityFileSharing)
    auto_update_enabled: bool  # clients' default-auto-update attribute (headscale's auto_update)
    node_expiry: timedelta  # 0: node keys never expire
    node_require_approval: bool  # device approval: new nodes wait for `nodes approve`
    ha_probe_interval: timedelta  # 0: HA subnet routers are not probed
    ha_probe_timeout: timedelta
    ephemeral_inactivity_timeout: timedelta
    disable_check_updates: bool
    cli: CliSettings
    max_connections_per_ip: int = 1024  # 0: no limit
    max_derp_connections_per_ip: int = 512
    # Exempt from the per-IP caps (a reverse proxy carries every client's connection).
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    warnings: list[str] = field(default_factory=list)
    oidc: OIDCSettings | None = None  # None: no identity provider, logins by the CLI only
    web_admins: tuple[str, ...] = ()  # emails that sign in to the console as admins (OIDC)
    web_admin_groups: tuple[str, ...] = ()  # ... or the IdP groups whose members do
    acme: AcmeSettings | None = None  # None: no Let's Encrypt


# ---------------------------------------------------------------- loading


def env_name(key: str, product: str = "HOMESCALE") -> str:
    return f"{product}_" + key.replace(".", "_").upper()


def env_lookup(environ: Mapping[str, str], key: str) -> tuple[str, str] | None:
    """(variable, value) overriding `key`: HOMESCALE_<KEY>, else headscale's HEADSCALE_<KEY>
    (container setups written for headscale keep working)."""
    for product in ("HOMESCALE", "HEADSCALE"):
        name = env_name(key, product)
        if name in environ:
            return name, environ[name]
    return None


def find_config(explicit: str | os.PathLike[str] | None, environ: Mapping[str, str]) -> Path | None:
    """The config path: `-c`, then $HOMESCALE_CONFIG (or $HEADSCALE_CONFIG), then the
    search paths; None if none exist."""
    if explicit:
        return Path(explicit)
    for name in ("HOMESCALE_CONFIG", "HEADSCALE_CONFIG"):
        if environ.get(name):
            return Path(environ[name])
    for p in SEARCH_PATHS:
        p = p.expanduser()
        if p.is_file():
            return p
    return None


def _flatten(node: Any, prefix: str, out: dict[str, tuple[Any, int | None]]) -> None:
    """Flatten nested YAML mappings to dotted keys, keeping each key's 1-based line."""
    if not isinstance(node, dict):
        return
    for k, v in node.items():
        key = f"{prefix}{k}"
        line = None
        if isinstance(node, CommentedMap):
            try:
                line = node.lc.key(k)[0] + 1
            except (KeyError, TypeError):
                line = None
        is_leaf_map = key in ("dns.nameservers.split",) or key.startswith("oidc.extra_params")
        if isinstance(v, dict) and v and not is_leaf_map:
            out[key] = (_Section, line)
            _flatten(v, key + ".", out)
        else:
            out[key] = (_plain(v), line)


class _Section:
    """Marker: this key is a mapping whose children were flattened."""


def _plain(v: Any) -> Any:
    if isinstance(v, CommentedMap):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, CommentedSeq):
        return [_plain(x) for x in v]
    return v


def read_yaml(path: Path) -> Any:
    """Parse a YAML file; a syntax error names the file, line and column."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: config file not found (create one with `homescale init`, or pass -c FILE)"
        ) from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError(
            f"{path}:{line}:{column}: not UTF-8 text (byte 0x{data[e.start]:02x}); "
            f"save the file as UTF-8"
        ) from None
    try:
        return YAML(typ="rt").load(text)
    except MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: malformed YAML: {e.problem or e.context}") from None
    except YAMLError as e:
        raise ConfigError(f"{path}: malformed YAML: {e}") from None


def load_config(path: Path | None, environ: Mapping[str, str] | None = None) -> Config:
    """Load and check a config file (or defaults when `path` is None) plus env overrides."""
    environ = os.environ if environ is None else environ
    raw: Any = {}
    if path is not None:
        raw = read_yaml(path)
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a YAML mapping of settings at the top level")
    flat: dict[str, tuple[Any, int | None]] = {}
    _flatten(raw, "", flat)
    where = str(path) if path else "<defaults>"

    warnings: list[str] = []
    for key, (_, line) in flat.items():
        for old, hint in REMOVED.items():
            if key == old or key.startswith(old + "."):
                loc = f"{where}:{line}" if line else where
                raise ConfigError(f"{loc}: the key {key!r} was removed: {hint}")

    values: dict[str, Any] = {}
    for key, (parse, default) in SCHEMA.items():
        raw_value, line = flat.get(key, (default, None))
        origin = f"{where}:{line}" if line else where
        env = env_lookup(environ, key)
        if env is not None:
            raw_value, origin = env[1], f"environment variable {env[0]}"
        if raw_value is _Section:
            raise ConfigError(f"{origin}: {key}: expected a value, got a mapping")
        try:
            values[key] = parse(raw_value)
        except ValueError as e:
            raise ConfigError(f"{origin}: {key}: {e}, got {raw_value!r}") from None

    # The old top-level alias still works (headscale warns about it too).
    if (
        "ephemeral_node_inactivity_timeout" in flat
        and "node.ephemeral.inactivity_timeout" not in flat
    ):
        raw_value, line = flat["ephemeral_node_inactivity_timeout"]
        try:
            values["node.ephemeral.inactivity_timeout"] = _duration(raw_value)
        except ValueError as e:
            raise ConfigError(
                f"{where}:{line}: ephemeral_node_inactivity_timeout: {e}, got {raw_value!r}"
            ) from None
        warnings.append(
            f"{where}:{line}: ephemeral_node_inactivity_timeout is deprecated; "
            f"use node.ephemeral.inactivity_timeout"
        )

    if not values["derp.server.stun.enabled"]:
        values["derp.server.stun_listen_addr"] = ""
    _check_unsupported(flat, where, environ, warnings)
    for key, (v, line) in flat.items():
        if key in SCHEMA or v is _Section or unsupported(key) or key in _ALIASES:
            continue
        loc = f"{where}:{line}" if line else where
        warnings.append(f"{loc}: unknown configuration key {key!r} (ignored)")

    base = path.parent.resolve() if path is not None else Path.cwd()
    if values["dns.extra_records_path"]:
        # Watched by the server (serve._watch_records_file): an edit reaches clients live.
        values["dns.config_records"] = values["dns.extra_records"]
        values["dns.extra_records_path"] = (
            base / Path(values["dns.extra_records_path"]).expanduser()
        )
        file_records = read_records_file(values["dns.extra_records_path"])
        values["dns.extra_records"] = values["dns.extra_records"] + file_records
    return config_from_values(values, source=path, base=base, warnings=warnings)


# Old spellings read in place of their new key (load_config).
_ALIASES = ("ephemeral_node_inactivity_timeout",)


def _check_unsupported(
    flat: dict[str, tuple[Any, int | None]],
    where: str,
    environ: Mapping[str, str],
    warnings: list[str],
) -> None:
    """Warn about each headscale key set to something homescale does not do."""
    given: dict[str, tuple[Any, str]] = {}
    for key, (v, line) in flat.items():
        if v is not _Section and key not in SCHEMA and unsupported(key):
            given[key] = (v, f"{where}:{line}" if line else where)
    for key in UNSUPPORTED:
        env = None if key.endswith(".") or key in SCHEMA else env_lookup(environ, key)
        if env is not None:
            given[key] = (env[1], f"environment variable {env[0]}")

    def get(key: str) -> Any:
        return given.get(key, (None, ""))[0]

    for key, (v, origin) in given.items():
        entry = unsupported(key)
        if entry is not None and not entry.inert(v, get):
            warnings.append(f"{origin}: {key} is not supported by homescale: {entry.loss}")


def config_from_values(
    values: dict[str, Any], *, source: Path | None, base: Path, warnings: list[str]
) -> Config:
    def resolve(text: str) -> Path:
        """Relative paths are relative to the config file's folder; `~` is expanded."""
        path = Path(text).expanduser()
        return path if path.is_absolute() else base / path

    def p(key: str) -> Path | None:
        return resolve(values[key]) if values[key] else None

    def req(key: str) -> Path:
        path = p(key)
        if path is None:
            raise ConfigError(f"{key}: must not be empty")
        return path

    if values["prefixes.v4"] is None and values["prefixes.v6"] is None:
        raise ConfigError("prefixes: set at least one of prefixes.v4 and prefixes.v6")
    interval, timeout = (
        values["node.routes.ha.probe_interval"],
        values["node.routes.ha.probe_timeout"],
    )
    if interval and interval < timedelta(seconds=2):
        raise ConfigError(
            f"node.routes.ha.probe_interval: {interval} is under 2s (0 turns probing off)"
        )
    if interval and not timedelta(seconds=1) <= timeout < interval:
        raise ConfigError(
            f"node.routes.ha.probe_timeout: {timeout} must be at least 1s and less than "
            f"probe_interval ({interval})"
        )
    if bool(values["tls_cert_path"]) != bool(values["tls_key_path"]):
        raise ConfigError("tls_cert_path and tls_key_path: set both (TLS) or neither (plain HTTP)")
    if values["dns.magic_dns"] and not values["dns.base_domain"]:
        raise ConfigError(
            "dns.base_domain: must be set when dns.magic_dns is true "
            "(for example base_domain: tailnet.example.com)"
        )
    server_host = urlsplit(values["server_url"]).hostname or ""
    base_domain = values["dns.base_domain"].strip(".")
    # headscale refuses both the domain itself and names under it (types/config.go isSafeServerURL).
    if base_domain and (server_host == base_domain or server_host.endswith("." + base_domain)):
        raise ConfigError(
            f"dns.base_domain: {values['dns.base_domain']!r} must not contain the "
            f"server_url host {server_host!r} (clients would resolve the control "
            f"server through MagicDNS)"
        )
    derp = DerpSettings(
        server_enabled=values["derp.server.enabled"],
        region_id=values["derp.server.region_id"],
        region_code=values["derp.server.region_code"],
        region_name=values["derp.server.region_name"],
        verify_clients=values["derp.server.verify_clients"],
        stun_listen_addr=values["derp.server.stun_listen_addr"],
        private_key_path=req("derp.server.private_key_path"),
        automatically_add_embedded_region=values[
            "derp.server.automatically_add_embedded_derp_region"
        ],
        ipv4=values["derp.server.ipv4"],
        ipv6=values["derp.server.ipv6"],
        urls=values["derp.urls"],
        paths=[resolve(x) for x in values["derp.paths"]],
        auto_update_enabled=values["derp.auto_update_enabled"],
        update_frequency=values["derp.update_frequency"],
    )
    dns = DNSSettings(
        magic_dns=values["dns.magic_dns"],
        base_domain=values["dns.base_domain"].strip("."),
        override_local_dns=values["dns.override_local_dns"],
        nameservers_global=values["dns.nameservers.global"],
        nameservers_split=values["dns.nameservers.split"],
        search_domains=values["dns.search_domains"],
        extra_records=values["dns.extra_records"],
        extra_records_path=values["dns.extra_records_path"] or None,
        config_records=values.get("dns.config_records", values["dns.extra_records"]),
    )
    return Config(
        source=source,
        server_url=values["server_url"],
        listen_addr=values["listen_addr"],
        metrics_listen_addr=values["metrics_listen_addr"],
        tls_cert_path=p("tls_cert_path"),
        tls_key_path=p("tls_key_path"),
        noise_private_key_path=req("noise.private_key_path"),
        prefix_v4=values["prefixes.v4"],
        prefix_v6=values["prefixes.v6"],
        ip_allocation=values["prefixes.allocation"],
        derp=derp,
        database_path=req("database.sqlite.path"),
        write_ahead_log=values["database.sqlite.write_ahead_log"],
        unix_socket=req("unix_socket"),
        unix_socket_permission=values["unix_socket_permission"],
        policy_mode=values["policy.mode"],
        policy_path=p("policy.path"),
        dns=dns,
        log_level=values["log.level"],
        log_format=values["log.format"],
        logtail_enabled=values["logtail.enabled"],
        taildrop_enabled=values["taildrop.enabled"],
        auto_update_enabled=values["auto_update.enabled"],
        node_expiry=values["node.expiry"],
        node_require_approval=values["node.require_approval"],
        ha_probe_interval=values["node.routes.ha.probe_interval"],
        ha_probe_timeout=values["node.routes.ha.probe_timeout"],
        ephemeral_inactivity_timeout=values["node.ephemeral.inactivity_timeout"],
        disable_check_updates=values["disable_check_updates"],
        cli=CliSettings(
            address=values["cli.address"],
            api_key=values["cli.api_key"],
            timeout=values["cli.timeout"],
            insecure=values["cli.insecure"],
        ),
        max_connections_per_ip=values["limits.max_connections_per_ip"],
        max_derp_connections_per_ip=values["limits.max_derp_connections_per_ip"],
        trusted_proxies=values["trusted_proxies"],
        web_admins=tuple(a.lower() for a in values["web.admins"]),
        web_admin_groups=tuple(values["web.admin_groups"]),
        warnings=warnings,
        oidc=_oidc_settings(values, resolve),
        acme=_acme_settings(values, resolve),
    )


def _acme_settings(values: dict[str, Any], resolve: Callable[[str], Path]) -> AcmeSettings | None:
    """headscale's rules for tls_letsencrypt_hostname (types/config.go)."""
    hostname = values["tls_letsencrypt_hostname"].strip()
    if not hostname:
        return None
    if values["tls_cert_path"] or values["tls_key_path"]:
        raise ConfigError(
            "tls_letsencrypt_hostname and tls_cert_path/tls_key_path: set one, not both "
            "(Let's Encrypt, or your own certificate)"
        )
    if not values["server_url"].startswith("https://"):
        raise ConfigError(
            f"tls_letsencrypt_hostname: needs an https:// server_url (clients must use the "
            f"certificate), got {values['server_url']!r}"
        )
    if not values["tls_letsencrypt_cache_dir"]:
        raise ConfigError("tls_letsencrypt_cache_dir: must not be empty")
    return AcmeSettings(
        hostname=hostname,
        challenge_type=values["tls_letsencrypt_challenge_type"],
        listen=values["tls_letsencrypt_listen"],
        cache_dir=resolve(values["tls_letsencrypt_cache_dir"]),
        directory_url=values["acme_url"],
        email=values["acme_email"],
    )


def _oidc_settings(values: dict[str, Any], resolve: Callable[[str], Path]) -> OIDCSettings | None:
    """The checks headscale makes when `oidc.issuer` is set (types/config.go validateOIDCConfig)."""
    issuer = values["oidc.issuer"]
    if not issuer:
        return None
    try:
        _url(issuer)  # kept as written: the provider's discovery must name it exactly
    except ValueError:
        raise ConfigError(
            f"oidc.issuer: expected an http:// or https:// URL like "
            f"https://sso.example.com/application/o/homescale/, got {issuer!r}"
        ) from None
    if not values["oidc.client_id"]:
        raise ConfigError("oidc.client_id: required when oidc.issuer is set")
    secret, secret_path = values["oidc.client_secret"], values["oidc.client_secret_path"]
    if secret and secret_path:
        raise ConfigError(
            "oidc.client_secret and oidc.client_secret_path: set one of them, not both"
        )
    if secret_path:
        path = resolve(os.path.expandvars(secret_path))
        try:
            secret = path.read_text().strip()
        except OSError as e:
            raise ConfigError(
                f"oidc.client_secret_path: cannot read {path}: {e.strerror}"
            ) from None
        if not secret:
            raise ConfigError(f"oidc.client_secret_path: {path} is empty")
    if not secret:
        raise ConfigError(
            "oidc.client_secret or oidc.client_secret_path: required when oidc.issuer is set"
        )
    if "openid" not in values["oidc.scope"]:
        raise ConfigError(
            f"oidc.scope: must contain openid (an OpenID Connect login), got "
            f"{values['oidc.scope']!r}"
        )
    return OIDCSettings(
        issuer=values["oidc.issuer"],
        client_id=values["oidc.client_id"],
        client_secret=secret,
        scope=values["oidc.scope"],
        extra_params=values["oidc.extra_params"],
        allowed_domains=values["oidc.allowed_domains"],
        allowed_users=values["oidc.allowed_users"],
        allowed_groups=values["oidc.allowed_groups"],
        email_verified_required=values["oidc.email_verified_required"],
        pkce_enabled=values["oidc.pkce.enabled"],
        pkce_method=values["oidc.pkce.method"],
        use_expiry_from_token=values["oidc.use_expiry_from_token"],
        only_start_if_available=values["oidc.only_start_if_oidc_is_available"],
    )


def split_hostport(addr: str) -> tuple[str, int]:
    """`127.0.0.1:8080` / `[::]:8080` / `:8080` -> (host, port); empty host = all addresses."""
    host, _, port = addr.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)
