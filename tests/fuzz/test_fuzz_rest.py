"""Fuzz target: the REST API's paths, queries and JSON bodies (appliance/api.py, fields.py).

Each input is one request as text -- ``METHOD PATH?QUERY`` on the first line,
the body after it -- handled by the admin API over a real store (a temporary
SQLite file), as an API client holding a valid key could send it.

Property: every answer is a status below 500 (503 "start the server" for the
interactive-login routes, which need the running server) with a JSON body a Go
client can decode (no NaN), nothing raises, and afterwards every list route
still answers 200: nothing stored can break a later read.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import trio
from hypothesis import strategies as st

from appliance.admin import Admin
from appliance.api import AdminApi, ApiRequest
from appliance.policies import check_policy_text
from appliance.store import Store
from appliance.storethread import run_inline
from tests.fuzz.harness import fuzz_tests
from tests.fuzz.strategies import HOSTILE_INTS, HOSTILE_STRINGS, json_values, mutated

_api: AdminApi | None = None


def api() -> AdminApi:
    """One API over one store for the whole run (state accumulates, as on a real server)."""
    global _api
    if _api is None:
        store = Store(Path(tempfile.mkdtemp(prefix="hs-fuzz-rest-")) / "db.sqlite")
        store.db.execute("PRAGMA synchronous = OFF")  # a throwaway file: no fsync per example
        admin = Admin(store)
        admin.create_user("alice")
        _api = AdminApi(
            admin,
            run_inline,
            require_auth=False,
            policy_check=lambda text: check_policy_text(text, "policy", store),
            policy_mode="database",
        )
    return _api


LISTS = ["/api/v1/user", "/api/v1/preauthkey", "/api/v1/apikey", "/api/v1/node"]


async def call(method: str, target: str, body: bytes) -> tuple[int, Any]:
    parts = urlsplit(target)
    q = ApiRequest(method, parts.path, parse_qs(parts.query), {}, body)
    return await api().handle(q)


def check(data: bytes) -> None:
    first, _, body = data.partition(b"\n")
    method, _, target = first.decode("latin-1").strip().partition(" ")

    async def run() -> None:
        status, obj = await call(method, target or "/", body)
        assert status < 500 or status == 503, (status, obj)
        json.dumps(obj, allow_nan=False)
        for path in LISTS:
            status, obj = await call("GET", path, b"")
            assert status == 200, (path, status, obj)
            json.dumps(obj, allow_nan=False)

    trio.run(run)


ROUTES = [
    ("POST", "/api/v1/user"),
    ("POST", "/api/v1/user/{id}/rename/{name}"),
    ("DELETE", "/api/v1/user/{id}"),
    ("GET", "/api/v1/user?id={id}&name={name}"),
    ("POST", "/api/v1/preauthkey"),
    ("GET", "/api/v1/preauthkey?user={id}"),
    ("POST", "/api/v1/preauthkey/expire"),
    ("DELETE", "/api/v1/preauthkey?id={id}"),
    ("POST", "/api/v1/apikey"),
    ("POST", "/api/v1/apikey/expire"),
    ("DELETE", "/api/v1/apikey/{name}"),
    ("GET", "/api/v1/node/{id}"),
    ("DELETE", "/api/v1/node/{id}"),
    ("POST", "/api/v1/node/{id}/expire?expiry={name}"),
    ("POST", "/api/v1/node/{id}/rename/{name}"),
    ("POST", "/api/v1/node/{id}/tags"),
    ("POST", "/api/v1/node/{id}/approve_routes"),
    ("GET", "/api/v1/node?user={name}"),
    ("POST", "/api/v1/node/register?user={name}&key={name}"),
    ("POST", "/api/v1/auth/register"),
    ("POST", "/api/v1/auth/reject"),
    ("POST", "/api/v1/policy/check"),
    ("PUT", "/api/v1/policy"),
    ("GET", "/api/v1/policy"),
    ("PATCH", "/api/v1/nope"),
]
FIELDS = [
    "name",
    "displayName",
    "email",
    "pictureUrl",
    "user",
    "reusable",
    "ephemeral",
    "expiration",
    "aclTags",
    "id",
    "key",
    "prefix",
    "expiry",
    "disableExpiry",
    "tags",
    "routes",
    "authId",
    "policy",
]
VALUES = st.one_of(
    json_values(max_leaves=6),
    st.sampled_from(HOSTILE_STRINGS),
    st.sampled_from(HOSTILE_INTS),
    st.sampled_from(["alice", "bob", "tag:a", "10.0.0.0/8", "2030-01-01T00:00:00Z", "1", "2"]),
)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    method, template = draw(st.sampled_from(ROUTES))
    ids = st.one_of(st.sampled_from(HOSTILE_INTS).map(str), st.sampled_from(HOSTILE_STRINGS))

    def escaped(text: str) -> str:  # percent-encoded UTF-8, lone surrogates included
        return quote(text.encode("utf-8", "surrogatepass"), safe="")

    target = template.format(
        id=escaped(draw(ids)),
        name=escaped(draw(st.sampled_from([*HOSTILE_STRINGS, "alice", "bob"]))),
    )
    body_obj = draw(st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=4))
    body = json.dumps(body_obj, allow_nan=True).encode()
    return f"{method} {target}\n".encode() + body


test_fuzz, test_corpus = fuzz_tests(
    "rest",
    st.one_of(requests(), mutated(requests())),
    check,
    expected=(),
)
