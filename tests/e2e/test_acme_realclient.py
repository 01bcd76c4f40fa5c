"""Issue 11 with real clients: the Let's Encrypt certificate is what real Tailscale
clients get, for the control protocol and for the embedded DERP relay.

homescale obtains its certificate from pebble (Let's Encrypt's test CA; TLS-ALPN-01,
validated by the CA on the main listener) at first start. Two tsnet nodes trust
only pebble's root (SSL_CERT_FILE) and resolve the server's name through a hosts
file of their own (a private mount namespace): they register over https, and,
forced onto DERP, reach each other through the relay on the same listener -- so
both paths verified the ACME chain for the hostname. No pin, no private CA.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import trio

from tests import realclient, tiers
from tests.e2e.conftest import ONLINE_WITHIN, fetch_until, node_by_name, wait_nodes
from tests.pebble import HOSTNAME, run_pebble
from tests.realclient import HOMESCALE, LogFile, msg_has

pytestmark = [
    pytest.mark.realclient,
    tiers.mark(
        "acme", shutil.which("pebble") is not None, "pebble missing (apt-get install pebble)"
    ),
]


class AcmeServer:
    """`homescale serve` with Let's Encrypt on (its config from `init`, TLS made by ACME)."""

    def __init__(self, directory: Path, port: int, acme_url: str, acme_ca: Path) -> None:
        self.url = f"https://{HOSTNAME}:{port}"
        self.data = directory / "data"
        subprocess.run(
            [str(HOMESCALE), "init", "--data-dir", str(self.data), "--server-url", self.url],
            check=True,
            capture_output=True,
            timeout=60,
        )
        self.config = self.data / "config.yaml"
        text = self.config.read_text()
        for old, new in [
            ("tls_cert_path: tls/server.pem", 'tls_cert_path: ""'),
            ("tls_key_path: tls/server.key", 'tls_key_path: ""'),
            ('tls_letsencrypt_hostname: ""', f"tls_letsencrypt_hostname: {HOSTNAME}"),
            ("tls_letsencrypt_challenge_type: HTTP-01", "tls_letsencrypt_challenge_type: TLS-ALPN-01"),
            ("acme_url: https://acme-v02.api.letsencrypt.org/directory", f"acme_url: {acme_url}"),
            ("metrics_listen_addr: 127.0.0.1:9090", f"metrics_listen_addr: 127.0.0.1:{realclient.free_port()}"),
            ('stun_listen_addr: "0.0.0.0:3478"', f'stun_listen_addr: "127.0.0.1:{realclient.free_port(2)}"'),
        ]:  # fmt: skip
            assert old in text, old
            text = text.replace(old, new)
        self.config.write_text(text)
        self.log = LogFile(directory / "server.log")
        with self.log.path.open("ab") as out:
            self.proc = subprocess.Popen(
                [str(HOMESCALE), "-c", str(self.config), "serve"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=directory,
                # pebble's directory is served over HTTPS with the test's own CA.
                env={"PATH": "/usr/bin:/bin", "REQUESTS_CA_BUNDLE": str(acme_ca)},
            )
        deadline = time.monotonic() + 60
        while not self.log.find(msg_has("listening on", "server_url")):
            assert self.proc.poll() is None, self.log.tail()
            assert time.monotonic() < deadline, self.log.tail()
            time.sleep(0.1)

    def cli(self, *args: str) -> str:
        return subprocess.run(
            [str(HOMESCALE), "-c", str(self.config), *args],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout

    def nodes(self) -> list[dict[str, object]]:
        return list(json.loads(self.cli("nodes", "list", "-o", "json")))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def test_real_clients_use_the_acme_certificate_for_control_and_derp(
    tmp_path: Path, realclient_ready: None
) -> None:
    port = realclient.free_port()
    clients: list[realclient.TsnetClient] = []
    with run_pebble(tmp_path / "pebble", tls_port=port) as pebble:
        server = AcmeServer(tmp_path, port, pebble.directory, pebble.ca_bundle)
        try:
            assert server.log.find(msg_has(f"certificate for {HOSTNAME} obtained")), (
                server.log.tail()
            )
            root = tmp_path / "pebble-root.pem"
            root.write_bytes(await trio.to_thread.run_sync(pebble.root))
            hosts = tmp_path / "hosts"
            hosts.write_text(f"127.0.0.1 localhost\n127.0.0.1 {HOSTNAME}\n")
            # The name resolves for the clients only: a private mount namespace each.
            wrapper = ["unshare", "-m", "--propagation", "private", "--", "sh", "-c",
                       'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts)]  # fmt: skip
            await trio.to_thread.run_sync(server.cli, "users", "create", "alice")
            out = await trio.to_thread.run_sync(
                server.cli, "preauthkeys", "create", "-u", "alice", "--reusable"
            )
            key = out.strip().splitlines()[-1]
            for name in ("nodea", "nodeb"):
                c = realclient.TsnetClient(
                    tmp_path,
                    name,
                    server.url,
                    auth_key=key,
                    wrapper=wrapper,
                    extra_env={"SSL_CERT_FILE": str(root), "TS_DEBUG_ALWAYS_USE_DERP": "true"},
                )
                c.start()
                clients.append(c)
            nodes = await wait_nodes(server, ["nodea", "nodeb"], timeout=ONLINE_WITHIN + 15)  # type: ignore[arg-type]
            a = node_by_name(nodes, "nodea")
            assert a is not None
            body = await fetch_until(clients[1], f"{a['ipAddresses'][0]}:80", timeout=60)
            assert body == b"hello from nodea"
            # Both held a DERP connection to homescale's relay over the ACME certificate.
            for c in clients:
                await c.wait_for_log(
                    msg_has("derp-999 connected"),
                    timeout=20,
                    what=f"{c.name} connected to the embedded relay",
                )
        finally:
            for c in clients:
                c.stop()
            server.stop()
