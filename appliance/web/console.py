"""The web console at `server_url/admin`: pages, sign-in, and the admin API for a session.

Every route is relative to `/admin/`, so the console works behind a reverse proxy
that keeps the path. The page is static (appliance/web/assets); it reads and changes
the tailnet through `/admin/api/v1/...`, which is the admin REST API (the same
routes and JSON as `/api/v1`) behind a session cookie, a CSRF token on every change,
the permission check of appliance.web.permissions, and the audit log.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from ..api import AdminApi, ApiRequest
from ..changes import Change
from ..config import Config
from ..errors import HomescaleError
from ..httpserver import Request, Response, RouteHandler, Upgrade, UpgradeHandler
from ..policies import PolicyInvalid
from ..secrets import display_prefix, split_key
from ..store import UserRow
from .audit import AuditLog
from .health import HealthSources, report
from .permissions import decide
from .preview import reachability
from .sessions import (
    ADMIN,
    COOKIE,
    USER,
    RateLimit,
    Session,
    Sessions,
    cookie_value,
    set_cookie,
)
from .sse import Broker

if TYPE_CHECKING:
    from ..oidc import Claims

PREFIX = "/admin"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = [
    ("Content-Security-Policy", CSP),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),  # a sign-in link never leaks through Referer
    ("X-Frame-Options", "DENY"),
    ("Cache-Control", "no-store"),
]
ASSET_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}
MUTATING = {"POST", "PUT", "PATCH", "DELETE"}


def asset(name: str) -> bytes | None:
    """A file of appliance/web/assets (package data, so the frozen binary has it too)."""
    if name not in _asset_names():
        return None
    return resources.files(__package__).joinpath("assets", name).read_bytes()


def _asset_names() -> set[str]:
    folder = resources.files(__package__).joinpath("assets")
    return {p.name for p in folder.iterdir() if p.is_file()}


def page(title: str, message: str, status: int) -> Response:
    """A small self-contained page (sign-in refusals); no script."""
    import html

    body = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<link rel="stylesheet" href="assets/console.css"><title>{html.escape(title)}</title>'
        f'</head><body><main class="narrow"><h1>{html.escape(title)}</h1>'
        f"<p>{html.escape(message)}</p></main></body></html>"
    )
    return _secure(Response.text(body, status, "text/html; charset=utf-8"))


def _secure(r: Response) -> Response:
    names = {k.lower() for k, _ in r.headers}
    r.headers += [(k, v) for k, v in SECURITY_HEADERS if k.lower() not in names]
    return r


def _json(obj: Any, status: int = 200) -> Response:
    return _secure(Response.json(obj, status))


def _problem(status: int, detail: str) -> Response:
    from http import HTTPStatus

    return _json({"title": HTTPStatus(status).phrase, "status": status, "detail": detail}, status)


class Console:
    """The console's routes; `install` adds them to the main listener."""

    def __init__(self, config: Config, api: AdminApi, log: logging.Logger) -> None:
        self.config = config
        self.api = api  # the admin API without its own auth: this class authorises
        self.log = log
        self.server_url = config.server_url.rstrip("/")
        self.secure = self.server_url.startswith("https://")
        self.sessions = Sessions()
        self.signin_limit = RateLimit()
        audit_path = Path(config.database_path).with_name("audit.jsonl")
        self.audit = AuditLog(audit_path, log.getChild("audit"))
        self.events = Broker(log.getChild("events"))
        self.oidc_start: RouteHandler | None = None  # set when OIDC sign-in is configured
        self.health: HealthSources | None = None  # set by `serve`: the health view's sources

    # -- wiring

    def install(self, routes: dict[str, RouteHandler], upgrades: dict[str, UpgradeHandler]) -> None:
        routes[PREFIX] = self.redirect_root
        routes[PREFIX + "/"] = self.handle
        upgrades[PREFIX + "/events"] = self.event_stream

    def add_cli_routes(self, api: AdminApi) -> None:
        """`homescale web login-url`: POST /api/v1/web/loginurl (admin socket, or API key)."""
        api.routes.append(("POST", re.compile(r"/api/v1/web/loginurl$"), self.login_url_route))

    def changed(self, change: Change) -> None:
        """An observer of `Tailnet.apply`: every committed change reaches open pages."""
        self.events.publish(change)

    # -- sign-in

    def login_url(self) -> tuple[str, datetime]:
        token, expires = self.sessions.new_link()
        self.audit.record("cli", "issue sign-in link", outcome="ok")
        return (
            f"{self.server_url}{PREFIX}/login?token={quote(token)}",
            datetime.fromtimestamp(expires, UTC),
        )

    async def login_url_route(self, q: ApiRequest) -> dict[str, Any]:
        url, expires = self.login_url()
        return {"url": url, "expiration": expires.isoformat().replace("+00:00", "Z")}

    def open_session(self, who: str, role: str, user_id: int | None = None) -> Response:
        """Signed in: the session cookie, and on to the console (no secret in the URL)."""
        cookie, s = self.sessions.open(who, role, user_id)
        self.audit.record(s.who, "sign in", f"session {s.id} ({role})")
        return self._signed_in(cookie)

    def client_ip(self, req: Request) -> str:
        """The sign-in's address: the peer's, or behind a trusted_proxies proxy the last
        address it added to X-Forwarded-For."""
        ip = req.peer.rpartition(":")[0].strip("[]") or req.peer
        forwarded = req.headers.get("x-forwarded-for", "").rpartition(",")[2].strip()
        if forwarded and self.config.trusted_proxies:
            try:
                peer = ipaddress.ip_address(ip)
            except ValueError:
                return ip
            if any(peer in net for net in self.config.trusted_proxies):
                return forwarded[:64]
        return ip

    async def login(self, req: Request) -> Response:
        ip = self.client_ip(req)
        if not self.signin_limit.allow(ip):
            self.audit.record(f"anonymous from {ip}", "sign in", outcome="refused: rate limit")
            return page("Too many attempts", "Too many sign-in attempts; wait a minute.", 429)
        token = req.arg("token")
        if not token or len(token) > 200:
            return page("Sign in", self.signin_hint(), 401)
        opened = self.sessions.use_link(token)
        if opened is None:
            self.audit.record(f"anonymous from {ip}", "sign in", outcome="refused: bad link")
            return page(
                "Link expired or used",
                "This sign-in link is unknown, was used already or has expired (links "
                "last 10 minutes and open one session). " + self.signin_hint(),
                401,
            )
        cookie, s = opened
        self.audit.record(s.who, "sign in", f"session {s.id} (one-time link)")
        return self._signed_in(cookie)

    def _signed_in(self, cookie: str) -> Response:
        """The session cookie, and on to the console (no secret left in the URL)."""
        return _secure(
            Response(
                303,
                b"",
                [
                    ("Location", f"{self.server_url}{PREFIX}/"),
                    ("Set-Cookie", set_cookie(cookie, secure=self.secure)),
                ],
            )
        )

    def oidc_signed_in(self, user: UserRow, claims: Claims) -> Response:
        """The provider vouched for `user`: an admin if named in web.admins (by email) or a
        member of a web.admin_groups group, else a user who manages their own devices."""
        email = claims.email.lower()
        admin = (bool(email) and claims.email_verified and email in self.config.web_admins) or (
            bool(set(claims.groups) & set(self.config.web_admin_groups))
        )
        who = f"{user.name} ({claims.email or claims.identifier})"
        if admin:
            return self.open_session(who, ADMIN)
        return self.open_session(who, USER, user.id)

    def signin_hint(self) -> str:
        how = "Run `homescale web login-url` on the server and open the link it prints"
        if self.oidc_start is not None:
            how += ", or sign in with your identity provider"
        return how + "."

    async def logout(self, req: Request, s: Session, cookie: str) -> Response:
        self.sessions.close(cookie)
        self.events.recheck()  # its open event streams end now, before anything else is sent
        self.audit.record(s.who, "sign out", f"session {s.id}")
        return _secure(
            Response(204, b"", [("Set-Cookie", set_cookie("", secure=self.secure, max_age=0))])
        )

    # -- routes

    async def redirect_root(self, req: Request) -> Response:
        return _secure(Response(308, b"", [("Location", "admin/")]))

    def session_of(self, cookie: str) -> Session | None:
        return self.sessions.get(cookie)

    async def event_stream(self, up: Upgrade) -> None:
        await self.events.serve(up, self.session_of)

    async def handle(self, req: Request) -> Response:
        sub = req.path[len(PREFIX) :]
        if sub.startswith("/assets/"):
            return self.serve_asset(sub[len("/assets/") :])
        if sub == "/login":
            return await self.login(req)
        if sub == "/signin" and self.oidc_start is not None:
            if not self.signin_limit.allow(self.client_ip(req)):
                return page("Too many attempts", "Too many sign-in attempts; wait a minute.", 429)
            return await self.oidc_start(req)
        if sub == "/":
            return self.serve_asset("index.html")
        cookie = cookie_value(req.headers.get("cookie", ""), COOKIE)
        session = self.sessions.get(cookie)
        bearer = await self._bearer(req)
        if session is None and bearer is None:
            return _problem(401, "sign in first: " + self.signin_hint())
        if session is not None and req.method in MUTATING and bearer is None:
            sent = req.headers.get("x-csrf-token", "")
            if not session.csrf_ok(sent):
                self.audit.record(session.who, f"{req.method} {sub}", outcome="refused: CSRF")
                return _problem(403, "missing or wrong CSRF token (X-CSRF-Token)")
        who = bearer if bearer is not None else session
        assert who is not None
        if sub == "/session" and req.method == "GET":
            return _json(self.session_json(who))
        if sub == "/logout" and req.method == "POST" and session is not None:
            return await self.logout(req, session, cookie)
        if sub == "/audit" and req.method == "GET":
            if who.role != ADMIN:
                return _problem(403, "only admins may read the audit log")
            return _json({"entries": self.audit.entries()})
        if sub == "/health" and req.method == "GET" and self.health is not None:
            if who.role != ADMIN:
                return _problem(403, "only admins may read the server's health")
            status, _ = await self.api.handle(ApiRequest("GET", "/api/v1/health", {}, {}, b""))
            return _json({**report(self.health), "database": status == 200})
        if sub == "/policy/preview" and req.method == "POST":
            if who.role != ADMIN:
                return _problem(403, "only admins may preview policies")
            return await self.preview(req.body)
        if sub == "/qr" and req.method == "POST":
            return qr_code(req.body)
        if sub == "/overview" and req.method == "GET":
            return _json(await self.overview(who))
        if sub.startswith("/api/v1/"):
            return await self.call_api(req, who, sub)
        return _problem(404, f"no console route {sub}")

    def serve_asset(self, name: str) -> Response:
        data = asset(name)
        if data is None:
            return _problem(404, f"no asset {name}")
        ctype = ASSET_TYPES.get(Path(name).suffix, "application/octet-stream")
        return _secure(Response(200, data, [("Content-Type", ctype)]))

    async def _bearer(self, req: Request) -> Session | None:
        """Scripted access: an API key in `Authorization: Bearer` acts as an admin."""
        auth = req.headers.get("authorization", "")
        if not auth.lower().startswith("bearer "):
            return None
        token = auth[7:].strip()
        ok = await self.api.run_db(lambda: self.api.admin.check_api_key(token))
        if not ok:
            return None
        prefix, _ = split_key("api", token)  # checked above: well-formed
        return Session(f"API key {display_prefix('api', prefix)}", ADMIN, "", 0.0, 0.0, id="apikey")

    def session_json(self, s: Session) -> dict[str, Any]:
        return {
            "who": s.who,
            "role": s.role,
            "csrf": s.csrf,
            "policyMode": self.config.policy_mode,
            "policyPath": str(self.config.policy_path or ""),
            "serverUrl": self.server_url,
            "baseDomain": self.config.dns.base_domain if self.config.dns.magic_dns else "",
        }

    async def preview(self, body: bytes) -> Response:
        """Who could reach each node under the draft policy in `{"policy": ...}`."""
        try:
            obj = json.loads(body or b"{}")
        except ValueError:
            return _problem(400, "request body is not JSON")
        text = obj.get("policy") if isinstance(obj, dict) else None
        if not isinstance(text, str):
            return _problem(400, "policy: a string (the draft policy's text)")
        store = self.api.admin.store
        try:
            nodes = await self.api.run_db(lambda: reachability(text, store))
        except PolicyInvalid as e:
            return _problem(400, str(e))
        return _json({"nodes": nodes})

    async def overview(self, s: Session) -> dict[str, Any]:
        """Every node (a user's own only) with what the page shows beyond headscale's Node."""
        admin = self.api.admin
        base = self.config.dns.base_domain if self.config.dns.magic_dns else ""

        def read() -> dict[str, Any]:
            nodes = []
            for row in admin.store.nodes():
                if s.role != ADMIN and row.user_id != s.user_id:
                    continue
                j = admin.node_json(row, listed=True)
                hi = row.hostinfo
                j["os"] = str(hi.get("OS") or "")
                j["osVersion"] = str(hi.get("OSVersion") or "")
                j["clientVersion"] = str(hi.get("IPNVersion") or "")
                j["magicDns"] = f"{row.given_name}.{base}" if base else ""
                net = _dict(hi.get("NetInfo"))
                j["derpRegion"] = net.get("PreferredDERP") or 0
                home = [
                    v
                    for k, v in _dict(net.get("DERPLatency")).items()
                    if str(k).split("-")[0] == str(j["derpRegion"]) and isinstance(v, int | float)
                ]
                j["derpLatencyMs"] = round(min(home) * 1000, 1) if home else None
                nodes.append(j)
            users = admin.list_users() if s.role == ADMIN else []
            return {"nodes": nodes, "users": users}

        return await self.api.run_db(read)

    async def call_api(self, req: Request, s: Session, sub: str) -> Response:
        decision = decide(s, req.method, sub)
        action = f"{req.method} {sub[len('/api/v1') :]}"
        if not decision.allowed:
            self.audit.record(s.who, action, outcome=f"refused: {decision.reason}")
            return _problem(403, decision.reason)
        query = dict(req.query)
        body = req.body
        if decision.node_id is not None or decision.own_keys:
            refused = await self._check_own(s, req, decision.node_id, query)
            if isinstance(refused, Response):
                self.audit.record(s.who, action, outcome="refused: not theirs")
                return refused
            body = refused
        raw = req.target.split("?", 1)[0][len(PREFIX) :]
        q = ApiRequest(req.method, raw, query, {}, body)
        status, obj = await self.api.handle(q)
        if req.method in MUTATING and not sub.endswith("/policy/check"):  # a check changes nothing
            outcome = "ok" if status < 400 else f"refused ({status}): {obj.get('detail', '')}"
            self.audit.record(s.who, action, _target(body), outcome)
        return _json(obj, status)

    async def _check_own(
        self, s: Session, req: Request, node_id: int | None, query: dict[str, list[str]]
    ) -> Response | bytes:
        """A user's request on their own things: the body to send on, or the refusal."""
        admin, uid = self.api.admin, s.user_id
        if node_id is not None:
            owner = await self.api.run_db(lambda: _node_owner(admin, node_id))
            if owner is None or owner != uid:
                return _problem(403, "that device is not yours")
            return req.body
        query["user"] = [str(uid)]
        if req.method == "GET":
            return req.body
        try:
            obj = json.loads(req.body or b"{}")
        except ValueError:
            return _problem(400, "request body is not JSON")
        if not isinstance(obj, dict):
            return _problem(400, "request body must be a JSON object")
        if req.path.endswith("/expire"):
            mine = await self.api.run_db(lambda: admin.list_pre_auth_keys(uid))
            if str(obj.get("id", "")) not in {k["id"] for k in mine}:
                return _problem(403, "that key is not yours")
            return req.body
        if obj.get("aclTags"):
            return _problem(403, "only admins may create tagged keys")
        obj["user"] = str(uid)
        return json.dumps(obj).encode()


MAX_QR_TEXT = 512  # a pre-auth key or a URL; QR codes of more are unreadable on a screen


def qr_code(body: bytes) -> Response:
    """`{"text": ...}` as a QR code (an SVG data: URI), made on the server so that the page
    needs no third-party code and the secret never travels in a URL."""
    import segno

    try:
        obj = json.loads(body or b"{}")
    except ValueError:
        return _problem(400, "request body is not JSON")
    text = obj.get("text") if isinstance(obj, dict) else None
    if not isinstance(text, str) or not text or len(text) > MAX_QR_TEXT:
        return _problem(400, f"text: a string of 1 to {MAX_QR_TEXT} characters")
    uri = segno.make(text, error="m").svg_data_uri(scale=5, border=2)
    return _json({"svg": uri})


def _dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _node_owner(admin: Any, node_id: int) -> int | None:
    try:
        row = admin.store.node(node_id)
    except HomescaleError:
        return None
    return None if row.tags else row.user_id


def _target(body: bytes) -> str:
    """A short summary of a change's body for the audit log (no keys or secrets in it)."""
    if not body:
        return ""
    try:
        obj = json.loads(body)
    except ValueError:
        return ""
    if not isinstance(obj, dict):
        return ""
    if "policy" in obj:
        return f"policy ({len(str(obj['policy']))} bytes)"
    return json.dumps({k: v for k, v in obj.items() if k not in ("key", "prefix")})[:300]
