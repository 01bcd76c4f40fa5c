"""A real ACME server for tests: Debian's pebble (Let's Encrypt's test CA).

pebble-challtestsrv runs beside it as its DNS server and answers every name with
127.0.0.1, so the CA validates challenges over loopback, over the path a real CA
would use (resolve the name, connect to the HTTP-01 or TLS-ALPN-01 port). Nothing
leaves the machine. pebble serves its ACME directory over HTTPS with a throwaway
CA of the test's own (`ca_bundle`); what it issues chains to `root()`, a root it
makes at each start.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from appliance.tlscerts import make_ca, make_server_cert
from tests.realclient import free_port

HOSTNAME = "hs.homescale.test"  # every name resolves to 127.0.0.1 for pebble


@dataclass
class Pebble:
    directory: str  # the ACME directory URL (acme_url)
    http_port: int  # where pebble validates HTTP-01
    tls_port: int  # where pebble validates TLS-ALPN-01
    ca_bundle: Path  # pebble's own HTTPS certificate's CA (REQUESTS_CA_BUNDLE for the client)
    management: int

    def root(self) -> bytes:
        """The root pebble issues under (made fresh at each start)."""
        ctx = ssl.create_default_context(cafile=str(self.ca_bundle))
        with urllib.request.urlopen(
            f"https://127.0.0.1:{self.management}/roots/0", context=ctx, timeout=10
        ) as r:
            data: bytes = r.read()
            return data


def _wait_tcp(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"pebble exited:\n{log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"pebble does not listen on {port}:\n{log.read_text()}")


@contextmanager
def run_pebble(d: Path, *, http_port: int = 0, tls_port: int = 0) -> Iterator[Pebble]:
    """pebble and its DNS server, on loopback, stopped on exit. Ports 0: free ones."""
    d.mkdir(parents=True, exist_ok=True)
    ca_pem, ca_key = make_ca()
    cert_pem, key_pem = make_server_cert(
        ["localhost", "127.0.0.1"], ca_cert_pem=ca_pem, ca_key_pem=ca_key
    )
    (d / "ca.pem").write_bytes(ca_pem)
    (d / "cert.pem").write_bytes(cert_pem)
    (d / "key.pem").write_bytes(key_pem)
    dns, dir_port, mgmt = free_port(), free_port(), free_port()
    http_port, tls_port = http_port or free_port(), tls_port or free_port()
    (d / "config.json").write_text(
        json.dumps(
            {
                "pebble": {
                    "listenAddress": f"127.0.0.1:{dir_port}",
                    "managementListenAddress": f"127.0.0.1:{mgmt}",
                    "certificate": str(d / "cert.pem"),
                    "privateKey": str(d / "key.pem"),
                    "httpPort": http_port,
                    "tlsPort": tls_port,
                    "ocspResponderURL": "",
                    "externalAccountBindingRequired": False,
                }
            }
        )
    )
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with (d / "dns.log").open("wb") as dns_log:
            procs.append(
                subprocess.Popen(
                    # Every name resolves to 127.0.0.1, and to no IPv6 address.
                    ["pebble-challtestsrv", "-dns01", f"127.0.0.1:{dns}", "-http01", "",
                     "-https01", "", "-tlsalpn01", "", "-management", f"127.0.0.1:{free_port()}",
                     "-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""],
                    stdout=dns_log, stderr=subprocess.STDOUT,
                )
            )  # fmt: skip
        log = d / "pebble.log"
        with log.open("wb") as out:
            procs.append(
                subprocess.Popen(
                    ["pebble", "-config", str(d / "config.json"), "-dnsserver", f"127.0.0.1:{dns}"],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    # No random sleeps before validation, no random nonce rejections.
                    env={
                        "PATH": "/usr/bin:/bin",
                        "PEBBLE_VA_NOSLEEP": "1",
                        "PEBBLE_WFE_NONCEREJECT": "0",
                    },
                )
            )
        _wait_tcp(dir_port, procs[1], log)
        yield Pebble(f"https://127.0.0.1:{dir_port}/dir", http_port, tls_port, d / "ca.pem", mgmt)
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
