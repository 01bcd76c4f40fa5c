"""Let's Encrypt built in, against a real ACME server: Debian's pebble (Let's Encrypt's
test CA), with its companion pebble-challtestsrv as the DNS server that resolves the
test's hostname to 127.0.0.1. Everything listens on loopback.

The CA validates each challenge over the network path a real one would use: it
resolves the name, connects to the HTTP-01 port (tls_letsencrypt_listen) or to the
main listener for TLS-ALPN-01, and only then issues. The test then checks, as a
client would, that the main listener serves a chain that verifies against pebble's
root for the hostname, that the certificate is cached, and that a renewal swaps it
in without a restart.
"""

from __future__ import annotations

import datetime as dt
import shutil
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from cryptography import x509

from appliance.acme import CertManager
from appliance.config import load_config
from appliance.serve import serve
from tests import tiers
from tests.pebble import HOSTNAME, Pebble, run_pebble
from tests.realclient import free_port

from .conftest import DERP_MAP, LOG, START_TIMEOUT

pytestmark = tiers.mark(
    "acme", shutil.which("pebble") is not None, "pebble missing (apt-get install pebble)"
)


@pytest.fixture
def pebble(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Pebble]:
    with run_pebble(tmp_path / "pebble") as p:
        # The ACME client checks pebble's HTTPS certificate against this bundle.
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(p.ca_bundle))
        yield p


def acme_config(tmp_path: Path, pebble: Pebble, challenge: str, port: int) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        f"""\
server_url: https://{HOSTNAME}:{port}
listen_addr: 127.0.0.1:{port}
metrics_listen_addr: ""
noise:
  private_key_path: noise_private.key
database:
  sqlite:
    path: db.sqlite
unix_socket: {tmp_path}/hs.sock
derp:
  paths:
    - {DERP_MAP}
dns:
  base_domain: tailnet.internal
tls_letsencrypt_hostname: {HOSTNAME}
tls_letsencrypt_challenge_type: {challenge}
tls_letsencrypt_listen: 127.0.0.1:{pebble.http_port}
tls_letsencrypt_cache_dir: acme-cache
acme_url: {pebble.directory}
acme_email: admin@homescale.test
"""
    )
    return path


def served_certificate(port: int, root: bytes) -> x509.Certificate:
    """Connect as a client that trusts only pebble's root and checks the hostname."""
    ctx = ssl.create_default_context(cadata=root.decode())
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=HOSTNAME) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


@pytest.mark.parametrize("challenge", ["HTTP-01", "TLS-ALPN-01"])
async def test_certificate_obtained_at_first_start_and_served(
    tmp_path: Path, pebble: Pebble, challenge: str
) -> None:
    port = pebble.tls_port  # TLS-ALPN-01 is validated on the main listener
    config = load_config(acme_config(tmp_path, pebble, challenge, port), {})
    assert config.acme is not None
    async with trio.open_nursery() as nursery:
        with trio.fail_after(START_TIMEOUT + 60):
            await nursery.start(serve, config, LOG)
        root = await trio.to_thread.run_sync(pebble.root)
        cert = await trio.to_thread.run_sync(served_certificate, port, root)
        nursery.cancel_scope.cancel()
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [HOSTNAME]
    cached = tmp_path / "acme-cache" / f"{HOSTNAME}.crt"
    assert x509.load_pem_x509_certificate(cached.read_bytes()) == cert
    assert oct((tmp_path / "acme-cache" / f"{HOSTNAME}.key").stat().st_mode & 0o777) == "0o600"

    # The next start serves the cached certificate: no new order.
    config = load_config(tmp_path / "config.yaml", {})
    async with trio.open_nursery() as nursery:
        with trio.fail_after(START_TIMEOUT):
            await nursery.start(serve, config, LOG)
        again = await trio.to_thread.run_sync(served_certificate, port, root)
        nursery.cancel_scope.cancel()
    assert again == cert


async def test_renewed_before_expiry_without_a_restart(tmp_path: Path, pebble: Pebble) -> None:
    port = free_port()
    config = load_config(acme_config(tmp_path, pebble, "HTTP-01", port), {})
    assert config.acme is not None
    now = [time.time()]
    certs = CertManager(config.acme, LOG, clock=lambda: now[0])
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
        from appliance.httpserver import HttpServer

        http = HttpServer(routes={}, upgrades={}, ssl_context=certs.context, logger=LOG)
        await nursery.start(http.serve, listeners)
        with trio.fail_after(60):
            await nursery.start(certs.run)
        root = await trio.to_thread.run_sync(pebble.root)
        first = await trio.to_thread.run_sync(served_certificate, port, root)
        not_after = first.not_valid_after_utc

        # 31 days before it expires: inside the renewal window.
        now[0] = (not_after - dt.timedelta(days=29)).timestamp()
        certs.recheck()
        with trio.fail_after(60):
            while True:
                second = await trio.to_thread.run_sync(served_certificate, port, root)
                if second.serial_number != first.serial_number:
                    break
                await trio.sleep(0.2)
        nursery.cancel_scope.cancel()
    assert second.serial_number != first.serial_number
    cached = tmp_path / "acme-cache" / f"{HOSTNAME}.crt"
    assert x509.load_pem_x509_certificate(cached.read_bytes()) == second


def test_listen_address_needs_no_services_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """Minimal systems (the .deb's chroot test) have no /etc/services: `:http` still works."""
    from appliance.acme import listen_address

    def no_services(name: str, proto: str = "") -> int:
        raise OSError("service not found")

    monkeypatch.setattr(socket, "getservbyname", no_services)
    assert listen_address(":http") == ("0.0.0.0", 80)
    assert listen_address("[::]:https") == ("::", 443)
    assert listen_address("127.0.0.1:8080") == ("127.0.0.1", 8080)
    with pytest.raises(ValueError, match="unknown port 'gopher'"):
        listen_address(":gopher")
