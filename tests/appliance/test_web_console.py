"""The web console's security: one-time sign-in links, sessions, CSRF, permissions,
the audit log and the live event stream, against a running server (issue 15)."""

from __future__ import annotations

import re
from importlib import resources
from urllib.parse import urlsplit

import httpx
import pytest
import trio

from appliance.serve import Server
from appliance.web.console import Console
from appliance.web.permissions import decide
from appliance.web.sessions import (
    ADMIN,
    LOGIN_LINK_TTL,
    SESSION_IDLE,
    USER,
    RateLimit,
    Sessions,
    set_cookie,
)

from .conftest import CALL_TIMEOUT, Site, arun_cli

# ---------------------------------------------------------------- sessions (no server)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_sign_in_link_opens_one_session_once() -> None:
    s = Sessions()
    token, _ = s.new_link()
    opened = s.use_link(token)
    assert opened is not None
    cookie, session = opened
    assert s.get(cookie) is session
    assert session.role == ADMIN
    assert s.use_link(token) is None  # one use
    assert s.use_link("made-up") is None


def test_sign_in_link_expires_after_ten_minutes() -> None:
    clock = Clock()
    s = Sessions(clock)
    token, expires = s.new_link()
    assert expires == clock.now + LOGIN_LINK_TTL == clock.now + 600
    clock.now += LOGIN_LINK_TTL + 1
    assert s.use_link(token) is None


def test_idle_session_ends_and_sign_out_ends_it() -> None:
    clock = Clock()
    s = Sessions(clock)
    cookie, _ = s.open("alice", ADMIN)
    clock.now += SESSION_IDLE - 10
    assert s.get(cookie) is not None  # used: the idle time starts again
    clock.now += SESSION_IDLE + 1
    assert s.get(cookie) is None
    cookie, _ = s.open("alice", ADMIN)
    s.close(cookie)
    assert s.get(cookie) is None


def test_csrf_token_is_the_sessions_own() -> None:
    s = Sessions()
    _, a = s.open("a", ADMIN)
    _, b = s.open("b", ADMIN)
    assert a.csrf_ok(a.csrf)
    assert not a.csrf_ok(b.csrf)
    assert not a.csrf_ok("")


def test_cookie_attributes() -> None:
    plain = set_cookie("v", secure=False)
    assert "HttpOnly" in plain
    assert "SameSite=Strict" in plain
    assert "Secure" not in plain
    assert "; Secure" in set_cookie("v", secure=True)


def test_sign_in_rate_limit_per_ip() -> None:
    clock = Clock()
    limit = RateLimit(burst=3, refill=10.0, clock=clock)
    assert [limit.allow("192.0.2.1") for _ in range(4)] == [True, True, True, False]
    assert limit.allow("192.0.2.2")  # another address has its own budget
    clock.now += 10.0
    assert limit.allow("192.0.2.1")


def test_permissions_of_a_user_who_is_no_admin() -> None:
    _, user = Sessions().open("bob@example.com", USER, user_id=7)
    assert decide(user, "POST", "/api/v1/node/3/rename/x").node_id == 3
    assert decide(user, "DELETE", "/api/v1/node/3").node_id == 3
    assert decide(user, "GET", "/api/v1/preauthkey").own_keys
    for method, path in [
        ("POST", "/api/v1/user"),
        ("GET", "/api/v1/apikey"),
        ("PUT", "/api/v1/policy"),
        ("POST", "/api/v1/node/3/tags"),
        ("POST", "/api/v1/node/3/approve_routes"),
        ("GET", "/api/v1/node"),
    ]:
        assert not decide(user, method, path).allowed, (method, path)


def test_page_has_no_inline_script() -> None:
    html = resources.files("appliance.web").joinpath("assets", "index.html").read_text()
    scripts = re.findall(r"<script([^>]*)>", html)
    assert scripts
    assert all("src=" in attrs for attrs in scripts)
    assert not re.search(r"\son[a-z]+=", html)  # no onclick= handlers either


# ---------------------------------------------------------------- against a running server


def console(server: Server) -> Console:
    assert server.console is not None
    return server.console


def browser(site: Site) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=site.url, timeout=CALL_TIMEOUT)


async def signed_in(client: httpx.AsyncClient, server: Server) -> str:
    """Open a session in `client` with a one-time link; its CSRF token."""
    url, _ = console(server).login_url()
    r = await client.get(urlsplit(url).path + "?" + urlsplit(url).query)
    assert r.status_code == 303, r.text
    assert r.headers["location"].endswith("/admin/")
    assert "token" not in r.headers["location"]
    s = await client.get("/admin/session")
    assert s.status_code == 200, s.text
    return str(s.json()["csrf"])


async def test_login_url_from_the_cli_opens_one_session(
    site: Site, server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    res = await arun_cli(capsys, site, "web", "login-url", "-o", "json")
    assert res.code == 0, res.err
    url = res.json()["url"]
    assert url.startswith(site.url + "/admin/login?token=")
    target = url[len(site.url) :]
    async with httpx.AsyncClient(base_url=site.url, timeout=CALL_TIMEOUT) as c:
        first = await c.get(target)
        assert first.status_code == 303
        cookie = first.headers["set-cookie"]
        assert "HttpOnly" in cookie
        assert "SameSite=Strict" in cookie
        async with httpx.AsyncClient(base_url=site.url, timeout=CALL_TIMEOUT) as other:
            again = await other.get(target)
            assert again.status_code == 401
            assert "used already or has expired" in again.text
            assert (await other.get("/admin/session")).status_code == 401
        who = (await c.get("/admin/session")).json()
        assert who["role"] == "admin"


async def test_changes_need_the_sessions_csrf_token(site: Site, server: Server) -> None:
    async with browser(site) as a, browser(site) as b:
        csrf_a, csrf_b = await signed_in(a, server), await signed_in(b, server)
        none = await a.post("/admin/api/v1/user", json={"name": "mallory"})
        assert none.status_code == 403
        assert "CSRF" in none.json()["detail"]
        foreign = await b.post(
            "/admin/api/v1/user", json={"name": "mallory"}, headers={"X-CSRF-Token": csrf_a}
        )
        assert foreign.status_code == 403
        users = await server.run_db(server.store.users)
        assert not users  # nothing was created by the refused requests
        ok = await a.post(
            "/admin/api/v1/user", json={"name": "alice"}, headers={"X-CSRF-Token": csrf_a}
        )
        assert ok.status_code == 200, ok.text
        assert ok.json()["user"]["name"] == "alice"
        audit = (await a.get("/admin/audit")).json()["entries"]
        assert audit[0]["action"] == "POST /user"
        assert audit[0]["outcome"] == "ok"
        assert any(e["outcome"] == "refused: CSRF" for e in audit)
        logout = await b.post("/admin/logout", headers={"X-CSRF-Token": csrf_b})
        assert logout.status_code == 204
        assert (await b.get("/admin/overview")).status_code == 401


async def test_headers_and_anonymous_requests(site: Site, server: Server) -> None:
    async with httpx.AsyncClient(base_url=site.url, timeout=CALL_TIMEOUT) as c:
        page = await c.get("/admin/")
        assert page.status_code == 200
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp
        assert "unsafe-inline" not in csp
        assert page.headers["referrer-policy"] == "no-referrer"
        assert (await c.get("/admin")).headers["location"] == "admin/"
        for method, path in [
            ("GET", "/admin/overview"),
            ("GET", "/admin/audit"),
            ("GET", "/admin/api/v1/node"),
            ("DELETE", "/admin/api/v1/node/1"),
        ]:
            r = await c.request(method, path)
            assert r.status_code == 401, (method, path)
        for name in ("..%2Fconsole.py", "nope.js", "%2e%2e%2f__init__.py"):
            assert (await c.get("/admin/assets/" + name)).status_code == 404, name


async def test_api_key_works_for_scripts(site: Site, server: Server) -> None:
    key = await server.run_db(server.admin.create_api_key, None)
    async with httpx.AsyncClient(base_url=site.url, timeout=CALL_TIMEOUT) as c:
        r = await c.post(
            "/admin/api/v1/user", json={"name": "ci"}, headers={"Authorization": f"Bearer {key}"}
        )
        assert r.status_code == 200, r.text
        bad = await c.get("/admin/overview", headers={"Authorization": "Bearer hskey-api-nope"})
        prefix = key.split("-")[2]
        assert console(server).audit.entries()[0]["who"] == f"API key hskey-api-{prefix}-***"
        assert bad.status_code == 401


async def test_sign_in_attempts_are_rate_limited(site: Site, server: Server) -> None:
    async with httpx.AsyncClient(base_url=site.url, timeout=CALL_TIMEOUT) as c:
        codes = [(await c.get("/admin/login?token=guess")).status_code for _ in range(12)]
    assert codes[0] == 401
    assert codes[-1] == 429


async def test_user_session_reaches_only_their_own_devices(site: Site, server: Server) -> None:
    def setup() -> tuple[int, int]:
        bob = server.store.create_user("bob")
        eve = server.store.create_user("eve")
        return bob.id, eve.id

    bob_id, eve_id = await server.run_db(setup)
    cookie, s = console(server).sessions.open("bob@example.com", USER, user_id=bob_id)
    headers = {"Cookie": f"homescale_console={cookie}", "X-CSRF-Token": s.csrf}
    async with httpx.AsyncClient(base_url=site.url, timeout=CALL_TIMEOUT) as c:
        r = await c.post("/admin/api/v1/user", json={"name": "x"}, headers=headers)
        assert r.status_code == 403
        mine = await c.post(
            "/admin/api/v1/preauthkey",
            json={"user": str(eve_id), "reusable": True},
            headers=headers,
        )
        assert mine.status_code == 200, mine.text
        assert mine.json()["preAuthKey"]["user"]["name"] == "bob"  # always their own
        tagged = await c.post(
            "/admin/api/v1/preauthkey", json={"aclTags": ["tag:x"]}, headers=headers
        )
        assert tagged.status_code == 403
        assert (await c.get("/admin/audit", headers=headers)).status_code == 403


async def test_event_stream_needs_a_session_and_carries_changes(site: Site, server: Server) -> None:
    async with httpx.AsyncClient(base_url=site.url, timeout=CALL_TIMEOUT) as anon:
        assert (await anon.get("/admin/events")).status_code == 401
    async with browser(site) as client:
        await signed_in(client, server)
        with trio.fail_after(CALL_TIMEOUT):
            async with client.stream("GET", "/admin/events") as stream:
                assert stream.headers["content-type"] == "text/event-stream"
                lines = stream.aiter_lines()
                assert await anext(lines) == "retry: 2000"
                await server.run_db(server.store.create_user, "dave")
                seen = []
                async for line in lines:
                    seen.append(line)
                    if line.startswith("data: {") and '"user"' in line:
                        break
                assert any('"kind": "user"' in x for x in seen)


async def test_health_view_is_for_admins(site: Site, server: Server) -> None:
    async with browser(site) as admin:
        await signed_in(admin, server)
        h = (await admin.get("/admin/health")).json()
        assert h["database"] is True
        assert h["nodes"] == 0
        assert "homescale_nodes" in h["metrics"]
    uid = (await server.run_db(server.store.create_user, "bob")).id
    cookie, _ = console(server).sessions.open("bob", USER, user_id=uid)
    async with browser(site) as user:
        r = await user.get("/admin/health", headers={"Cookie": f"homescale_console={cookie}"})
        assert r.status_code == 403


async def test_qr_code_of_a_key_is_made_by_the_server(site: Site, server: Server) -> None:
    async with browser(site) as c:
        csrf = await signed_in(c, server)
        h = {"X-CSRF-Token": csrf}
        r = await c.post("/admin/qr", json={"text": "hskey-auth-x-y"}, headers=h)
        assert r.status_code == 200
        assert r.json()["svg"].startswith("data:image/svg+xml")
        assert (await c.post("/admin/qr", json={"text": "x" * 513}, headers=h)).status_code == 400
        assert (await c.post("/admin/qr", json={"text": "x"})).status_code == 403  # no CSRF


async def test_policy_preview_names_the_bad_line_and_stores_nothing(
    site: Site, server: Server
) -> None:
    async with browser(site) as c:
        h = {"X-CSRF-Token": await signed_in(c, server)}
        bad = await c.post("/admin/policy/preview", json={"policy": '{\n"acls": [1]}'}, headers=h)
        assert bad.status_code == 400
        assert "(line 2)" in bad.json()["detail"]
        ok = await c.post("/admin/policy/preview", json={"policy": '{"acls": []}'}, headers=h)
        assert ok.status_code == 200
        assert ok.json() == {"nodes": []}
        assert await server.run_db(server.store.policy) is None


async def test_sign_out_ends_the_sessions_event_stream(site: Site, server: Server) -> None:
    async with browser(site) as client:
        csrf = await signed_in(client, server)
        with trio.fail_after(CALL_TIMEOUT):
            async with client.stream("GET", "/admin/events") as stream:
                lines = stream.aiter_lines()
                assert await anext(lines) == "retry: 2000"
                async with browser(site) as other:
                    other.cookies = client.cookies
                    out = await other.post("/admin/logout", headers={"X-CSRF-Token": csrf})
                    assert out.status_code == 204
                await server.run_db(server.store.create_user, "after-sign-out")
                rest = [line async for line in lines]  # the stream ends (no timeout)
        assert not any("after-sign-out" in x or '"kind": "user"' in x for x in rest)


async def test_one_session_cannot_take_every_event_stream(site: Site, server: Server) -> None:
    from contextlib import AsyncExitStack

    from appliance.web.sse import MAX_PER_SESSION

    async with browser(site) as client, AsyncExitStack() as streams:
        await signed_in(client, server)
        with trio.fail_after(CALL_TIMEOUT):
            for _ in range(MAX_PER_SESSION):
                s = await streams.enter_async_context(client.stream("GET", "/admin/events"))
                assert s.status_code == 200
            over = await client.get("/admin/events")
            assert over.status_code == 503
            async with browser(site) as other:
                await signed_in(other, server)
                async with other.stream("GET", "/admin/events") as s:
                    assert s.status_code == 200  # another session still gets one
