"""The admin REST API: headscale's `/api/v1` routes and JSON shapes, as an ASGI app.

Served by hypercorn on the unix socket (no auth: file permissions guard it) and
through the main listener, where every call needs `Authorization: Bearer <API key>`.
Store work runs in a worker thread (one at a time: the store has one writer).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar
from urllib.parse import parse_qs, quote, unquote

from protocol import safejson

from .admin import Admin
from .boundary import Boundary
from .errors import HomescaleError, InvalidInput, StoreError
from .fields import Body, parse_flag, parse_id, parse_time
from .secrets import parse_auth_id
from .storethread import RunDb

R = TypeVar("R")
_NODE = r"/api/v1/node/([^/]+)"  # a node's routes; the ID is checked by its handler


def _need_ref(body: Body, *names: str) -> str | int:
    ref = body.ref(*names)
    if ref is None:
        raise InvalidInput(f"request body needs {' or '.join(repr(n) for n in names)}")
    return ref


def _opt_id(value: Any, field: str) -> int:
    """An optional uint64 field as headscale's (absent, null or "": 0); anything but an ID
    is a 400 naming the field."""
    return 0 if value is None or value == "" else parse_id(value, field)


def _pak_ref(body: Body) -> str | int:
    """A pre-auth key by `id` (numeric, as headscale's) or by homescale's `key` prefix."""
    if body.has("id"):
        return parse_id(body.obj["id"], "id")
    return _need_ref(body, "key")


@dataclass
class ApiRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes

    def arg(self, name: str) -> str:
        v = self.query.get(name)
        return v[0] if v else ""

    def json(self, *, max_bytes: int = safejson.DEFAULT_MAX_BYTES) -> Body:
        """The body as a JSON object whose fields are read with their types (appliance.fields)."""
        return Body(self.body, max_bytes=max_bytes)


class InteractiveLogins(Protocol):
    """Pending interactive logins live in the running server (appliance.control)."""

    async def complete_registration(self, user: str, reg_id: str) -> dict[str, Any]: ...
    def reject_registration(self, reg_id: str) -> None: ...
    def approve_auth(self, auth_id: str) -> None: ...
    def pending_auth(self) -> list[dict[str, Any]]: ...
    def add_debug_registration(self, auth_id: str, hostinfo: dict[str, Any]) -> tuple[str, str]:
        """A pending login under `auth_id` for a made-up machine; its (machine, node) keys."""
        ...


class ApiError(HomescaleError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# A policy is the largest body (the HTTP front caps every body at 4 MiB too).
MAX_POLICY_BODY = 4 << 20


class AdminApi:
    """Routes `/api/v1/...` to admin operations; an ASGI app (`__call__`)."""

    def __init__(
        self,
        admin: Admin,
        run_db: RunDb,
        *,
        require_auth: bool,
        policy_check: Callable[[str], None],
        policy_mode: str,
        logins: InteractiveLogins | None = None,
        boundary: Boundary | None = None,
    ) -> None:
        self.admin = admin
        self.boundary = boundary or Boundary(logging.getLogger("homescale.api"))
        self.run_db = run_db
        self.require_auth = require_auth
        self.policy_check = policy_check
        self.policy_mode = policy_mode
        self.logins = logins
        a = admin
        # (method, pattern, handler) -- handlers take (request, *path groups).
        self.routes: list[tuple[str, re.Pattern[str], Callable[..., Awaitable[Any]]]] = []
        r = self._route
        r("GET", r"/api/v1/health", self.health)
        r("GET", r"/api/v1/user", self.list_users)
        r("POST", r"/api/v1/user", self.create_user)
        # User IDs in paths are numeric, as headscale's: a name there is a 400 naming it.
        r(
            "POST",
            r"/api/v1/user/([^/]+)/rename/([^/]+)",
            lambda q, uid, new: self.db(
                lambda: {"user": a.rename_user(parse_id(uid, "user ID"), new)}
            ),
        )
        r(
            "DELETE",
            r"/api/v1/user/([^/]+)",
            lambda q, uid: self.done(lambda: a.delete_user(parse_id(uid, "user ID"))),
        )
        r(
            "GET",
            r"/api/v1/preauthkey",
            lambda q: self.db(lambda: {"preAuthKeys": a.list_pre_auth_keys(q.arg("user") or None)}),
        )
        r("POST", r"/api/v1/preauthkey", self.create_pre_auth_key)
        r(
            "POST",
            r"/api/v1/preauthkey/expire",
            lambda q: self.done(lambda: a.expire_pre_auth_key(_pak_ref(q.json()))),
        )
        r("DELETE", r"/api/v1/preauthkey", self.delete_pre_auth_key)
        r("GET", r"/api/v1/apikey", lambda q: self.db(lambda: {"apiKeys": a.list_api_keys()}))
        r(
            "POST",
            r"/api/v1/apikey",
            lambda q: self.db(lambda: {"apiKey": a.create_api_key(q.json().time("expiration"))}),
        )
        r("POST", r"/api/v1/apikey/expire", self.expire_api_key)
        # The prefix may be empty when the key is named by `?id=N`.
        r(
            "DELETE",
            r"/api/v1/apikey/([^/]*)",
            lambda q, prefix: self.done(
                lambda: a.delete_api_key(prefix, _opt_id(q.arg("id"), "id"))
            ),
        )
        r(
            "GET",
            r"/api/v1/node",
            lambda q: self.db(lambda: {"nodes": a.list_nodes(q.arg("user") or None)}),
        )
        r(
            "POST",
            r"/api/v1/node/register",
            lambda q: self.register(q.arg("user"), parse_auth_id(q.arg("key"), "key")),
        )
        r(
            "POST",
            r"/api/v1/auth/register",
            lambda q: self.register(
                q.json().string("user"), parse_auth_id(q.json().string("authId"))
            ),
        )
        r("POST", r"/api/v1/node/backfillips", self.backfill_ips)
        r("POST", r"/api/v1/debug/node", self.debug_create_node)
        r("POST", r"/api/v1/auth/reject", self.reject)
        r("POST", r"/api/v1/auth/approve", self.approve)
        r("GET", r"/api/v1/auth", self.pending)
        # Node IDs are checked by the handler (appliance.fields.parse_id): a malformed one
        # is a 400 that says so, as headscale answers, not a 404 for an unknown route.
        r("GET", _NODE, lambda q, nid: self.db(lambda: {"node": a.get_node(nid)}))
        r("DELETE", _NODE, lambda q, nid: self.done(lambda: a.delete_node(nid)))
        r("POST", _NODE + "/expire", self.expire_node)
        r("POST", _NODE + "/approve", lambda q, nid: self.db(lambda: {"node": a.approve_node(nid)}))
        r("POST", _NODE + "/reject", lambda q, nid: self.done(lambda: a.reject_node(nid)))
        r(
            "POST",
            _NODE + "/rename/([^/]+)",
            lambda q, nid, new: self.db(lambda: {"node": a.rename_node(nid, new)}),
        )
        r(
            "POST",
            _NODE + "/tags",
            lambda q, nid: self.db(lambda: {"node": a.tag_node(nid, q.json().strings("tags"))}),
        )
        r("POST", _NODE + "/approve_routes", self.approve_routes)
        r("GET", r"/api/v1/policy", lambda q: self.db(a.get_policy))
        r("PUT", r"/api/v1/policy", self.set_policy)
        r("POST", r"/api/v1/policy/check", self.check_policy)

    def _route(self, method: str, pattern: str, handler: Callable[..., Awaitable[Any]]) -> None:
        self.routes.append((method, re.compile(pattern + "$"), handler))

    async def db(self, fn: Callable[[], R]) -> R:
        return await self.run_db(fn)

    async def done(self, fn: Callable[[], None]) -> dict[str, Any]:
        """Run an operation that returns nothing; the API answers `{}` as headscale's does."""
        await self.run_db(fn)
        return {}

    # -- handlers that need more than one line

    async def health(self, q: ApiRequest) -> dict[str, Any]:
        try:
            ok = await self.run_db(self.admin.store.ping)
        except Exception:
            ok = False
        if not ok:
            raise ApiError(503, "database unreachable")
        return {"databaseConnectivity": True}

    async def create_user(self, q: ApiRequest) -> dict[str, Any]:
        b = q.json()
        name, display, email, picture = (
            b.string("name"),
            b.string("displayName"),
            b.string("email"),
            b.string("pictureUrl"),
        )
        return await self.db(
            lambda: {"user": self.admin.create_user(name, display, email, picture)}
        )

    async def approve_routes(self, q: ApiRequest, nid: str) -> dict[str, Any]:
        routes = q.json().strings("routes")
        await self.db(lambda: self.admin.approve_routes(nid, routes))
        # Read back once the tailnet has the change: it decides what the node serves.
        return await self.db(lambda: {"node": self.admin.get_node(nid)})

    async def list_users(self, q: ApiRequest) -> dict[str, Any]:
        uid = _opt_id(q.arg("id"), "id")  # headscale: a non-numeric id is a 400
        name, email = q.arg("name"), q.arg("email")
        return await self.db(
            lambda: {"users": self.admin.list_users(name=name, id=str(uid or ""), email=email)}
        )

    async def delete_pre_auth_key(self, q: ApiRequest) -> dict[str, Any]:
        # headscale names the key by ?id=N (numeric); homescale also by ?key=<prefix>.
        by_key = q.arg("key") and not q.arg("id")
        ref = q.arg("key") if by_key else parse_id(q.arg("id"), "id")
        return await self.done(lambda: self.admin.delete_pre_auth_key(ref))

    async def expire_api_key(self, q: ApiRequest) -> dict[str, Any]:
        b = q.json()
        id, prefix = _opt_id(b.obj.get("id"), "id"), b.string("prefix")
        return await self.done(lambda: self.admin.expire_api_key(prefix, id))

    async def backfill_ips(self, q: ApiRequest) -> dict[str, Any]:
        if not parse_flag(q.arg("confirmed"), "confirmed"):
            raise InvalidInput(
                "confirmed: backfilling changes node addresses; send ?confirmed=true"
            )
        return {"changes": await self.db(self.admin.backfill_ips)}

    async def debug_create_node(self, q: ApiRequest) -> dict[str, Any]:
        """headscale's DebugCreateNode: a made-up machine waits in an interactive login under
        `key` (finish it with `auth register`); the answer echoes the node it would be."""
        b = q.json()
        user_name, name, routes = b.string("user"), b.string("name"), b.strings("routes")
        owner = await self.db(lambda: self.admin.resolve_user_name(user_name))
        clean = [self.admin.parse_route(r, "routes") for r in routes]
        auth_id = parse_auth_id(b.string("key"), "key")
        hostinfo = {"Hostname": name, "OS": "TestOS", "RoutableIPs": clean}
        machine, node_key = self._logins().add_debug_registration(auth_id, hostinfo)
        return {"node": self.admin.echo_node_json(owner, machine, node_key, hostinfo)}

    async def create_pre_auth_key(self, q: ApiRequest) -> dict[str, Any]:
        b = q.json()
        # headscale: `user` is a numeric ID (a name is a 400); 0 or absent: no user.
        user = _opt_id(b.obj.get("user"), "user") or None
        reusable, ephemeral = b.boolean("reusable"), b.boolean("ephemeral")
        expiration, tags = b.time("expiration"), b.strings("aclTags")
        return await self.db(
            lambda: {
                "preAuthKey": self.admin.create_pre_auth_key(
                    user=user,
                    reusable=reusable,
                    ephemeral=ephemeral,
                    expiration=expiration,
                    tags=tags,
                )
            }
        )

    async def expire_node(self, q: ApiRequest, nid: str) -> dict[str, Any]:
        b = q.json()
        expiry = b.time("expiry") if b.has("expiry") else parse_time(q.arg("expiry"), "expiry")
        disable = b.boolean("disableExpiry") or parse_flag(q.arg("disableExpiry"), "disableExpiry")
        if disable and expiry is not None:
            raise InvalidInput("cannot set both disableExpiry and expiry")  # as headscale
        return await self.db(lambda: {"node": self.admin.expire_node(nid, expiry, disable)})

    def _logins(self) -> InteractiveLogins:
        if self.logins is None:
            raise ApiError(503, "interactive logins wait in the running server; start it first")
        return self.logins

    async def register(self, user: str, auth_id: str) -> dict[str, Any]:
        return {"node": await self._logins().complete_registration(user, auth_id)}

    async def pending(self, q: ApiRequest) -> dict[str, Any]:
        return {"pending": self._logins().pending_auth()}

    async def approve(self, q: ApiRequest) -> dict[str, Any]:
        self._logins().approve_auth(parse_auth_id(q.json().string("authId")))
        return {}

    async def reject(self, q: ApiRequest) -> dict[str, Any]:
        self._logins().reject_registration(parse_auth_id(q.json().string("authId")))
        return {}

    async def set_policy(self, q: ApiRequest) -> dict[str, Any]:
        if self.policy_mode != "database":
            raise ApiError(
                400,
                "the policy can only be set in policy.mode: database "
                "(in file mode, edit the file at policy.path)",
            )
        text = q.json(max_bytes=MAX_POLICY_BODY).string("policy")
        return await self.db(lambda: self.admin.set_policy(text, self.policy_check))

    async def check_policy(self, q: ApiRequest) -> dict[str, Any]:
        text = q.json(max_bytes=MAX_POLICY_BODY).string("policy")
        await self.run_db(self.policy_check, text)
        return {}

    # -- ASGI

    def _authorized(self, headers: dict[str, str]) -> Callable[[], bool] | None:
        auth = headers.get("authorization", "")
        if not auth.lower().startswith("bearer "):
            return None
        token = auth[7:].strip()
        return lambda: self.admin.check_api_key(token)

    async def handle(self, q: ApiRequest) -> tuple[int, Any]:
        if self.require_auth:
            check = self._authorized(q.headers)
            if check is None or not await self.run_db(check):
                return 401, {
                    "title": "Unauthorized",
                    "status": 401,
                    "detail": "missing or invalid API key (Authorization: Bearer <key>)",
                }
        allowed = []
        for method, pattern, handler in self.routes:
            m = pattern.match(q.path)
            if not m:
                continue
            if method != q.method:
                allowed.append(method)
                continue
            try:
                return 200, await handler(q, *(unquote(g) for g in m.groups()))
            except ApiError as e:
                return e.status, _problem(e.status, str(e))
            except StoreError as e:
                return e.status, _problem(e.status, str(e))
            except HomescaleError as e:
                return 400, _problem(400, str(e))
            except Exception as e:  # a bug: this request fails, nothing else does
                self.boundary.record("api", f"{q.method} {q.path}", e)
                return 500, _problem(500, "internal error (logged on the server)")
        if allowed:
            return 405, _problem(405, f"method {q.method} not allowed; use {', '.join(allowed)}")
        return 404, _problem(404, f"no API route {q.path}")

    async def __call__(
        self,
        scope: dict[str, Any],
        receive: Callable[..., Awaitable[Any]],
        send: Callable[..., Awaitable[Any]],
    ) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        body = bytearray()
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if len(body) > MAX_POLICY_BODY:  # hypercorn (the unix socket) sets no limit itself
                await _send_json(send, 413, _problem(413, "request body too large"))
                return
            if not msg.get("more_body"):
                break
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        # Route on the path as sent: `path` is already percent-decoded, so a name holding
        # "%2F" would split into two segments (and "%41" would arrive as "A"); the handlers
        # unquote each matched segment once.
        raw_path = scope.get("raw_path")
        path = raw_path.decode("latin-1") if raw_path else quote(scope["path"])
        q = ApiRequest(
            scope["method"],
            path,
            parse_qs(scope["query_string"].decode("latin-1")),
            headers,
            bytes(body),
        )
        status, obj = await self.handle(q)
        await _send_json(send, status, obj)


async def _send_json(send: Callable[..., Awaitable[Any]], status: int, obj: Any) -> None:
    data = json.dumps(obj).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(data))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def _problem(status: int, detail: str) -> dict[str, Any]:
    from http import HTTPStatus

    return {"title": HTTPStatus(status).phrase, "status": status, "detail": detail}
