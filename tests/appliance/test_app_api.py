"""The admin REST API: Bearer auth on the main listener, headscale's wrapping, errors."""

from __future__ import annotations

from datetime import timedelta

import httpx
import pytest
import trio

from appliance.serve import Server
from appliance.store import to_iso, utcnow

from .conftest import CALL_TIMEOUT, Site


async def make_api_key(server: Server, expires_in: timedelta | None = timedelta(days=1)) -> str:
    expiration = utcnow() + expires_in if expires_in is not None else None
    return await server.run_db(server.admin.create_api_key, expiration)


@pytest.fixture
async def api_key(server: Server) -> str:
    return await make_api_key(server)


async def request(
    site: Site,
    method: str,
    path: str,
    key: str | None = None,
    headers: dict[str, str] | None = None,
    *,
    json: object = None,
    params: dict[str, str] | None = None,
    content: bytes | None = None,
) -> httpx.Response:
    """One API call; `json`, `params`, `content` go to httpx as they are (None: not sent)."""
    headers = dict(headers or {})
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    with trio.fail_after(CALL_TIMEOUT):
        async with httpx.AsyncClient(base_url=site.url) as client:
            return await client.request(
                method, path, headers=headers, json=json, params=params, content=content
            )


# ---------------------------------------------------------------- authentication


async def test_without_api_key_401(site: Site, server: Server) -> None:
    for path in ("/api/v1/user", "/api/v1/node", "/api/v1/health", "/api/v1/no-such-route"):
        r = await request(site, "GET", path)
        assert r.status_code == 401, path
        assert "API key" in r.json()["detail"]


async def test_wrong_api_keys_401(site: Site, server: Server, api_key: str) -> None:
    prefix = api_key.split("-")[2]
    for key in (
        "nope",
        f"hskey-api-{prefix}-" + "0" * 64,
        "hskey-api-000000000000-" + "1" * 64,
        api_key.replace("hskey-api-", "hskey-auth-"),
    ):
        r = await request(site, "GET", "/api/v1/user", key)
        assert r.status_code == 401, key
    r = await request(site, "GET", "/api/v1/user", headers={"Authorization": f"Basic {api_key}"})
    assert r.status_code == 401


async def test_expired_api_key_401(site: Site, server: Server) -> None:
    key = await make_api_key(server)
    assert (await request(site, "GET", "/api/v1/user", key)).status_code == 200
    await server.run_db(server.admin.expire_api_key, key.split("-")[2])
    assert (await request(site, "GET", "/api/v1/user", key)).status_code == 401


async def test_valid_api_key_200(site: Site, server: Server, api_key: str) -> None:
    r = await request(site, "GET", "/api/v1/user", api_key)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"users": []}
    r = await request(site, "GET", "/api/v1/health", api_key)
    assert r.json() == {"databaseConnectivity": True}


# ---------------------------------------------------------------- headscale's shapes


async def test_responses_are_wrapped_as_headscale_does(
    site: Site, server: Server, api_key: str
) -> None:
    r = await request(site, "POST", "/api/v1/user", api_key, json={"name": "alice"})
    assert r.status_code == 200, r.text
    user = r.json()["user"]
    assert user["name"] == "alice"
    assert list(r.json()) == ["user"]

    r = await request(site, "GET", "/api/v1/user", api_key)
    assert [u["name"] for u in r.json()["users"]] == ["alice"]

    expiration = to_iso(utcnow() + timedelta(hours=1))
    r = await request(
        site,
        "POST",
        "/api/v1/preauthkey",
        api_key,
        json={
            "user": user["id"],
            "reusable": True,
            "expiration": expiration,
            "aclTags": ["tag:web"],
        },
    )
    assert r.status_code == 200, r.text
    pak = r.json()["preAuthKey"]
    assert pak["reusable"] is True
    assert pak["aclTags"] == ["tag:web"]
    assert pak["expiration"] == expiration

    r = await request(site, "GET", "/api/v1/preauthkey", api_key, params={"user": user["id"]})
    assert [k["id"] for k in r.json()["preAuthKeys"]] == [pak["id"]]

    store = site.store()
    try:
        node = store.create_node(
            machine_key="mkey:" + "a" * 64,
            node_key="nodekey:" + "b" * 64,
            given_name="laptop",
            hostname="laptop",
            user_id=int(user["id"]),
            ipv4="100.64.0.1",
        )
    finally:
        store.close()
    r = await request(site, "GET", "/api/v1/node", api_key)
    assert [n["givenName"] for n in r.json()["nodes"]] == ["laptop"]
    r = await request(site, "GET", f"/api/v1/node/{node.id}", api_key)
    assert r.json()["node"]["ipAddresses"] == ["100.64.0.1"]
    r = await request(site, "POST", f"/api/v1/node/{node.id}/rename/desktop", api_key)
    assert r.json()["node"]["givenName"] == "desktop"

    r = await request(site, "GET", "/api/v1/apikey", api_key)
    assert [k["prefix"] for k in r.json()["apiKeys"]] == [f"hskey-api-{api_key.split('-')[2]}-***"]


async def test_errors_are_problem_json(site: Site, server: Server, api_key: str) -> None:
    assert (await request(site, "POST", "/api/v1/user", api_key, json={"name": "alice"})).is_success
    r = await request(site, "POST", "/api/v1/user", api_key, json={"name": "alice"})
    assert r.status_code == 409
    assert "already exists" in r.json()["detail"]
    r = await request(site, "GET", "/api/v1/node/99", api_key)
    assert r.status_code == 404
    assert "no node with id 99" in r.json()["detail"]
    r = await request(
        site, "POST", "/api/v1/preauthkey", api_key, json={"user": "1", "aclTags": ["web"]}
    )
    assert r.status_code == 400
    assert "malformed tag" in r.json()["detail"]


# ---------------------------------------------------------------- routing and bodies


async def test_unknown_route_404_wrong_method_405(site: Site, server: Server, api_key: str) -> None:
    r = await request(site, "GET", "/api/v1/no-such-route", api_key)
    assert r.status_code == 404
    assert "/api/v1/no-such-route" in r.json()["detail"]
    r = await request(site, "PUT", "/api/v1/user", api_key)
    assert r.status_code == 405
    assert "GET" in r.json()["detail"]
    assert "POST" in r.json()["detail"]
    r = await request(site, "GET", "/api/v1/preauthkey/expire", api_key)
    assert r.status_code == 405


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b'{"name": "alice"', "not valid JSON"),
        (b'{"name": alice}', "not valid JSON"),
        (b'["alice"]', "must be a JSON object"),
    ],
)
async def test_bad_json_body_400(
    site: Site, server: Server, api_key: str, body: bytes, problem: str
) -> None:
    r = await request(
        site,
        "POST",
        "/api/v1/user",
        api_key,
        content=body,
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 400
    assert problem in r.json()["detail"]
    assert (await request(site, "GET", "/api/v1/user", api_key)).json() == {"users": []}


async def test_bad_time_400_names_the_field(site: Site, server: Server, api_key: str) -> None:
    r = await request(site, "POST", "/api/v1/apikey", api_key, json={"expiration": "tomorrow"})
    assert r.status_code == 400
    assert "expiration" in r.json()["detail"]
    assert "tomorrow" in r.json()["detail"]


async def test_admin_socket_needs_no_key(site: Site, server: Server) -> None:
    with trio.fail_after(CALL_TIMEOUT):
        async with httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(site.socket)), base_url="http://homescale"
        ) as client:
            r = await client.post("/api/v1/user", json={"name": "alice"})
            assert r.status_code == 200, r.text
            r = await client.get("/api/v1/user")
    assert [u["name"] for u in r.json()["users"]] == ["alice"]
