"""The design rule: one node's change costs work proportional to the peers that can see it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import appliance.nodeentries as entries_mod
import appliance.policystate as policy_mod
import netmap.policy
from appliance.changes import NodeChanged, NodeOnline, PolicyChanged
from netmap.nodes import PeerNode
from netmap.nodes import encode_node as real_encode
from netmap.policy import CompiledPolicy
from netmap.policy import compile_policy as real_compile
from tests.appliance.test_tailnet_support import change, compose, connect, make_tailnet, node, user

USERS = 10
PER_USER = 20
# Every node sees only its own user's nodes.
SELF_ONLY = """{
  "acls": [{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]}]
}"""


def test_endpoint_change_marks_only_the_nodes_that_see_it(monkeypatch: pytest.MonkeyPatch) -> None:
    users = [user(u, f"user{u}") for u in range(1, USERS + 1)]
    nodes = [node(i, user_id=(i - 1) // PER_USER + 1) for i in range(1, USERS * PER_USER + 1)]
    tn = make_tailnet(users, nodes, SELF_ONLY)
    handles = {}
    for n in nodes:
        h, first = connect(tn, n.id)
        assert len(first["Peers"]) == PER_USER - 1
        handles[n.id] = h

    encodes: list[int] = []
    compiles: list[int] = []

    def encode_node(n: PeerNode, domain: str) -> bytes:
        encodes.append(n.id)
        return real_encode(n, domain)

    def compile_policy(*args: Any, **kwargs: Any) -> CompiledPolicy:
        compiles.append(1)
        return real_compile(*args, **kwargs)

    monkeypatch.setattr(entries_mod, "encode_node", encode_node)
    monkeypatch.setattr(policy_mod, "compile_policy", compile_policy)

    changed = 45  # user 3's node
    change(tn, changed, endpoints=["198.51.100.45:41641"])

    woken = {nid for nid, h in handles.items() if h.wake.is_set()}
    same_user = set(range(41, 61))
    assert woken - {changed} == same_user - {changed}  # the other 19 nodes of that user
    assert len(woken - {changed}) == PER_USER - 1
    assert encodes == [changed]  # encoded once, reused for every recipient
    assert compiles == []  # an endpoint change does not recompile the policy
    for nid in woken - {changed}:
        msg = compose(tn, handles[nid])
        assert msg is not None
        assert msg["PeersChangedPatch"] == [
            {"NodeID": changed, "Endpoints": ["198.51.100.45:41641"]}
        ]


def test_online_change_marks_only_the_nodes_that_see_it() -> None:
    users = [user(u, f"user{u}") for u in range(1, USERS + 1)]
    nodes = [node(i, user_id=(i - 1) // PER_USER + 1) for i in range(1, USERS * PER_USER + 1)]
    tn = make_tailnet(users, nodes, SELF_ONLY)
    handles = {n.id: connect(tn, n.id)[0] for n in nodes}
    tn.apply([NodeOnline(1, True)])
    woken = {nid for nid, h in handles.items() if h.wake.is_set()}
    assert woken == set(range(1, PER_USER + 1))


def test_membership_change_sends_only_to_those_whose_view_changed() -> None:
    users = [user(u, f"user{u}") for u in range(1, USERS + 1)]
    nodes = [node(i, user_id=(i - 1) // PER_USER + 1) for i in range(1, USERS * PER_USER + 1)]
    tn = make_tailnet(users, nodes, SELF_ONLY)
    handles = {n.id: connect(tn, n.id)[0] for n in nodes}
    change(tn, 45, user_id=4)  # moves from user 3 (41..60) to user 4 (61..80)
    # The design rule: only the 40 sessions whose view can change are woken at all.
    assert {nid for nid, h in handles.items() if h.wake.is_set()} == set(range(41, 81))
    got = {nid: msg for nid, h in handles.items() if (msg := compose(tn, h)) is not None}
    assert set(got) == set(range(41, 81))
    for nid in range(41, 61):
        if nid != 45:
            assert got[nid]["PeersRemoved"] == [45]
    for nid in range(61, 81):
        assert [p["ID"] for p in got[nid]["PeersChanged"]] == [45]
    assert len(got[45]["PeersRemoved"]) == PER_USER - 1
    assert len(got[45]["PeersChanged"]) == PER_USER


def test_a_membership_change_compiles_the_policy_without_parsing_it_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The text is parsed when it changes, not on every join (issue 16: ~19 ms per join
    for a 14 KB policy)."""
    users = [user(u, f"user{u}") for u in range(1, 3)]
    tn = make_tailnet(users, [node(1), node(2, user_id=2)], SELF_ONLY)
    parses: list[str] = []
    real_parse = netmap.policy.parse_policy

    def parse_policy(text: str, source: str) -> Any:
        parses.append(source)
        return real_parse(text, source)

    monkeypatch.setattr(policy_mod, "parse_policy", parse_policy)
    tn.apply([NodeChanged(node(3, user_id=1))])
    assert 3 in tn.visible_peers(1)  # compiled with the new member
    assert parses == []
    tn.apply([PolicyChanged(SELF_ONLY.replace("autogroup:self:*", "*:*"))])
    assert parses == ["policy"]
    assert 2 in tn.visible_peers(1)


def test_the_coalescing_tick_slows_while_the_server_is_saturated() -> None:
    """Issue 10: a busy server sends fewer, larger messages (each costs every stream a
    compose, a seal and a send) and returns to the quick tick once the load is gone."""
    from appliance.control import COALESCE_MAX, CoalescingClock

    streams = 1000
    clock = CoalescingClock(lambda: streams, machine=lambda: None)
    quick = clock.interval()
    assert quick == pytest.approx(0.2)  # 100 ms + 100 ms per 1,000 streams
    clock.adapt(0.6)  # in between: no change
    assert clock.interval() == quick
    seen = []
    for _ in range(10):
        clock.adapt(1.0)  # one core saturated
        seen.append(clock.interval())
    assert seen == sorted(seen)
    assert seen[0] > quick
    assert seen[-1] == COALESCE_MAX
    clock.adapt(0.7)  # below saturation, not idle: it stays
    assert clock.interval() == COALESCE_MAX
    clock.adapt(0.1)  # the load is gone: quick again at once
    assert clock.interval() == quick
    streams = 3000  # more streams: the floor rises with them
    assert clock.interval() == pytest.approx(0.4)


async def test_a_slowed_tick_comes_as_soon_as_the_load_is_gone(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """After a busy spell slowed the tick to COALESCE_MAX, the next tick does not wait
    out those seconds once the load has gone: the change made meanwhile goes out within
    about COALESCE_BASE (a churn right after a join wave had p99 1.5 s from this)."""
    from appliance.control import COALESCE_BASE, COALESCE_MAX, CoalescingClock

    load = {"busy": 1.0}
    clock = CoalescingClock(lambda: 10, cpu=lambda: 0.0, machine=lambda: load["busy"])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(clock.run)
        while clock.interval() < COALESCE_MAX:  # saturated: the tick slows tick by tick
            await clock.next_tick()
        load["busy"] = 0.1  # the spell is over
        t0 = trio.current_time()
        await clock.next_tick()
        waited = trio.current_time() - t0
        nursery.cancel_scope.cancel()
    assert waited <= 2 * COALESCE_BASE + 1e-6
    assert clock.interval() == clock.floor()


async def test_a_tick_wakes_streams_a_batch_per_scheduler_pass(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Thousands of streams woken in one pass would compose in one long pass, and any
    request or handshake needing a few passes would wait that long several times."""
    from appliance.control import WAKE_BATCH, CoalescingClock

    streams = 3 * WAKE_BATCH
    clock = CoalescingClock(lambda: streams, cpu=lambda: 0.0, machine=lambda: 0.0)
    passes = 0
    woke_in: list[int] = []
    first_woke = trio.Event()
    all_woke = trio.Event()

    async def count_passes() -> None:
        nonlocal passes
        await first_woke.wait()
        while len(woke_in) < streams:
            passes += 1
            await trio.lowlevel.checkpoint()

    async def stream() -> None:
        await clock.next_tick()  # the first tick after start spreads them over batches
        await clock.next_tick()
        first_woke.set()
        woke_in.append(passes)
        if len(woke_in) == streams:
            all_woke.set()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(clock.run)
            nursery.start_soon(count_passes)
            for _ in range(streams):
                nursery.start_soon(stream)
            await all_woke.wait()
            nursery.cancel_scope.cancel()
    # Passes are counted by a task among them, so a batch may straddle a count.
    assert len(set(woke_in)) >= 2, "every stream woke in one pass"


def test_a_change_for_nearly_everyone_goes_through_one_log() -> None:
    """Issue 10 (storms): a change at least half of many sessions must hear of costs one
    log entry and one wake of everyone per delay, not a mark per session; each session
    reads the log when it composes, and one that fell behind the kept log re-checks all."""
    import appliance.sessions as sessions_mod
    from appliance.sessions import BROADCAST_MIN, SessionRegistry

    reg = SessionRegistry(domain="tail.example", disable_logtail=True)
    woken: list[int] = []
    reg.on_broadcast = lambda: woken.append(1)
    handles = [reg.open(i) for i in range(1, BROADCAST_MIN + 1)]
    for h in handles:
        h.state.pending_all = False
        h.state.pending_peers.clear()
    everyone = frozenset(range(1, BROADCAST_MIN + 1))
    reg.mark_peer(everyone, 7)
    reg.mark_peers(everyone, [8, 9])
    assert woken == [1]  # one wake-up request for the three changes
    assert not any(h.state.pending_peers or h.wake.is_set() for h in handles)
    batches = list(reg.broadcast_batches(50))
    assert [len(b) for b in batches] == [50, 50, BROADCAST_MIN - 100]
    for batch in batches:
        for h in batch:
            h.notify()
    assert all(h.wake.is_set() for h in handles)
    reg.catch_up(handles[0])
    assert handles[0].state.pending_peers == {7, 8, 9}
    reg.catch_up(handles[0])  # read once
    assert handles[0].state.pending_peers == {7, 8, 9}
    handles[0].state.pending_peers.clear()
    reg.catch_up(handles[0])
    assert not handles[0].state.pending_peers

    # A few watchers: marked one by one as before (a join wakes only its user's sessions).
    reg.mark_peer(frozenset({1, 2}), 5)
    assert handles[1].state.pending_peers == {5}
    assert 5 not in handles[5].state.pending_peers

    # The log is bounded; a session that missed entries dropped from it re-checks all.
    old = sessions_mod.LOG_MAX
    sessions_mod.LOG_MAX = 8
    try:
        for n in range(20):
            reg.mark_peer(everyone, 100 + n)
    finally:
        sessions_mod.LOG_MAX = old
    laggard = handles[2].state
    reg.catch_up(handles[2])
    assert laggard.pending_all


def test_sessions_read_the_log_up_to_the_last_broadcast() -> None:
    """Sessions woken by one broadcast read the same range of the log (what came after it
    waits for the next broadcast), so their deltas can be one (SharedDeltas); the range
    is offered only to a session with nothing else pending."""
    from appliance.sessions import BROADCAST_MIN, SessionRegistry
    from netmap.mapsession import LogRead

    reg = SessionRegistry(domain="tail.example", disable_logtail=True)
    reg.on_broadcast = lambda: None
    handles = [reg.open(i) for i in range(1, BROADCAST_MIN + 1)]
    for h in handles:
        h.state.pending_all = h.state.pending_self = False
    everyone = frozenset(range(1, BROADCAST_MIN + 1))
    reg.mark_peers(everyone, [7, 8])
    list(reg.broadcast_batches(64))
    reg.mark_peer(everyone, 9)  # after the broadcast began
    a, b, c = handles[0], handles[1], handles[2]
    c.state.mark_peers([5])  # a mark of its own as well
    read_a, read_b = reg.catch_up(a), reg.catch_up(b)
    assert read_a == read_b == LogRead(0, 2, [7, 8])
    assert not a.state.pending_peers  # handed to the compose, not marked
    assert reg.catch_up(c) is None
    assert c.state.pending_peers == {5, 7, 8}
    assert reg.catch_up(a) is None  # nothing new until the next broadcast
    list(reg.broadcast_batches(64))
    assert reg.catch_up(a) == LogRead(2, 3, [9])
    late = reg.open(BROADCAST_MIN + 1)  # its first map holds everything so far
    assert reg.catch_up(late) is None
    assert not late.state.pending_peers


def test_a_change_during_a_round_reaches_its_later_batches() -> None:
    """A change that comes while a broadcast round is going through the sessions goes to
    the rest of that round (its later batches read the log up to it), and to the
    sessions already passed in the next round, which it asks for: no session waits for
    the next round to begin and then for its turn in it."""
    from appliance.sessions import BROADCAST_MIN, SessionRegistry
    from netmap.mapsession import LogRead

    reg = SessionRegistry(domain="tail.example", disable_logtail=True)
    rounds: list[int] = []
    reg.on_broadcast = lambda: rounds.append(1)
    handles = [reg.open(i) for i in range(1, BROADCAST_MIN + 1)]
    for h in handles:
        h.state.pending_all = h.state.pending_self = False
    everyone = frozenset(range(1, BROADCAST_MIN + 1))
    reg.mark_peer(everyone, 7)
    assert rounds == [1]
    batches = reg.broadcast_batches(64)
    first = next(batches)
    assert [reg.catch_up(h) for h in first] == [LogRead(0, 1, [7])] * 64
    reg.mark_peer(everyone, 9)  # during the round
    assert rounds == [1, 1]  # the sessions already passed need another
    second = next(batches)
    assert [reg.catch_up(h) for h in second] == [LogRead(0, 2, [7, 9])] * 64
    assert list(batches) == []
    again = list(reg.broadcast_batches(64))
    assert [reg.catch_up(h) for h in again[0]] == [LogRead(1, 2, [9])] * 64
    assert all(reg.catch_up(h) is None for h in again[1])  # they had it


def test_a_silent_stream_is_woken_for_a_keepalive() -> None:
    """Keep-alives come from one sweep over the sessions, not a timer per stream: a stream
    silent for its interval is marked due and woken once; one that sent lately is not."""
    from appliance.sessions import SessionRegistry

    reg = SessionRegistry(domain="tail.example", disable_logtail=True)
    quiet, busy = reg.open(1), reg.open(2)
    quiet.quiet_for = busy.quiet_for = 50.0
    quiet.last_sent, busy.last_sent = 0.0, 40.0
    reg.wake_for_keepalives(55.0)
    assert quiet.keepalive_due
    assert quiet.wake.is_set()
    assert not busy.keepalive_due
    assert not busy.wake.is_set()
    quiet.wake = trio.Event()
    reg.wake_for_keepalives(60.0)  # due already: not woken again before it sends
    assert not quiet.wake.is_set()
    reg.wake_for_keepalives(90.0)
    assert busy.keepalive_due


def test_machine_load_reads_how_busy_the_cpus_were(tmp_path: Path) -> None:
    """The coalescing tick also backs off when the box is saturated: MachineLoad reads
    /proc/stat's cpu line (user nice system idle iowait irq softirq steal)."""
    from appliance.control import MachineLoad

    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 1 2 3\n")
    load = MachineLoad(str(stat))
    assert load.busy() is None  # a first sample has nothing to compare with
    stat.write_text("cpu  190 0 190 820 0 0 0 0 0 0\n")  # 180 busy of 200 ticks
    assert load.busy() == pytest.approx(0.9)
    assert MachineLoad(str(tmp_path / "missing")).busy() is None
    stat.write_text("cpu  x y\n")  # not Linux's format: no figure, no failure
    assert load.busy() is None
