"""OIDC without a provider process: the `oidc` config block, the authorization rules,
the claims a provider may send, and the ID-token checks.

The ID-token tests sign tokens with a key made here and hand homescale the matching
key set, as a provider's jwks_uri would: the point is what homescale accepts and
refuses (expired, wrong audience, wrong nonce, foreign signature, alg "none"),
which a real provider never sends on purpose. The whole flow with a real provider
is tests/e2e/test_oidc_realclient.py.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import pytest
import trio
from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey

from appliance.config import OIDCSettings, load_config
from appliance.errors import ConfigError
from appliance.oidc import (
    Claims,
    LoginRefused,
    OIDCError,
    OIDCLogin,
    ProviderMetadata,
    authorize,
    upsert_user,
)
from appliance.serve import ServeError, serve
from appliance.store import Store
from appliance.storethread import run_inline
from tests.realclient import free_port

from .conftest import LOG, Site, run_cli
from .test_app_config import BASE, write

ISSUER = "http://127.0.0.1:9/idp"
CLIENT = "homescale"


def oidc_config(tmp_path: Path, block: str) -> Any:
    return load_config(write(tmp_path, BASE + "oidc:\n" + block), {})


# ---------------------------------------------------------------- config


def test_oidc_block_parsed_with_headscale_defaults(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("s3cret\n")
    c = oidc_config(
        tmp_path,
        f"  issuer: {ISSUER}\n  client_id: {CLIENT}\n  client_secret_path: secret\n"
        "  extra_params:\n    domain_hint: example.com\n",
    )
    o = c.oidc
    assert o is not None
    assert c.warnings == []
    assert (o.issuer, o.client_id, o.client_secret) == (ISSUER, CLIENT, "s3cret")
    assert o.scope == ["openid", "profile", "email"]
    assert o.extra_params == {"domain_hint": "example.com"}
    assert o.email_verified_required is True
    assert o.only_start_if_available is True
    assert (o.pkce_enabled, o.pkce_method) == (False, "S256")
    assert o.use_expiry_from_token is False


def test_no_issuer_no_oidc(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, BASE), {}).oidc is None


@pytest.mark.parametrize(
    ("block", "says"),
    [
        ("  issuer: not a url\n  client_id: x\n  client_secret: y\n", "oidc.issuer: expected"),
        (f"  issuer: {ISSUER}\n  client_secret: y\n", "oidc.client_id: required"),
        (f"  issuer: {ISSUER}\n  client_id: x\n", "oidc.client_secret or oidc.client_secret_path"),
        (
            f"  issuer: {ISSUER}\n  client_id: x\n  client_secret: y\n  client_secret_path: z\n",
            "set one of them, not both",
        ),
        (
            f"  issuer: {ISSUER}\n  client_id: x\n  client_secret_path: missing\n",
            "oidc.client_secret_path: cannot read",
        ),
        (
            f"  issuer: {ISSUER}\n  client_id: x\n  client_secret: y\n  pkce:\n    method: S512\n",
            "oidc.pkce.method: expected S256 or plain",
        ),
        (
            f"  issuer: {ISSUER}\n  client_id: x\n  client_secret: y\n  scope: [profile]\n",
            "oidc.scope: must contain openid",
        ),
        (f"  issuer: {ISSUER}\n  expiry: 180d\n", "moved to node.expiry"),
    ],
)
def test_oidc_block_errors_name_the_key(tmp_path: Path, block: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        oidc_config(tmp_path, block)
    assert says in str(info.value)


def test_unknown_oidc_key_is_a_warning(tmp_path: Path) -> None:
    c = oidc_config(tmp_path, f"  issuer: {ISSUER}\n  client_id: x\n  client_secret: y\n  foo: 1\n")
    assert any("oidc.foo" in w for w in c.warnings)


# ---------------------------------------------------------------- authorization


def settings(**kw: Any) -> OIDCSettings:
    base: dict[str, Any] = {
        "issuer": ISSUER,
        "client_id": CLIENT,
        "client_secret": "s",
        "scope": ["openid"],
        "extra_params": {},
        "allowed_domains": [],
        "allowed_users": [],
        "allowed_groups": [],
        "email_verified_required": True,
        "pkce_enabled": False,
        "pkce_method": "S256",
        "use_expiry_from_token": False,
        "only_start_if_available": True,
    }
    return OIDCSettings(**{**base, **kw})


def claims(**kw: Any) -> Claims:
    base: dict[str, Any] = {
        "iss": ISSUER,
        "sub": "s1",
        "email": "a@example.com",
        "email_verified": True,
        "groups": ["eng"],
    }
    return Claims.from_json({**base, **kw})


def test_authorize_rules() -> None:
    authorize(settings(), claims())  # nothing configured: everyone
    authorize(settings(allowed_domains=["example.com"], allowed_groups=["eng"]), claims())
    authorize(settings(allowed_users=["a@example.com"]), claims())
    # Unverified email is fine when no email rule applies, or when not required.
    authorize(settings(allowed_groups=["eng"]), claims(email_verified=False))
    authorize(
        settings(allowed_domains=["example.com"], email_verified_required=False),
        claims(email_verified=False),
    )
    with pytest.raises(LoginRefused, match=r"groups allowed to sign in \(ops\).*: eng"):
        authorize(settings(allowed_groups=["ops"]), claims())
    with pytest.raises(LoginRefused, match=r"\(other.org\) is not one of the domains"):
        authorize(settings(allowed_domains=["example.com"]), claims(email="x@other.org"))
    with pytest.raises(LoginRefused, match="email_verified is not true"):
        authorize(settings(allowed_domains=["example.com"]), claims(email_verified=False))
    with pytest.raises(LoginRefused, match="not in the list of users"):
        authorize(settings(allowed_users=["b@example.com"]), claims())
    # A subdomain is not the domain (headscale compares the part after '@' exactly).
    with pytest.raises(LoginRefused):
        authorize(settings(allowed_domains=["example.com"]), claims(email="x@evil.example.com"))


def test_claims_as_providers_send_them() -> None:
    # JumpCloud sends email_verified as a string; some providers send one group bare.
    c = Claims.from_json({"sub": "x", "email_verified": "true", "groups": "admins"})
    assert c.email_verified is True
    assert c.groups == ("admins",)
    c = Claims.from_json({"sub": "x", "email_verified": "false", "groups": ["a", 3, None]})
    assert c.email_verified is False
    assert c.groups == ("a",)
    # Wrong types are ignored, not trusted.
    c = Claims.from_json({"sub": 5, "email": ["a@b"], "name": {"x": 1}})
    assert (c.sub, c.email, c.name) == ("", "", "")
    assert Claims.from_json({"iss": "https://idp/", "sub": "/u"}).identifier == "https://idp/u"


def test_upsert_user_matches_by_subject_and_never_takes_a_name(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    try:
        store.create_user("alice")  # made with the CLI: not the provider's alice
        u = upsert_user(
            store,
            claims(username="alice", email="alice@example.com", name="Alice"),
            email_verified_required=True,
        )
        assert u.name == "alice@example.com"  # the next candidate, not a takeover
        assert (u.provider, u.provider_id) == ("oidc", f"{ISSUER}/s1")
        again = upsert_user(
            store,
            claims(username="alice", email="alice@example.com", name="Alice B", picture="p"),
            email_verified_required=True,
        )
        assert again.id == u.id
        assert (again.display_name, again.profile_pic_url) == ("Alice B", "p")
        assert again.groups == ["eng"]
        assert store.user(u.id).groups == ["eng"]  # stored, as the policy reads it
        # An unverified email is not stored when verification is required.
        other = upsert_user(
            store,
            claims(sub="s2", username="", email="bob@example.com", email_verified=False),
            email_verified_required=True,
        )
        assert other.email == ""
        assert other.name.startswith("user-")
        assert len(store.users()) == 3
    finally:
        store.close()


# ---------------------------------------------------------------- the ID token


class _NoLogins:
    def pending_hostname(self, reg_id: str) -> str | None:
        return None

    async def complete_registration(
        self, user: str, reg_id: str, *, expiry: Any = None, method: str = "cli"
    ) -> dict[str, Any]:
        raise AssertionError("not reached")


@pytest.fixture
def signer() -> RSAKey:
    return RSAKey.generate_key(2048, parameters={"kid": "k1", "alg": "RS256"})


@pytest.fixture
def login(signer: RSAKey, tmp_path: Path) -> OIDCLogin:
    o = OIDCLogin(
        settings(),
        server_url="http://127.0.0.1:8080",
        logins=_NoLogins(),
        store=Store(tmp_path / "db.sqlite"),
        run_db=run_inline,
        log=logging.getLogger("test.oidc"),
    )
    o.provider = ProviderMetadata(
        issuer=ISSUER,
        authorization_endpoint=ISSUER + "/auth",
        token_endpoint=ISSUER + "/token",
        jwks_uri=ISSUER + "/jwks",
        userinfo_endpoint="",
        id_token_algs=("RS256",),
        token_auth_methods=("client_secret_basic",),
    )
    o.keys = KeySet([RSAKey.import_key(signer.as_dict(private=False))])
    o.keys_fetched = time.monotonic()
    return o


def id_token(key: RSAKey, **kw: Any) -> str:
    now = int(time.time())
    payload = {
        "iss": ISSUER,
        "sub": "s1",
        "aud": CLIENT,
        "exp": now + 300,
        "iat": now,
        "nonce": "n1",
        "email": "a@example.com",
        **kw,
    }
    payload = {k: v for k, v in payload.items() if v is not None}
    return jwt.encode({"alg": "RS256", "kid": "k1"}, payload, key)


async def test_valid_id_token_gives_claims_and_expiry(login: OIDCLogin, signer: RSAKey) -> None:
    exp = int(time.time()) + 300
    c, expiry = await login._verify_id_token({"id_token": id_token(signer, exp=exp)}, "n1")
    assert (c.sub, c.email) == ("s1", "a@example.com")
    assert expiry is not None
    assert int(expiry.timestamp()) == exp


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"exp": int(time.time()) - 3600}, "expired"),
        ({"aud": "someone-else"}, "aud"),
        ({"iss": "http://127.0.0.1:9/other"}, "iss"),
        ({"nonce": "replayed"}, "nonce"),
        ({"nonce": None}, "nonce"),
        ({"exp": None}, "exp"),
        ({"aud": [CLIENT, "other"], "azp": "other"}, "another party"),
    ],
)
async def test_bad_id_tokens_are_refused(
    login: OIDCLogin, signer: RSAKey, change: dict[str, Any], says: str
) -> None:
    with pytest.raises(OIDCError, match=says) as info:
        await login._verify_id_token({"id_token": id_token(signer, **change)}, "n1")
    assert info.value.status == 403


async def test_foreign_signature_and_alg_none_are_refused(login: OIDCLogin, signer: RSAKey) -> None:
    stranger = RSAKey.generate_key(2048, parameters={"kid": "k1"})
    with pytest.raises(OIDCError, match="not valid"):
        await login._verify_id_token({"id_token": id_token(stranger)}, "n1")
    good = id_token(signer).split(".")
    header = base64.urlsafe_b64encode(json.dumps({"alg": "none"}).encode()).rstrip(b"=")
    unsigned = f"{header.decode()}.{good[1]}."
    with pytest.raises(OIDCError, match="not valid"):
        await login._verify_id_token({"id_token": unsigned}, "n1")
    with pytest.raises(OIDCError, match="no ID token"):
        await login._verify_id_token({"access_token": "x"}, "n1")


# ---------------------------------------------------------------- start-up


def _with_unreachable_issuer(site: Site, only_start: bool) -> Any:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    site.config_path.write_text(
        site.config_path.read_text()
        + f"oidc:\n  issuer: {dead}\n  client_id: x\n  client_secret: y\n"
        + f"  only_start_if_oidc_is_available: {'true' if only_start else 'false'}\n"
    )
    return load_config(site.config_path, {})


async def test_unreachable_provider_stops_the_start_when_required(site: Site) -> None:
    with pytest.raises(ServeError, match=r"oidc: oidc\.issuer: cannot reach the provider"):
        with trio.fail_after(30):
            await serve(_with_unreachable_issuer(site, True), LOG)


async def test_unreachable_provider_tolerated_when_allowed(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    config = _with_unreachable_issuer(site, False)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(30):
            srv = await nursery.start(serve, config, LOG)
        assert srv.oidc is not None
        assert srv.oidc.provider is None
        assert "starting anyway" in caplog.text
        nursery.cancel_scope.cancel()


def test_configtest_reports_an_unreachable_provider(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    _with_unreachable_issuer(site, True)
    r = run_cli(capsys, site, "configtest")
    assert r.code == 0  # the file is fine; the provider being down is reported
    assert "oidc: oidc.issuer: cannot reach the provider" in r.err
    assert "the server will refuse to start" in r.err


# ---------------------------------------------------------------- the token endpoint


async def test_client_secret_falls_back_from_header_to_form(
    login: OIDCLogin, nursery: trio.Nursery
) -> None:
    """A provider whose client takes its secret only in the form (client_secret_post)
    answers invalid_client to the Basic header; homescale then sends the form, as Go's
    oauth2 AuthStyleAutoDetect does, and remembers it. Simulated here: npm's
    oidc-provider accepts either style for every client, so it cannot show this."""
    seen: list[str] = []

    async def token_endpoint(stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < int(
            data.partition(b"content-length: ")[2].split(b"\r\n")[0] or 0
        ):
            data += await stream.receive_some(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        basic = b"authorization: basic" in head.lower()
        seen.append("basic" if basic else "post")
        if basic:
            out = b'{"error":"invalid_client"}'
            status = b"401 Unauthorized"
        else:
            assert b"client_secret=s" in body
            out = b'{"id_token":"x","access_token":"y"}'
            status = b"200 OK"
        await stream.send_all(
            b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(out)).encode() + b"\r\nConnection: close\r\n\r\n" + out
        )
        await stream.aclose()

    listeners = await nursery.start(
        functools.partial(trio.serve_tcp, token_endpoint, 0, host="127.0.0.1")
    )
    port = listeners[0].socket.getsockname()[1]
    assert login.provider is not None
    login.provider = dataclasses.replace(
        login.provider,
        token_endpoint=f"http://127.0.0.1:{port}/token",
        token_auth_methods=("client_secret_basic", "client_secret_post"),
    )
    tokens = await login._exchange("code1", "")
    assert tokens["access_token"] == "y"
    assert seen == ["basic", "post"]
    assert login.auth_style == "client_secret_post"
    await login._exchange("code2", "")
    assert seen == ["basic", "post", "post"]  # remembered
    nursery.cancel_scope.cancel()


# ---------------------------------------------------------------- what the provider sends


def _discovery(**kw: Any) -> dict[str, Any]:
    base = {
        "issuer": ISSUER,
        "authorization_endpoint": ISSUER + "/auth",
        "token_endpoint": ISSUER + "/token",
        "jwks_uri": ISSUER + "/jwks",
        "userinfo_endpoint": ISSUER + "/me",
        "id_token_signing_alg_values_supported": ["RS256"],
    }
    return {k: v for k, v in {**base, **kw}.items() if v is not None}


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"issuer": ISSUER + "/"}, "the provider calls itself"),
        ({"token_endpoint": None}, "token_endpoint is missing"),
        ({"jwks_uri": "ftp://x/jwks"}, "jwks_uri is missing or not an http(s) URL"),
        ({"id_token_signing_alg_values_supported": ["HS256", "none"]}, "no public-key"),
        ({"id_token_signing_alg_values_supported": "RS256"}, "malformed"),
    ],
)
def test_discovery_documents_refused(change: dict[str, Any], says: str) -> None:
    with pytest.raises(OIDCError, match=re.escape(says)):
        ProviderMetadata.from_json(_discovery(**change), ISSUER)


def test_discovery_keeps_only_public_key_algorithms() -> None:
    meta = ProviderMetadata.from_json(
        _discovery(id_token_signing_alg_values_supported=["none", "HS256", "ES256", "RS256"]),
        ISSUER,
    )
    assert meta.id_token_algs == ("ES256", "RS256")
    assert meta.userinfo_endpoint == ISSUER + "/me"


async def test_http_client_deadline_and_size_cap(nursery: trio.Nursery) -> None:
    """A provider that stalls or floods cannot hold a login (or the server) hostage."""
    from appliance import httpclient

    async def stall(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    async def flood(stream: trio.SocketStream) -> None:
        await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"x" * 65536
        with trio.move_on_after(10):
            while True:
                await stream.send_all(b"%x\r\n%s\r\n" % (len(chunk), chunk))

    ports = []
    for handler in (stall, flood):
        ls = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        ports.append(ls[0].socket.getsockname()[1])
    with pytest.raises(httpclient.HttpClientError, match=r"no answer within 0\.5 s"):
        await httpclient.request("GET", f"http://127.0.0.1:{ports[0]}/", timeout=0.5)
    with pytest.raises(httpclient.HttpClientError, match="answer larger than"):
        await httpclient.request("GET", f"http://127.0.0.1:{ports[1]}/", timeout=10)
    nursery.cancel_scope.cancel()


def test_pkce_challenge_rfc7636_vector() -> None:
    from appliance.oidc import _pkce_challenge

    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"  # RFC 7636 appendix B
    assert _pkce_challenge(verifier, "S256") == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
    assert _pkce_challenge(verifier, "plain") == verifier
