"""Every admin CLI command, through a running server and directly on the database.

Each test runs twice (`hs` is parametrized): once with `serve` running in this trio
run (the CLI talks to its admin socket), once with no server (the CLI opens the
database). `-v` must say which path was taken; the results must be the same.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
import trio
from ruamel.yaml import YAML

from appliance.config import load_config
from appliance.serve import serve
from appliance.store import utcnow

from .conftest import LOG, START_TIMEOUT, CliResult, Site, arun_cli

USER_FIELDS = {
    "id",
    "name",
    "createdAt",
    "displayName",
    "email",
    "providerId",
    "provider",
    "profilePicUrl",
}
PAK_FIELDS = {
    "id",
    "key",
    "user",
    "reusable",
    "ephemeral",
    "used",
    "expiration",
    "createdAt",
    "aclTags",
}
NODE_FIELDS = {
    "id",
    "machineKey",
    "nodeKey",
    "discoKey",
    "ipAddresses",
    "name",
    "givenName",
    "user",
    "online",
    "lastSeen",
    "expiry",
    "createdAt",
    "registerMethod",
    "tags",
    "approvedRoutes",
    "availableRoutes",
    "subnetRoutes",
}
APIKEY_FIELDS = {"id", "prefix", "expiration", "createdAt", "lastSeen"}

# One JSON object as the CLI prints it; its values are whatever JSON holds.
JsonObject = dict[str, Any]

VIA_SERVER = "using the running server's admin socket"
VIA_DB = "using the database"

POLICY = """// homescale test policy
{
  "groups": {"group:admins": ["alice@"]},
  "acls": [
    {"action": "accept", "src": ["group:admins"], "dst": ["*:*"]},
  ],
}
"""
BAD_POLICY = '{\n  "acls": [\n    {"action": "drop", "src": ["*"], "dst": ["*:*"]}\n  ]\n}\n'


@dataclass
class Hs:
    """The CLI against one site, either with its server running or without."""

    site: Site
    capsys: pytest.CaptureFixture[str]
    mode: str  # "server" or "direct"

    async def __call__(self, *args: str, local: bool = False) -> CliResult:
        """`homescale -v ARGS`; checks that `-v` names the path this mode must take.

        `local`: the CLI refuses before it picks a path (a bad flag, no --force).
        """
        res = await arun_cli(self.capsys, self.site, "-v", *args)
        if local:
            assert VIA_SERVER not in res.err
            assert VIA_DB not in res.err
        elif self.mode == "server":
            assert VIA_SERVER in res.err, res.err
            assert VIA_DB not in res.err
        else:
            assert VIA_DB in res.err, res.err
            assert VIA_SERVER not in res.err
        return res

    async def ok(self, *args: str) -> CliResult:
        res = await self(*args)
        assert res.code == 0, res.err
        return res

    async def json(self, *args: str) -> object:
        return (await self.ok("-o", "json", *args)).json()

    async def json_object(self, *args: str) -> JsonObject:
        """`json` for a command that prints one object (a user, a key, a node, the policy)."""
        return cast(JsonObject, await self.json(*args))

    async def json_list(self, *args: str) -> list[JsonObject]:
        """`json` for a `list` command: the CLI prints the objects as a bare list."""
        return cast(list[JsonObject], await self.json(*args))

    async def fails(self, *args: str, says: str, local: bool = False) -> CliResult:
        res = await self(*args, local=local)
        assert res.code != 0, res.out
        assert says in res.err, res.err
        return res

    def add_node(self, n: int, user: str | None = "alice", **values: object) -> int:
        """A registered node, written straight into the store (registration lands later)."""
        s = self.site.store()
        try:
            owner = s.user_by_name(user) if user else None
            fields: dict[str, object] = {
                "machine_key": f"mkey:{n:064x}",
                "node_key": f"nodekey:{n:064x}",
                "disco_key": f"discokey:{n:064x}",
                "given_name": f"node{n}",
                "hostname": f"Host-{n}",
                "user_id": owner.id if owner else None,
                "ipv4": f"100.64.0.{n}",
                "ipv6": f"fd7a:115c:a1e0::{n}",
                "hostinfo": {"RoutableIPs": ["10.0.0.0/24", "10.1.0.0/24"]},
                "approved_routes": ["10.0.0.0/24"],
                "last_seen": utcnow(),
            }
            fields.update(values)
            return s.create_node(**fields).id
        finally:
            s.close()


@pytest.fixture(params=["server", "direct"])
async def hs(
    request: pytest.FixtureRequest, site: Site, capsys: pytest.CaptureFixture[str]
) -> AsyncIterator[Hs]:
    if request.param == "direct":
        yield Hs(site, capsys, "direct")
        return
    config = load_config(site.config_path, environ={})
    async with trio.open_nursery() as nursery:
        with trio.fail_after(START_TIMEOUT):
            await nursery.start(serve, config, LOG)
        yield Hs(site, capsys, "server")
        nursery.cancel_scope.cancel()


def parse_time(s: str) -> datetime:
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


# ---------------------------------------------------------------- users


async def test_users(hs: Hs) -> None:
    created = await hs.json_object(
        "users", "create", "alice", "--email", "alice@example.com", "--display-name", "Alice A"
    )
    assert set(created) == USER_FIELDS
    assert created["name"] == "alice"
    assert created["email"] == "alice@example.com"
    assert created["displayName"] == "Alice A"
    assert re.fullmatch(r"\d+", created["id"])
    await hs.ok("users", "create", "bob")

    listed = await hs.json_list("users", "list")
    assert isinstance(listed, list)  # the CLI prints lists bare
    assert [u["name"] for u in listed] == ["alice", "bob"]
    table = (await hs.ok("users", "list")).out
    assert "alice" in table
    assert "bob" in table
    assert [u["name"] for u in await hs.json_list("users", "list", "--name", "bob")] == ["bob"]

    renamed = await hs.json_object("users", "rename", "--name", "bob", "--new-name", "carol")
    assert renamed["name"] == "carol"
    renamed = await hs.json_object(
        "users", "rename", "--identifier", created["id"], "--new-name", "alicia"
    )
    assert renamed["name"] == "alicia"

    res = await hs.ok("users", "destroy", "--name", "carol", "--force")
    assert "destroyed" in res.out
    assert [u["name"] for u in await hs.json_list("users", "list")] == ["alicia"]


async def test_users_errors_change_nothing(hs: Hs) -> None:
    await hs.ok("users", "create", "alice")
    before = await hs.json_list("users", "list")
    await hs.fails("users", "create", "alice", says="already exists")
    await hs.fails("users", "create", "1nvalid", says="must start with a letter")
    await hs.fails("users", "rename", "--name", "nobody", "--new-name", "x2", says="nobody")
    await hs.ok("users", "create", "bob")
    await hs.fails("users", "rename", "--name", "bob", "--new-name", "alice", says="already exists")
    await hs.fails("users", "destroy", "--name", "nobody", "--force", says="nobody")
    # no confirmation (stdin is not a terminal) and no --force: refused
    await hs.fails("users", "destroy", "--name", "bob", says="--force")
    hs.add_node(1)
    await hs.fails("users", "destroy", "--name", "alice", "--force", says="still owns 1 node")
    after = await hs.json_list("users", "list")
    assert [u["name"] for u in after] == ["alice", "bob"]
    assert after[0] == before[0]


# ---------------------------------------------------------------- pre-auth keys


async def test_preauthkeys(hs: Hs) -> None:
    await hs.ok("users", "create", "alice")
    key = await hs.json_object(
        "preauthkeys",
        "create",
        "--user",
        "alice",
        "--reusable",
        "--ephemeral",
        "--expiration",
        "2h",
        "--tags",
        "tag:web,tag:db",
    )
    assert set(key) == PAK_FIELDS
    assert re.fullmatch(r"hskey-auth-[0-9a-f]{12}-[0-9a-f]{64}", key["key"])
    assert key["user"]["name"] == "alice"
    assert key["reusable"] is True
    assert key["ephemeral"] is True
    assert key["used"] is False
    assert key["aclTags"] == ["tag:db", "tag:web"]
    expires = parse_time(key["expiration"])
    now = datetime.now(UTC)
    assert now + timedelta(hours=1) < expires < now + timedelta(hours=3)

    plain = await hs.ok("preauthkeys", "create", "--user", "alice")
    assert re.fullmatch(r"hskey-auth-[0-9a-f]{12}-[0-9a-f]{64}\n", plain.out)

    listed = await hs.json_list("preauthkeys", "list")
    assert isinstance(listed, list)
    assert len(listed) == 2
    assert all(set(k) == PAK_FIELDS for k in listed)
    prefix = key["key"].split("-")[2]
    assert listed[0]["key"] == f"hskey-auth-{prefix}-***"  # prefix shown, secret never
    assert key["key"] not in json.dumps(listed)
    assert len(await hs.json_list("preauthkeys", "list", "--user", "alice")) == 2

    await hs.ok("preauthkeys", "expire", "--id", key["id"])
    expired = (await hs.json_list("preauthkeys", "list"))[0]
    assert parse_time(expired["expiration"]) <= datetime.now(UTC)

    await hs.ok("preauthkeys", "delete", "--id", key["id"])
    assert [k["id"] for k in await hs.json_list("preauthkeys", "list")] != [key["id"]]
    assert len(await hs.json_list("preauthkeys", "list")) == 1


async def test_preauthkeys_by_prefix(hs: Hs) -> None:
    await hs.ok("users", "create", "alice")
    key = (await hs.ok("preauthkeys", "create", "--user", "alice")).out.strip()
    await hs.ok("preauthkeys", "expire", "--id", f"hskey-auth-{key.split('-')[2]}-***")
    listed = await hs.json_list("preauthkeys", "list")
    assert parse_time(listed[0]["expiration"]) <= datetime.now(UTC)
    await hs.ok("preauthkeys", "delete", "--id", key.split("-")[2])
    assert await hs.json("preauthkeys", "list") == []


async def test_a_prefix_of_decimal_digits_is_still_a_prefix(
    hs: Hs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key's prefix is 12 random hex digits, about one in 280 of them all decimal
    (`test_preauthkeys_by_prefix` failed on one): `--id` with those 12 digits names that
    key, not a key with that numeric ID."""
    import appliance.secrets as key_secrets

    real = key_secrets.new_key

    def decimal_prefix(kind: str) -> key_secrets.NewKey:
        key = real(kind)
        full = key.full.replace(key.prefix, "588530559538", 1)
        return key_secrets.NewKey(full=full, prefix="588530559538", hash=key.hash)

    monkeypatch.setattr(key_secrets, "new_key", decimal_prefix)
    await hs.ok("users", "create", "alice")
    key = (await hs.ok("preauthkeys", "create", "--user", "alice")).out.strip()
    assert key.split("-")[2] == "588530559538"
    await hs.ok("preauthkeys", "expire", "--id", "588530559538")
    listed = await hs.json_list("preauthkeys", "list")
    assert parse_time(listed[0]["expiration"]) <= datetime.now(UTC)
    await hs.ok("preauthkeys", "delete", "--id", "588530559538")
    assert await hs.json("preauthkeys", "list") == []


async def test_tag_only_preauthkey(hs: Hs) -> None:
    key = await hs.json_object("preauthkeys", "create", "--tags", "tag:server")
    assert key["user"] is None
    assert key["aclTags"] == ["tag:server"]


async def test_preauthkeys_errors_change_nothing(hs: Hs) -> None:
    await hs.ok("users", "create", "alice")
    await hs.fails("preauthkeys", "create", "--user", "nobody", says="nobody")
    await hs.fails(
        "preauthkeys", "create", "--user", "alice", "--tags", "web", says="malformed tag"
    )
    await hs.fails(
        "preauthkeys",
        "create",
        "--user",
        "alice",
        "--tags",
        "tag:ok,tag:not ok",
        says="malformed tag",
    )
    await hs.fails(
        "preauthkeys", "create", "--user", "alice", "--expiration", "soon", says="--expiration"
    )
    await hs.fails("preauthkeys", "create", says="needs a user")
    await hs.fails("preauthkeys", "expire", "--id", "99", says="no pre-auth key")
    await hs.fails("preauthkeys", "delete", "--id", "99", says="no pre-auth key")
    await hs.fails("preauthkeys", "list", "--user", "nobody", says="nobody")
    assert await hs.json("preauthkeys", "list") == []


# ---------------------------------------------------------------- API keys


async def test_apikeys(hs: Hs) -> None:
    key = (await hs.ok("apikeys", "create", "--expiration", "30d")).out.strip()
    assert re.fullmatch(r"hskey-api-[0-9a-f]{12}-[0-9a-f]{64}", key)
    assert isinstance(await hs.json("apikeys", "create"), str)
    listed = await hs.json_list("apikeys", "list")
    assert isinstance(listed, list)
    assert len(listed) == 2
    assert all(set(k) == APIKEY_FIELDS for k in listed)
    prefix = key.split("-")[2]
    assert listed[0]["prefix"] == f"hskey-api-{prefix}-***"
    assert key not in json.dumps(listed)
    expires = parse_time(listed[0]["expiration"])
    assert expires > datetime.now(UTC) + timedelta(days=29)

    await hs.ok("apikeys", "expire", "--prefix", prefix)
    assert parse_time((await hs.json_list("apikeys", "list"))[0]["expiration"]) <= datetime.now(UTC)
    await hs.ok("apikeys", "delete", "--prefix", prefix)
    assert [k["id"] for k in await hs.json_list("apikeys", "list")] == [listed[1]["id"]]
    await hs.ok("apikeys", "delete", "--id", listed[1]["id"])
    assert await hs.json("apikeys", "list") == []


async def test_apikeys_errors(hs: Hs) -> None:
    await hs.fails("apikeys", "expire", "--prefix", "0123456789ab", says="no API key")
    # As headscale: a prefix no key has (well-formed or not) is not found.
    await hs.fails("apikeys", "delete", "--prefix", "nothex", says="no API key")
    await hs.fails(
        "apikeys", "delete", "--prefix", "0123456789ab", "--id", "1", says="not both", local=True
    )
    await hs.fails("apikeys", "create", "--expiration", "forever", says="--expiration", local=True)
    assert await hs.json("apikeys", "list") == []


# ---------------------------------------------------------------- nodes


async def test_nodes(hs: Hs, tmp_path: Path) -> None:
    await hs.ok("users", "create", "alice")
    await hs.ok("users", "create", "bob")
    n1 = hs.add_node(1)
    n2 = hs.add_node(2, user="bob")
    # Approved through the CLI, so a running server hears of the node and serves the route.
    await hs.ok("nodes", "approve-routes", "-i", str(n1), "-r", "10.0.0.0/24")

    listed = await hs.json_list("nodes", "list")
    assert isinstance(listed, list)
    assert [n["id"] for n in listed] == [str(n1), str(n2)]
    node = listed[0]
    assert NODE_FIELDS <= set(node)
    assert node["machineKey"] == f"mkey:{1:064x}"
    assert node["nodeKey"] == f"nodekey:{1:064x}"
    assert node["discoKey"] == f"discokey:{1:064x}"
    assert node["ipAddresses"] == ["100.64.0.1", "fd7a:115c:a1e0::1"]
    assert node["name"] == "Host-1"
    assert node["givenName"] == "node1"
    assert node["user"]["name"] == "alice"
    assert {"id", "name"} <= set(node["user"])
    assert node["online"] is False
    assert node["registerMethod"] == "REGISTER_METHOD_AUTH_KEY"
    assert node["tags"] == []
    assert node["approvedRoutes"] == ["10.0.0.0/24"]
    assert node["availableRoutes"] == ["10.0.0.0/24", "10.1.0.0/24"]
    assert node["subnetRoutes"] == ["10.0.0.0/24"]
    assert node["expiry"] is None
    assert [n["id"] for n in await hs.json_list("nodes", "list", "--user", "bob")] == [str(n2)]
    table = (await hs.ok("nodes", "list")).out.splitlines()
    # headscale's columns (then device approval), short keys, its time format.
    assert [c.strip() for c in table[0].split("|")] == [
        "ID", "Hostname", "Name", "MachineKey", "NodeKey", "User", "Tags", "IP addresses",
        "Ephemeral", "Last seen", "Expiration", "Connected", "Expired", "Approved",
    ]  # fmt: skip
    row = [c.strip() for c in table[1].split("|")]
    assert row[2] == "node1"
    assert re.fullmatch(r"\[[A-Za-z0-9+/]{5}\]", row[3])
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", row[9])
    assert row[8:] == ["false", row[9], "N/A", "offline", "no", "true"]

    renamed = await hs.json_object("nodes", "rename", "laptop", "--identifier", str(n1))
    assert renamed["givenName"] == "laptop"

    # Only tags the policy's tagOwners define (as headscale); the node then belongs to them.
    await hs.fails("nodes", "tag", "--identifier", str(n1), "--tags", "tag:web", says="tagOwners")
    policy = tmp_path / "tags.hujson"
    policy.write_text('{"tagOwners": {"tag:web": ["alice@"], "tag:db": ["alice@"]}}')
    await hs.ok("policy", "set", "--file", str(policy))
    tagged = await hs.json_object(
        "nodes", "tag", "--identifier", str(n1), "--tags", "tag:web,tag:db"
    )
    assert tagged["tags"] == ["tag:db", "tag:web"]
    assert tagged["user"] is None  # a single node's answer, as headscale's
    listed = await hs.json_list("nodes", "list")
    assert listed[0]["user"]["name"] == "tagged-devices"
    await hs.fails("nodes", "tag", "--identifier", str(n1), says="at least one tag")

    expired = await hs.json_object("nodes", "expire", "--identifier", str(n1))
    assert parse_time(expired["expiry"]) <= datetime.now(UTC)

    await hs.ok("nodes", "delete", "--identifier", str(n2), "--force")
    assert [n["id"] for n in await hs.json_list("nodes", "list")] == [str(n1)]


async def test_nodes_errors_change_nothing(hs: Hs) -> None:
    await hs.ok("users", "create", "alice")
    n1 = hs.add_node(1)
    hs.add_node(2)
    before = await hs.json("nodes", "list")
    await hs.fails("nodes", "tag", "--identifier", str(n1), "--tags", "web", says="malformed tag")
    await hs.fails(
        "nodes", "rename", "Not_A_Label", "--identifier", str(n1), says="invalid node name"
    )
    await hs.fails("nodes", "rename", "node2", "--identifier", str(n1), says="already taken")
    await hs.fails("nodes", "expire", "--identifier", "99", says="no node with id 99")
    await hs.fails("nodes", "rename", "x", "--identifier", "99", says="no node with id 99")
    await hs.fails("nodes", "delete", "--identifier", "99", "--force", says="no node with id 99")
    await hs.fails("nodes", "delete", "--identifier", str(n1), local=True, says="--force")
    await hs.fails("nodes", "list", "--user", "nobody", says="nobody")
    assert await hs.json("nodes", "list") == before


# ---------------------------------------------------------------- output formats


async def test_output_formats(hs: Hs) -> None:
    await hs.ok("users", "create", "alice")
    await hs.ok("users", "create", "bob")
    as_json = await hs.json("users", "list")
    line = (await hs.ok("-o", "json-line", "users", "list")).out
    assert line.count("\n") == 1
    assert json.loads(line) == as_json
    as_yaml = YAML(typ="safe", pure=True).load(
        io.StringIO((await hs.ok("-o", "yaml", "users", "list")).out)
    )
    assert as_yaml == as_json
    await hs.fails("-o", "xml", "users", "list", says="unknown output format")


# ---------------------------------------------------------------- policy, health


async def test_policy(hs: Hs, tmp_path) -> None:
    good, bad = tmp_path / "good.hujson", tmp_path / "bad.hujson"
    good.write_text(POLICY)
    bad.write_text(BAD_POLICY)
    await hs.fails("policy", "get", says="no policy")
    await hs.ok("policy", "set", "--file", str(good))
    assert (await hs.ok("policy", "get")).out == POLICY + "\n"
    got = await hs.json_object("policy", "get")
    assert got["policy"] == POLICY
    res = await hs.fails("policy", "set", "--file", str(bad), says="drop")
    assert "line 3" in res.err
    assert (await hs.json_object("policy", "get"))["policy"] == POLICY
    latin1 = tmp_path / "latin1.hujson"
    latin1.write_bytes(b'{"groups": {"group:caf\xe9": []}}')
    await hs.fails("policy", "set", "--file", str(latin1), says="not UTF-8", local=True)
    await hs.fails(
        "policy", "set", "--file", str(tmp_path / "missing.hujson"), says="cannot read", local=True
    )


async def test_policy_check_needs_no_server(
    site: Site, capsys: pytest.CaptureFixture[str], tmp_path
) -> None:
    good, bad = tmp_path / "good.hujson", tmp_path / "bad.hujson"
    good.write_text(POLICY)
    bad.write_text(BAD_POLICY)
    res = await arun_cli(capsys, site, "policy", "check", "--file", str(good))
    assert res.code == 0
    assert "policy OK" in res.out
    res = await arun_cli(capsys, site, "policy", "check", "--file", str(bad))
    assert res.code != 0
    assert str(bad) in res.err
    assert "line 3" in res.err


async def test_health(hs: Hs) -> None:
    assert (await hs.ok("health")).out == "healthy\n"
    assert await hs.json("health") == {"databaseConnectivity": True}


async def test_version_and_generate(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    res = await arun_cli(capsys, site, "version")
    assert res.code == 0
    assert "commit" in res.out
    assert set((await arun_cli(capsys, site, "-o", "json", "version")).json()) == {
        "version",
        "commit",
    }
    keys = set()
    for _ in range(2):
        res = await arun_cli(capsys, site, "generate", "private-key")
        assert res.code == 0
        assert re.fullmatch(r"privkey:[0-9a-f]{64}\n", res.out)
        keys.add(res.out)
    assert len(keys) == 2


# ---------------------------------------------------------------- remote API (HOMESCALE_CLI_ADDRESS)


async def test_remote_cli_with_api_key(
    site: Site, server: object, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    good = (await arun_cli(capsys, site, "apikeys", "create")).out.strip()
    expired = (await arun_cli(capsys, site, "apikeys", "create")).out.strip()
    assert (
        await arun_cli(capsys, site, "apikeys", "expire", "--prefix", expired.split("-")[2])
    ).code == 0
    monkeypatch.setenv("HOMESCALE_CLI_ADDRESS", site.url)

    monkeypatch.setenv("HOMESCALE_CLI_API_KEY", good)
    res = await arun_cli(capsys, site, "-v", "users", "create", "alice")
    assert res.code == 0, res.err
    assert f"using the remote API at {site.url}" in res.err

    for key in (expired, "hskey-api-000000000000-" + "0" * 64):
        monkeypatch.setenv("HOMESCALE_CLI_API_KEY", key)
        res = await arun_cli(capsys, site, "users", "create", "mallory")
        assert res.code != 0
        assert "HTTP 401" in res.err

    monkeypatch.delenv("HOMESCALE_CLI_API_KEY")
    res = await arun_cli(capsys, site, "users", "list")
    assert res.code != 0
    assert "HOMESCALE_CLI_API_KEY" in res.err

    monkeypatch.delenv("HOMESCALE_CLI_ADDRESS")
    names = [
        u["name"] for u in (await arun_cli(capsys, site, "-o", "json", "users", "list")).json()
    ]
    assert names == ["alice"]


# ---------------------------------------------------------------- the direct path's own duties


@pytest.mark.parametrize("mode", ["server", "direct"])
async def test_policy_set_refused_in_file_mode(
    site: Site, capsys: pytest.CaptureFixture[str], tmp_path, mode: str
) -> None:
    """In policy.mode: file a database policy would be ignored: both paths refuse to store one."""
    site.config_path.write_text(
        site.config_path.read_text().replace("mode: database", "mode: file")
    )
    good = tmp_path / "good.hujson"
    good.write_text(POLICY)
    hs = Hs(site, capsys, mode)
    async with trio.open_nursery() as nursery:
        if mode == "server":
            with trio.fail_after(START_TIMEOUT):
                await nursery.start(serve, load_config(site.config_path, environ={}), LOG)
        await hs.fails("policy", "set", "--file", str(good), says="policy.mode: database")
        await hs.fails("policy", "get", says="no policy")
        nursery.cancel_scope.cancel()


async def test_direct_path_does_not_keep_the_database_open(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    from .test_app_store import open_fds_on

    res = await arun_cli(capsys, site, "-v", "users", "create", "alice")
    assert res.code == 0
    assert VIA_DB in res.err
    res = await arun_cli(
        capsys, site, "-v", "users", "rename", "--name", "alice", "--new-name", "bob"
    )
    assert res.code == 0
    assert open_fds_on(site.db_path) == 0


def test_output_into_a_closed_pipe_is_not_a_traceback(site: Site) -> None:
    """`homescale users list | head -1`: the reader leaves early; no traceback follows."""
    import subprocess

    from .test_app_shutdown import HOMESCALE, REPO

    proc = subprocess.Popen(
        [*HOMESCALE, "-c", str(site.config_path), "-o", "json", "version"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    assert proc.stdout is not None
    proc.stdout.close()  # no reader left: the child's first write meets EPIPE
    _, err = proc.communicate(timeout=CLI_PROCESS_TIMEOUT)
    assert b"Traceback" not in err, err.decode()
    assert proc.returncode == 141


CLI_PROCESS_TIMEOUT = 30


@pytest.mark.parametrize("new_name", ["a/b", "a%41b", "a%2Fb", "a?b", "a#b", "a b", "x/../y"])
async def test_names_reach_the_server_verbatim(hs: Hs, new_name: str) -> None:
    """A name goes into the URL path: it must arrive as typed, and be judged as typed."""
    await hs.ok("users", "create", "alice")
    n = hs.add_node(1)
    await hs.fails(
        "users", "rename", "--name", "alice", "--new-name", new_name, says="invalid character"
    )
    await hs.fails("nodes", "rename", new_name, "--identifier", str(n), says="invalid node name")
    assert [u["name"] for u in await hs.json_list("users", "list")] == ["alice"]
    assert [x["givenName"] for x in await hs.json_list("nodes", "list")] == ["node1"]
