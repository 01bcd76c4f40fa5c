"""Issue 15: the web console driven by a real browser against a server with real nodes.

Headless Debian chromium (playwright, the system browser: no download) signs in with
`homescale web login-url`, watches a real tsnet node appear live (server-sent
events, no reload), renames it and sees the rename reach another real client's
MagicDNS, has a bad policy edit refused with its line, has a change carrying another
session's CSRF token refused, and signs out. Screenshots of each page are written to
build/test-artifacts/console/ (not committed; HOMESCALE_TEST_ARTIFACTS overrides).
"""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests import oidcprovider, realclient
from tests.e2e.conftest import ONLINE_WITHIN, RUNNING_WITHIN, fetch_until, wait_nodes_sync
from tests.realclient import msg_has

pytestmark = [pytest.mark.realclient]

ARTIFACTS = Path(
    os.environ.get(
        "HOMESCALE_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "build" / "test-artifacts"
    )
)
BAD_POLICY = """{
  "acls": [
    {"action": "accept", "src": ["*"], "dst": ["nowhere"]}
  ]
}
"""
GOOD_POLICY = """{
  // only watcher may open connections, and only to renamedweb's web server
  "acls": [
    {"action": "accept", "src": ["watcher"], "dst": ["renamedweb:80"]}
  ],
  "hosts": {"watcher": "100.64.0.1/32", "renamedweb": "100.64.0.2/32"}
}
"""


@pytest.fixture
def chromium() -> str:
    return oidcprovider.require_browser()


@pytest.fixture
def console_net(realclient_ready: None, tmp_path: Path) -> Iterator[dict[str, Any]]:
    server = realclient.HomescaleServer(tmp_path)
    server.set_policy_mode("database")
    server.start()
    clients: list[realclient.TsnetClient] = []
    try:
        server.cli("users", "create", "alice")
        key = server.create_key("alice", "--reusable")

        def client(name: str, auth_key: str = key) -> realclient.TsnetClient:
            c = realclient.TsnetClient(tmp_path, name, server.url, auth_key=auth_key)
            clients.append(c)
            c.start()
            return c

        yield {"server": server, "client": client}
    finally:
        for c in clients:
            try:
                c.stop()
            except Exception:
                c.kill()
        server.stop()


def login_url(server: realclient.HomescaleServer) -> str:
    out = server.cli("web", "login-url", "-o", "json").stdout
    return str(json.loads(out)["url"])


def test_console_runs_the_tailnet_from_a_browser(
    chromium: str, console_net: dict[str, Any]
) -> None:
    from playwright.sync_api import expect, sync_playwright

    server: realclient.HomescaleServer = console_net["server"]
    shots = ARTIFACTS / "console"
    shots.mkdir(parents=True, exist_ok=True)
    watcher = console_net["client"]("watcher")
    wait_nodes_sync(server, ["watcher"], timeout=ONLINE_WITHIN + 15)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            ctx = browser.new_context(viewport={"width": 1280, "height": 900})
            page = ctx.new_page()
            page.set_default_timeout(20_000)
            page.on("dialog", lambda d: d.accept())
            # Every script error and Content-Security-Policy violation of the page is kept.
            problems: list[str] = []
            page.on("pageerror", lambda e: problems.append(f"script error: {e}"))
            page.on(
                "console",
                lambda m: problems.append(m.text) if "Content Security Policy" in m.text else None,
            )

            # Sign in with the one-time link; the address bar keeps no secret.
            page.goto(login_url(server))
            expect(page.locator("#tabs")).to_be_visible()
            assert page.url == server.url + "/admin/"
            expect(page.locator("#whoami")).to_contain_text("admin")
            expect(page.locator("#live")).not_to_have_class("live off")
            expect(page.locator('article[data-name="watcher"] .status')).to_have_text("online")

            # A pre-auth key made in the page (shown once, with a QR code) ...
            page.goto(server.url + "/admin/#keys")
            page.locator("#key-create select[name=user]").select_option(label="alice")
            page.locator("#key-create button").click()
            expect(page.locator("#new-key-qr")).to_be_visible()
            new_key = page.locator("#new-key-value").input_value()
            assert new_key.startswith("hskey-auth-")
            qr = page.locator("#new-key-qr").evaluate("img => img.naturalWidth")
            assert qr > 100  # the image decoded: a QR code of the key
            page.screenshot(path=str(shots / "keys.png"), full_page=True)

            # ... registers a real node: its card appears and turns online without a reload.
            page.goto(server.url + "/admin/#nodes")
            page.evaluate("window.__same_page = true")
            console_net["client"]("webnode", new_key)
            card = page.locator('article[data-name="webnode"]')
            expect(card.locator(".status")).to_have_text("online", timeout=40_000)
            expect(card).to_contain_text("DERP region 999")
            assert page.evaluate("window.__same_page") is True
            page.screenshot(path=str(shots / "nodes.png"), full_page=True)

            # Rename it in the page: the other real client reaches it by its new MagicDNS name.
            card.locator("form.rename input").fill("renamedweb")
            card.locator("form.rename button").click()
            expect(page.locator('article[data-name="renamedweb"]')).to_be_visible()
            expect(page.locator('article[data-name="renamedweb"]')).to_contain_text(
                "renamedweb.tailnet.internal"
            )
            watcher.log.wait_for_sync(
                msg_has("Switching ipn state", "-> Running"),
                timeout=RUNNING_WITHIN,
                what="watcher Running",
            )
            body = trio.run(fetch_until, watcher, "renamedweb.tailnet.internal:80")
            assert body == b"hello from webnode"

            # A machine waiting in an interactive login (made up by `debug create-node`:
            # the tsnet harness cannot advertise routes) is registered from the Pending
            # view, then its subnet route and exit node (one switch) approved on its card.
            auth_id = "hskey-authreq-" + "ab" * 12
            page.goto(server.url + "/admin/#pending")
            expect(page.locator("#pending")).to_contain_text("Nothing is waiting")
            server.cli(
                "debug", "create-node", "--name", "routed", "--user", "alice", "--key", auth_id,
                "--route", "10.9.0.0/24,0.0.0.0/0,::/0",
            )  # fmt: skip
            waiting = page.locator('#pending article[data-name="routed"]')  # appears live
            expect(waiting).to_contain_text("login")
            page.screenshot(path=str(shots / "pending.png"), full_page=True)
            waiting.locator("input[name=user]").fill("alice")
            waiting.locator("button", has_text="Register").click()
            expect(waiting).to_have_count(0)
            page.goto(server.url + "/admin/#nodes")
            routed = page.locator('#nodes article[data-name="routed"]')
            routed.locator('input.route[value="10.9.0.0/24"]').check()
            routed.locator("input.exit-node").check()
            routed.locator("form.routes button").click()
            expect(page.locator("#flash")).to_have_text("routes of routed: done")
            expect(routed).not_to_contain_text("not approved")
            expect(routed).to_contain_text("10.9.0.0/24 ✓, exit node ✓")
            expect(routed.locator("input.exit-node")).to_be_checked()  # as read back
            page.screenshot(path=str(shots / "nodes-routes.png"), full_page=True)
            found = next(n for n in server.nodes() if n["givenName"] == "routed")
            assert set(found["approvedRoutes"]) == {"10.9.0.0/24", "0.0.0.0/0", "::/0"}

            # A bad policy is refused with its line; nothing is stored.
            page.goto(server.url + "/admin/#policy")
            expect(page.locator("#policy-save")).to_be_visible()
            page.locator("#policy-text").fill(BAD_POLICY)
            page.locator("#policy-check").click()
            result = page.locator("#policy-result")
            expect(result).to_contain_text("line 3")
            expect(result).to_contain_text("nowhere")
            assert result.get_attribute("data-line") == "3"
            expect(page.locator("#policy-highlight .hl-bad")).to_contain_text('"nowhere"')
            page.locator("#policy-save").click()
            expect(result).to_contain_text("line 3")
            page.screenshot(path=str(shots / "policy.png"), full_page=True)
            stored = server.cli("policy", "get", check=False)
            assert "nowhere" not in stored.stdout

            # A good draft previewed before saving: who may reach each node, on which ports.
            page.locator("#policy-text").fill(GOOD_POLICY)
            page.locator("#policy-preview").click()
            reach = page.locator("#policy-reach")
            expect(reach.locator('tr[data-node="renamedweb"]')).to_contain_text("watcher (80)")
            expect(reach.locator('tr[data-node="watcher"]')).to_contain_text("nobody")
            assert "renamedweb" not in server.cli("policy", "get", check=False).stdout
            page.screenshot(path=str(shots / "policy-preview.png"), full_page=True)
            page.locator("#policy-save").click()
            expect(result).to_contain_text("Saved")
            assert "renamedweb" in server.cli("policy", "get").stdout

            # A change sent with a second session's CSRF token is refused.
            other = browser.new_context()
            other_page = other.new_page()
            other_page.goto(login_url(server))
            expect(other_page.locator("#tabs")).to_be_visible()
            other_csrf = other_page.evaluate(
                "fetch('session').then(r => r.json()).then(s => s.csrf)"
            )
            status = page.evaluate(
                """(token) => fetch('api/v1/user', {method: 'POST',
                    headers: {'X-CSRF-Token': token, 'Content-Type': 'application/json'},
                    body: JSON.stringify({name: 'mallory'})}).then(r => r.status)""",
                other_csrf,
            )
            assert status == 403
            assert "mallory" not in server.cli("users", "list").stdout
            other.close()

            # Health: nodes online, the embedded relay's region as the nodes' home, STUN.
            page.goto(server.url + "/admin/#health")
            expect(page.locator("#health-summary")).to_contain_text("2 of 3 online")
            expect(page.locator("#health-summary")).to_contain_text("database reachable")
            expect(page.locator("#health-regions")).to_contain_text("2 nodes")
            expect(page.locator("#health-metrics")).to_contain_text("homescale_stun_requests_total")
            page.screenshot(path=str(shots / "health.png"), full_page=True)

            # An API key made in the page works for scripts (shown once).
            page.goto(server.url + "/admin/#apikeys")
            page.locator("#apikey-create button").click()
            expect(page.locator("#new-apikey")).to_be_visible()
            api_key = page.locator("#new-apikey-value").input_value()
            with urllib.request.urlopen(
                urllib.request.Request(
                    server.url + "/api/v1/node", headers={"Authorization": f"Bearer {api_key}"}
                ),
                timeout=10,
            ) as r:
                assert "renamedweb" in r.read().decode()
            expect(page.locator("#apikeys tr")).to_have_count(1)
            page.screenshot(path=str(shots / "apikeys.png"), full_page=True)
            page.goto(server.url + "/admin/#users")
            expect(page.locator("#users")).to_contain_text("alice")
            page.screenshot(path=str(shots / "users.png"), full_page=True)

            # The audit view names who renamed what.
            page.goto(server.url + "/admin/#audit")
            expect(page.locator("#audit")).to_contain_text("/rename/renamedweb")
            expect(page.locator("#audit")).to_contain_text("refused: CSRF")
            page.screenshot(path=str(shots / "audit.png"), full_page=True)

            # On a phone-sized screen the nodes page still works.
            phone = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
            phone_page = phone.new_page()
            phone_page.goto(login_url(server))
            expect(phone_page.locator('article[data-name="renamedweb"]')).to_be_visible()
            phone_page.screenshot(path=str(shots / "nodes-phone.png"), full_page=True)
            phone.close()

            assert problems == []

            # Sign out: the page asks to sign in again, and the session is gone.
            page.goto(server.url + "/admin/#nodes")
            page.locator("#signout").click()
            expect(page.locator("#signin")).to_be_visible()
            page.reload()
            expect(page.locator("#signin")).to_be_visible()
            assert page.evaluate("fetch('overview').then(r => r.status)") == 401
        finally:
            browser.close()
