"""Sign in through the organisation's OpenID provider (headscale's `oidc` keys and meaning).

The flow is headscale's (hscontrol/oidc.go): the AuthURL a client prints is
`server_url/register/<id>`; opening it redirects the browser to the provider's
authorization endpoint with a fresh state and nonce (and, with `pkce`, a code
challenge). The provider sends the browser back to `server_url/oidc/callback`, the
redirect URI admins register at their provider. There the state must match the
cookie set for it (SameSite=Lax, so it survives the provider's cross-site redirect)
and is spent at once; the code is exchanged for tokens; the ID token's signature
(the provider's published keys) and its iss, aud, exp, iat and nonce are checked
with joserfc; userinfo fills in what the ID token lacks; `allowed_*` decide; the user
is found by the provider's subject (iss + sub), created on first login and its name,
email and picture refreshed on every login; then the waiting client's login
completes for that user once they confirm it on one more page (headscale's
interstitial: with silent single sign-on, opening someone else's login link
must not add their machine to your account). A refusal is a page that says why;
nothing is registered.
"""

from __future__ import annotations

import base64
import hashlib
import html
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import parse_qs, quote, urlencode, urlsplit

from joserfc import jwt
from joserfc.errors import JoseError, MissingKeyError
from joserfc.jwk import KeySet

from .admin import validate_username
from .config import OIDCSettings
from .errors import HomescaleError, InvalidInput
from .httpclient import HttpAnswer, HttpClientError, request
from .httpserver import Request, Response
from .sshcheck import SSHChecks
from .store import Store, UserRow
from .storethread import RunDb

CALLBACK_PATH = "/oidc/callback"
CONFIRM_PATH = "/register/confirm/"
LOGIN_TTL = 15 * 60.0  # seconds from the redirect to the callback (headscale: 15 min)
MAX_LOGINS_IN_FLIGHT = 1024  # bounds what unauthenticated GETs of /register/<id> can fill
STATE_BYTES = 24
JWKS_REFRESH_MIN = 10.0  # seconds between two key-set fetches for an unknown key id
CLOCK_LEEWAY = 60  # seconds of clock skew tolerated on exp/iat (go-oidc allows some too)
MAX_PARAM = 4096  # a code or state longer than this is not from a provider
COOKIE_PREFIX = "homescale_oidc_"
# Signature algorithms an ID token may use: the provider's published list minus
# "none" and the shared-secret HMACs (go-oidc verifies only public-key signatures).
PUBLIC_KEY_ALGS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)


class OIDCError(HomescaleError):
    """The provider cannot be used (unreachable, malformed answer, bad token)."""

    def __init__(self, message: str, status: int = 502) -> None:
        super().__init__(message)
        self.status = status


class LoginRefused(HomescaleError):
    """The provider vouched for the user, but the config does not let them in."""


class PendingLogins(Protocol):
    """The narrow view of interactive logins this module needs (owned by the control side)."""

    def pending_hostname(self, reg_id: str) -> str | None:
        """The waiting machine's hostname, or None when no such login is pending."""

    async def complete_registration(
        self, user: str, reg_id: str, *, expiry: datetime | None = None, method: str = "cli"
    ) -> dict[str, Any]:
        """Register the waiting machine for `user` (name or ID) and release its client."""


# ---------------------------------------------------------------- provider facts


@dataclass(frozen=True)
class ProviderMetadata:
    """What discovery (`/.well-known/openid-configuration`) told us."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    userinfo_endpoint: str
    id_token_algs: tuple[str, ...]
    token_auth_methods: tuple[str, ...]

    @classmethod
    def from_json(cls, obj: dict[str, Any], issuer: str) -> ProviderMetadata:
        where = f"{discovery_url(issuer)}"

        def url(key: str, required: bool = True) -> str:
            v = obj.get(key)
            if v is None and not required:
                return ""
            if not isinstance(v, str) or urlsplit(v).scheme not in ("http", "https"):
                raise OIDCError(f"{where}: {key} is missing or not an http(s) URL: {v!r}")
            return v

        if obj.get("issuer") != issuer:
            # OpenID Connect Discovery 4.3: the issuer must be exactly the one configured.
            raise OIDCError(
                f"{where}: the provider calls itself {obj.get('issuer')!r}, but oidc.issuer is "
                f"{issuer!r}; set oidc.issuer to exactly the provider's issuer"
            )
        algs = obj.get("id_token_signing_alg_values_supported") or ["RS256"]
        methods = obj.get("token_endpoint_auth_methods_supported") or ["client_secret_basic"]
        if not isinstance(algs, list) or not isinstance(methods, list):
            raise OIDCError(f"{where}: malformed algorithm or auth method lists")
        usable = tuple(a for a in algs if a in PUBLIC_KEY_ALGS)
        if not usable:
            raise OIDCError(f"{where}: no public-key ID token signature among {algs!r}")
        return cls(
            issuer=issuer,
            authorization_endpoint=url("authorization_endpoint"),
            token_endpoint=url("token_endpoint"),
            jwks_uri=url("jwks_uri"),
            userinfo_endpoint=url("userinfo_endpoint", required=False),
            id_token_algs=usable,
            token_auth_methods=tuple(str(m) for m in methods),
        )


def discovery_url(issuer: str) -> str:
    return issuer.rstrip("/") + "/.well-known/openid-configuration"


async def discover(issuer: str) -> ProviderMetadata:
    """Fetch and check the provider's discovery document."""
    url = discovery_url(issuer)
    try:
        answer = await request("GET", url)
    except HttpClientError as e:
        raise OIDCError(f"oidc.issuer: cannot reach the provider: {e}") from None
    if answer.status != 200:
        raise OIDCError(f"{url}: HTTP {answer.status} (is oidc.issuer right?)")
    try:
        return ProviderMetadata.from_json(answer.json(url), issuer)
    except HttpClientError as e:
        raise OIDCError(str(e)) from None


def provider_report(settings: OIDCSettings) -> str:
    """One line for `configtest`: does the provider's discovery answer? (never raises)"""
    import trio

    try:
        meta = trio.run(discover, settings.issuer)
    except OIDCError as e:
        what = (
            "the server will refuse to start"
            if settings.only_start_if_available
            else "the server starts anyway (only_start_if_oidc_is_available: false)"
        )
        return f"warning: oidc: {e}; while it stays so, {what}"
    return f"oidc: provider {settings.issuer} answers; sign-in at {meta.authorization_endpoint}"


# ---------------------------------------------------------------- claims


def _flexible_bool(v: Any) -> bool:
    """email_verified as a boolean, or as "true"/"false" (JumpCloud; headscale accepts it)."""
    if isinstance(v, bool):
        return v
    if isinstance(v, str):
        return v.strip().lower() in ("true", "1", "t")
    return False


def _flexible_strings(v: Any) -> list[str]:
    """groups as a list of strings, or one string (some providers send one group bare)."""
    if isinstance(v, str):
        return [v]
    if isinstance(v, list):
        return [x for x in v if isinstance(x, str)][:1000]
    return []


def _text(v: Any, limit: int = 1024) -> str:
    return v[:limit] if isinstance(v, str) else ""


@dataclass(frozen=True)
class Claims:
    """Who the provider says signed in (headscale's OIDCClaims)."""

    iss: str
    sub: str
    name: str = ""
    username: str = ""  # preferred_username
    email: str = ""
    email_verified: bool = False
    picture: str = ""
    groups: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Claims:
        return cls(
            iss=_text(obj.get("iss")),
            sub=_text(obj.get("sub"), 255),
            name=_text(obj.get("name")),
            username=_text(obj.get("preferred_username"), 255),
            email=_text(obj.get("email"), 320),
            email_verified=_flexible_bool(obj.get("email_verified")),
            picture=_text(obj.get("picture"), 2048),
            groups=tuple(_flexible_strings(obj.get("groups"))),
        )

    def merged_with_userinfo(self, info: dict[str, Any]) -> Claims:
        """userinfo wins where it says something (headscale: cmp.Or(userinfo, id token))."""
        other = Claims.from_json({**info, "iss": self.iss})
        return Claims(
            iss=self.iss,
            sub=self.sub,
            name=other.name or self.name,
            username=other.username or self.username,
            email=other.email or self.email,
            email_verified=other.email_verified or self.email_verified,
            picture=other.picture or self.picture,
            groups=other.groups if "groups" in info else self.groups,
        )

    @property
    def identifier(self) -> str:
        """The provider identity a user is matched by: issuer + "/" + subject (headscale's)."""
        return self.iss.rstrip("/") + "/" + self.sub.lstrip("/")


def authorize(settings: OIDCSettings, claims: Claims) -> None:
    """headscale's doOIDCAuthorization: groups always; email rules only on a trusted email."""
    if settings.allowed_groups and not set(settings.allowed_groups) & set(claims.groups):
        have = ", ".join(claims.groups) if claims.groups else "none"
        raise LoginRefused(
            f"you are not in any of the groups allowed to sign in "
            f"({', '.join(settings.allowed_groups)}); the provider says your groups are: {have}"
        )
    trust_email = not settings.email_verified_required or claims.email_verified
    if (settings.allowed_domains or settings.allowed_users) and not trust_email:
        raise LoginRefused(
            f"your email address {claims.email or '(none)'} is not verified at the identity "
            f"provider (claim email_verified is not true), and this server only accepts "
            f"verified addresses"
        )
    if settings.allowed_domains:
        domain = claims.email.rpartition("@")[2] if "@" in claims.email else ""
        if domain not in settings.allowed_domains:
            raise LoginRefused(
                f"the domain of your email address ({domain or 'none'}) is not one of the "
                f"domains allowed to sign in ({', '.join(settings.allowed_domains)})"
            )
    if settings.allowed_users and claims.email not in settings.allowed_users:
        raise LoginRefused(
            f"your email address ({claims.email or 'none'}) is not in the list of users "
            f"allowed to sign in"
        )


# ---------------------------------------------------------------- the user


def _usable_name(candidate: str) -> bool:
    try:
        validate_username(candidate)
    except InvalidInput:
        return False
    return True


def upsert_user(store: Store, claims: Claims, *, email_verified_required: bool) -> UserRow:
    """(store thread) The user for this provider identity, created or refreshed from the claims.

    The name is preferred_username (else the email) when valid and free; a name another
    user holds is never taken over, so a CLI-made `alice` is not merged with a provider's
    `alice` (anyone who can choose that name at the provider would get her nodes).
    """
    email = claims.email if claims.email_verified or not email_verified_required else ""
    fields: dict[str, Any] = {
        "display_name": claims.name,
        "email": email,
        "profile_pic_url": claims.picture,
        "groups": list(claims.groups),
    }
    with store.transaction():
        user = store.user_by_provider_id(claims.identifier)
        wanted = [c for c in (claims.username, email) if c and _usable_name(c)]
        if user is not None:
            for c in wanted:
                other = store.user_by_name(c)
                if other is None or other.id == user.id:
                    fields["name"] = c
                    break
            return store.update_user(user.id, **fields)
        digest = hashlib.sha256(claims.identifier.encode()).hexdigest()[:8]
        base = wanted[0] if wanted else f"user-{digest}"
        name = base
        n = 1
        while store.user_by_name(name) is not None:
            n += 1
            name = f"{base}-{n}"
        created = store.create_user(name, claims.name, email, claims.picture)
        return store.update_user(
            created.id,
            provider="oidc",
            provider_id=claims.identifier,
            groups=list(claims.groups),
        )


# ---------------------------------------------------------------- pages


def page(title: str, message: str, status: int = 200) -> Response:
    """A small HTML page; every value in it is escaped by the caller or here."""
    body = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>homescale: {html.escape(title)}</title></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{html.escape(message)}</p></body></html>"
    )
    return Response.text(body, status, content_type="text/html; charset=utf-8")


def _cookies(header: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in header.split(";"):
        name, eq, value = part.strip().partition("=")
        if eq and name:
            out.setdefault(name, value.strip('"'))
    return out


def _pkce_challenge(verifier: str, method: str) -> str:
    if method == "plain":
        return verifier
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


# ---------------------------------------------------------------- the flow


@dataclass
class _Confirmation:
    """A signed-in user's login waiting for their click on "Connect this machine"."""

    user_id: int
    expiry: datetime | None
    csrf: str
    started: float = field(default_factory=time.monotonic)


@dataclass
class _LoginInFlight:
    reg_id: str  # a pending login's id, or an SSH check's auth_id (kind "ssh")
    nonce: str
    verifier: str
    kind: str = "register"  # register | ssh | console
    started: float = field(default_factory=time.monotonic)


class OIDCLogin:
    """The two routes of an OIDC login: the redirect to the provider and the callback."""

    def __init__(
        self,
        settings: OIDCSettings,
        *,
        server_url: str,
        logins: PendingLogins,
        store: Store,
        run_db: RunDb,
        log: logging.Logger,
    ) -> None:
        self.settings = settings
        self.server_url = server_url.rstrip("/")
        self.redirect_uri = self.server_url + CALLBACK_PATH
        self.secure_cookies = self.server_url.startswith("https://")
        self.logins = logins
        self.store = store
        self.run_db = run_db
        self.log = log
        self.provider: ProviderMetadata | None = None
        self.keys: KeySet | None = None
        self.keys_fetched = 0.0
        self.in_flight: OrderedDict[str, _LoginInFlight] = OrderedDict()
        self.confirmations: dict[str, _Confirmation] = {}  # by pending login id
        self.auth_style = ""  # how the token endpoint took the client secret last time
        # SSH check mode (set by `serve`): pending checks, and who owns a node (None:
        # tagged or unknown). A check passes only for the owner of the source machine.
        self.ssh_checks: SSHChecks | None = None
        self.node_owner: Callable[[int], int | None] = lambda node_id: None
        # The web console's sign-in (set by `serve`): who signed in -> the console's answer.
        self.console_signed_in: Callable[[UserRow, Claims], Response] | None = None

    # -- provider

    async def start(self) -> None:
        """Discover the provider at startup; OIDCError tells the caller why it failed."""
        self.provider = await discover(self.settings.issuer)
        self.log.info(
            "OIDC provider %s: authorization at %s, callback %s",
            self.settings.issuer,
            self.provider.authorization_endpoint,
            self.redirect_uri,
        )

    async def _provider(self) -> ProviderMetadata:
        if self.provider is None:  # the provider was down at startup: try again now
            await self.start()
        assert self.provider is not None
        return self.provider

    async def _key_set(self, *, refresh: bool = False) -> KeySet:
        provider = await self._provider()
        if self.keys is not None and not refresh:
            return self.keys
        if self.keys is not None and time.monotonic() - self.keys_fetched < JWKS_REFRESH_MIN:
            return self.keys
        try:
            answer = await request("GET", provider.jwks_uri)
            if answer.status != 200:
                raise OIDCError(f"{provider.jwks_uri}: HTTP {answer.status}")
            self.keys = KeySet.import_key_set(answer.json(provider.jwks_uri))  # type: ignore[arg-type]
        except HttpClientError as e:
            raise OIDCError(f"the provider's signing keys: {e}") from None
        except (JoseError, ValueError, TypeError, KeyError) as e:
            raise OIDCError(f"{provider.jwks_uri}: malformed key set ({e})") from None
        self.keys_fetched = time.monotonic()
        return self.keys

    # -- step 1: /register/<id> -> the provider

    def _expire(self) -> None:
        now = time.monotonic()
        while self.in_flight:
            state, first = next(iter(self.in_flight.items()))
            if now - first.started <= LOGIN_TTL and len(self.in_flight) <= MAX_LOGINS_IN_FLIGHT:
                break
            del self.in_flight[state]

    async def register_page(self, req: Request, reg_id: str) -> Response:
        """Send the browser to the provider to sign in for pending login `reg_id`."""
        if self.logins.pending_hostname(reg_id) is None:
            return page(
                "Login expired",
                "This login is unknown or has expired; start the login on the device again.",
                404,
            )
        return await self._redirect(reg_id, "register")

    async def ssh_check_page(self, req: Request, auth_id: str) -> Response:
        """Send the browser to the provider to pass SSH check `auth_id`."""
        if self.ssh_checks is None or self.ssh_checks.get(auth_id) is None:
            return page(
                "Check expired",
                "This SSH check is unknown or has expired; connect again.",
                404,
            )
        return await self._redirect(auth_id, "ssh")

    async def console_page(self, req: Request) -> Response:
        """Send the browser to the provider to sign in to the web console (/admin/signin)."""
        return await self._redirect("", "console")

    async def _redirect(self, reg_id: str, kind: str) -> Response:
        try:
            provider = await self._provider()
        except OIDCError as e:
            self.log.warning("OIDC login %s: %s", reg_id, e)
            return page(
                "Identity provider unavailable",
                "The identity provider cannot be reached right now; try again in a moment.",
                502,
            )
        state = secrets.token_urlsafe(STATE_BYTES)
        nonce = secrets.token_urlsafe(STATE_BYTES)
        verifier = secrets.token_urlsafe(48) if self.settings.pkce_enabled else ""
        self._expire()
        self.in_flight[state] = _LoginInFlight(reg_id, nonce, verifier, kind)
        params = {
            "client_id": self.settings.client_id,
            "redirect_uri": self.redirect_uri,
            "response_type": "code",
            "scope": " ".join(self.settings.scope),
            "state": state,
            "nonce": nonce,
        }
        if verifier:
            params["code_challenge"] = _pkce_challenge(verifier, self.settings.pkce_method)
            params["code_challenge_method"] = self.settings.pkce_method
        params.update(self.settings.extra_params)
        sep = "&" if "?" in provider.authorization_endpoint else "?"
        location = provider.authorization_endpoint + sep + urlencode(params)
        cookie = (
            f"{COOKIE_PREFIX}{state[:8]}={state}; Path={CALLBACK_PATH}; Max-Age={int(LOGIN_TTL)}; "
            f"HttpOnly; SameSite=Lax{'; Secure' if self.secure_cookies else ''}"
        )
        self.log.debug("OIDC login %s: redirecting to %s", reg_id, provider.authorization_endpoint)
        return Response(
            302,
            b"",
            [("Location", location), ("Set-Cookie", cookie), ("Cache-Control", "no-store")],
        )

    # -- step 2: the provider -> /oidc/callback

    async def callback(self, req: Request) -> Response:
        try:
            return await self._callback(req)
        except LoginRefused as e:
            self.log.info("OIDC login refused: %s", e)
            return page("Sign-in refused", str(e), 403)
        except OIDCError as e:
            self.log.warning("OIDC callback failed: %s", e)
            return page("Sign-in failed", str(e), e.status)

    async def _callback(self, req: Request) -> Response:
        error = req.arg("error")
        if error:
            desc = req.arg("error_description")
            raise OIDCError(
                f"the identity provider answered {error[:100]}"
                + (f": {desc[:300]}" if desc else ""),
                403,
            )
        code, state = req.arg("code"), req.arg("state")
        if not code or not state:
            raise OIDCError("missing code or state parameter", 400)
        if len(code) > MAX_PARAM or len(state) > MAX_PARAM:
            raise OIDCError("code or state parameter too long", 400)
        cookie = _cookies(req.headers.get("cookie", "")).get(f"{COOKIE_PREFIX}{state[:8]}")
        if cookie is None:
            raise OIDCError(
                "no sign-in state cookie in this browser: open the login link again "
                "in the same browser",
                400,
            )
        if not secrets.compare_digest(cookie, state):
            raise OIDCError("the state does not match this browser's sign-in", 403)
        self._expire()
        flight = self.in_flight.pop(state, None)  # single use: a replayed callback fails here
        if flight is None:
            raise OIDCError("this sign-in was already used or has expired; start again", 410)
        tokens = await self._exchange(code, flight.verifier)
        claims, id_exp = await self._verify_id_token(tokens, flight.nonce)
        claims = await self._with_userinfo(claims, tokens)
        authorize(self.settings, claims)
        user: UserRow = await self.run_db(
            lambda: upsert_user(
                self.store, claims, email_verified_required=self.settings.email_verified_required
            )
        )
        if flight.kind == "ssh":
            return self._finish_ssh_check(flight.reg_id, user)
        if flight.kind == "console":
            if self.console_signed_in is None:
                raise OIDCError("the web console is not running", 503)
            return self.console_signed_in(user, claims)
        expiry = id_exp if self.settings.use_expiry_from_token else None
        host = self.logins.pending_hostname(flight.reg_id)
        if host is None:
            raise OIDCError("the device's login expired meanwhile; start it again", 410)
        self.log.info(
            "OIDC login %s: %s (%s) signed in; asking to confirm machine %s",
            flight.reg_id,
            user.name,
            claims.identifier,
            host,
        )
        return self._confirm_page(flight.reg_id, user, host, expiry)

    # -- step 3: confirm adding the machine (headscale's registration interstitial)
    #
    # Without it, a provider that signs in silently (single sign-on) would let anyone who
    # gets a victim to open a login link add the sender's machine to the victim's account.

    def _confirm_page(
        self, reg_id: str, user: UserRow, host: str, expiry: datetime | None
    ) -> Response:
        csrf = secrets.token_urlsafe(24)
        self._expire_confirmations()
        self.confirmations[reg_id] = _Confirmation(user.id, expiry, csrf)
        who = html.escape(f"{user.display_name or user.name} ({user.name})")
        body = (
            "<!doctype html><html><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            "<title>homescale: add this machine?</title></head><body>"
            f"<h1>Add {html.escape(host)} to the tailnet?</h1>"
            f"<p>Signed in as {who}. Connect the machine <b>{html.escape(host)}</b> as you? "
            "Only continue if you just started this login on that machine yourself.</p>"
            f"<form method='post' action='{CONFIRM_PATH}{html.escape(reg_id)}'>"
            f"<input type='hidden' name='csrf' value='{csrf}'>"
            "<button type='submit' id='confirm'>Connect this machine</button></form>"
            "</body></html>"
        )
        cookie = (
            f"{COOKIE_PREFIX}confirm={csrf}; Path={CONFIRM_PATH}{reg_id}; "
            f"Max-Age={int(LOGIN_TTL)}; HttpOnly; SameSite=Strict"
            f"{'; Secure' if self.secure_cookies else ''}"
        )
        return Response(
            200,
            body.encode(),
            [
                ("Content-Type", "text/html; charset=utf-8"),
                ("Set-Cookie", cookie),
                ("Cache-Control", "no-store"),
            ],
        )

    def _expire_confirmations(self) -> None:
        now = time.monotonic()
        for rid in [r for r, c in self.confirmations.items() if now - c.started > LOGIN_TTL]:
            del self.confirmations[rid]
        while len(self.confirmations) > MAX_LOGINS_IN_FLIGHT:
            del self.confirmations[next(iter(self.confirmations))]

    async def confirm(self, req: Request, reg_id: str) -> Response:
        """POST /register/confirm/<id>: the signed-in user confirmed; register the machine."""
        if req.method != "POST":
            return page("Method not allowed", "Confirm with the button on the sign-in page.", 405)
        if len(req.body) > 4096:
            return page("Bad request", "The confirmation form is too large.", 400)
        form = parse_qs(req.body.decode("utf-8", "replace"))
        sent = (form.get("csrf") or [""])[0]
        cookie = _cookies(req.headers.get("cookie", "")).get(f"{COOKIE_PREFIX}confirm", "")
        self._expire_confirmations()
        pending = self.confirmations.get(reg_id)
        if pending is None:
            return page("Login expired", "Nothing to confirm here; start the login again.", 410)
        if (
            not sent
            or not cookie
            or not (
                secrets.compare_digest(sent, cookie) and secrets.compare_digest(sent, pending.csrf)
            )
        ):
            return page(
                "Not confirmed", "This confirmation does not come from your sign-in page.", 403
            )
        del self.confirmations[reg_id]
        host = self.logins.pending_hostname(reg_id)
        if host is None:
            return page("Login expired", "The machine's login expired; start it again.", 410)
        try:
            await self.logins.complete_registration(
                str(pending.user_id), reg_id, expiry=pending.expiry, method="oidc"
            )
        except HomescaleError as e:
            self.log.warning("OIDC login %s: could not register: %s", reg_id, e)
            return page("Sign-in failed", f"could not register the device: {e}", 500)
        user = await self.run_db(self.store.user, pending.user_id)
        self.log.info("OIDC login %s: machine %s registered for %s", reg_id, host, user.name)
        return page(
            "Signed in",
            f"Signed in as {user.display_name or user.name} ({user.name}). The machine "
            f"{host} is now registered and connects on its own; you can close this window.",
        )

    def _finish_ssh_check(self, auth_id: str, user: UserRow) -> Response:
        check = self.ssh_checks.get(auth_id) if self.ssh_checks is not None else None
        if self.ssh_checks is None or check is None:
            raise OIDCError("the SSH check expired meanwhile; connect again", 410)
        owner = self.node_owner(check.src)
        if owner is None or owner != user.id:
            # headscale: only the owner of the source machine may pass its check (a
            # stolen machine key alone must not get through).
            self.log.warning(
                "OIDC SSH check %s: %s is not the owner of node %d", auth_id, user.name, check.src
            )
            raise LoginRefused(
                f"you signed in as {user.name}, who does not own the machine the SSH "
                f"connection comes from"
            )
        self.ssh_checks.finish(auth_id, accept=True, by=f"by {user.name} at the provider")
        return page(
            "SSH check passed",
            f"Signed in as {user.display_name or user.name} ({user.name}); the SSH "
            f"connection continues. You can close this window.",
        )

    async def _exchange(self, code: str, verifier: str) -> dict[str, Any]:
        provider = await self._provider()
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": self.redirect_uri}
        if verifier:
            form["code_verifier"] = verifier
        # The client secret goes in a Basic header or in the form, whichever this client
        # is registered for: like Go's oauth2 (AuthStyleAutoDetect, what headscale uses),
        # try the header first and the form if the provider says invalid_client, then
        # remember what worked. A failed client authentication does not spend the code.
        styles = [
            s
            for s in (self.auth_style, "client_secret_basic", "client_secret_post")
            if s and s in provider.token_auth_methods
        ] or ["client_secret_basic"]
        for style in dict.fromkeys(styles):
            answer, body = await self._token_request(provider, dict(form), style)
            if answer.status == 200:
                self.auth_style = style
                return body
            if body.get("error") != "invalid_client":
                break
        err = _text(body.get("error"), 100) or f"HTTP {answer.status}"
        desc = _text(body.get("error_description"), 300)
        raise OIDCError(f"the provider refused the code ({err}{': ' + desc if desc else ''})", 403)

    async def _token_request(
        self, provider: ProviderMetadata, form: dict[str, str], style: str
    ) -> tuple[HttpAnswer, dict[str, Any]]:
        headers: dict[str, str] = {}
        if style == "client_secret_basic":
            # RFC 6749 2.3.1: both parts form-encoded, then joined and base64-encoded.
            cid = quote(self.settings.client_id, safe="")
            secret = quote(self.settings.client_secret, safe="")
            headers["Authorization"] = (
                "Basic " + base64.b64encode(f"{cid}:{secret}".encode()).decode()
            )
        else:
            form["client_id"] = self.settings.client_id
            form["client_secret"] = self.settings.client_secret
        try:
            answer = await request("POST", provider.token_endpoint, headers=headers, form=form)
            return answer, answer.json(provider.token_endpoint)
        except HttpClientError as e:
            raise OIDCError(f"exchanging the code for tokens: {e}") from None

    async def _verify_id_token(
        self, tokens: dict[str, Any], nonce: str
    ) -> tuple[Claims, datetime | None]:
        raw = tokens.get("id_token")
        if not isinstance(raw, str) or not raw:
            raise OIDCError("the provider sent no ID token (is openid in oidc.scope?)", 502)
        provider = await self._provider()
        keys = await self._key_set()
        try:
            try:
                token = jwt.decode(raw, keys, algorithms=list(provider.id_token_algs))
            except MissingKeyError:  # the provider rotated its keys: fetch them once more
                keys = await self._key_set(refresh=True)
                token = jwt.decode(raw, keys, algorithms=list(provider.id_token_algs))
            jwt.JWTClaimsRegistry(
                leeway=CLOCK_LEEWAY,
                iss={"essential": True, "value": self.settings.issuer},
                sub={"essential": True},
                aud={"essential": True, "value": self.settings.client_id},
                exp={"essential": True},
                iat={"essential": True},
                nonce={"essential": True, "value": nonce},
            ).validate(token.claims)
        except JoseError as e:
            raise OIDCError(f"the ID token is not valid: {e.error}: {e.description}", 403) from None
        aud = token.claims.get("aud")
        azp = token.claims.get("azp")
        if isinstance(aud, list) and len(aud) > 1 and azp != self.settings.client_id:
            # OpenID Connect Core 3.1.3.7: with several audiences, azp must name us.
            raise OIDCError("the ID token was issued to another party (azp)", 403)
        claims = Claims.from_json(token.claims)
        if not claims.sub:
            raise OIDCError("the ID token has no subject (sub)", 403)
        exp = token.claims.get("exp")
        expiry = datetime.fromtimestamp(int(exp), UTC) if isinstance(exp, int | float) else None
        return claims, expiry

    async def _with_userinfo(self, claims: Claims, tokens: dict[str, Any]) -> Claims:
        provider = await self._provider()
        access = tokens.get("access_token")
        if not provider.userinfo_endpoint or not isinstance(access, str) or not access:
            return claims
        try:
            answer = await request(
                "GET", provider.userinfo_endpoint, headers={"Authorization": f"Bearer {access}"}
            )
            info = answer.json(provider.userinfo_endpoint) if answer.status == 200 else None
        except HttpClientError as e:
            self.log.info("OIDC userinfo failed (using the ID token's claims only): %s", e)
            return claims
        if info is None:
            self.log.info("OIDC userinfo: HTTP %d; using the ID token's claims", answer.status)
            return claims
        if info.get("sub") != claims.sub:
            # OpenID Connect Core 5.3.2: a userinfo answer about someone else is ignored.
            self.log.warning("OIDC userinfo is about another subject; ignored")
            return claims
        return claims.merged_with_userinfo(info)
