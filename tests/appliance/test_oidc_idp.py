"""OIDC settings against the real provider (npm oidc-provider, tier idp), with the
server in this process: no network namespace needed, everything is on loopback.

The login is created directly in the control service (what a client's register
request does; tests/e2e covers that with a real client), then the browser side
is played through the provider's pages.
"""

from __future__ import annotations

import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import trio

from appliance.config import load_config
from appliance.serve import Server, serve
from tests import oidcprovider

from .conftest import LOG, START_TIMEOUT, Site

ALICE = {
    "sub": "alice-subject-1",
    "email": "alice@example.com",
    "email_verified": True,
    "preferred_username": "alice",
    "name": "Alice",
}
TOKEN_TTL = 600


@pytest.fixture
def idp(site: Site, tmp_path: Path) -> Iterator[oidcprovider.TestIdP]:
    oidcprovider.require_idp()
    p = oidcprovider.TestIdP(
        tmp_path / "idp",
        site.url + "/oidc/callback",
        {"alice": dict(ALICE)},
        pkce_required=False,
        id_token_ttl=TOKEN_TTL,
    )
    p.start()
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture
async def oidc_server(site: Site, idp: oidcprovider.TestIdP) -> AsyncIterator[Server]:
    site.config_path.write_text(
        site.config_path.read_text()
        + "oidc:\n"
        + f"  issuer: {idp.issuer}\n"
        + f"  client_id: {oidcprovider.CLIENT_ID}\n"
        + f"  client_secret: {oidcprovider.CLIENT_SECRET}\n"
        + "  use_expiry_from_token: true\n"
        + "  extra_params:\n    login_hint: alice-subject-1\n    ui_locales: en\n"
    )
    config = load_config(site.config_path, environ={})
    async with trio.open_nursery() as nursery:
        with trio.fail_after(START_TIMEOUT):
            srv = await nursery.start(serve, config, LOG)
        yield srv
        nursery.cancel_scope.cancel()


async def test_expiry_from_token_and_extra_params(
    oidc_server: Server, site: Site, idp: oidcprovider.TestIdP
) -> None:
    assert oidc_server.control is not None
    machine, node_key = "mkey:" + "ab" * 32, "nodekey:" + "cd" * 32
    login = oidc_server.logins.start(machine, node_key, {"Hostname": "exp1"}, False)
    result = await trio.to_thread.run_sync(
        lambda: oidcprovider.sign_in(f"{site.url}/register/{login.id}", "alice", idp=idp)
    )
    assert result.final.status_code == 200, result.text
    # extra_params go into the authorization request; without pkce, no challenge.
    auth = parse_qs(urlsplit(result.urls[1]).query)
    assert auth["login_hint"] == ["alice-subject-1"]
    assert auth["ui_locales"] == ["en"]
    assert "code_challenge" not in auth
    # use_expiry_from_token: the node key expires with the ID token.
    node = oidc_server.store.node_by("machine_key", machine)
    assert node is not None
    assert node.register_method == "oidc"
    assert node.expiry is not None
    left = node.expiry.timestamp() - time.time()
    assert TOKEN_TTL - 120 < left <= TOKEN_TTL + 5, left


@pytest.mark.parametrize(
    ("query", "cookie", "status", "says"),
    [
        ("", "", 400, "missing code or state"),
        ("code=x", "", 400, "missing code or state"),
        ("code=x&state=" + "s" * 5000, "", 400, "too long"),
        ("code=x&state=abcdefgh12345", "", 400, "no sign-in state cookie"),
        # A cookie for this state, but the server never issued it: spent or forged.
        (
            "code=x&state=abcdefgh12345",
            "homescale_oidc_abcdefgh=abcdefgh12345",
            410,
            "already used or has expired",
        ),
        ("error=access_denied&error_description=User+said+no", "", 403, "access_denied"),
        ("error=" + "e" * 5000, "", 403, "answered eeee"),
    ],
)
async def test_hostile_callbacks_register_nothing(
    oidc_server: Server, site: Site, query: str, cookie: str, status: int, says: str
) -> None:
    def get() -> httpx.Response:
        headers = {"Cookie": cookie} if cookie else {}
        return httpx.get(f"{site.url}/oidc/callback?{query}", headers=headers, timeout=10)

    r = await trio.to_thread.run_sync(get)
    assert r.status_code == status, r.text
    assert says in r.text
    assert len(r.text) < 2000  # the provider's text is capped, never echoed whole
    assert oidc_server.store.nodes() == []


@dataclass
class Proxied:
    public: str  # server_url: https://localhost:PORT, the proxy's address
    ca: ssl.SSLContext  # trusts the proxy's certificate
    idp: oidcprovider.TestIdP


@pytest.fixture
def proxied(site: Site, tmp_path: Path) -> Iterator[Proxied]:
    """A TLS-terminating reverse proxy (caddy, the binary the real-client tests use) in
    front of the site's plain-http listener, and a provider whose client redirects to
    the proxy's address."""
    from tests import realclient, tiers

    tiers.require_tier(
        "realclient",
        realclient.CADDY.exists(),
        f"caddy missing at {realclient.CADDY}: run tests/fetch-realclient.sh",
    )
    oidcprovider.require_idp()
    ca = realclient.make_test_ca(tmp_path / "tls")
    port = realclient.free_port()
    public = f"https://localhost:{port}"
    caddyfile = tmp_path / "Caddyfile"
    caddyfile.write_text(
        "{\n\tadmin off\n\tauto_https disable_redirects\n}\n"
        f"https://localhost:{port} {{\n\ttls {ca.cert_path} {ca.key_path}\n"
        f"\treverse_proxy 127.0.0.1:{site.port}\n}}\n"
    )
    idp = oidcprovider.TestIdP(
        tmp_path / "idp", public + "/oidc/callback", {"alice": dict(ALICE)}, pkce_required=True
    )
    idp.start()
    with (tmp_path / "caddy.log").open("wb") as log:
        caddy = subprocess.Popen(
            [str(realclient.CADDY), "run", "--config", str(caddyfile), "--adapter", "caddyfile"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=realclient.client_env(tmp_path / "home"),
        )
        try:
            text = site.config_path.read_text()
            site.config_path.write_text(
                text.replace(f"server_url: http://127.0.0.1:{site.port}", f"server_url: {public}")
                + f"oidc:\n  issuer: {idp.issuer}\n  client_id: {oidcprovider.CLIENT_ID}\n"
                + f"  client_secret: {oidcprovider.CLIENT_SECRET}\n  pkce:\n    enabled: true\n"
            )
            yield Proxied(public, ssl.create_default_context(cafile=str(ca.ca_path)), idp)
        finally:
            caddy.terminate()
            caddy.wait(10)
            idp.stop()


async def test_login_behind_a_tls_reverse_proxy(site: Site, proxied: Proxied) -> None:
    """homescale on plain http behind the proxy, server_url https://localhost:PORT: every
    URL the flow hands out is built from server_url, and the state cookie is Secure."""
    config = load_config(site.config_path, environ={})
    async with trio.open_nursery() as nursery:
        with trio.fail_after(START_TIMEOUT):
            srv = await nursery.start(serve, config, LOG)
        assert srv.control is not None
        machine = "mkey:" + "12" * 32
        login = srv.control.logins.start(machine, "nodekey:" + "34" * 32, {"Hostname": "px"}, False)
        register = f"{proxied.public}/register/{login.id}"

        def browse() -> tuple[httpx.Response, oidcprovider.SignIn]:
            with httpx.Client(verify=proxied.ca, timeout=15) as browser:
                deadline = time.monotonic() + 15  # the proxy may take a moment to listen
                while True:
                    try:
                        first = browser.get(register, follow_redirects=False)
                        break
                    except httpx.ConnectError:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.2)
                signed = oidcprovider.sign_in(register, "alice", idp=proxied.idp, client=browser)
                return first, signed

        first, result = await trio.to_thread.run_sync(browse)
        assert first.status_code == 302, first.text
        assert "; Secure" in first.headers["set-cookie"]
        auth = parse_qs(urlsplit(first.headers["location"]).query)
        assert auth["redirect_uri"] == [proxied.public + "/oidc/callback"]
        assert result.final.status_code == 200, result.text
        assert "is now registered" in result.text
        assert str(result.final.url).startswith(proxied.public + "/register/confirm/")
        node = srv.store.node_by("machine_key", machine)
        assert node is not None
        assert node.register_method == "oidc"
        nursery.cancel_scope.cancel()


async def test_device_approval_after_an_oidc_login(site: Site, idp: oidcprovider.TestIdP) -> None:
    """node.require_approval holds a machine that signed in through the provider too."""
    site.config_path.write_text(
        site.config_path.read_text()
        + f"oidc:\n  issuer: {idp.issuer}\n  client_id: {oidcprovider.CLIENT_ID}\n"
        + f"  client_secret: {oidcprovider.CLIENT_SECRET}\n"
        + "node:\n  require_approval: true\n"
    )
    config = load_config(site.config_path, environ={})
    assert config.node_require_approval
    async with trio.open_nursery() as nursery:
        with trio.fail_after(START_TIMEOUT):
            srv = await nursery.start(serve, config, LOG)
        assert srv.control is not None
        machine = "mkey:" + "56" * 32
        login = srv.control.logins.start(machine, "nodekey:" + "78" * 32, {"Hostname": "ap"}, False)
        result = await trio.to_thread.run_sync(
            lambda: oidcprovider.sign_in(f"{site.url}/register/{login.id}", "alice", idp=idp)
        )
        assert result.final.status_code == 200, result.text
        node = srv.store.node_by("machine_key", machine)
        assert node is not None
        assert node.approved is False
        waiting = [p for p in srv.pending_auth() if p["kind"] == "device-approval"]
        assert [(p["hostname"], p["user"]) for p in waiting] == [("ap", "alice")]
        nursery.cancel_scope.cancel()
