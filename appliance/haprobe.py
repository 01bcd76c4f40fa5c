"""HA subnet router health probes (headscale's HAHealthProber).

Routers that share a subnet route are pinged every `node.routes.ha.probe_interval`
with a tailcfg.PingRequest in their map stream; the client answers with `HEAD
<server_url>/machine/ping-response?id=<id>` (controlclient answerHeadPing). One that
stays connected but does not answer within `probe_timeout` is marked unhealthy and
its routes move to the next router: a hung primary fails over, not only a
disconnected one. The unguessable ID is the answer's only credential.
"""

from __future__ import annotations

import logging
import secrets

import trio

from .httpserver import Request, Response
from .sessions import SessionHandle
from .tailnet import Tailnet

MAX_WAITING = 10_000  # pings outstanding at once (bounded by the HA routers probed)


class HAProber:
    def __init__(
        self,
        tailnet: Tailnet,
        server_url: str,
        interval: float,
        timeout: float,
        log: logging.Logger,
    ) -> None:
        self.tailnet = tailnet
        self.server_url = server_url.rstrip("/")
        self.interval = interval
        self.timeout = timeout
        self.log = log
        self.waiting: dict[str, trio.Event] = {}

    async def ping_response(self, req: Request) -> Response:
        """`HEAD /machine/ping-response?id=ID`: a client answers a probe."""
        if req.method != "HEAD":
            return Response.text("method not allowed; use HEAD\n", 405)
        ping_id = req.arg("id")
        if not ping_id:
            return Response.text("missing ping ID\n", 400)
        event = self.waiting.pop(ping_id, None)
        if event is None:
            return Response.text("unknown or expired ping\n", 404)
        event.set()
        return Response(200)

    async def run(self) -> None:
        """Probe every interval until cancelled."""
        self.log.info(
            "HA subnet router probes every %gs (timeout %gs)", self.interval, self.timeout
        )
        while True:
            await trio.sleep(self.interval)
            await self.probe_once()

    async def probe_once(self) -> None:
        async with trio.open_nursery() as nursery:
            for node_id in sorted(self.tailnet.ha_routers()):
                nursery.start_soon(self._probe, node_id)

    async def ping(self, node_id: int) -> tuple[float | None, SessionHandle | None]:
        """Ping a connected node: (seconds it took to answer, None: no answer within the
        timeout; the session pinged, None: not connected)."""
        if len(self.waiting) >= MAX_WAITING:
            return None, None
        ping_id = secrets.token_urlsafe(24)
        answered = self.waiting[ping_id] = trio.Event()
        url = f"{self.server_url}/machine/ping-response?id={ping_id}"
        start = trio.current_time()
        session = self.tailnet.send_ping(node_id, {"URL": url})
        if session is None:
            self.waiting.pop(ping_id, None)
            return None, None
        with trio.move_on_after(self.timeout):
            await answered.wait()
        self.waiting.pop(ping_id, None)
        return (trio.current_time() - start if answered.is_set() else None), session

    async def _probe(self, node_id: int) -> None:
        latency, session = await self.ping(node_id)
        if session is None:
            return
        if latency is not None:
            self.tailnet.set_router_health(node_id, True)
            return
        if self.tailnet.sessions.get(node_id) is not session:
            return  # it disconnected or reconnected meanwhile: that decides, not the probe
        self.log.warning(
            "HA probe: router %d is connected but did not answer within %gs; its routes "
            "move to another router",
            node_id,
            self.timeout,
        )
        self.tailnet.set_router_health(node_id, False)
