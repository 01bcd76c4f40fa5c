"""A load-generator worker process: one Fleet, driven by JSON lines on stdin.

Each command is one line ``{"cmd": ..., ...}``; the answer is one JSON line on
stdout. The worker exits when stdin closes (the orchestrator is gone).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
from typing import Any

import trio

from appliance.serve import GC_THRESHOLDS
from tests.loadgen.fleet import Churn, Fleet, fetch_server_key, now


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _lines(stream: trio.abc.ReceiveStream) -> Any:
    buf = b""
    while True:
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield json.loads(line)
        chunk = await stream.receive_some(65536)
        if not chunk:
            return
        buf += chunk


async def serve(args: argparse.Namespace) -> None:
    key = await fetch_server_key(args.host, args.port)
    fleet = Fleet(
        args.host,
        args.port,
        key,
        first_index=args.first,
        count=args.count,
        measure_every=args.measure_every,
    )
    out = sys.stdout

    def reply(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    async with trio.open_nursery() as nursery:
        await nursery.start(fleet.run)
        reply({"ready": True})
        async for cmd in _lines(trio.lowlevel.FdStream(os.dup(0))):
            c = cmd["cmd"]
            if c == "register":
                reply(await fleet.register(cmd["auth_key"], concurrency=cmd["concurrency"]))
                # As the server does (appliance.serve._tune_gc): the registered nodes live to
                # the end, and rescanning them in full collections paused this loop for
                # hundreds of milliseconds, late senders and late reads counted as latency.
                gc.freeze()
            elif c == "churn":
                churn = Churn(t0=cmd["t0"], rate=cmd["rate"], total=cmd["total"])
                reply(await fleet.churn_phase(churn, cmd["duration"], cmd["grace"]))
            elif c == "arm_policy":
                fleet.arm_policy()
                reply({})
            elif c == "policy_seen":
                reply({"seen_at": await fleet.policy_seen(cmd["deadline"])})
            elif c == "drop":
                await fleet.drop()
                reply({})
            elif c == "reconnect":
                reply(await fleet.reconnect(cmd["t0"]))
            elif c == "messages":
                reply({"messages": fleet.messages()})
            elif c == "now":
                reply({"now": now()})
            else:
                reply({"error": f"unknown command {c!r}"})
        nursery.cancel_scope.cancel()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--first", type=int, required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--measure-every", type=int, default=1)
    args = p.parse_args()
    raise_fd_limit()
    gc.set_threshold(*GC_THRESHOLDS)
    trio.run(serve, args)


if __name__ == "__main__":
    main()
