"""``make bench-scale N=...``: a real ``homescale serve`` under N simulated nodes.

Starts the server (info logging, policy in the database, allow-all), splits the N
nodes over worker processes (tests/loadgen/worker.py) and runs the phases, each
bounded, printing one line per phase:

- register: every node registers with one reusable key and opens its map stream
  (``--concurrency`` at a time per worker); per-node time to its first map.
- churn: ``--rate`` lite endpoint updates per second for ``--seconds``; latency
  from each change to each peer seeing it, and how many peers' final views lack
  a node's last endpoint (lost), read at every ``--measure-every``-th node (every
  node receives everything; the others only count their messages, so the load
  generator does not take the CPU the server shares).
- policy-edit: a policy that changes every node's filter, PUT over the REST API;
  time until each node has its new PacketFilter.
- storm: every node hangs up at once, then all reconnect at once; time to each
  node's first full map, and its Noise handshake time.
- idle: ``--idle`` seconds with nothing but keep-alives.

Each line also has the server's CPU in the phase (/proc/PID/stat, all threads),
its RSS at the end, and the load generator's own CPU (workers + this process).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import trio

from tests.loadgen.fleet import hist_percentiles, now, percentiles
from tests.loadgen.worker import raise_fd_limit

TICKS = os.sysconf("SC_CLK_TCK")
POLICY_EDIT = {  # every node's filter gains a rule: one new PacketFilter each
    "acls": [
        {"action": "accept", "src": ["*"], "dst": ["*:*"]},
        {"action": "accept", "proto": "udp", "src": ["*"], "dst": ["*:53"]},
    ]
}


# Receivers whose deliveries a churn reads by default: a p99 over 500 receivers x every
# change is millions of deliveries.
MEASURED_NODES = 500


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return math.nan


class Worker:
    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self._buf = b""

    async def _line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while b"\n" not in self._buf:
            chunk = await self.proc.stdout.receive_some(1 << 20)
            if not chunk:
                raise RuntimeError(f"load-generator worker {self.proc.pid} exited")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        out: dict[str, Any] = json.loads(line)
        return out

    async def ready(self) -> None:
        await self._line()

    async def call(self, cmd: str, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        await self.proc.stdin.send_all((json.dumps({"cmd": cmd, **args}) + "\n").encode())
        return await self._line()


class Bench:
    def __init__(self, args: argparse.Namespace, server: Any, workers: list[Worker]) -> None:
        self.args = args
        self.server = server
        self.workers = workers
        self.pid = server.proc.pid

    def gen_cpu(self) -> float:
        return sum(cpu_seconds(w.proc.pid) for w in self.workers) + cpu_seconds(os.getpid())

    async def all(self, cmd: str, **args: Any) -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = [{} for _ in self.workers]

        async def one(i: int) -> None:
            results[i] = await self.workers[i].call(cmd, **args)

        async with trio.open_nursery() as nursery:
            for i in range(len(self.workers)):
                nursery.start_soon(one, i)
        return results

    def line(self, phase: str, wall: float, cpu0: tuple[float, float], text: str) -> None:
        server_cpu = cpu_seconds(self.pid) - cpu0[0]
        gen = self.gen_cpu() - cpu0[1]
        print(
            f"{phase:<12} N={self.args.n:<5} {text}  | wall {wall:.1f} s, server CPU "
            f"{server_cpu:.1f} s ({100 * server_cpu / max(wall, 1e-9):.0f}%), server RSS "
            f"{rss_mb(self.pid):.0f} MB, loadgen CPU {gen:.1f} s",
            flush=True,
        )

    def mark(self) -> tuple[float, tuple[float, float]]:
        return now(), (cpu_seconds(self.pid), self.gen_cpu())

    async def register(self, key: str) -> None:
        t0, cpu = self.mark()
        res = await self.all("register", auth_key=key, concurrency=self.args.concurrency)
        wall = now() - t0
        first = [x for r in res for x in r["first_map_s"]]
        reg = [x for r in res for x in r["register_s"]]
        missing = sum(r["missing"] for r in res)
        msgs = sum(r["messages"] for r in res)
        self.line(
            "register",
            wall,
            cpu,
            f"{len(first) / wall:.1f} nodes/s, {msgs} map messages delivered, server CPU per join "
            f"{1000 * (cpu_seconds(self.pid) - cpu[0]) / max(len(first), 1):.0f} ms; register {_ms(reg)}; first map since the start {_ms(first)}"
            + _missing(missing, res),
        )

    async def churn(self) -> None:
        a = self.args
        t0, cpu = self.mark()
        res = await self.all(
            "churn", t0=t0 + 1.0, rate=a.rate, total=a.n, duration=a.seconds, grace=a.grace
        )
        wall = now() - t0
        hist: dict[int, int] = {}
        for r in res:
            for ms, c in r["hist_ms"].items():
                hist[int(ms)] = hist.get(int(ms), 0) + c
        p50, p99, count = hist_percentiles(hist)
        mx = max(r["max_s"] for r in res)
        lost = sum(r["lost"] for r in res)
        failed = sum(r["failed"] for r in res)
        lag = max(r["sender_lag_s"] for r in res)
        answered = [x for r in res for x in r["answered_s"]]
        self.line(
            "churn",
            wall,
            cpu,
            f"{a.rate:g} changes/s x {a.seconds:g} s, change->peer p50 {p50 * 1000:.0f} / "
            f"p99 {p99 * 1000:.0f} / max {mx * 1000:.0f} ms over {count} deliveries "
            f"(read at 1 node in {a.measure_every}); "
            f"lost {lost}, failed updates {failed}, sender lag {lag * 1000:.0f} ms; "
            f"update stored and answered {_ms(answered)}",
        )

    async def policy_edit(self, api_key: str) -> None:
        a = self.args
        await self.all("arm_policy")
        t0, cpu = self.mark()
        body = json.dumps({"policy": json.dumps(POLICY_EDIT)}).encode()
        req = urllib.request.Request(
            f"{self.server.url}/api/v1/policy",
            data=body,
            method="PUT",
            headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"},
        )

        def put() -> None:
            with urllib.request.urlopen(req, timeout=60) as r:
                r.read()

        await trio.to_thread.run_sync(put)
        res = await self.all("policy_seen", deadline=t0 + a.phase_timeout)
        wall = now() - t0
        seen = [x - t0 for r in res for x in r["seen_at"]]
        self.line(
            "policy-edit",
            wall,
            cpu,
            f"new filter at every node {_ms(seen)}" + _missing(a.n - len(seen), []),
        )

    async def storm(self) -> None:
        t0, cpu = self.mark()
        before = sum(r["messages"] for r in await self.all("messages"))
        await self.all("drop")
        # Let the server see every hang-up (offline deltas) before all return.
        await trio.sleep(2.0)
        t1 = now()
        res = await self.all("reconnect", t0=t1)
        wall = now() - t0
        first = [x for r in res for x in r["first_map_s"]]
        hs = [x for r in res for x in r["handshake_s"]]
        missing = sum(r["missing"] for r in res)
        msgs = sum(r["messages"] for r in res) - before
        self.line(
            "storm",
            wall,
            cpu,
            f"all back with full maps in {max(first, default=math.nan):.1f} s, {msgs} map "
            f"messages delivered; first map "
            f"{_ms(first)}; handshake {_ms(hs)}" + _missing(missing, res),
        )

    async def idle(self) -> None:
        t0, cpu = self.mark()
        await trio.sleep(self.args.idle)
        self.line("idle", now() - t0, cpu, f"{self.args.idle:g} s of keep-alives only")


def _ms(values: list[float]) -> str:
    p50, p99, mx = percentiles(values)
    return f"p50 {p50 * 1000:.0f} / p99 {p99 * 1000:.0f} / max {mx * 1000:.0f} ms"


def _missing(n: int, res: list[dict[str, Any]]) -> str:
    if not n:
        return ""
    errors = [e for r in res for e in r.get("errors", [])][:3]
    return f"; MISSING {n} {errors}"


async def run(args: argparse.Namespace) -> None:
    from tests.realclient import HomescaleServer

    raise_fd_limit()
    with tempfile.TemporaryDirectory(prefix="homescale-scale-") as tmp:
        server = HomescaleServer(Path(tmp), log_level="info")
        text = server.config.read_text()
        server.config.write_text(text.replace("  mode: file\n", "  mode: database\n", 1))
        server.start()
        try:
            server.cli("users", "create", "bench")
            key = server.create_key("bench", "--reusable")
            api_key = server.cli("apikeys", "create").stdout.strip().splitlines()[-1]
            per = math.ceil(args.n / args.workers)
            procs: list[trio.Process] = []
            async with trio.open_nursery() as nursery:
                for i in range(args.workers):
                    first, count = i * per, min(per, args.n - i * per)
                    if count <= 0:
                        break
                    cmd = [sys.executable, "-m", "tests.loadgen.worker", "--port"]
                    cmd += [str(server.port), "--first", str(first), "--count", str(count)]
                    cmd += ["--measure-every", str(args.measure_every)]
                    procs.append(
                        await nursery.start(
                            partial(
                                trio.run_process,
                                cmd,
                                stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE,
                            )
                        )
                    )
                workers = [Worker(p) for p in procs]
                for worker in workers:
                    await worker.ready()
                bench = Bench(args, server, workers)
                print(
                    f"# homescale bench-scale: N={args.n}, {len(workers)} worker processes, "
                    f"server pid {bench.pid}; {os.cpu_count()} CPUs (shared with the load "
                    f"generator)",
                    flush=True,
                )
                await bench.register(key)
                phases: dict[str, Callable[[], Awaitable[None]]] = {
                    "churn": bench.churn,
                    "policy-edit": partial(bench.policy_edit, api_key),
                    "storm": bench.storm,
                    "idle": bench.idle,
                }
                for name, phase in phases.items():
                    if name in args.phases:
                        await phase()
                for p in procs:
                    assert p.stdin is not None
                    await p.stdin.aclose()
        finally:
            server.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("-n", "--n", type=int, default=200, help="simulated nodes (default 200)")
    p.add_argument("--workers", type=int, default=4, help="worker processes")
    p.add_argument("--concurrency", type=int, default=8, help="registrations at once per worker")
    p.add_argument("--rate", type=float, default=20, help="churn: endpoint changes per second")
    p.add_argument("--seconds", type=float, default=10, help="churn: duration")
    p.add_argument("--grace", type=float, default=5, help="churn: wait for the last changes")
    p.add_argument("--idle", type=float, default=10, help="idle phase seconds")
    p.add_argument(
        "--phases",
        type=lambda s: s.split(","),
        default=["churn", "policy-edit", "storm", "idle"],
        help="phases after register (default: churn,policy-edit,storm,idle)",
    )
    p.add_argument("--phase-timeout", type=float, default=120, help="bound for waiting phases")
    p.add_argument(
        "--measure-every",
        type=int,
        default=0,
        help=f"churn: read deliveries at every K-th node (default: enough for "
        f"{MEASURED_NODES} measured nodes)",
    )
    args = p.parse_args()
    if args.measure_every <= 0:
        args.measure_every = max(1, math.ceil(args.n / MEASURED_NODES))
    trio.run(run, args)


if __name__ == "__main__":
    main()
