"""The control endpoints inside Noise: `/machine/register` and `/machine/map`.

Registration follows Tailscale's decision order (PROTOCOL.md 3.1): logout, follow-up
long poll, auth key, known node restart, key rotation, else interactive login. The
map endpoint stores what the node reports, then either answers a lite update or
runs the node's map stream: a first full map, then deltas and keep-alives.
"""

from __future__ import annotations

import functools
import json
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import trio

from netmap.mapsession import MapSessionState
from protocol import safejson, tailcfg
from protocol.gojson import ZERO_TIME, WireError, is_zero_time
from protocol.mapframe import MapFrameEncoder, message_json

from .admin import Admin, validate_tags
from .changes import NodeOnline
from .control_conn import ControlRequest, ControlResponse
from .errors import HomescaleError, InvalidInput, NotFound
from .logins import PendingLogins, PendingRegistration
from .nodes import Login, log_in
from .sessions import SessionHandle
from .sshcheck import SSHCheckError, SSHChecks
from .store import NodeRow, Store, utcnow
from .storethread import RunDb
from .tailnet import Tailnet, node_is_expired
from .users import TAGGED_USER_ID, TAGGED_USER_NAME

# Keep-alive cadence: the client cancels a poll after 120 s of silence (controlclient);
# Tailscale and headscale send one every 50 s plus jitter.
KEEPALIVE_BASE = 50.0
KEEPALIVE_JITTER = 9.0
KEEPALIVE_SWEEP = 5.0  # how often silent streams are looked for (a keep-alive may be as late)
MAX_BODY = 1024 * 1024
# After a stream sends a message it waits for the next tick of one shared clock before
# composing the next, so changes arriving meanwhile go out merged in one message (last
# state wins); changes in the shared log go out in the broadcaster's rounds instead
# (`ControlService._broadcaster`). The tick is 100 ms and slows by 100 ms per 1,000
# streams, so each message carries more changes as the tailnet grows; and while the
# process is busy (its CPU time over the last tick above BUSY_HIGH of the wall time) it
# slows by half again per tick, up to COALESCE_MAX: a saturated server sends fewer,
# larger messages instead of falling behind (each message costs every stream a compose,
# a seal and a send). Below BUSY_LOW (looked at every COALESCE_BASE) it is back to quick
# at once. In between it stays: a tick quickened step by step there (tried) made the
# rounds outrun the box, and a churn at 5,000 nodes went from p99 2.8 to 5.4 s.
COALESCE_BASE = 0.1
COALESCE_PER_STREAM = 0.1 / 1000
COALESCE_MAX = 2.0
BUSY_HIGH = 0.8
BUSY_LOW = 0.5
# The shared log's rounds (`ControlService._broadcaster`) begin at most this often; a
# round that took longer is followed at once by the next (see there).
BROADCAST_PERIOD = 0.1
# Nodes that joined or moved within this long share one policy compile; a first map
# waits for it, at most SETTLE_WAIT (then it compiles itself).
SETTLE_DELAY = 0.05
SETTLE_WAIT = 2.0
# Streams woken (by the tick) or sent to (by the broadcaster) per pass of trio's scheduler.
# A pass runs every task that was runnable at its start: 5,000 composes in one pass took
# half a second, and a request or handshake needing several passes waited seconds (an
# endpoint update took 3 s to be stored at 5,000 nodes). Batches keep each pass short
# (a request waits for a few passes: 256 a pass kept an endpoint update at 5,000 nodes
# 150 ms from being answered, 64 at 40 ms); the whole round takes as long as before.
# Tried at 5,000 nodes, one run each, when every round woke each stream's task: 128 (58
# joins/s, churn p99 2.5 s) and 32 (p99 4.6 s) did worse than 64 (69-75 joins/s, p99
# 1.9-2.1 s).
WAKE_BATCH = 64
# Full maps built at once in a reconnect storm (each holds the loop for milliseconds).
FIRST_MAPS_AT_ONCE = 4
# Distinct small messages kept framed (compressed) for every stream to reuse.
FRAME_CACHE = 4096
ZERO_NODE_KEY = "nodekey:" + "0" * 64


class ControlService:
    """Answers the Noise HTTP/2 requests of every connected node."""

    def __init__(
        self,
        *,
        store: Store,
        admin: Admin,
        tailnet: Tailnet,
        run_db: RunDb,
        log: logging.Logger,
        nursery: trio.Nursery,
        logins: PendingLogins,
    ) -> None:
        self.store = store
        self.admin = admin
        self.tailnet = tailnet
        self.config = tailnet.config
        self.run_db = run_db
        self.log = log
        self.nursery = nursery
        self.boundary = tailnet.boundary
        self.logins = logins
        self.metrics = tailnet.boundary.metrics  # None in tests that build no server
        self.ssh_checks = SSHChecks(server_url=self.config.server_url, log=log.getChild("ssh"))
        # One encoder for every stream: one compression context, each delta compressed once.
        # zstd level 1: on map deltas (random keys, tens of KB) it is about a quarter
        # faster than level 3 and no bigger, and compressing deltas that differ per
        # session was a sixth of the server's CPU while 5,000 nodes joined.
        self.frames = MapFrameEncoder(level=1, cache_entries=FRAME_CACHE)
        self.clock = CoalescingClock(lambda: len(self.tailnet.sessions))
        self.first_maps = trio.CapacityLimiter(FIRST_MAPS_AT_ONCE)
        nursery.start_soon(self.clock.run)
        # The policy is compiled once for whatever joined or moved within SETTLE_DELAY,
        # not once per join (a compile is O(nodes)); see Tailnet.settle.
        self._stale = trio.Event()
        self._settled = trio.Event()
        tailnet.defer_settle = True
        tailnet.on_stale = lambda: self._stale.set()
        if tailnet.stale:
            self._stale.set()
        nursery.start_soon(self._settler)
        self._broadcast = trio.Event()
        tailnet.sessions.on_broadcast = lambda: self._broadcast.set()
        nursery.start_soon(self._broadcaster)
        nursery.start_soon(self._keepalives)

    # ------------------------------------------------------------ dispatch

    async def handle(self, req: ControlRequest, resp: ControlResponse) -> None:
        """The per-stream handler given to the ts2021 connection."""
        try:
            if req.method == "POST" and req.path == "/machine/register":
                await self.register(req, resp)
            elif req.method == "POST" and req.path == "/machine/map":
                await self.map(req, resp)
            elif req.method == "GET" and req.path.startswith("/machine/ssh/action/"):
                await self.ssh_action(req, resp)
            elif req.path.startswith("/machine/"):
                await self._reply(resp, 404, {"error": f"{req.path} is not supported"})
            else:
                await self._reply(resp, 404, {"error": "not found"})
        except _Refusal as e:
            self.log.info("%s from %s (%s) refused: %s", req.path, req.machine_key, req.peer, e)
            await self._reply(resp, e.status, {"error": str(e)})

    async def _reply(self, resp: ControlResponse, status: int, obj: Any) -> None:
        body = json.dumps(obj).encode()
        await resp.send_headers(
            status, [("content-type", "application/json"), ("content-length", str(len(body)))]
        )
        await resp.send_data(body)
        await resp.end()

    @staticmethod
    def _parse(req: ControlRequest, cls: type[Any]) -> Any:
        if len(req.body) > MAX_BODY:
            raise _Refusal(413, "request body too large")
        try:
            return cls.from_json(safejson.loads(req.body))
        except safejson.JSONInputError as e:
            raise _Refusal(400, f"malformed JSON: {e}") from None
        except (WireError, ValueError, TypeError) as e:
            raise _Refusal(400, f"malformed {cls.__name__}: {e}") from None

    # ------------------------------------------------------------ registration

    async def _success(self, node: NodeRow) -> tailcfg.RegisterResponse:
        if node.tags or node.user_id is None:
            uid, name, created = TAGGED_USER_ID, TAGGED_USER_NAME, ZERO_TIME
        else:
            u = self.tailnet.users.get(node.user_id)
            if u is None:
                u = await self.run_db(self.store.user, node.user_id)
            uid, name, created = u.id, u.name, u.created_at or ZERO_TIME
        return tailcfg.RegisterResponse(
            User=tailcfg.User(ID=uid, DisplayName=name, Created=created),
            Login=tailcfg.Login(ID=uid, LoginName=name, DisplayName=name),
            # False under device approval: the client waits (NeedsMachineAuth) until an admin
            # approves; the approval reaches it as its own node in the map stream.
            MachineAuthorized=node.approved,
        )

    async def _register_reply(self, resp: ControlResponse, rr: tailcfg.RegisterResponse) -> None:
        await self._reply(resp, 200, rr.to_json())

    async def ssh_action(self, req: ControlRequest, resp: ControlResponse) -> None:
        """Tailscale SSH on `dst` asks whether `src` may connect (an `action: check` rule)."""
        parts = urlsplit(req.path)
        m = _SSH_ACTION_PATH.fullmatch(parts.path)
        if m is None:
            raise _Refusal(404, f"{parts.path}: expected /machine/ssh/action/<src>/to/<dst>")
        src, dst = int(m[1]), int(m[2])
        dst_node = self.tailnet.nodes.get(dst)
        if dst_node is None:
            raise _Refusal(404, f"destination node {dst} not found")
        # Only the destination itself may ask (headscale: a stranger's Noise session must
        # not record verdicts for other pairs).
        if dst_node.machine_key != str(req.machine_key):
            raise _Refusal(401, "this machine is not the destination node")
        if src not in self.tailnet.nodes:
            raise _Refusal(404, f"source node {src} not found")
        query = parse_qs(parts.query)
        compiled = self.tailnet.compiled
        try:
            action = await self.ssh_checks.action(
                src,
                dst,
                period=compiled.ssh_check_period(src, dst) if compiled is not None else None,
                auth_id=query.get("auth_id", [""])[0][:64],
                local_user=query.get("local_user", [""])[0][:256],
            )
        except SSHCheckError as e:
            raise _Refusal(e.status, str(e)) from None
        await self._reply(resp, 200, action)

    async def register(self, req: ControlRequest, resp: ControlResponse) -> None:
        rr = self._parse(req, tailcfg.RegisterRequest)
        machine = str(req.machine_key)
        node_key = str(rr.NodeKey)
        if node_key == ZERO_NODE_KEY:
            raise _Refusal(400, "RegisterRequest without a NodeKey")
        hostinfo = rr.Hostinfo.to_json() if rr.Hostinfo is not None else {}
        node = await self.run_db(self.store.node_by, "node_key", node_key)
        if node is not None and node.machine_key != machine:
            raise _Refusal(403, "node key belongs to another machine")
        by_machine = await self.run_db(self.store.node_by, "machine_key", machine)

        # 1. Logout: an expiry in the past (Tailscale sends Unix 123).
        if not is_zero_time(rr.Expiry) and rr.Expiry <= utcnow():
            await self._logout(node or by_machine)
            await self._register_reply(resp, tailcfg.RegisterResponse(NodeKeyExpired=True))
            return
        # 2. Follow-up of an interactive login: wait until an admin completes it.
        if rr.Followup:
            await self._followup(rr.Followup, node_key, machine, resp)
            return
        # 3. Auth key.
        auth_key = rr.Auth.AuthKey if rr.Auth is not None else ""
        if auth_key:
            try:
                done = await self.run_db(
                    self._register_with_key,
                    auth_key,
                    machine,
                    node_key,
                    hostinfo,
                    rr.Ephemeral,
                    node or by_machine,
                )
            except InvalidInput as e:
                self.log.info("registration of %s refused: %s", machine, e)
                await self._register_reply(resp, tailcfg.RegisterResponse(Error=str(e)))
                return
            self.log.info("node %d (%s) registered with an auth key", done.id, done.given_name)
            await self._register_reply(resp, await self._success(done))
            return
        # 4. A known node restarting with its stored key.
        if node is not None:
            if node_is_expired(node):
                await self._register_reply(resp, tailcfg.RegisterResponse(NodeKeyExpired=True))
                return
            if hostinfo and hostinfo != node.hostinfo:
                nid = node.id
                node = await self.run_db(lambda: self.store.update_node(nid, hostinfo=hostinfo))
            await self._register_reply(resp, await self._success(node))
            return
        # 5. Key rotation: OldNodeKey names this machine's node.
        old_key = str(rr.OldNodeKey)
        if (
            old_key != ZERO_NODE_KEY
            and by_machine is not None
            and by_machine.node_key == old_key
            and not node_is_expired(by_machine)
        ):
            rotated = await self.run_db(
                lambda: self.store.update_node(by_machine.id, node_key=node_key)
            )
            self.log.info("node %d rotated its key", rotated.id)
            await self._register_reply(resp, await self._success(rotated))
            return
        # 6. Interactive login.
        pending = self.logins.start(machine, node_key, hostinfo, rr.Ephemeral)
        self.log.info(
            "interactive login %s for %s: waiting for `homescale nodes register`",
            pending.id,
            hostinfo.get("Hostname", "?"),
        )
        await self._register_reply(
            resp, tailcfg.RegisterResponse(AuthURL=self.auth_url(pending.id))
        )

    def auth_url(self, reg_id: str) -> str:
        return f"{self.config.server_url}/register/{reg_id}"

    def _register_with_key(
        self,
        auth_key: str,
        machine: str,
        node_key: str,
        hostinfo: dict[str, Any],
        ephemeral: bool,
        existing: NodeRow | None,
    ) -> NodeRow:
        """(store thread) Validate the key and create or re-login the node."""
        if existing is not None and existing.node_key == node_key and not node_is_expired(existing):
            # A node restarting with its key still works even when its single-use key is spent.
            return existing
        key = self.admin.check_pre_auth_key(auth_key)
        login = Login(
            node_key=node_key,
            hostinfo=hostinfo,
            user_id=key.user_id if not key.tags else None,
            tags=tuple(key.tags),
            ephemeral=key.ephemeral or ephemeral,
            auth_key_id=key.id,
            register_method="authkey",
        )
        return log_in(self.store, self.config, machine, existing, login)

    async def _logout(self, node: NodeRow | None) -> None:
        if node is None:
            return
        if node.ephemeral:
            await self.run_db(self.store.delete_node, node.id)
            self.log.info("ephemeral node %d logged out and was deleted", node.id)
            return
        await self.run_db(lambda: self.store.update_node(node.id, expiry=utcnow()))
        self.log.info("node %d logged out", node.id)

    def add_debug_registration(self, auth_id: str, hostinfo: dict[str, Any]) -> tuple[str, str]:
        return self.logins.add_debug(auth_id, hostinfo)

    async def _followup(self, url: str, node_key: str, machine: str, resp: ControlResponse) -> None:
        reg = self.logins.get(url)
        if reg is None or reg.machine_key != machine:
            node = await self.run_db(self.store.node_by, "node_key", node_key)
            if node is not None and node.machine_key == machine and not node_is_expired(node):
                await self._register_reply(resp, await self._success(node))
                return
            fresh = self.logins.start(machine, node_key, {}, False)
            await self._register_reply(
                resp, tailcfg.RegisterResponse(AuthURL=self.auth_url(fresh.id))
            )
            return
        await self.logins.wait(reg)
        if reg.rejected:
            self.log.info("interactive login %s was rejected", reg.id)
            await self._register_reply(resp, tailcfg.RegisterResponse(Error=reg.reason))
            return
        if reg.node is None:
            self.logins.forget(reg)
            fresh = self.logins.start(machine, node_key, reg.hostinfo, reg.ephemeral)
            await self._register_reply(
                resp, tailcfg.RegisterResponse(AuthURL=self.auth_url(fresh.id))
            )
            return
        await self._register_reply(resp, await self._success(reg.node))

    def reject_registration(self, reg_id: str) -> None:
        """`homescale auth reject --auth-id ID`: the waiting client is told it was refused."""
        self.logins.reject(self.logins.require(reg_id))

    async def complete_registration(
        self, user: str, reg_id: str, *, expiry: datetime | None = None, method: str = "cli"
    ) -> dict[str, Any]:
        """`homescale nodes register --user U --key ID` (or an OIDC sign-in): create the
        node, release the client."""
        reg = self.logins.require(reg_id)
        if not user:
            raise InvalidInput("--user is required")
        owner = await self.run_db(self.admin.resolve_user, user)
        tags = self._requested_tags(reg, owner.id, owner.name)

        def create() -> NodeRow:
            existing = self.store.node_by("machine_key", reg.machine_key)
            login = Login(
                node_key=reg.node_key,
                hostinfo=reg.hostinfo,
                user_id=None if tags else owner.id,  # tagged: owned by its tags
                tags=tags,
                ephemeral=reg.ephemeral,
                register_method=method,
                expiry=expiry,
            )
            return log_in(self.store, self.config, reg.machine_key, existing, login)

        node = await self.run_db(create)
        self.logins.complete(reg, node)
        self.log.info(
            "node %d (%s) registered interactively for %s", node.id, node.given_name, user
        )
        return await self.run_db(self.admin.node_json, node)

    def _requested_tags(self, reg: PendingRegistration, user_id: int, user: str) -> tuple[str, ...]:
        """The tags the client asked for (`--advertise-tags`), if `user` owns each per the
        policy's tagOwners (as headscale); else the login is refused, and the client and
        the admin are told which tags and why."""
        raw = reg.hostinfo.get("RequestTags") or []
        if not raw:
            return ()
        compiled = self.tailnet.compiled
        try:
            tags = validate_tags([str(t) for t in raw])
        except InvalidInput as e:
            refused, why = [str(t) for t in raw], str(e)
        else:
            refused = [
                t for t in tags if compiled is None or not compiled.user_owns_tag(user_id, t)
            ]
            why = f"{user} does not own {', '.join(refused)} in the policy's tagOwners"
            if not refused:
                return tuple(tags)
        message = f"login refused: the machine asks for tags ({', '.join(refused)}); {why}"
        self.logins.reject(reg, message)
        self.log.info("interactive login %s: %s", reg.id, message)
        raise InvalidInput(message)

    # ------------------------------------------------------------ map

    async def map(self, req: ControlRequest, resp: ControlResponse) -> None:
        mr = self._parse(req, tailcfg.MapRequest)
        machine = str(req.machine_key)
        # The tailnet mirrors the store: map requests (frequent) need no database read.
        node_id = self.tailnet.by_node_key.get(str(mr.NodeKey))
        node = self.tailnet.nodes.get(node_id) if node_id is not None else None
        if node is None:
            quarantined = self.tailnet.quarantine_of(str(mr.NodeKey))
            if quarantined is not None:
                raise _Refusal(
                    403,
                    f"this node's stored record cannot be served ({quarantined.problems[0]}); "
                    f"an administrator of this homescale server can repair it with "
                    f"`homescale doctor --fix`",
                )
            raise _Refusal(404, "unknown node key: register first")
        if node.machine_key != machine:
            raise _Refusal(403, "node key belongs to another machine")
        if mr.Stream:
            await self._stream(node, mr, resp)
            return
        node = await self._store_report(node, mr)
        await resp.send_headers(200, [("content-type", "application/json")])
        if mr.OmitPeers:
            # Lite update: stored and announced above; the client discards the body.
            await resp.end()
            return
        once = MapSessionState(
            node_id=node.id,
            domain=self.config.dns.base_domain,
            disable_logtail=not self.config.logtail_enabled,
        )
        msg = once.next_message(self.tailnet, utcnow())
        if msg is not None:
            await resp.send_data(self.frames.encode(msg))
        await resp.end()

    async def _store_report(self, node: NodeRow, mr: tailcfg.MapRequest) -> NodeRow:
        """Keep what the node reports (endpoints, disco key, hostinfo) and announce changes."""
        values: dict[str, Any] = {}
        disco = str(mr.DiscoKey)
        if not mr.DiscoKey.is_zero() and disco != node.disco_key:
            values["disco_key"] = disco
        if mr.Endpoints is not None and list(mr.Endpoints) != node.endpoints:
            values["endpoints"] = list(mr.Endpoints)
            self._count('headscale_mapresponse_endpoint_updates_total{status="ok"}')
        if mr.Hostinfo is not None:
            hi = mr.Hostinfo.to_json()
            if hi != node.hostinfo:
                values["hostinfo"] = hi
        if not values:
            return node
        return await self.run_db(lambda: self.store.update_node(node.id, **values))

    async def _stream(self, node: NodeRow, mr: tailcfg.MapRequest, resp: ControlResponse) -> None:
        handle = self.tailnet.sessions.open(node.id)
        encoder = self.frames
        # Online before the report is stored: the disco key a joining node reports first
        # then shows it to its peers already online, in one message (not as offline and
        # then a patch to online).
        self.tailnet.apply([NodeOnline(node.id, True)])
        try:
            node = await self._store_report(node, mr)
            await resp.send_headers(200, [("content-type", "application/json")])
            self.log.info("node %d (%s) map stream opened", node.id, node.given_name)
            with trio.CancelScope() as scope:
                handle.cancel_scope = scope
                await self._stream_loop(handle, encoder, resp)
            if handle.last_words is not None:
                with trio.move_on_after(5):
                    await resp.send_data(encoder.encode(handle.last_words))
        finally:
            with trio.CancelScope(shield=True):
                if self.tailnet.sessions.close(handle):
                    now = utcnow()
                    # Offline first: the stored last_seen then changes nothing peers see.
                    self.tailnet.apply([NodeOnline(node.id, False, now)])
                    try:
                        row = await self.run_db(
                            lambda: self.store.update_node(node.id, last_seen=now)
                        )
                        if row.ephemeral:
                            self._start_reaper(node.id)
                    except NotFound:
                        pass
                self.log.info(
                    "node %d map stream closed%s",
                    node.id,
                    f" ({handle.closed_reason})" if handle.closed_reason else "",
                )
                # headscale: "cancelled" when the server ends it, "done" when the client does.
                reason = "cancelled" if handle.closed_reason else "done"
                self._count(f'headscale_mapresponse_ended_total{{reason="{reason}"}}')

    async def _settler(self) -> None:
        took = 0.0
        while True:
            await self._stale.wait()
            self._stale = trio.Event()
            # Not the coalescing tick: that slows to seconds under load, and joining nodes
            # wait for this compile before their first map. A compile is O(nodes): at
            # most a tenth of the time goes to compiling however fast nodes join.
            await trio.sleep(max(SETTLE_DELAY, 9 * took))
            t0 = time.perf_counter()
            self.tailnet.settle()  # guarded inside: a failing compile is logged, not raised
            took = time.perf_counter() - t0
            self._settled.set()
            self._settled = trio.Event()

    async def _broadcaster(self) -> None:
        """One round of every session for the shared change log (SessionRegistry), at
        most one per BROADCAST_PERIOD; under load the rounds run back to back, and what
        changes during one goes out merged in the next. A session whose stream waits is
        sent its message from here (`_deliver`): no task to wake, no writer, a few tens
        of microseconds. The rest are woken. The sessions of a batch read the same range
        of the log (`SessionRegistry.broadcast_batches`).

        (Before, a round began at the coalescing clock's next tick, 0.6 s at 5,000
        streams and slower under load, and woke every stream's task and then its
        writer: the churn at 5,000 nodes had p99 1.9-2.2 s.)"""
        next_round = 0.0
        while True:
            await self._broadcast.wait()
            self._broadcast = trio.Event()
            await trio.sleep_until(next_round)
            next_round = trio.current_time() + BROADCAST_PERIOD
            for batch in self.tailnet.sessions.broadcast_batches(WAKE_BATCH):
                for handle in batch:
                    handle.deliver_or_notify()
                await trio.lowlevel.checkpoint()  # requests and handshakes run in between

    async def _keepalives(self) -> None:
        while True:
            await trio.sleep(KEEPALIVE_SWEEP)
            self.tailnet.sessions.wake_for_keepalives(trio.current_time())

    async def _settled_view(self) -> None:
        """Wait (SETTLE_WAIT at most) for the next compile if nodes moved: a joining
        node's first map then comes from the compile that also placed the nodes joining
        with it."""
        with trio.move_on_after(SETTLE_WAIT):
            while self.tailnet.stale:
                await self._settled.wait()

    async def _stream_loop(
        self, handle: SessionHandle, encoder: MapFrameEncoder, resp: ControlResponse
    ) -> None:
        first = True
        handle.last_sent = trio.current_time()
        handle.quiet_for = KEEPALIVE_BASE + random.uniform(0, KEEPALIVE_JITTER)
        deliver = functools.partial(self._deliver, handle, encoder, resp)
        while True:
            handle.wake = trio.Event()  # before composing: a mark after it wakes us again
            if handle.unsent is not None:
                unsent, handle.unsent = handle.unsent, None
                await resp.send_data(unsent, wait=False)
                del unsent
            if first:
                await self._settled_view()
                # In a reconnect storm the full maps are built a few at a time, so the
                # handshakes of connections still arriving run in between, not behind all.
                async with self.first_maps:
                    frame, paced = self._compose(handle, encoder)
                first = False
            else:
                frame, paced = self._compose(handle, encoder)
            if frame is None and handle.keepalive_due:
                frame, paced = [encoder.keepalive()], True
                self._count('headscale_mapresponse_sent_total{status="ok",type="keepalive"}')
            if frame is not None:
                handle.sent(trio.current_time())
                await resp.send_data(frame, wait=False)
                # Not held while the stream waits: the broadcaster sends most of what
                # follows, so a first map (0.7 MB compressed at 5,000 nodes) stayed
                # referenced here for as long as the stream lived.
                frame = None
                if not paced:
                    await self._idle(handle, deliver, self.clock.next_tick)
            # Woken by a change, or by `_keepalives` after a silence of `quiet_for`.
            await self._idle(handle, deliver, handle.wake.wait)

    @staticmethod
    async def _idle(
        handle: SessionHandle, deliver: Callable[[], bool], wait: Callable[[], Awaitable[None]]
    ) -> None:
        """`wait`, while the broadcaster may send the session's messages (`_deliver`).
        Also during the coalescing tick after a message of the node's own changes: that
        tick is up to COALESCE_MAX, and the shared log's messages would wait for it (at
        1,000 nodes the churn's p99 was 1.0-1.3 s for the nodes that had just moved)."""
        handle.deliver = deliver
        try:
            await wait()
        finally:
            handle.deliver = None

    def _deliver(
        self, handle: SessionHandle, encoder: MapFrameEncoder, resp: ControlResponse
    ) -> bool:
        """Compose and send the session's next message from the caller's task, with all
        it has pending (its task waits): True if done, False to wake the task (a
        keep-alive is due, or the connection cannot take the message at once: the task
        then sends it from `unsent`)."""
        if handle.closed_reason or handle.unsent is not None:
            return False  # what it holds goes first, from its task
        # A failure here (a bug) must not end the broadcaster, which serves every stream:
        # it is logged, and ends that stream alone.
        try:
            frame, _ = self._compose(handle, encoder)
        except Exception:  # its own task composes again, meets it, and ends
            self.log.exception("node %d: composing its message failed", handle.node_id)
            return False
        if frame is None:
            return not handle.keepalive_due
        handle.sent(trio.current_time())
        try:
            sent = resp.send_now(frame)
        except Exception:  # part of it may be queued: the stream cannot go on
            self.log.exception("node %d: sending its message failed", handle.node_id)
            handle.close("sending its message failed")
            return True
        if not sent:
            handle.unsent = frame
        return sent

    def _count(self, name: str) -> None:
        """A counter under headscale's metric names (hscontrol/metrics.go), which its
        dashboards graph."""
        if self.metrics is not None:
            self.metrics.inc(name)

    def _compose(
        self, handle: SessionHandle, encoder: MapFrameEncoder
    ) -> tuple[list[bytes] | None, bool]:
        """The session's next message, framed (in parts: a big first map's pieces are
        shared, not copied), None when its client is up to date; and whether it held only
        the shared log's changes, which the broadcaster already paces to one round a tick."""
        log = self.tailnet.sessions.catch_up(handle)
        msg = handle.state.next_message(self.tailnet, utcnow(), log)
        if msg is None:
            return None, log is not None
        frame = encoder.encode_parts(msg)
        if self.log.isEnabledFor(logging.DEBUG):
            self.log.debug(
                "node %d <- %d bytes: %s", handle.node_id, len(msg), message_json(msg).decode()
            )
        return frame, log is not None

    async def _reap_ephemeral(self, node_id: int) -> None:
        """Delete an ephemeral node once it has been offline for the inactivity timeout.

        Never while online; a node that comes back and leaves again is measured from
        its new last_seen (the reaper started at that disconnect does the work).
        """
        timeout = self.config.ephemeral_inactivity_timeout
        while True:
            row = self.tailnet.nodes.get(node_id)
            if row is None or node_id in self.tailnet.online or not row.ephemeral:
                return
            due = (row.last_seen or row.created_at or utcnow()) + timeout
            wait = (due - utcnow()).total_seconds()
            if wait <= 0:
                break
            await trio.sleep(wait)
        try:
            await self.run_db(self.store.delete_node, node_id)
        except NotFound:
            return
        self.log.info("ephemeral node %d deleted after %s offline", node_id, timeout)

    def reap_offline_ephemeral(self) -> None:
        """At start: ephemeral nodes left offline by a previous run get their reapers."""
        for node_id, row in list(self.tailnet.nodes.items()):
            if row.ephemeral and node_id not in self.tailnet.online:
                self._start_reaper(node_id)

    def _start_reaper(self, node_id: int) -> None:
        # A failing reaper (a bug, a database error) ends only itself, logged with its node.
        self.nursery.start_soon(
            self.boundary.run, "ephemeral reaper", f"node {node_id}", self._reap_ephemeral, node_id
        )


_SSH_ACTION_PATH = re.compile(r"/machine/ssh/action/([0-9]{1,18})/to/([0-9]{1,18})")


class CoalescingClock:
    """The tick every map stream waits for after sending: one timer for all streams.

    A timer per stream per message put trio's deadline and cancellation machinery at a
    fifth of the server's CPU with 1,000 streams; waking the waiters of an event is
    cheap. The waiters are spread over one event per WAKE_BATCH streams, set one per
    scheduler pass. The clock only runs while a stream waits (an idle server has no timer).
    """

    def __init__(
        self,
        streams: Callable[[], int],
        cpu: Callable[[], float] = time.process_time,
        machine: Callable[[], float | None] | None = None,
    ) -> None:
        self._streams = streams
        self._cpu = cpu
        self._machine = machine if machine is not None else MachineLoad().busy
        self._ticks = [trio.Event()]  # waiters are spread over these, woken a batch per pass
        self._turn = 0
        self._waiting = 0
        self._someone_waits = trio.Event()
        self._interval = COALESCE_BASE

    def floor(self) -> float:
        return min(COALESCE_MAX, COALESCE_BASE + self._streams() * COALESCE_PER_STREAM)

    def interval(self) -> float:
        return max(self._interval, self.floor())

    def adapt(self, busy: float) -> None:
        """`busy`: CPU seconds per wall second over the last tick (1.0: one core saturated)."""
        if busy > BUSY_HIGH:
            self._interval = min(COALESCE_MAX, self.interval() * 1.5)
        elif busy < BUSY_LOW:
            self._interval = self.floor()  # the load is gone: quick again at once

    async def next_tick(self) -> None:
        self._waiting += 1
        self._someone_waits.set()
        self._turn += 1
        try:
            await self._ticks[self._turn % len(self._ticks)].wait()
        finally:
            self._waiting -= 1

    async def run(self) -> None:
        while True:
            if not self._waiting:
                self._someone_waits = trio.Event()
                await self._someone_waits.wait()
            cpu0, t0 = self._cpu(), trio.current_time()
            machine = machine_time = 0.0
            # The load is looked at every COALESCE_BASE, not once a tick: a tick slowed
            # to seconds by a busy spell comes as soon as the spell is over.
            while (left := t0 + self.interval() - trio.current_time()) > 0:
                cpu, t = self._cpu(), trio.current_time()
                await trio.sleep(min(left, COALESCE_BASE))
                step = max(trio.current_time() - t, 1e-3)
                # The box's CPUs too: a server on a saturated small box (its clients, a
                # load generator, other services) sends fewer, larger messages as well.
                box = self._machine()
                if box is not None:
                    machine, machine_time = machine + box * step, machine_time + step
                if max((self._cpu() - cpu) / step, box or 0.0) < BUSY_LOW:
                    self._interval = self.floor()
            ticks = self._ticks
            self._ticks = [trio.Event() for _ in range(max(1, -(-self._streams() // WAKE_BATCH)))]
            for tick in ticks:
                tick.set()
                await trio.lowlevel.checkpoint()  # the next batch wakes in the next pass
            own = (self._cpu() - cpu0) / max(trio.current_time() - t0, 1e-3)
            self.adapt(max(own, machine / machine_time if machine_time else 0.0))


class MachineLoad:
    """How busy all of the machine's CPUs were since the last call (Linux /proc/stat);
    None where that is not known."""

    def __init__(self, path: str = "/proc/stat") -> None:
        self._path = path
        self._last: tuple[int, int] | None = None

    def busy(self) -> float | None:
        try:
            with open(self._path) as f:
                cpu = f.readline().split()
            ticks = [int(v) for v in cpu[1:9]]
        except (OSError, ValueError):
            return None  # unreadable or not Linux's format: the process's own CPU decides
        if not cpu or cpu[0] != "cpu" or len(ticks) < 4:
            return None
        idle, total = ticks[3] + (ticks[4] if len(ticks) > 4 else 0), sum(ticks)
        last, self._last = self._last, (idle, total)
        if last is None or total <= last[1]:
            return None
        return 1.0 - (idle - last[0]) / (total - last[1])


class _Refusal(HomescaleError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
