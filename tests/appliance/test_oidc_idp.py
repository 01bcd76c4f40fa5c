"""OIDC settings against the real provider (npm oidc-provider, tier idp), with the
server in this process: no network namespace needed, everything is on loopback.

The login is created directly in the control service (what a client's register
request does; tests/e2e covers that with a real client), then the browser side
is played through the provider's pages.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

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
    login = oidc_server.control._new_pending(machine, node_key, {"Hostname": "exp1"}, False)
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
    import httpx

    def get() -> httpx.Response:
        headers = {"Cookie": cookie} if cookie else {}
        return httpx.get(f"{site.url}/oidc/callback?{query}", headers=headers, timeout=10)

    r = await trio.to_thread.run_sync(get)
    assert r.status_code == status, r.text
    assert says in r.text
    assert len(r.text) < 2000  # the provider's text is capped, never echoed whole
    assert oidc_server.store.nodes() == []
