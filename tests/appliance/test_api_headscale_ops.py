"""headscale's admin operations beyond its golden answers: debug nodes, IP backfill, exit
routes approved as a pair, auth IDs in headscale's shape (issue 12)."""

from __future__ import annotations

import json
import re

import pytest

from appliance.serve import Server

from .conftest import Site, arun_cli


async def cli_json(capsys: pytest.CaptureFixture[str], site: Site, *args: str) -> object:
    res = await arun_cli(capsys, site, "-o", "json", *args)
    assert res.code == 0, res.err
    return json.loads(res.out)


async def test_debug_node_waits_until_auth_register(
    server: Server, site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    await arun_cli(capsys, site, "users", "create", "alice")
    echo = await cli_json(
        capsys, site, "debug", "create-node", "--name", "dbg", "-u", "alice", "-r", "10.0.0.0/24"
    )
    assert isinstance(echo, dict)
    assert echo["name"] == "dbg"
    assert echo["availableRoutes"] == ["10.0.0.0/24"]
    assert echo["registerMethod"] == "REGISTER_METHOD_UNSPECIFIED"
    assert await cli_json(capsys, site, "nodes", "list") == []  # nothing stored yet
    # The key it waits under, from `auth list` (headscale's shape).
    pending = await cli_json(capsys, site, "auth", "list")
    assert isinstance(pending, list)
    (auth_id,) = [p["authId"] for p in pending if p["hostname"] == "dbg"]
    assert re.fullmatch(r"hskey-authreq-[0-9a-f]{24}", auth_id)

    node = await cli_json(capsys, site, "auth", "register", "-u", "alice", "--auth-id", auth_id)
    assert isinstance(node, dict)
    assert (node["name"], node["user"]["name"]) == ("dbg", "alice")
    assert node["availableRoutes"] == ["10.0.0.0/24"]
    assert node["lastSeen"] is not None  # as headscale: seen when it registered
    # Spent: the same key is now unknown (404), a malformed one is a 400 naming it.
    res = await arun_cli(capsys, site, "auth", "register", "-u", "alice", "--auth-id", auth_id)
    assert res.code != 0
    assert "no pending registration" in res.err
    res = await arun_cli(capsys, site, "auth", "approve", "--auth-id", "not-an-id")
    assert res.code != 0
    assert "malformed auth ID" in res.err


async def test_backfillips_gives_missing_addresses(
    server: Server, site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    def make() -> int:
        u = server.store.create_user("alice")
        return server.store.create_node(
            user_id=u.id,
            machine_key="mkey:" + "1" * 64,
            node_key="nodekey:" + "1" * 64,
            given_name="old",
            hostname="old",
            ipv4="100.64.0.7",
            ipv6=None,  # made before prefixes.v6 was configured
        ).id

    nid = await server.run_db(make)
    res = await arun_cli(capsys, site, "nodes", "backfillips")  # not a tty, no --force
    assert res.code != 0
    assert "--force" in res.err
    out = await cli_json(capsys, site, "nodes", "backfillips", "--force")
    assert out == {"changes": [f'assigned IPv6 "fd7a:115c:a1e0::1" to Node({nid}) "old"']}
    listed = await cli_json(capsys, site, "nodes", "list")
    assert isinstance(listed, list)
    assert listed[0]["ipAddresses"] == ["100.64.0.7", "fd7a:115c:a1e0::1"]
    # Nothing left to do the second time.
    assert await cli_json(capsys, site, "nodes", "backfillips", "--force") == {"changes": []}


async def test_one_exit_route_approves_both_families(
    server: Server, site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    def make() -> int:
        u = server.store.create_user("alice")
        return server.store.create_node(
            user_id=u.id,
            machine_key="mkey:" + "2" * 64,
            node_key="nodekey:" + "2" * 64,
            given_name="exit",
            hostname="exit",
            ipv4="100.64.0.2",
            hostinfo={"RoutableIPs": ["0.0.0.0/0", "::/0"]},
        ).id

    nid = await server.run_db(make)
    for route in ("0.0.0.0/0", "::/0"):
        node = await cli_json(capsys, site, "nodes", "approve-routes", "-i", str(nid), "-r", route)
        assert isinstance(node, dict)
        assert node["approvedRoutes"] == ["0.0.0.0/0", "::/0"], route
    # The tailnet serves both to peers: the node is an exit node.
    assert server.tailnet.entries.peers[nid].exit_routes == ("0.0.0.0/0", "::/0")


async def test_routes_show_what_the_tailnet_serves(
    server: Server, site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    """Approved (by an admin or autoApprovers), available and serving routes, by the rule
    the tailnet uses: one primary per subnet, exit routes from every approved exit node."""
    policy = site.dir / "policy.hujson"
    policy.write_text(
        '{"autoApprovers": {"routes": {"10.9.0.0/16": ["alice@"]}},'
        ' "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}'
    )
    await arun_cli(capsys, site, "users", "create", "alice")
    assert (await arun_cli(capsys, site, "policy", "set", "--file", str(policy))).code == 0

    def make(n: int) -> int:
        u = server.store.user_by_name("alice")
        assert u is not None
        return server.store.create_node(
            user_id=u.id,
            machine_key=f"mkey:{n:064x}",
            node_key=f"nodekey:{n:064x}",
            given_name=f"router{n}",
            hostname=f"router{n}",
            ipv4=f"100.64.0.{n}",
            hostinfo={"RoutableIPs": ["10.0.0.0/24", "10.9.0.0/16", "0.0.0.0/0", "::/0"]},
        ).id

    r1, r2 = await server.run_db(make, 1), await server.run_db(make, 2)
    for nid in (r1, r2):
        await cli_json(
            capsys, site, "nodes", "approve-routes", "-i", str(nid), "-r", "10.0.0.0/24,0.0.0.0/0"
        )
    listed = await cli_json(capsys, site, "nodes", "list-routes")
    assert isinstance(listed, list)
    by_id = {int(n["id"]): n for n in listed}
    for nid in (r1, r2):
        # 10.9.0.0/16 is approved by autoApprovers, and shown so.
        assert by_id[nid]["approvedRoutes"] == ["0.0.0.0/0", "10.0.0.0/24", "10.9.0.0/16", "::/0"]
    # One primary per subnet (nobody online: the lowest ID); both are exit nodes.
    assert by_id[r1]["subnetRoutes"] == ["10.0.0.0/24", "10.9.0.0/16", "0.0.0.0/0", "::/0"]
    assert by_id[r2]["subnetRoutes"] == ["0.0.0.0/0", "::/0"]
    single = await cli_json(capsys, site, "nodes", "list", "--user", "alice")
    assert isinstance(single, list)
    assert [n["subnetRoutes"] for n in single] == [n["subnetRoutes"] for n in listed]


def test_policy_get_in_file_mode(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    """As headscale: `policy get` returns the policy file's text in file mode."""
    from .conftest import run_cli

    policy = site.dir / "policy.hujson"
    policy.write_text(
        '// the file\n{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}\n'
    )
    site.config_path.write_text(
        site.config_path.read_text().replace(
            "policy:\n  mode: database\n", f"policy:\n  mode: file\n  path: {policy}\n"
        )
    )
    res = run_cli(capsys, site, "-o", "json", "policy", "get")
    assert res.code == 0, res.err
    assert json.loads(res.out)["policy"] == policy.read_text()
