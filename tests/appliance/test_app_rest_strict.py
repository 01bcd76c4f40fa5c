"""Issue 9 item 2 (REST): fields are strictly typed, IDs and times checked, nothing coerced.

Every hostile body or path gets a 4xx naming the field, nothing is stored, and
every stored time reads back (list calls never 500 afterwards).
"""

from __future__ import annotations

from typing import Any

import pytest

from appliance.errors import InvalidInput
from appliance.fields import Body, parse_id, parse_time
from appliance.serve import Server
from appliance.store import from_iso, to_iso

from .conftest import Site
from .test_app_api import api_key, request  # noqa: F401 (api_key is a fixture)

NODE = {
    "machine_key": "mkey:" + "1" * 64,
    "node_key": "nodekey:" + "1" * 64,
    "disco_key": "discokey:" + "1" * 64,
    "given_name": "node1",
    "hostname": "node1",
    "ipv4": "100.64.0.1",
    "ipv6": "fd7a:115c:a1e0::1",
}


async def rows(server: Server) -> tuple[Any, ...]:
    def read() -> tuple[Any, ...]:
        s = server.store
        keys = [(k.id, k.prefix, k.expiration) for k in s.api_keys()]  # not last_seen: it moves
        return (s.users(), s.pre_auth_keys(), keys, s.nodes())

    return await server.run_db(read)


@pytest.fixture
async def node_id(server: Server) -> int:
    def make() -> int:
        u = server.store.create_user("alice")
        return server.store.create_node(user_id=u.id, **NODE).id

    return await server.run_db(make)


BAD_BODIES = [
    ("POST", "/api/v1/user", {"name": None}, "too short"),
    ("POST", "/api/v1/user", {"name": {"a": 1}}, "name: expected a string, got an object"),
    ("POST", "/api/v1/user", {"name": ["bob"]}, "name: expected a string, got a list"),
    ("POST", "/api/v1/user", {"name": 5}, "name: expected a string, got a number"),
    ("POST", "/api/v1/user", {"name": "bob", "email": False}, "email: expected a string"),
    ("POST", "/api/v1/preauthkey", {"user": "1", "reusable": "false"}, "reusable: expected"),
    ("POST", "/api/v1/preauthkey", {"user": "1", "ephemeral": "no"}, "ephemeral: expected"),
    ("POST", "/api/v1/preauthkey", {"user": "1", "reusable": 1}, "reusable: expected"),
    ("POST", "/api/v1/preauthkey", {"user": ["alice"]}, "user: expected a numeric ID"),
    ("POST", "/api/v1/preauthkey", {"user": "alice"}, "user: expected a numeric ID"),
    ("POST", "/api/v1/preauthkey", {"user": 2**63}, "out of range"),
    ("POST", "/api/v1/preauthkey", {"user": "1", "aclTags": 5}, "aclTags: expected a list"),
    ("POST", "/api/v1/preauthkey", {"user": "1", "aclTags": [None]}, "aclTags[0]"),
    (
        "POST",
        "/api/v1/preauthkey",
        {"user": "1", "expiration": "2030-01-01T00:00:00"},
        "with a timezone",
    ),
    ("POST", "/api/v1/preauthkey", {"user": "1", "expiration": 5}, "expiration: expected"),
    (
        "POST",
        "/api/v1/preauthkey",
        {"user": "1", "expiration": "0001-01-01T00:00:00Z"},
        "in the past",
    ),
    ("POST", "/api/v1/apikey", {"expiration": "2030-01-01"}, "with a timezone"),
    ("POST", "/api/v1/apikey", {"expiration": "20300101T000000Z"}, "with a timezone"),
    ("POST", "/api/v1/apikey", {"expiration": "0001-01-01T00:00:00+01:00"}, "expiration: "),
    ("POST", "/api/v1/apikey", {"expiration": "9999-12-31T23:59:59-01:00"}, "expiration: "),
    ("POST", "/api/v1/apikey/expire", {"prefix": {"x": 1}}, "prefix: expected a string"),
    ("POST", "/api/v1/preauthkey/expire", {"id": [1]}, "id: expected a numeric ID"),
    ("POST", "/api/v1/preauthkey/expire", {"id": "99999999999999999999"}, "out of range"),
    ("POST", "/api/v1/node/{nid}/tags", {"tags": 5}, "tags: expected a list"),
    ("POST", "/api/v1/node/{nid}/tags", {"tags": [None]}, "tags[0]: expected a string"),
    ("POST", "/api/v1/node/{nid}/tags", {"tags": "tag:a"}, "tags: expected a list"),
    ("POST", "/api/v1/node/{nid}/approve_routes", {"routes": 5}, "routes: expected a list"),
    ("POST", "/api/v1/node/{nid}/approve_routes", {"routes": [{}]}, "routes[0]"),
    ("POST", "/api/v1/node/{nid}/expire", {"expiry": "yesterday"}, "expiry: expected"),
    ("POST", "/api/v1/node/{nid}/expire", {"disableExpiry": "true"}, "disableExpiry"),
    (
        "POST",
        "/api/v1/node/{nid}/expire",
        {"disableExpiry": True, "expiry": "2030-01-01T00:00:00Z"},
        "cannot set both",
    ),
    ("POST", "/api/v1/policy/check", {"policy": {"acls": []}}, "policy: expected a string"),
    ("POST", "/api/v1/auth/reject", {"authId": 5}, "authId: expected a string"),
]


async def test_wrong_types_are_400_naming_the_field_and_store_nothing(
    site: Site,
    server: Server,
    api_key: str,  # noqa: F811
    node_id: int,
) -> None:
    before = await rows(server)
    for method, path, body, says in BAD_BODIES:
        r = await request(site, method, path.format(nid=node_id), api_key, json=body)
        assert r.status_code == 400, (path, body, r.status_code, r.text)
        assert says in r.json()["detail"], (path, body, r.json())
    # NaN and Infinity are not JSON (Go refuses them); neither is invalid UTF-8 or deep nesting.
    for raw, says in [
        (b'{"name": NaN}', "NaN"),
        (b'{"name": Infinity}', "Infinity"),
        (b'{"name": "\xff\xfe"}', "UTF-8"),
        (b'{"name": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nest"),
        (b'{"name": ' + b"9" * 5000 + b"}", "number"),
        (b'{"name": "\\ud800"}', "surrogate"),
    ]:
        r = await request(site, "POST", "/api/v1/user", api_key, content=raw)
        assert r.status_code == 400, (raw[:40], r.text)
        assert "not valid JSON" in r.json()["detail"]
        assert says.lower() in r.json()["detail"].lower(), r.json()
    assert await rows(server) == before
    assert (await request(site, "GET", "/api/v1/user", api_key)).status_code == 200


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/v1/node/9223372036854775808"),
        ("GET", "/api/v1/node/" + "9" * 5000),
        ("GET", "/api/v1/node/%C2%B2"),  # "²": str.isdigit() says yes, int() says no
        ("GET", "/api/v1/node/%D9%A3"),  # Arabic-Indic three: \d matches it, it is no ID
        ("GET", "/api/v1/node/abc"),
        ("GET", "/api/v1/node/-1"),
        ("DELETE", "/api/v1/node/18446744073709551616"),
        ("POST", "/api/v1/node/9223372036854775808/expire"),
        ("POST", "/api/v1/node/9223372036854775808/rename/x"),
        ("POST", "/api/v1/node/9223372036854775808/tags"),
        ("POST", "/api/v1/node/9223372036854775808/approve_routes"),
        ("DELETE", "/api/v1/user/9223372036854775808"),
        ("POST", "/api/v1/user/9223372036854775808/rename/bob"),
        ("GET", "/api/v1/preauthkey?user=9223372036854775808"),
        ("DELETE", "/api/v1/preauthkey?id=9223372036854775808"),
        ("GET", "/api/v1/node?user=9223372036854775808"),
        ("GET", "/api/v1/user?id=abc"),
        ("GET", "/api/v1/user?id=%C2%B2"),
        ("POST", "/api/v1/node/1/expire?expiry=2030-01-01"),
        ("POST", "/api/v1/node/1/expire?disableExpiry=maybe"),
    ],
)
async def test_malformed_ids_are_400(
    site: Site,
    server: Server,
    api_key: str,  # noqa: F811
    method: str,
    path: str,
) -> None:
    r = await request(site, method, path, api_key)
    assert r.status_code == 400, (path, r.status_code, r.text)
    assert r.json()["detail"]


async def test_go_zero_time_has_headscales_meaning_and_reads_back(
    site: Site,
    server: Server,
    api_key: str,  # noqa: F811
    node_id: int,
) -> None:
    zero = "0001-01-01T00:00:00Z"
    r = await request(site, "POST", "/api/v1/apikey", api_key, json={"expiration": zero})
    assert r.status_code == 200, r.text
    new_key = r.json()["apiKey"]
    # An API key with the zero expiration never expires, and is listed with the zero instant.
    r = await request(site, "GET", "/api/v1/apikey", new_key)
    assert r.status_code == 200, r.text
    assert zero in [k["expiration"] for k in r.json()["apiKeys"]]
    # A node "expired" at the zero time is expired now.
    r = await request(
        site, "POST", f"/api/v1/node/{node_id}/expire", api_key, json={"expiry": zero}
    )
    assert r.status_code == 200, r.text
    assert r.json()["node"]["expiry"] != zero
    r = await request(site, "GET", "/api/v1/node", api_key)
    assert r.status_code == 200, r.text
    # An offset time is stored in UTC and reads back.
    r = await request(
        site, "POST", "/api/v1/apikey", api_key, json={"expiration": "2030-06-01T12:00:00+02:00"}
    )
    assert r.status_code == 200
    listed = (await request(site, "GET", "/api/v1/apikey", api_key)).json()["apiKeys"]
    assert "2030-06-01T10:00:00Z" in [k["expiration"] for k in listed]


async def test_strict_booleans_mean_what_they_say(
    site: Site,
    server: Server,
    api_key: str,  # noqa: F811
    node_id: int,
) -> None:
    body = {"user": "1", "reusable": False, "ephemeral": None, "aclTags": None}
    r = await request(site, "POST", "/api/v1/preauthkey", api_key, json=body)
    assert r.status_code == 200, r.text
    assert (r.json()["preAuthKey"]["reusable"], r.json()["preAuthKey"]["ephemeral"]) == (
        False,
        False,
    )


def test_parse_id_accepts_only_int64_ascii_digits() -> None:
    assert parse_id("42", "id") == 42
    assert parse_id(42, "id") == 42
    assert parse_id(str(2**63 - 1), "id") == 2**63 - 1
    for bad in ["²", "٣", "", "1.0", "-1", True, None, 1.5, str(2**63), 2**63, "9" * 5000]:
        with pytest.raises(InvalidInput, match=r"^id: "):
            parse_id(bad, "id")


def test_times_are_rfc3339_with_timezone_and_read_back() -> None:
    t = parse_time("2026-01-02T15:04:05.123456789+01:00", "t")
    assert to_iso(t) == "2026-01-02T14:04:05Z"
    zero = parse_time("0001-01-01T00:00:00Z", "t")
    assert to_iso(zero) == "0001-01-01T00:00:00Z"
    assert from_iso(to_iso(zero)) == zero
    assert from_iso("1-01-01T00:00:00Z") == zero  # rows an older homescale wrote
    for bad in ["2026-01-02T15:04:05", "2026-01-02", "2026-13-01T00:00:00Z", "now", 0, [], {}]:
        with pytest.raises(InvalidInput, match=r"^t: "):
            parse_time(bad, "t")
    assert parse_time(None, "t") is None
    assert parse_time("", "t") is None


def test_body_reads_null_as_unset_and_refuses_everything_else() -> None:
    b = Body(b'{"s": null, "b": null, "l": null, "x": 1}')
    assert (b.string("s"), b.boolean("b"), b.strings("l"), b.string("absent")) == (
        "",
        False,
        [],
        "",
    )
    with pytest.raises(InvalidInput, match="x: expected a string, got a number"):
        b.string("x")
    with pytest.raises(InvalidInput, match="must be a JSON object, got a list"):
        Body(b"[]")
    assert Body(b"  ").obj == {}
