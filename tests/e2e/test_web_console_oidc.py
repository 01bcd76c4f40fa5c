"""Issue 15: signing in to the web console through a real OpenID provider (npm
oidc-provider, tests/idp): a person named in `web.admins` (or in a group of
`web.admin_groups`) is an admin; anyone else the provider lets in manages only
their own devices, and the server refuses them everything else."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from tests import oidcprovider, realclient
from tests.e2e.test_web_console_realclient import ARTIFACTS

ACCOUNTS: dict[str, dict[str, Any]] = {
    "alice": {
        "sub": "alice-subject-1",
        "email": "alice@example.com",
        "email_verified": True,
        "preferred_username": "alice",
        "groups": ["tailnet"],
    },
    "olga": {
        "sub": "olga-subject-1",
        "email": "olga@example.com",
        "email_verified": True,
        "preferred_username": "olga",
        "groups": ["tailnet", "ops"],
    },
    "carol": {
        "sub": "carol-subject-1",
        "email": "carol@example.com",
        "email_verified": True,
        "preferred_username": "carol",
        "groups": ["tailnet"],
    },
    "bob": {
        "sub": "bob-subject-1",
        "email": "bob@example.com",
        "email_verified": True,
        "preferred_username": "bob",
        "groups": ["tailnet"],
    },
}


IDPS: dict[str, oidcprovider.TestIdP] = {}  # the provider of each server (by its URL)


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[realclient.HomescaleServer]:
    oidcprovider.require_idp()
    d = tmp_path_factory.mktemp("console-oidc")
    server = realclient.HomescaleServer(d)
    idp = oidcprovider.TestIdP(
        d / "idp", server.url + "/oidc/callback", copy.deepcopy(ACCOUNTS), pkce_required=True
    )
    idp.start()
    try:
        (server.data / "oidc_client_secret").write_text(oidcprovider.CLIENT_SECRET + "\n")
        with server.config.open("a") as f:
            f.write(
                "\noidc:\n"
                f"  issuer: {idp.issuer}\n"
                f"  client_id: {oidcprovider.CLIENT_ID}\n"
                "  client_secret_path: oidc_client_secret\n"
                "  scope: [openid, profile, email, groups]\n"
                "  allowed_groups: [tailnet]\n"
                "  pkce:\n    enabled: true\n    method: S256\n"
            )
        text = server.config.read_text()
        for old, new in [
            ("admins: []", "admins: [Alice@example.com]"),
            ("admin_groups: []", "admin_groups: [ops]"),
        ]:
            assert old in text, f"homescale init config lacks web.{old}"
            text = text.replace(old, new, 1)
        server.config.write_text(text)
        server.set_policy_mode("database")
        server.start()
        IDPS[server.url] = idp
        try:
            yield server
        finally:
            server.stop()
    finally:
        idp.stop()


@contextmanager
def console_sign_in(server: realclient.HomescaleServer, login: str) -> Iterator[httpx.Client]:
    """A client that signed in at /admin/signin as `login`, holding its session cookie."""
    with httpx.Client(timeout=15) as c:
        yield _signed_in(c, server, login)


def _signed_in(c: httpx.Client, server: realclient.HomescaleServer, login: str) -> httpx.Client:
    result = oidcprovider.sign_in(
        server.url + "/admin/signin", login, idp=IDPS[server.url], client=c, confirm=False
    )
    assert result.final.status_code == 200, result.text
    assert str(result.final.url) == server.url + "/admin/"
    assert "code=" not in str(result.final.url)
    return c


def session(c: httpx.Client, server: realclient.HomescaleServer) -> dict[str, Any]:
    r = c.get(server.url + "/admin/session")
    assert r.status_code == 200, r.text
    return dict(r.json())


@pytest.mark.parametrize("login", ["alice", "olga"])
def test_named_admins_and_admin_groups_sign_in_as_admins(
    net: realclient.HomescaleServer, login: str
) -> None:
    with console_sign_in(net, login) as c:
        s = session(c, net)
        assert s["role"] == "admin"
        assert login in s["who"]
        r = c.post(
            net.url + "/admin/api/v1/user",
            json={"name": f"made-by-{login}"},
            headers={"X-CSRF-Token": s["csrf"]},
        )
        assert r.status_code == 200, r.text


def test_other_users_manage_only_their_own_devices(net: realclient.HomescaleServer) -> None:
    with console_sign_in(net, "bob") as c:
        s = session(c, net)
        assert s["role"] == "user"
        headers = {"X-CSRF-Token": s["csrf"]}
        # bob (created by his sign-in) and alice each get a device.
        for user, name, auth in [("bob", "bobs-laptop", "cd"), ("alice", "alices-nas", "ef")]:
            key = "hskey-authreq-" + auth * 12
            net.cli("debug", "create-node", "--name", name, "--user", user, "--key", key)
            net.cli("auth", "register", "--user", user, "--auth-id", key)
        nodes = c.get(net.url + "/admin/overview").json()["nodes"]
        assert [n["givenName"] for n in nodes] == ["bobs-laptop"]
        everyone = {n["givenName"]: n["id"] for n in net.nodes()}
        mine, theirs = everyone["bobs-laptop"], everyone["alices-nas"]

        refused = [
            c.post(f"{net.url}/admin/api/v1/node/{theirs}/rename/stolen", headers=headers),
            c.delete(f"{net.url}/admin/api/v1/node/{theirs}", headers=headers),
            c.post(f"{net.url}/admin/api/v1/node/{mine}/tags", json={"tags": []}, headers=headers),
            c.get(f"{net.url}/admin/api/v1/node"),
            c.post(f"{net.url}/admin/api/v1/user", json={"name": "x"}, headers=headers),
            c.put(f"{net.url}/admin/api/v1/policy", json={"policy": "{}"}, headers=headers),
            c.get(f"{net.url}/admin/audit"),
        ]
        assert [r.status_code for r in refused] == [403] * len(refused)
        assert "alices-nas" in {n["givenName"] for n in net.nodes()}

        ok = c.post(f"{net.url}/admin/api/v1/node/{mine}/rename/bobs-new-laptop", headers=headers)
        assert ok.status_code == 200, ok.text
        made = c.post(
            f"{net.url}/admin/api/v1/preauthkey", json={"reusable": False}, headers=headers
        )
        assert made.status_code == 200, made.text
        assert made.json()["preAuthKey"]["user"]["name"] == "bob"
        assert made.json()["preAuthKey"]["key"].startswith("hskey-auth-")
        listed = json.loads(net.cli("preauthkeys", "list", "-o", "json").stdout)
        assert [k["user"]["name"] for k in listed] == ["bob"]
        gone = c.delete(f"{net.url}/admin/api/v1/node/{mine}", headers=headers)
        assert gone.status_code == 200, gone.text
        assert "bobs-new-laptop" not in {n["givenName"] for n in net.nodes()}


def test_console_sign_in_page_offers_the_provider(net: realclient.HomescaleServer) -> None:
    r = httpx.get(net.url + "/admin/session", timeout=15)
    assert r.status_code == 401
    assert "identity provider" in r.json()["detail"]


def test_a_user_manages_their_own_device_in_the_browser(net: realclient.HomescaleServer) -> None:
    """Sign in through the provider's pages in chromium; the Strict session cookie set at
    the end of the cross-site redirect chain is used by the page (same-origin fetches)."""
    from playwright.sync_api import expect, sync_playwright

    chromium = oidcprovider.require_browser()
    idp = IDPS[net.url]
    key = "hskey-authreq-" + "12" * 12
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 390, "height": 844})
            page.set_default_timeout(20_000)
            page.goto(net.url + "/admin/")
            expect(page.locator("#signin-oidc")).to_be_visible()
            page.locator("#signin-oidc a").click()
            page.fill('input[name="login"]', idp.accounts["carol"]["sub"])
            page.fill('input[name="password"]', "any password")
            page.click('button[type="submit"]')
            page.wait_for_selector('button[type="submit"]:has-text("Continue")')
            page.click('button[type="submit"]')
            expect(page.locator("#whoami")).to_contain_text("carol")
            expect(page.locator("#whoami")).to_contain_text("(user)")
            assert page.url == net.url + "/admin/"
            # carol exists now: a phone waits for her, is registered, and only it is listed.
            net.cli(
                "debug", "create-node", "--name", "carols-phone", "--user", "carol", "--key", key
            )
            net.cli("auth", "register", "--user", "carol", "--auth-id", key)
            card = page.locator('#nodes article[data-name="carols-phone"]')
            expect(card).to_be_visible()  # live: no reload
            expect(page.locator("#nodes article")).to_have_count(1)
            for admin_only in ("Users", "Policy", "Audit", "API keys"):
                expect(page.locator("#tabs a", has_text=admin_only)).to_be_hidden()
            expect(card.locator("form.tags")).to_have_count(0)
            card.locator("form.rename input").fill("carols-new-phone")
            card.locator("form.rename button").click()
            expect(page.locator('#nodes article[data-name="carols-new-phone"]')).to_be_visible()
            page.screenshot(path=str(ARTIFACTS / "console" / "self-service-phone.png"))
            assert "carols-new-phone" in {n["givenName"] for n in net.nodes()}
        finally:
            browser.close()
