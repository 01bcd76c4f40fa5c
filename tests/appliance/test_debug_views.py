"""headscale's /debug/* views on the metrics listener, as JSON (issue 12)."""

from __future__ import annotations

import httpx
import pytest
import trio

from appliance.debugviews import debug_access
from appliance.serve import Server

from .conftest import CALL_TIMEOUT, Site, arun_cli


async def get(site: Site, path: str) -> httpx.Response:
    with trio.fail_after(CALL_TIMEOUT):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{site.metrics_port}") as c:
            return await c.get(path)


async def test_views_show_the_tailnet(
    server: Server, site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    await arun_cli(capsys, site, "users", "create", "alice")

    def make() -> int:
        u = server.store.user_by_name("alice")
        assert u is not None
        return server.store.create_node(
            user_id=u.id,
            machine_key="mkey:" + "1" * 64,
            node_key="nodekey:" + "1" * 64,
            disco_key="discokey:" + "1" * 64,
            given_name="router",
            hostname="router",
            ipv4="100.64.0.1",
            hostinfo={"RoutableIPs": ["10.0.0.0/24"]},
        ).id

    nid = await server.run_db(make)
    res = await arun_cli(
        capsys, site, "nodes", "approve-routes", "-i", str(nid), "-r", "10.0.0.0/24"
    )
    assert res.code == 0, res.err

    index = (await get(site, "/debug/")).json()
    assert "/debug/nodestore" in index
    assert "/debug/mapresponses" in index
    nodes = (await get(site, "/debug/nodestore")).json()
    assert nodes[str(nid)]["servedRoutes"] == ["10.0.0.0/24"]
    assert (await get(site, "/debug/routes")).json()["primaryRoutes"] == {"10.0.0.0/24": nid}
    assert (await get(site, "/debug/overview")).json()["nodes"] == 1
    assert "Regions" in (await get(site, "/debug/derp")).json()
    assert (await get(site, "/debug/policy")).json() == {"policy": None}
    assert str(nid) in (await get(site, "/debug/filter")).json()
    assert (await get(site, "/debug/registration-cache")).json() == []
    maps = (await get(site, f"/debug/mapresponses?node={nid}")).json()
    assert maps[str(nid)]["Node"]["ID"] == nid
    assert (await get(site, "/debug/mapresponses?node=abc")).status_code == 400
    assert (await get(site, "/debug/mapresponses?node=99")).status_code == 404
    # The metrics are still there (also under headscale's name), nothing else answers.
    metrics = (await get(site, "/metrics")).text
    assert "homescale_nodes 1" in metrics
    assert "headscale_nodestore_nodes 1" in metrics  # headscale's dashboards' name
    assert (await get(site, "/debug/nope")).status_code == 404


def test_only_local_tailscale_and_private_addresses() -> None:
    for peer in ("127.0.0.1:5", "[::1]:5", "100.64.0.7:1", "[fd7a:115c:a1e0::5]:1", "10.1.2.3:4"):
        assert debug_access(peer), peer
    for peer in ("8.8.8.8:53", "[2606:4700::1]:1", "nonsense", "[::ffff:8.8.8.8]:1"):
        assert not debug_access(peer), peer
