"""``make bench``: performance figures, printed (never asserted).

Each benchmark is an async function returning a list of ``Figure`` rows and
is listed in ``BENCHMARKS``; add new ones there. Everything runs on loopback
(127.0.0.1) for a few seconds at most.

The relay benchmark runs the server in a child process (so the server has its
own interpreter, as in production) and measures, in the same run, a bare
trio TLS byte forwarder doing the same job, so the ratio shows our overhead.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio
from nacl.public import PrivateKey

from derp.client import DerpClient
from derp.codec import FrameBuffer, RecvPacket
from derp.server import DerpServer

PACKET = 1280  # a full-size WireGuard packet on a 1280-MTU tailnet
PAIRS = 2
THROUGHPUT_SECONDS = 3.0
LATENCY_SAMPLES = 2000
IDLE_CONNECTIONS = 1000


@dataclass
class Figure:
    name: str
    value: float
    unit: str


# ---------------------------------------------------------------- child servers


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 8192)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _tls_files(directory: Path) -> tuple[Path, Path]:
    from appliance.tlscerts import make_server_cert

    cert, key = make_server_cert(["127.0.0.1", "localhost"])
    (directory / "server.pem").write_bytes(cert)
    (directory / "server.key").write_bytes(key)
    return directory / "server.pem", directory / "server.key"


async def _serve_child(kind: str, certdir: Path) -> None:
    from tests.derp.derp_harness import serve_loopback

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certdir / "server.pem", certdir / "server.key")
    async with trio.open_nursery() as nursery:
        if kind == "derp":
            server = DerpServer(bytes(PrivateKey.generate()), logger=logging.getLogger("bench"))
            port = await serve_loopback(nursery, server.handle_upgrade, ssl_context=ctx)
        else:
            port = await _serve_bare(nursery, ctx)
        print(port, flush=True)
        # Run until the parent closes our stdin.
        await trio.to_thread.run_sync(sys.stdin.read)
        nursery.cancel_scope.cancel()


async def _serve_bare(nursery: trio.Nursery, ctx: ssl.SSLContext) -> int:
    """The baseline: TLS in, 9-byte hello (pair id + role), bytes piped to the partner."""
    receivers: dict[bytes, trio.abc.Stream] = {}
    arrived: dict[bytes, trio.Event] = {}

    async def on_conn(raw: trio.SocketStream) -> None:
        stream = trio.SSLStream(raw, ctx, server_side=True)
        try:
            head = b""
            while len(head) < 9:
                chunk = await stream.receive_some(9 - len(head))
                if not chunk:
                    return
                head += chunk
            pair, role = head[:8], head[8]
            event = arrived.setdefault(pair, trio.Event())
            if role == 1:  # receiver: park until it hangs up
                receivers[pair] = stream
                event.set()
                while await stream.receive_some():
                    pass
                return
            await event.wait()
            dst = receivers[pair]
            while data := await stream.receive_some(65536):
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # a partner hung up: the pair is over
        finally:
            await trio.aclose_forcefully(stream)

    listeners = await nursery.start(partial(trio.serve_tcp, on_conn, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1]


class _Child:
    def __init__(self, kind: str, certdir: Path) -> None:
        self.kind, self.certdir = kind, certdir

    async def __aenter__(self) -> _Child:
        self.proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "tests.bench", "--serve", self.kind, str(self.certdir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        line = b""
        with trio.fail_after(30):
            while not line.endswith(b"\n"):
                chunk = await self.proc.stdout.receive_some(64)
                if not chunk:
                    raise RuntimeError(f"bench {self.kind} server exited early")
                line += chunk
        self.port = int(line)
        return self

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    async def __aexit__(self, *exc: object) -> None:
        assert self.proc.stdin is not None
        await self.proc.stdin.aclose()  # the child exits when its stdin closes
        with trio.move_on_after(10):
            await self.proc.wait()
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


# ---------------------------------------------------------------- clients


def _client_ctx(certdir: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certdir / "server.pem"))


async def _tls(port: int, certdir: Path) -> trio.SSLStream[trio.SocketStream]:
    raw = await trio.open_tcp_stream("127.0.0.1", port)
    s = trio.SSLStream(raw, _client_ctx(certdir), server_hostname="127.0.0.1")
    await s.do_handshake()
    return s


class _Pair(ABC):
    """A sender and a receiver, DERP or bare, with the same send/receive surface."""

    @abstractmethod
    def frame(self, payload: bytes) -> bytes:
        """The bytes `send` must write so that `receive` yields `payload`."""

    @abstractmethod
    async def send(self, data: bytes) -> None: ...

    @abstractmethod
    async def receive(self) -> list[bytes]: ...

    @abstractmethod
    async def aclose(self) -> None: ...


class _DerpPair(_Pair):
    def __init__(self, a: DerpClient, b: DerpClient) -> None:
        self.a = a  # sends
        self.b = b  # receives
        self.dst = b.public_key

    @classmethod
    async def open(cls, port: int, certdir: Path) -> _DerpPair:
        a = await DerpClient.connect(
            await _tls(port, certdir), bytes(PrivateKey.generate()), host="127.0.0.1"
        )
        b = await DerpClient.connect(
            await _tls(port, certdir), bytes(PrivateKey.generate()), host="127.0.0.1"
        )
        return cls(a, b)

    def frame(self, payload: bytes) -> bytes:
        return self.a.conn.send_packet(self.dst, payload)

    async def send(self, data: bytes) -> None:
        await self.a.stream.send_all(data)

    async def receive(self) -> list[bytes]:
        ev = await self.b.recv()
        out = [ev.data] if isinstance(ev, RecvPacket) else []
        out += [e.data for e in self.b.pending() if isinstance(e, RecvPacket)]
        return out

    async def aclose(self) -> None:
        await self.a.aclose()
        await self.b.aclose()


class _BarePair(_Pair):
    def __init__(
        self, a: trio.SSLStream[trio.SocketStream], b: trio.SSLStream[trio.SocketStream]
    ) -> None:
        self.a = a  # sends
        self.b = b  # receives
        self.frames = FrameBuffer()
        # Same framing as DERP, so both sides parse the same bytes.
        self.dst = bytes(32)

    @classmethod
    async def open(cls, port: int, certdir: Path) -> _BarePair:
        pair = os.urandom(8)
        b = await _tls(port, certdir)
        await b.send_all(pair + b"\x01")
        a = await _tls(port, certdir)
        await a.send_all(pair + b"\x00")
        return cls(a, b)

    def frame(self, payload: bytes) -> bytes:
        return len(self.dst + payload).to_bytes(5, "big") + self.dst + payload

    async def send(self, data: bytes) -> None:
        await self.a.send_all(data)

    async def receive(self) -> list[bytes]:
        out: list[bytes] = []
        while not out:
            data = await self.b.receive_some(65536)
            if not data:
                raise trio.EndOfChannel
            self.frames.feed(bytes(data))  # bytes(b) is b itself: no copy
            while (f := self.frames.next_frame(1 << 20)) is not None:
                out.append(f[1][32:])
        return out

    async def aclose(self) -> None:
        await self.a.aclose()
        await self.b.aclose()


OpenPair = Callable[[int, Path], Awaitable[_Pair]]


async def _throughput(open_pair: OpenPair, port: int, certdir: Path) -> tuple[float, float]:
    pairs = [await open_pair(port, certdir) for _ in range(PAIRS)]
    received = 0
    batch = 16
    done = trio.Event()

    async def sender(p: _Pair) -> None:
        burst = b"".join(p.frame(b"x" * PACKET) for _ in range(batch))
        while not done.is_set():
            await p.send(burst)

    async def receiver(p: _Pair) -> None:
        nonlocal received
        while True:
            received += len(await p.receive())

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for p in pairs:
            nursery.start_soon(sender, p)
            nursery.start_soon(receiver, p)
        await trio.sleep(THROUGHPUT_SECONDS)
        done.set()
        counted = received
        elapsed = time.perf_counter() - start
        nursery.cancel_scope.cancel()
    for p in pairs:
        await p.aclose()
    pps = counted / elapsed
    return pps, pps * PACKET / 1e6


async def _latency(open_pair: OpenPair, port: int, certdir: Path) -> tuple[float, float]:
    p = await open_pair(port, certdir)
    samples = []
    for _ in range(LATENCY_SAMPLES):
        t0 = time.perf_counter()
        await p.send(p.frame(b"l" * PACKET))
        got = 0
        while got < 1:
            got += len(await p.receive())
        samples.append((time.perf_counter() - t0) * 1e6)
    await p.aclose()
    q = statistics.quantiles(samples, n=100)
    return q[49], q[98]


async def _idle_rss(kind: str, certdir: Path) -> float:
    async with _Child(kind, certdir) as child:
        await trio.sleep(0.2)
        before = child.rss_kib()
        streams: list[DerpClient | trio.SSLStream[trio.SocketStream]] = []
        for i in range(IDLE_CONNECTIONS):
            if kind == "derp":
                s = await _tls(child.port, certdir)
                streams.append(
                    await DerpClient.connect(s, bytes(PrivateKey.generate()), host="127.0.0.1")
                )
            else:
                s = await _tls(child.port, certdir)
                await s.send_all(i.to_bytes(8, "big") + b"\x01")
                streams.append(s)
        await trio.sleep(0.5)
        after = child.rss_kib()
        for conn in streams:
            await trio.aclose_forcefully(conn.stream if isinstance(conn, DerpClient) else conn)
    return (after - before) / IDLE_CONNECTIONS


async def bench_derp_relay() -> list[Figure]:
    """DERP relay vs a bare TLS byte forwarder: rate, latency, idle memory."""
    _raise_fd_limit()
    figures: list[Figure] = []
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        certdir = Path(tmp)
        _tls_files(certdir)
        for kind, opener in (("derp", _DerpPair.open), ("bare", _BarePair.open)):
            async with _Child(kind, certdir) as child:
                pps, mbs = await _throughput(opener, child.port, certdir)
                p50, p99 = await _latency(opener, child.port, certdir)
            rss = await _idle_rss(kind, certdir)
            results[kind] = {"pps": pps, "mbs": mbs, "p50": p50, "p99": p99, "rss": rss}
            label = "DERP relay" if kind == "derp" else "bare forwarder"
            figures += [
                Figure(f"{label}: packets/s ({PAIRS} pairs, {PACKET} B, TLS)", pps, "pkt/s"),
                Figure(f"{label}: throughput", mbs, "MB/s"),
                Figure(f"{label}: relay latency p50", p50, "us"),
                Figure(f"{label}: relay latency p99", p99, "us"),
                Figure(f"{label}: RSS per idle connection ({IDLE_CONNECTIONS})", rss, "KiB"),
            ]
    d, b = results["derp"], results["bare"]
    figures += [
        Figure("ratio DERP/bare packets/s (aim >= 0.5)", d["pps"] / b["pps"], "x"),
        Figure("ratio DERP/bare latency p50", d["p50"] / b["p50"], "x"),
        Figure("ratio DERP/bare RSS per idle connection", d["rss"] / max(b["rss"], 0.001), "x"),
    ]
    return figures


def _more_benchmarks() -> list[Callable[[], Awaitable[list[Figure]]]]:
    from tests.bench_migrate import bench_migrate_headscale
    from tests.bench_netmap import bench_netmap_deltas
    from tests.bench_policy import bench_policy_propagation

    return [bench_netmap_deltas, bench_policy_propagation, bench_migrate_headscale]


BENCHMARKS: list[Callable[[], Awaitable[list[Figure]]]] = [bench_derp_relay, *_more_benchmarks()]


async def _run_all() -> None:
    for bench in BENCHMARKS:
        print(f"== {bench.__name__}: {(bench.__doc__ or '').strip().splitlines()[0]}", flush=True)
        for f in await bench():
            print(f"  {f.name:<60} {f.value:>12.2f} {f.unit}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench")
    parser.add_argument("--serve", choices=["derp", "bare"], help=argparse.SUPPRESS)
    parser.add_argument("certdir", nargs="?", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        _raise_fd_limit()
        trio.run(_serve_child, args.serve, args.certdir)
    else:
        trio.run(_run_all)


if __name__ == "__main__":
    main()
