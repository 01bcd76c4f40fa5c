"""Issue 5 with real clients: a policy decides who reaches whom, and changes to it
reach connected clients within seconds, as deltas for the affected nodes only.

The tailnet: users alice, bob and carol; a node ``web`` tagged ``tag:server``
(owned by alice) serving a page on :80; ``alicepc`` (alice) and ``bobpc`` (bob),
all real tsnet clients; carol's node is an in-process ts2021 peer whose map
stream the test reads frame by frame. The policy lets group:a (alice) reach
tag:server:80 and nothing else; then it is changed to let bob in too -- by editing
the file (policy.mode: file) or with ``homescale policy set`` (database mode) --
and, in file mode, back again by SIGHUP (an invalid edit in between is refused).
The last test covers ``policy check``/``set`` errors and a server that refuses to
start on an invalid stored policy, then recovers.

What the client saw comes from the client: its traffic (a fetch through it), its
own log (caddy ``debug``: how many peers tsnet configured WireGuard with, and the
peers its netmap diffs added or removed), and for carol the decoded map stream. The server's debug log ("node N <- B bytes: {json}") shows what each real
node was sent.

The scenario tests need real clients (the realclient tier, tests/tiers.py); the
CLI/server test runs everywhere.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import sqlite3
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from appliance.config import load_config
from tests import realclient
from tests.e2e.conftest import ControlPeer, MapStream, connect_peer, fetch_until, wait_nodes

# The two scenario tests start real clients: the realclient tier, decided at
# collection (a pytest.skip inside the trio test run loses its reason). The CLI
# and server test at the end starts none and runs everywhere.
needs_clients = realclient.tier_mark()

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "policy_e2e"
GROUP_A_ONLY = FIXTURES / "group_a_only.hujson"
GROUP_A_AND_BOB = FIXTURES / "group_a_and_bob.hujson"
UNDEFINED_GROUP = FIXTURES / "undefined_group.hujson"
FAILING_TEST = FIXTURES / "failing_test.hujson"

# Registration and map stream come within a couple of seconds; Running takes
# netcheck's ~6 s in the namespace. Generous for 2 shared cores.
ONLINE_WITHIN = 30.0
RUNNING_WITHIN = 40.0
# How long a change may take to reach a client before the test gives up. Issue 5
# asks for "within a second"; that figure is measured by `make bench`
# (tests/bench.py), never asserted here. The file is polled every second, and
# tsnet then reconfigures WireGuard and netstack.
CHANGE_WITHIN = 10.0
# A denied fetch: caddy gives up dialing a tailnet address no peer owns (about
# 2.5 s). Bounded so a hanging dial fails the test instead of stalling it.
DENIED_FETCH_TIMEOUT = 12.0
# How a denied dial through tsnet ends, as caddy logs it: the policy kept the
# target out of the client's netmap, so no peer owns the address ("no route to
# host", what these scenarios produce), or the peer's packet filter dropped the
# SYN (a dial timeout). Not "connection refused": that is a peer reached with
# nothing listening, not a denial.
DENIAL_ERRORS = ("connect: no route to host", "i/o timeout", "context deadline exceeded")
# After the affected nodes got their deltas, how long the unaffected ones are
# watched for anything (the server composes all sessions' messages together,
# so a stray one would come right away).
QUIET_WINDOW = 2.0
# Longer than the server's policy file poll (appliance/serve.py, 1 s).
POLL_AND_SOME = 1.5


# --- helpers ---------------------------------------------------------------------------


def write_atomically(path: Path, text: str) -> None:
    """As an editor saving: the watcher must never read a half-written file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def sent_messages(
    server: realclient.HomescaleServer, node_id: str, since: int
) -> list[dict[str, Any]]:
    """The map messages the server sent node ``node_id`` after log line ``since``."""
    return realclient.sent_maps(server.log.refresh()[since:], node_id)


def filter_allows(rules: list[dict[str, Any]], src: str, dst: str, port: int) -> bool:
    """Whether a PacketFilter lets ``src`` reach ``dst:port`` (prefixes may be merged)."""

    def within(addr: str, entries: list[str]) -> bool:
        ip = ipaddress.ip_address(addr)
        for e in entries:  # "*", a prefix, an address, or a range "first-last" (tailcfg)
            if e == "*":
                return True
            if "-" in e:
                first, last = (ipaddress.ip_address(x) for x in e.split("-", 1))
                if first.version == ip.version and first <= ip <= last:  # type: ignore[operator]
                    return True
            elif ip in ipaddress.ip_network(e, strict=False):
                return True
        return False

    return any(
        within(src, rule["SrcIPs"])
        and any(
            within(dst, [d["IP"]]) and d["Ports"]["First"] <= port <= d["Ports"]["Last"]
            for d in rule["DstPorts"]
        )
        for rule in rules
    )


def peer_ids(msg: dict[str, Any], key: str) -> set[int]:
    return {int(p["ID"]) for p in msg.get(key) or []}


async def fetch_denied(via: realclient.TsnetClient, target: str) -> str:
    """One fetch through ``via`` that the policy denies, with positive evidence of the
    denial: ``via`` runs, its proxy answers (502), and caddy logs that the dial to
    ``target`` itself failed the way a denial fails (``DENIAL_ERRORS``). A dead
    proxy, a refused local connection or a hang fail the test instead of passing
    for a denial. Returns caddy's error."""
    assert via.running, f"{via.name} is not running; log {via.log.path}"
    mark = via.log.mark()
    try:
        status, body = await via.fetch(target, timeout=DENIED_FETCH_TIMEOUT)
    except (OSError, trio.TooSlowError) as e:
        pytest.fail(
            f"{via.name}'s proxy gave no answer ({type(e).__name__}: {e}): no evidence of "
            f"a denial; log {via.log.path}"
        )
    assert status == 502, (
        f"{via.name} fetching {target}: {status} {body[:200]!r}; a denied dial answers 502"
    )
    line = await via.wait_for_log(
        lambda ln: ln.get("logger") == "http.log.error" and f"dial tcp {target}:" in ln["msg"],
        since=mark,
        timeout=5,
        what=f"caddy's error for the dial to {target}",
    )
    error = str(line["msg"])
    assert any(e in error for e in DENIAL_ERRORS), f"the dial failed, but not as a denial: {error}"
    assert via.running, f"{via.name} exited; log {via.log.path}"
    return error


@dataclass
class Scenario:
    server: realclient.HomescaleServer
    dir: Path
    clients: dict[str, realclient.TsnetClient] = field(default_factory=dict)
    ids: dict[str, str] = field(default_factory=dict)
    ipv4: dict[str, str] = field(default_factory=dict)
    carol_key: str = ""

    @property
    def web(self) -> str:
        return f"{self.ipv4['web']}:80"


@asynccontextmanager
async def scenario(d: Path, mode: str) -> AsyncIterator[Scenario]:
    """Server with the group_a_only policy (file or database), users, three tsnet nodes."""
    server = realclient.HomescaleServer(d / "server")
    policy_file = d / "policy.hujson"
    if mode == "file":
        write_atomically(policy_file, GROUP_A_ONLY.read_text())
        server.set_policy_mode("file", policy_file)
    else:
        server.set_policy_mode("database")
    sc = Scenario(server, d)
    try:
        await trio.to_thread.run_sync(server.start)
        for user in ("alice", "bob", "carol"):
            await server.acli("users", "create", user)
        if mode == "database":
            await server.acli("policy", "set", "--file", str(GROUP_A_ONLY))
        keys = {
            "web": server.create_key("alice", "--tags", "tag:server"),
            "alicepc": server.create_key("alice"),
            "bobpc": server.create_key("bob"),
        }
        sc.carol_key = server.create_key("carol")
        for name, key in keys.items():
            c = realclient.TsnetClient(d, name, server.url, auth_key=key)
            sc.clients[name] = c
            c.start()
        nodes = await wait_nodes(server, list(keys), timeout=ONLINE_WITHIN)
        for n in nodes:
            sc.ids[n["givenName"]] = str(n["id"])
            sc.ipv4[n["givenName"]] = n["ipAddresses"][0]
        for c in sc.clients.values():
            await c.wait_for_log(
                realclient.msg_has("Switching ipn state", "-> Running"),
                timeout=RUNNING_WITHIN,
                what=f"{c.name} Running",
            )
        yield sc
    finally:
        for c in sc.clients.values():
            try:
                c.stop()
            except Exception:  # stop the others whatever this one did
                c.kill()
        server.stop()


async def open_carol(
    sc: Scenario, nursery: trio.Nursery
) -> tuple[ControlPeer, MapStream, dict[str, Any]]:
    """carol's node, registered over real ts2021; its first map."""
    carol = await connect_peer(sc.server, nursery, "carolpc")
    with trio.fail_after(20):
        await carol.register(sc.carol_key)
        await carol.lite_update(Endpoints=["192.0.2.30:41641"], EndpointTypes=[1])
        stream = await carol.open_stream()
        _, first = await stream.next()
    return carol, stream, first


async def check_before_change(sc: Scenario, carol_first: dict[str, Any], since: int) -> None:
    """group_a_only in force: alice reaches web, bob neither reaches nor sees it."""
    web_id, bob_id = int(sc.ids["web"]), int(sc.ids["bobpc"])
    body = await fetch_until(sc.clients["alicepc"], sc.web, timeout=30)
    assert body.startswith(b"hello from web")
    how = await fetch_denied(sc.clients["bobpc"], sc.web)

    # What bob's node was sent: a first map (no Peers: an empty list is left out) with
    # an empty filter (nobody may reach bob), and web never, not even later.
    bob_msgs = sent_messages(sc.server, sc.ids["bobpc"], since)
    first = next((m for m in bob_msgs if "DERPMap" in m), None)
    assert first is not None, f"no first map sent to bobpc: {bob_msgs}"
    assert first.get("PacketFilter") == [], first.get("PacketFilter")
    assert all(
        web_id not in peer_ids(m, "Peers") | peer_ids(m, "PeersChanged") for m in bob_msgs
    ), f"bobpc was sent web as a peer: {bob_msgs}"
    # And what bob's client holds: no peer at all (alice's: one, web).
    await wait_client_view(sc.clients["bobpc"], peers=0, why=f"bob denied ({how})")
    await wait_client_view(sc.clients["alicepc"], peers=1, why="alice allowed")

    # carol, in no rule, sees nobody either.
    assert not carol_first.get("Peers"), f"carol sees peers: {carol_first.get('Peers')}"
    # And web sees alice (to answer her) but not bob.
    web_peers: set[int] = set()
    for m in sent_messages(sc.server, sc.ids["web"], since):
        web_peers |= peer_ids(m, "Peers") | peer_ids(m, "PeersChanged")
        web_peers -= set(m.get("PeersRemoved") or [])
    assert int(sc.ids["alicepc"]) in web_peers
    assert bob_id not in web_peers
    await wait_client_view(sc.clients["web"], peers=1, why="serves alice only")


def wireguard_peers(client: realclient.TsnetClient) -> int | None:
    """How many peers the client last configured WireGuard with, None before any.

    tsnet logs ``wgengine: Reconfig: configuring userspace WireGuard config (with
    N/M peers)`` on every change: M is every peer of its netmap (N the active ones).
    """
    total = None
    for line in client.log.refresh():
        m = realclient.tailscale_msg(line)
        if "configuring userspace WireGuard config (with " in m:
            total = int(m.split("(with ", 1)[1].split("/", 1)[1].split()[0])
    return total


def netmap_diff_signs(client: realclient.TsnetClient, since: int) -> dict[str, str]:
    """For each tailnet IPv4 address in the client's netmap diffs after log line
    ``since``: "+" if its peer was last added, "-" if last removed.

    tsnet logs ``[v1] netmap diff:`` with ``- [key] d:... <ips> ...`` and ``+ [key] ...``
    lines for every netmap after the first (a changed peer: removed, then added).
    The first netmap is never diffed (and the periodic ``new network map`` line
    has no peers), so a client's initial peers show only in its WireGuard count.
    """
    signs: dict[str, str] = {}
    for line in client.log.refresh()[since:]:
        m = realclient.tailscale_msg(line)
        if not m.startswith("[v1] netmap diff:"):
            continue
        for entry in m.splitlines()[1:]:
            if entry[:1] in ("+", "-"):
                for word in entry[1:].split():
                    if word.startswith("100."):
                        signs[word] = entry[0]
    return signs


async def wait_client_view(
    client: realclient.TsnetClient,
    *,
    peers: int,
    why: str,
    added: frozenset[str] = frozenset(),
    removed: frozenset[str] = frozenset(),
    since: int = 0,
    timeout: float = 5.0,
) -> None:
    """The client itself holds ``peers`` peers, and since log line ``since`` its
    netmap gained the peers with the ``added`` addresses and lost the ``removed`` ones.

    Waits (bounded) for tsnet to log it: the map may still be in flight."""
    wg: int | None = None
    signs: dict[str, str] = {}
    with trio.move_on_after(timeout):
        while True:
            wg = wireguard_peers(client)
            signs = netmap_diff_signs(client, since)
            if (
                wg == peers
                and all(signs.get(a) == "+" for a in added)
                and all(signs.get(r) == "-" for r in removed)
            ):
                return
            await trio.sleep(0.2)
    pytest.fail(
        f"{client.name} ({why}): WireGuard peers {wg} (expected {peers}); netmap diffs "
        f"{signs} (expected added {set(added)}, removed {set(removed)}); "
        f"log {client.log.path}"
    )


async def change_lets_bob_in(
    sc: Scenario, carol_stream: MapStream, since: int, change: Callable[[], Any]
) -> None:
    """Apply ``change``; bob's node fetches within seconds, only bob's and web's nodes
    were sent anything, carol's stream stays silent."""
    web_id, bob_id = int(sc.ids["web"]), int(sc.ids["bobpc"])
    marks = {name: c.log.mark() for name, c in sc.clients.items()}
    await change()
    # A bound, not a measurement: `make bench` prints the propagation time.
    body = await fetch_until(sc.clients["bobpc"], sc.web, timeout=CHANGE_WITHIN)
    assert body.startswith(b"hello from web")

    # bob's node was sent web as a changed peer; web was sent bob and a new filter.
    bob_msgs = sent_messages(sc.server, sc.ids["bobpc"], since)
    assert any(web_id in peer_ids(m, "PeersChanged") for m in bob_msgs), bob_msgs
    assert not any("Peers" in m for m in bob_msgs), f"bobpc was sent a full map: {bob_msgs}"
    web_msgs = sent_messages(sc.server, sc.ids["web"], since)
    assert any(bob_id in peer_ids(m, "PeersChanged") for m in web_msgs), web_msgs
    filters = [m["PacketFilter"] for m in web_msgs if "PacketFilter" in m]
    assert filters, f"web was sent no new PacketFilter: {web_msgs}"
    assert filter_allows(filters[-1], sc.ipv4["bobpc"], sc.ipv4["web"], 80), filters[-1]
    assert filter_allows(filters[-1], sc.ipv4["alicepc"], sc.ipv4["web"], 80), filters[-1]
    assert not filter_allows(filters[-1], sc.ipv4["bobpc"], sc.ipv4["web"], 81), filters[-1]
    # The clients' own view: bob's gained web, web's gained bob.
    await wait_client_view(
        sc.clients["bobpc"],
        peers=1,
        why="bob let in",
        added=frozenset({sc.ipv4["web"]}),
        since=marks["bobpc"],
    )
    await wait_client_view(
        sc.clients["web"],
        peers=2,
        why="serves alice and bob",
        added=frozenset({sc.ipv4["bobpc"]}),
        since=marks["web"],
    )

    # Unaffected: alice's access and peers did not change, carol's neither.
    with trio.move_on_after(QUIET_WINDOW):
        size, msg = await carol_stream.next(timeout=QUIET_WINDOW + 1)
        pytest.fail(f"carol's node, unaffected, was sent {size} bytes: {msg}")
    realclient.assert_nothing_sent(sc.server, sc.ids["alicepc"], since, "alicepc, unaffected,")
    assert netmap_diff_signs(sc.clients["alicepc"], marks["alicepc"]) == {}, (
        "alicepc's netmap changed"
    )


async def change_shuts_bob_out(
    sc: Scenario, carol_stream: MapStream, since: int, change: Callable[[], Any]
) -> None:
    """Apply ``change`` (back to group_a_only): bob's node loses web within seconds and
    its fetch fails again; only bob's and web's nodes were sent anything."""
    web_id, bob_id = int(sc.ids["web"]), int(sc.ids["bobpc"])
    marks = {name: c.log.mark() for name, c in sc.clients.items()}
    await change()
    await wait_client_view(
        sc.clients["bobpc"],
        peers=0,
        why="bob shut out again",
        removed=frozenset({sc.ipv4["web"]}),
        since=marks["bobpc"],
        timeout=CHANGE_WITHIN,
    )
    await wait_client_view(
        sc.clients["web"],
        peers=1,
        why="serves alice only",
        removed=frozenset({sc.ipv4["bobpc"]}),
        since=marks["web"],
    )
    await fetch_denied(sc.clients["bobpc"], sc.web)

    bob_msgs = sent_messages(sc.server, sc.ids["bobpc"], since)
    assert any(web_id in (m.get("PeersRemoved") or []) for m in bob_msgs), bob_msgs
    web_msgs = sent_messages(sc.server, sc.ids["web"], since)
    assert any(bob_id in (m.get("PeersRemoved") or []) for m in web_msgs), web_msgs
    filters = [m["PacketFilter"] for m in web_msgs if "PacketFilter" in m]
    assert filters, f"web was sent no new PacketFilter: {web_msgs}"
    assert not filter_allows(filters[-1], sc.ipv4["bobpc"], sc.ipv4["web"], 80), filters[-1]
    assert filter_allows(filters[-1], sc.ipv4["alicepc"], sc.ipv4["web"], 80), filters[-1]

    with trio.move_on_after(QUIET_WINDOW):
        size, msg = await carol_stream.next(timeout=QUIET_WINDOW + 1)
        pytest.fail(f"carol's node, unaffected, was sent {size} bytes: {msg}")
    realclient.assert_nothing_sent(sc.server, sc.ids["alicepc"], since, "alicepc, unaffected,")
    assert netmap_diff_signs(sc.clients["alicepc"], marks["alicepc"]) == {}, (
        "alicepc's netmap changed"
    )
    body = await fetch_until(sc.clients["alicepc"], sc.web, timeout=10)
    assert body.startswith(b"hello from web")


# --- the tests -------------------------------------------------------------------------


@pytest.mark.realclient
@needs_clients
async def test_file_policy_denies_then_admits_after_edit(tmp_path: Path) -> None:
    policy_file = tmp_path / "policy.hujson"
    async with scenario(tmp_path, "file") as sc, trio.open_nursery() as nursery:
        _, carol_stream, carol_first = await open_carol(sc, nursery)
        await check_before_change(sc, carol_first, 0)

        # An invalid edit is refused (located error in the log), the policy in force
        # stays, and no node is sent anything.
        mark = sc.server.log.mark()
        write_atomically(policy_file, UNDEFINED_GROUP.read_text())
        await sc.server.log.wait_for(
            realclient.msg_has("policy reload refused", "acls[1].src[0]", "line 7"),
            since=mark,
            timeout=CHANGE_WITHIN,
            what="the refused reload",
        )
        await trio.sleep(0.5)  # what a (wrong) recompile would have sent comes at once
        for name in sc.ids:
            realclient.assert_nothing_sent(sc.server, sc.ids[name], mark, name)
        await fetch_denied(sc.clients["bobpc"], sc.web)

        mark = sc.server.log.mark()

        async def edit() -> None:
            # Padded (HuJSON allows trailing whitespace) so that the revert below fits
            # in the same number of bytes.
            text = GROUP_A_AND_BOB.read_text()
            write_atomically(policy_file, text.ljust(len(GROUP_A_ONLY.read_text()) + 16))

        await change_lets_bob_in(sc, carol_stream, mark, edit)

        # And back, by SIGHUP alone: the file is rewritten in place with the same
        # size, inode and mtime, so the watcher (which compares those) sees no change.
        mark = sc.server.log.mark()

        async def revert_and_sighup() -> None:
            before = policy_file.stat()
            text = GROUP_A_ONLY.read_text()
            text = text.ljust(before.st_size)
            with policy_file.open("r+") as f:
                f.write(text)
            os.utime(policy_file, ns=(before.st_atime_ns, before.st_mtime_ns))
            after = policy_file.stat()
            assert (after.st_size, after.st_ino, after.st_mtime_ns) == (
                before.st_size,
                before.st_ino,
                before.st_mtime_ns,
            )
            await trio.sleep(POLL_AND_SOME)
            sc.server.log.assert_absent(
                realclient.msg_has("policy loaded"),
                since=mark,
                what="a reload of a file whose stamp did not change",
                proof=sc.server.render_log(f"policy loaded from {policy_file}"),
            )
            assert sc.server.proc is not None
            sc.server.proc.send_signal(signal.SIGHUP)
            await sc.server.log.wait_for(
                realclient.msg_has("SIGHUP: reloading the policy"),
                since=mark,
                timeout=5,
                what="the SIGHUP reload",
            )

        await change_shuts_bob_out(sc, carol_stream, mark, revert_and_sighup)
        nursery.cancel_scope.cancel()


@pytest.mark.realclient
@needs_clients
async def test_database_policy_denies_then_admits_after_set(tmp_path: Path) -> None:
    async with scenario(tmp_path, "database") as sc, trio.open_nursery() as nursery:
        _, carol_stream, carol_first = await open_carol(sc, nursery)
        await check_before_change(sc, carol_first, 0)

        mark = sc.server.log.mark()

        async def policy_set() -> None:
            await sc.server.acli("policy", "set", "--file", str(GROUP_A_AND_BOB))

        await change_lets_bob_in(sc, carol_stream, mark, policy_set)
        got = await sc.server.acli("policy", "get")
        assert got.stdout.strip() == GROUP_A_AND_BOB.read_text().strip()
        nursery.cancel_scope.cancel()


# --- CLI and server --------------------------------------------------------------------

# What each invalid policy's error must name: the JSON path, the problem, the line.
INVALID = [
    (UNDEFINED_GROUP, ("acls[1].src[0]", 'group "group:nosuch" is not defined', "(line 7)")),
    (FAILING_TEST, ("tests[0]", "test failed: bobpc -> web:80", "(line 10)")),
]


def assert_located(
    r: subprocess.CompletedProcess[str], needles: tuple[str, ...], what: str
) -> None:
    out = r.stderr + r.stdout
    assert r.returncode != 0, f"{what} succeeded: {out}"
    for n in needles:
        assert n in out, f"{what}: {n!r} not in the error: {out}"
    assert "Traceback" not in out, out


async def test_policy_check_set_refused_start_and_recovery(tmp_path: Path) -> None:
    server = realclient.HomescaleServer(tmp_path / "server")
    server.set_policy_mode("database")
    stored = GROUP_A_ONLY.read_text()
    try:
        await trio.to_thread.run_sync(server.start)
        await server.acli("users", "create", "alice")

        # policy check: 0 for a valid policy, non-zero with the located error otherwise.
        r = await server.acli("policy", "check", "--file", str(GROUP_A_ONLY), check=False)
        assert r.returncode == 0, r.stderr + r.stdout
        for bad, needles in INVALID:
            r = await server.acli("policy", "check", "--file", str(bad), check=False)
            assert_located(r, needles, f"policy check {bad.name}")

        # policy set: an invalid policy is refused, the stored one stays.
        await server.acli("policy", "set", "--file", str(GROUP_A_ONLY))
        for bad, needles in INVALID:
            r = await server.acli("policy", "set", "--file", str(bad), check=False)
            assert_located(r, needles, f"policy set {bad.name}")
            got = await server.acli("policy", "get")
            assert got.stdout.strip() == stored.strip(), f"after a refused set: {got.stdout}"
    finally:
        server.stop()

    # An invalid policy in the database (as a hand edit, or a policy an older version
    # accepted, would leave it: `policy set` never stores one), then the server refuses
    # to start, says why and how to recover.
    database = load_config(server.config).database_path
    conn = sqlite3.connect(database)
    try:
        with conn:
            conn.execute(
                "INSERT INTO policies (data, created_at) VALUES (?, ?)",
                (UNDEFINED_GROUP.read_text(), "2026-01-01T00:00:00Z"),
            )
    finally:
        conn.close()
    r = await trio.to_thread.run_sync(
        lambda: subprocess.run(
            [str(realclient.HOMESCALE), "-c", str(server.config), "serve"],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
            cwd=server.dir,
        )
    )
    hs = f"homescale -c {server.config}"  # the steps name the config this server runs with
    assert_located(
        r,
        (
            *INVALID[0][1],
            "refusing to start",
            f"{hs} policy get",
            f"{hs} policy check --file",
            f"{hs} policy set --file",
            "server stopped",
        ),
        "serve with an invalid stored policy",
    )

    # The recovery steps, with the server down (the CLI opens the database itself).
    dump = tmp_path / "policy.hujson"
    got = await server.acli("policy", "get")
    assert got.stdout.strip() == UNDEFINED_GROUP.read_text().strip()
    dump.write_text(got.stdout)
    r = await server.acli("policy", "check", "--file", str(dump), check=False)
    assert_located(r, INVALID[0][1], "policy check of the dump")
    dump.write_text(got.stdout.replace('"group:nosuch"', '"group:a"'))  # the fix
    r = await server.acli("policy", "check", "--file", str(dump), check=False)
    assert r.returncode == 0, r.stderr + r.stdout
    await server.acli("policy", "set", "--file", str(dump))
    got = await server.acli("policy", "get")
    assert got.stdout.strip() == dump.read_text().strip()

    since = server.log.mark()
    try:
        await trio.to_thread.run_sync(server.start)
        assert server.log.find(realclient.msg_has("policy loaded from database"), since), (
            server.log.tail()
        )
        got = await server.acli("policy", "get")
        assert got.stdout.strip() == dump.read_text().strip()
    finally:
        server.stop()
