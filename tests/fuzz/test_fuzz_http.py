"""Fuzz target: the HTTP/1 front end (appliance/httpserver.py), as anyone may reach it.

One connection per example, in memory (trio.testing streams, a MockClock that
jumps over every timeout): the bytes go in, the client side closes, and
whatever the server answers is read until it hangs up.

Property: `handle_connection` returns (nothing escapes its boundary), nothing
it did was an internal error (the boundary's counter of bugs stays at zero and
no 500 goes out), and every byte it sent parses as HTTP/1.1 responses.
"""

from __future__ import annotations

import logging
import re

import trio
import trio.testing
from hypothesis import strategies as st

from appliance.boundary import Boundary
from appliance.httpserver import HttpServer, Request, Response, Upgrade
from appliance.metrics import Metrics
from tests.fuzz.harness import fuzz_tests
from tests.fuzz.strategies import HOSTILE_STRINGS, mutated

LOG = logging.getLogger("fuzz.http")
LOG.setLevel(logging.CRITICAL)  # the boundary logs every refusal; the counters are checked


async def echo(req: Request) -> Response:
    return Response(200, req.body, [("Content-Type", "application/octet-stream")])


async def query(req: Request) -> Response:
    return Response.json({"v": req.arg("v"), "headers": len(req.headers)})


async def upgraded(up: Upgrade) -> None:
    """An upgrade route that takes the raw stream, as /ts2021 and /derp do."""
    with trio.move_on_after(1):
        await up.stream.receive_some(1024)
    await up.stream.send_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\nbye")


async def exchange(data: bytes, metrics: Metrics) -> bytes:
    server = HttpServer(
        routes={"/echo": echo, "/q": query, "/prefix/": echo},
        upgrades={"/up": upgraded},
        logger=LOG,
        boundary=Boundary(LOG, metrics),
    )
    client, server_end = trio.testing.memory_stream_pair()
    out = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle_connection, server_end)
        try:
            await client.send_all(data)
        except trio.BrokenResourceError:
            pass
        await client.send_stream.aclose()
        while True:
            try:
                chunk = await client.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                break
            if not chunk:
                break
            out += chunk
    return bytes(out)


def check(data: bytes) -> None:
    metrics = Metrics()
    reply = trio.run(exchange, data, metrics, clock=trio.testing.MockClock(autojump_threshold=0))
    internal = {k: v for k, v in metrics.counters.items() if 'cause="internal"' in k}
    assert not internal, internal
    for status in responses(reply):
        assert status != 500, reply[:300]


_STATUS_LINE = re.compile(rb"HTTP/1\.1 ([1-5][0-9][0-9]) [^\r\n]*\r\n")


def responses(reply: bytes) -> list[int]:
    """The status codes of the HTTP/1.1 responses `reply` consists of (AssertionError if not)."""
    statuses = []
    rest = reply
    while rest:
        m = _STATUS_LINE.match(rest)
        assert m, f"not an HTTP/1.1 response: {rest[:200]!r} (in {reply[:300]!r})"
        head, sep, rest = rest[m.end() :].partition(b"\r\n\r\n")
        assert sep, f"a response head without its end: {reply[:300]!r}"
        statuses.append(int(m.group(1)))
        if statuses[-1] == 101:
            break  # the upgrade route's bytes follow
        lengths = [
            int(v)
            for k, _, v in (h.partition(b":") for h in head.split(b"\r\n"))
            if k.strip().lower() == b"content-length"
        ]
        assert len(lengths) == 1, f"each response says its length once: {head!r}"
        if rest and not rest.startswith(b"HTTP/1.1 "):  # else: an answer to HEAD, no body
            assert len(rest) >= lengths[0], f"a body shorter than announced: {reply[:300]!r}"
            rest = rest[lengths[0] :]
    return statuses


METHODS = [b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PRI"]
TARGETS = [b"/echo", b"/q?v=1", b"/up", b"/prefix/x", b"/nope", b"*", b"x:1", b"http://a/echo"]
HEADERS = [
    b"Content-Length: 5",
    b"Content-Length: 99999999999999999999",
    b"Content-Length: -1",
    b"Content-Length: 1, 2",
    b"Transfer-Encoding: chunked",
    b"Transfer-Encoding: gzip",
    b"Upgrade: websocket",
    b"Upgrade: tailscale-control-protocol",
    b"Connection: upgrade",
    b"Connection: close",
    b"Connection: keep-alive",
    b"Expect: 100-continue",
    b"Host: x",
    b"X: " + b"y" * 300,
]


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    """One or more pipelined requests built from parts, bodies and chunks included."""
    out = b""
    for _ in range(draw(st.integers(1, 3))):
        method = draw(st.sampled_from(METHODS))
        target = draw(
            st.one_of(
                st.sampled_from(TARGETS),
                st.sampled_from(HOSTILE_STRINGS).map(
                    lambda s: b"/q?v=" + s.encode("utf-8", "replace")
                ),
            )
        )
        headers = draw(st.lists(st.sampled_from(HEADERS), max_size=5))
        body = draw(st.binary(max_size=40))
        if b"Transfer-Encoding: chunked" in headers:
            body = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
        version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1"]))
        out += method + b" " + target + b" " + version + b"\r\n"
        out += b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body
    return out


test_fuzz, test_corpus = fuzz_tests(
    "http_front",
    st.one_of(mutated(requests()), requests(), st.binary(max_size=200)),
    check,
    expected=(),
)
