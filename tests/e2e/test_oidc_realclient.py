"""Issue 13: `tailscale up`-style login through a real OpenID provider.

The provider is npm's oidc-provider (tests/idp) on loopback with PKCE required;
the machine is a real tsnet 1.90.9 client started without an auth key, whose
printed AuthURL the test follows through the provider's login and consent pages
(an HTTP client playing the browser). Refusals and replays use our own ts2021
peer to get an AuthURL (cheaper than a tsnet process; the server cannot tell).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
import trio

from tests import oidcprovider, realclient
from tests.e2e.conftest import (
    ONLINE_WITHIN,
    RUNNING_WITHIN,
    ControlPeer,
    connect_peer,
    node_by_name,
    wait_nodes,
)
from tests.e2e.test_policy_realclient import filter_allows
from tests.realclient import msg_has

pytestmark = [pytest.mark.realclient]

ACCOUNTS: dict[str, dict[str, Any]] = {
    "alice": {
        "sub": "alice-subject-1",
        "email": "alice@example.com",
        "email_verified": True,
        "name": "Alice Liddell",
        "preferred_username": "alice",
        "picture": "http://127.0.0.1/alice.png",
        "groups": ["tailnet", "engineering"],
    },
    "mallory": {
        "sub": "mallory-subject-1",
        "email": "mallory@example.com",
        "email_verified": True,
        "preferred_username": "mallory",
        "groups": ["sales"],
    },
    "eve": {
        "sub": "eve-subject-1",
        "email": "eve@evil.example",
        "email_verified": True,
        "preferred_username": "eve",
        "groups": ["tailnet"],
    },
    "bob": {
        "sub": "bob-subject-1",
        "email": "bob@example.com",
        "email_verified": False,
        "preferred_username": "bob",
        "groups": ["tailnet"],
    },
}


@dataclass
class OidcNet:
    server: realclient.HomescaleServer
    idp: oidcprovider.TestIdP
    dir: Path


@pytest.fixture(scope="module")
def oidcnet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcNet]:
    realclient.require_realclient()
    oidcprovider.require_idp()
    d = tmp_path_factory.mktemp("oidc")
    server = realclient.HomescaleServer(d)
    idp = oidcprovider.TestIdP(
        d / "idp", server.url + "/oidc/callback", copy.deepcopy(ACCOUNTS), pkce_required=True
    )
    idp.start()
    try:
        secret = server.data / "oidc_client_secret"
        secret.write_text(oidcprovider.CLIENT_SECRET + "\n")
        with server.config.open("a") as f:
            f.write(
                "\noidc:\n"
                f"  issuer: {idp.issuer}\n"
                f"  client_id: {oidcprovider.CLIENT_ID}\n"
                "  client_secret_path: oidc_client_secret\n"
                "  scope: [openid, profile, email, groups]\n"
                "  allowed_domains: [example.com]\n"
                "  allowed_groups: [tailnet]\n"
                "  pkce:\n    enabled: true\n    method: S256\n"
            )
        server.set_policy_mode("database")  # no policy (allow all) until a test sets one
        server.start()
        try:
            yield OidcNet(server, idp, d)
        finally:
            server.stop()
    finally:
        idp.stop()


async def auth_url_of(peer: ControlPeer) -> str:
    """Register without a key, as `tailscale up` does: the answer is the AuthURL."""
    status, body = await peer.post(
        "/machine/register",
        {
            "Version": 130,
            "NodeKey": peer.node_key,
            "OldNodeKey": "nodekey:" + "0" * 64,
            "Hostinfo": peer.hostinfo(),
        },
    )
    assert status == 200, body
    url = json.loads(body)["AuthURL"]
    assert isinstance(url, str)
    return url


async def sign_in(net: OidcNet, url: str, login: str, **kw: Any) -> oidcprovider.SignIn:
    return await trio.to_thread.run_sync(
        lambda: oidcprovider.sign_in(url, login, idp=net.idp, **kw)
    )


async def test_tsnet_client_logs_in_through_the_provider(oidcnet: OidcNet) -> None:
    server = oidcnet.server
    c = realclient.TsnetClient(oidcnet.dir, "oidc1", server.url, auth_key="")
    c.start()
    try:
        line = await c.wait_for_log(msg_has("/register/"), timeout=30, what="the AuthURL")
        msg = str(line["msg"])
        url = msg[msg.index(server.url) :].split()[0]
        assert node_by_name(await server.anodes(), "oidc1") is None

        result = await sign_in(oidcnet, url, "alice")
        # The AuthURL led the browser straight to the provider's authorization endpoint.
        assert urlsplit(result.urls[1]).path == "/auth", result.urls
        assert result.urls[1].startswith(oidcnet.idp.issuer)
        q = parse_qs(urlsplit(result.urls[1]).query)
        assert q["redirect_uri"] == [server.url + "/oidc/callback"]
        assert q["code_challenge_method"] == ["S256"]
        assert result.final.status_code == 200, result.text
        assert "Signed in as Alice Liddell (alice)" in result.text
        assert "oidc1" in result.text

        nodes = await wait_nodes(server, ["oidc1"], timeout=ONLINE_WITHIN)
        node = node_by_name(nodes, "oidc1")
        assert node is not None
        assert node["user"]["name"] == "alice"
        assert node["registerMethod"] == "REGISTER_METHOD_OIDC"
        users = json.loads((await server.acli("users", "list", "-o", "json")).stdout)
        alice = next(u for u in users if u["name"] == "alice")
        assert alice["provider"] == "oidc"
        assert alice["providerId"] == f"{oidcnet.idp.issuer}/alice-subject-1"
        assert alice["email"] == "alice@example.com"
        assert alice["displayName"] == "Alice Liddell"
        assert alice["profilePicUrl"] == "http://127.0.0.1/alice.png"
        await c.wait_for_log(msg_has("Switching ipn state", "-> Running"), timeout=RUNNING_WITHIN)
    finally:
        c.stop()


@pytest.mark.parametrize(
    ("login", "says"),
    [
        ("mallory", "not in any of the groups allowed to sign in (tailnet)"),
        ("eve", "domain of your email address (evil.example) is not one of the domains"),
        ("bob", "not verified at the identity provider (claim email_verified is not true)"),
    ],
)
async def test_refused_login_says_why_and_registers_nothing(
    oidcnet: OidcNet, login: str, says: str
) -> None:
    async with trio.open_nursery() as nursery:
        peer = await connect_peer(oidcnet.server, nursery, f"refused-{login}")
        url = await auth_url_of(peer)
        result = await sign_in(oidcnet, url, login)
        assert result.final.status_code == 403, result.text
        assert "Sign-in refused" in result.text
        assert says in result.text
        nodes = await oidcnet.server.anodes()
        assert node_by_name(nodes, f"refused-{login}") is None
        users = json.loads((await oidcnet.server.acli("users", "list", "-o", "json")).stdout)
        assert login not in [u["name"] for u in users]
        nursery.cancel_scope.cancel()


async def test_tampered_state_replayed_callback_and_replayed_code_are_refused(
    oidcnet: OidcNet,
) -> None:
    async with trio.open_nursery() as nursery:
        peer = await connect_peer(oidcnet.server, nursery, "replayed")
        url = await auth_url_of(peer)
        # The login waits, and `auth list` shows which machine since when.
        pending = json.loads((await oidcnet.server.acli("auth", "list", "-o", "json")).stdout)
        mine = [p for p in pending if p["kind"] == "login" and p["hostname"] == "replayed"]
        assert [p["authId"] for p in mine] == [url.rsplit("/", 1)[-1]]
        assert mine[0]["createdAt"]
        with httpx.Client(timeout=15) as browser:
            to_callback = await sign_in(
                oidcnet, url, "alice", client=browser, stop_at_callback=True
            )
            location = to_callback.final.headers["location"]
            parts = urlsplit(location)
            params = {k: v[0] for k, v in parse_qs(parts.query).items()}

            def get(query: dict[str, str]) -> httpx.Response:
                return browser.get(
                    f"{oidcnet.server.url}/oidc/callback?{urlencode(query)}",
                    follow_redirects=False,
                )

            # Same cookie name, different state: not this browser's sign-in.
            tampered = dict(params, state=params["state"][:8] + "x" * 24)
            r = await trio.to_thread.run_sync(get, tampered)
            assert r.status_code == 403, r.text
            assert "state does not match" in r.text
            # Another browser (no state cookie) cannot use the code either.
            r = await trio.to_thread.run_sync(
                lambda: httpx.get(location, timeout=15, follow_redirects=False)
            )
            assert r.status_code == 400, r.text
            assert "no sign-in state cookie" in r.text
            assert node_by_name(await oidcnet.server.anodes(), "replayed") is None
            # The genuine callback asks the signed-in user to confirm the machine ...
            r = await trio.to_thread.run_sync(get, params)
            assert r.status_code == 200, r.text
            assert "Add replayed to the tailnet?" in r.text
            confirm_page = r.text
            # ... replaying it is refused (the state is spent) ...
            r = await trio.to_thread.run_sync(get, params)
            assert r.status_code == 410, r.text
            assert "already used" in r.text
            # ... nothing is registered before the click, and a forged confirmation
            # (another browser: no cookie; or a wrong token) registers nothing ...
            assert node_by_name(await oidcnet.server.anodes(), "replayed") is None
            reg_id = url.rsplit("/", 1)[-1]
            confirm_url = f"{oidcnet.server.url}/register/confirm/{reg_id}"
            csrf = confirm_page.split("name='csrf' value='", 1)[1].split("'", 1)[0]
            r = await trio.to_thread.run_sync(
                lambda: httpx.post(confirm_url, data={"csrf": csrf}, timeout=15)
            )
            assert r.status_code == 403, r.text
            r = await trio.to_thread.run_sync(
                lambda: browser.post(confirm_url, data={"csrf": "x" * len(csrf)})
            )
            assert r.status_code == 403, r.text
            assert node_by_name(await oidcnet.server.anodes(), "replayed") is None
            # ... and the user's own click does.
            r = await trio.to_thread.run_sync(
                lambda: browser.post(confirm_url, data={"csrf": csrf})
            )
            assert r.status_code == 200, r.text
            assert "is now registered" in r.text
            # A spent code replayed in a fresh sign-in (its own valid state and cookie) is
            # refused by the provider, and homescale says so.
            other = await connect_peer(oidcnet.server, nursery, "replayed-code")
            fresh = await sign_in(
                oidcnet, await auth_url_of(other), "alice", client=browser, stop_at_callback=True
            )
            fresh_params = parse_qs(urlsplit(fresh.final.headers["location"]).query)
            reused = {"code": params["code"], "state": fresh_params["state"][0]}
            r = await trio.to_thread.run_sync(get, reused)
            assert r.status_code == 403, r.text
            assert "the provider refused the code (invalid_grant" in r.text
            assert node_by_name(await oidcnet.server.anodes(), "replayed-code") is None
        nodes = await oidcnet.server.anodes()
        assert [n["givenName"] for n in nodes].count("replayed") == 1
        nursery.cancel_scope.cancel()


async def test_profile_refreshed_at_next_login_reaches_peers(oidcnet: OidcNet) -> None:
    async with trio.open_nursery() as nursery:
        first = await connect_peer(oidcnet.server, nursery, "profile1")
        r = await sign_in(oidcnet, await auth_url_of(first), "alice")
        assert r.final.status_code == 200, r.text
        stream = await first.open_stream()
        _, full = await stream.next()
        me = next(p for p in full["UserProfiles"] if p["LoginName"] == "alice@example.com")
        uid = me["ID"]
        # The user is renamed at the provider; a second machine signs in as them.
        claims = dict(oidcnet.idp.accounts["alice"], name="Alice Pleasance", picture="")
        oidcnet.idp.set_account("alice", claims)
        second = await connect_peer(oidcnet.server, nursery, "profile2")
        r = await sign_in(oidcnet, await auth_url_of(second), "alice")
        assert r.final.status_code == 200, r.text
        assert "Signed in as Alice Pleasance (alice)" in r.text
        # The first machine hears the new profile as a delta.
        with trio.fail_after(15):
            while True:
                _, msg = await stream.next()
                profiles = {p["ID"]: p for p in msg.get("UserProfiles") or []}
                if uid in profiles and profiles[uid]["DisplayName"] == "Alice Pleasance":
                    assert "ProfilePicURL" not in profiles[uid]
                    break
        users = json.loads((await oidcnet.server.acli("users", "list", "-o", "json")).stdout)
        assert [u["name"] for u in users].count("alice") == 1  # matched by subject, not new
        nursery.cancel_scope.cancel()


async def test_configtest_reports_the_provider_answering(oidcnet: OidcNet) -> None:
    r = await oidcnet.server.acli("configtest")
    assert f"oidc: provider {oidcnet.idp.issuer} answers" in r.stderr
    assert f"sign-in at {oidcnet.idp.issuer}/auth" in r.stderr


async def test_provider_groups_in_the_policy_follow_each_sign_in(
    oidcnet: OidcNet, tmp_path: Path
) -> None:
    server, idp = oidcnet.server, oidcnet.idp
    dave = {
        "sub": "dave-subject-1",
        "email": "dave@example.com",
        "email_verified": True,
        "preferred_username": "dave",
        "groups": ["tailnet", "engineering"],
    }
    idp.set_account("dave", dave)
    await server.acli("users", "create", "svc")
    key = await trio.to_thread.run_sync(server.create_key, "svc")
    policy = tmp_path / "policy.hujson"
    policy.write_text(
        json.dumps(
            {
                "groups": {"group:eng": ["oidc:engineering"]},
                "acls": [{"action": "accept", "src": ["group:eng"], "dst": ["*:22"]}],
            }
        )
    )
    async with trio.open_nursery() as nursery:
        db = await connect_peer(server, nursery, "groups-db")
        await db.register(key)
        laptop = await connect_peer(server, nursery, "groups-dave1")
        r = await sign_in(oidcnet, await auth_url_of(laptop), "dave")
        assert r.final.status_code == 200, r.text
        nodes = await server.anodes()
        db_node, dave_node = node_by_name(nodes, "groups-db"), node_by_name(nodes, "groups-dave1")
        assert db_node is not None
        assert dave_node is not None
        db_ip, dave_ip = db_node["ipAddresses"][0], dave_node["ipAddresses"][0]
        await server.acli("policy", "set", "--file", str(policy))
        stream = await db.open_stream()
        _, full = await stream.next()
        assert filter_allows(full["PacketFilter"], dave_ip, db_ip, 22), full["PacketFilter"]
        # dave leaves engineering at the provider; his next sign-in (another machine)
        # stores the new groups, and the database's filter loses his addresses.
        idp.set_account("dave", dict(dave, groups=["tailnet"]))
        phone = await connect_peer(server, nursery, "groups-dave2")
        r = await sign_in(oidcnet, await auth_url_of(phone), "dave")
        assert r.final.status_code == 200, r.text
        with trio.fail_after(15):
            while True:
                _, msg = await stream.next()
                if "PacketFilter" in msg:
                    assert not filter_allows(msg["PacketFilter"], dave_ip, db_ip, 22), msg
                    break
        nursery.cancel_scope.cancel()


@pytest.fixture(scope="module")
def chromium() -> str:
    return oidcprovider.require_browser()


async def test_browser_signs_in_and_tsnet_client_comes_up(oidcnet: OidcNet, chromium: str) -> None:
    """`tailscale up` as a person does it: the URL the client prints, opened in a real
    browser (Debian's chromium, headless), sign-in and consent typed and clicked at the
    provider, which is another site (localhost) than homescale (127.0.0.1): the state
    cookie must survive that cross-site return (SameSite=Lax)."""
    server = oidcnet.server
    assert urlsplit(oidcnet.idp.issuer).hostname == "localhost"
    c = realclient.TsnetClient(oidcnet.dir, "browser1", server.url, auth_key="")
    c.start()
    try:
        line = await c.wait_for_log(msg_has("/register/"), timeout=30, what="the AuthURL")
        msg = str(line["msg"])
        url = msg[msg.index(server.url) :].split()[0]
        final_url, text = await trio.to_thread.run_sync(
            lambda: oidcprovider.browser_sign_in(chromium, url, "alice", idp=oidcnet.idp)
        )
        # Back through /oidc/callback (the state cookie survived) to the confirmation,
        # whose button the browser pressed.
        assert final_url == f"{server.url}/register/confirm/{url.rsplit('/', 1)[-1]}"
        assert "Signed in as" in text, text
        assert "is now registered" in text
        assert "browser1" in text
        nodes = await wait_nodes(server, ["browser1"], timeout=ONLINE_WITHIN)
        node = node_by_name(nodes, "browser1")
        assert node is not None
        assert node["user"]["name"] == "alice"
        await c.wait_for_log(msg_has("Switching ipn state", "-> Running"), timeout=RUNNING_WITHIN)
    finally:
        c.stop()


async def test_ssh_check_mode_through_the_provider_and_by_an_admin(
    oidcnet: OidcNet, tmp_path: Path
) -> None:
    """`action: check` at the wire level, as Tailscale SSH on the destination calls it
    (tailssh fetchSSHAction: GET the holdAndDelegate URL over Noise, then GET the
    returned one and wait). tsnet has no SSH server, so our ts2021 peer plays tailscaled."""
    server, idp = oidcnet.server, oidcnet.idp
    idp.set_account(
        "carol",
        {
            "sub": "carol-subject-1",
            "email": "carol@example.com",
            "email_verified": True,
            "preferred_username": "carol",
            "groups": ["tailnet"],
        },
    )
    await server.acli("users", "create", "ops")
    policy = tmp_path / "policy.hujson"

    async def set_policy(period: str) -> None:
        policy.write_text(
            json.dumps(
                {
                    "tagOwners": {"tag:server": ["ops@"]},
                    "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
                    "ssh": [
                        {
                            "action": "check",
                            "src": ["autogroup:member"],
                            "dst": ["tag:server"],
                            "users": ["root"],
                            "checkPeriod": period,
                        }
                    ],
                }
            )
        )
        await server.acli("policy", "set", "--file", str(policy))

    await set_policy("1h")
    key = await trio.to_thread.run_sync(server.create_key, "ops", "--tags", "tag:server")

    async def get(peer: ControlPeer, path: str) -> tuple[int, dict[str, Any]]:
        status, body = await peer.client.request("GET", path, b"")
        return status, json.loads(body)

    async with trio.open_nursery() as nursery:
        src = await connect_peer(server, nursery, "ssh-src")
        r = await sign_in(oidcnet, await auth_url_of(src), "alice")
        assert r.final.status_code == 200, r.text
        dst = await connect_peer(server, nursery, "ssh-dst")
        await dst.register(key)
        nodes = await server.anodes()
        src_node, dst_node = node_by_name(nodes, "ssh-src"), node_by_name(nodes, "ssh-dst")
        assert src_node is not None
        assert dst_node is not None
        src_id, dst_id = src_node["id"], dst_node["id"]
        # The destination's SSH policy delegates to the server.
        stream = await dst.open_stream()
        _, full = await stream.next()
        action = full["SSHPolicy"]["rules"][0]["action"]
        assert action["holdAndDelegate"].startswith(server.url + "/machine/ssh/action/")
        first = f"/machine/ssh/action/{src_id}/to/{dst_id}?local_user=root"

        # Only the destination may ask about its connections.
        status, body = await get(src, first)
        assert status == 401, body

        status, hold = await get(dst, first)
        assert status == 200, hold
        assert "accept" not in hold
        follow = urlsplit(hold["holdAndDelegate"])
        auth_id = parse_qs(follow.query)["auth_id"][0]
        check_url = f"{server.url}/auth/{auth_id}"
        assert f"To authenticate, visit: {check_url}" in hold["message"]
        verdicts_in, verdicts = trio.open_memory_channel[dict[str, Any]](4)

        async def wait_verdict(path: str) -> None:
            status, body = await get(dst, path)
            assert status == 200, body
            await verdicts_in.send(body)

        async def no_verdict_within(seconds: float) -> None:
            with trio.move_on_after(seconds):
                early = await verdicts.receive()
                pytest.fail(f"the check was decided too early: {early}")

        async def verdict() -> dict[str, Any]:
            with trio.fail_after(10):
                return await verdicts.receive()

        follow_path = f"{follow.path}?{follow.query}"
        nursery.start_soon(wait_verdict, follow_path)
        await no_verdict_within(0.5)  # the client waits for the check
        pending = json.loads((await server.acli("auth", "list", "-o", "json")).stdout)
        check = next(p for p in pending if p["authId"] == auth_id)
        assert (check["kind"], check["user"]) == ("ssh-check", "alice")
        assert check["hostname"] == "ssh-src -> ssh-dst"
        # Someone who is not the owner of the source machine cannot pass it.
        r = await sign_in(oidcnet, check_url, "carol")
        assert r.final.status_code == 403, r.text
        assert "does not own the machine" in r.text
        await no_verdict_within(0.3)
        # The owner signs in at the provider: the waiting client hears accept at once.
        r = await sign_in(oidcnet, check_url, "alice")
        assert r.final.status_code == 200, r.text
        assert "SSH check passed" in r.text
        assert (await verdict())["accept"] is True
        # Within checkPeriod the next connection is accepted without asking.
        status, again = await get(dst, first)
        assert (status, again.get("accept")) == (200, True)

        # checkPeriod "always": every connection asks; here an admin decides.
        await set_policy("always")
        for command, accepted in (("approve", True), ("reject", False)):
            status, hold = await get(dst, first)
            assert "holdAndDelegate" in hold, hold
            follow = urlsplit(hold["holdAndDelegate"])
            auth_id = parse_qs(follow.query)["auth_id"][0]
            nursery.start_soon(wait_verdict, f"{follow.path}?{follow.query}")
            await no_verdict_within(0.3)
            await server.acli("auth", command, "--auth-id", auth_id)
            got = await verdict()
            assert got.get("accept", False) is accepted, got
            assert got.get("reject", False) is (not accepted), got
        # A spent auth_id is not a way in.
        r2 = await server.acli("auth", "approve", "--auth-id", auth_id, check=False)
        assert r2.returncode != 0
        nursery.cancel_scope.cancel()
