"""A small HTTP/1.1 client (h11 over trio) for the identity provider's four endpoints.

OIDC needs a handful of requests per login (discovery, keys, token, userinfo), all
small JSON. h11 and trio are already what the server is built on, so these few
lines replace a runtime dependency on a general HTTP client. Every call has one
deadline for the whole exchange and a cap on the answer's size; redirects are not
followed (an OpenID provider answers these endpoints directly).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

import h11
import trio

from protocol.safejson import JSONInputError, loads

from .errors import HomescaleError

TIMEOUT = 10.0  # seconds for one whole request and answer
MAX_ANSWER = 1024 * 1024  # discovery documents and key sets are a few KB


class HttpClientError(HomescaleError):
    """A request to a remote HTTP server failed: unreachable, timed out, or malformed."""


@dataclass(frozen=True)
class HttpAnswer:
    status: int
    headers: dict[str, str]  # lower-cased names
    body: bytes

    def json(self, what: str) -> dict[str, Any]:
        """The body as a JSON object; HttpClientError naming ``what`` otherwise."""
        try:
            obj = loads(self.body, max_bytes=MAX_ANSWER)
        except JSONInputError as e:
            raise HttpClientError(f"{what}: not JSON ({e})") from None
        if not isinstance(obj, dict):
            raise HttpClientError(f"{what}: expected a JSON object")
        return obj


_tls_context: ssl.SSLContext | None = None


def _tls() -> ssl.SSLContext:
    """The system's trust store (SSL_CERT_FILE is honoured), made once."""
    global _tls_context
    if _tls_context is None:
        _tls_context = ssl.create_default_context()
    return _tls_context


async def request(
    method: str,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    form: dict[str, str] | None = None,
    timeout: float = TIMEOUT,
) -> HttpAnswer:
    """One request on a fresh connection; ``form`` is sent url-encoded."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise HttpClientError(f"{url}: not an http(s) URL")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host = parts.netloc.rpartition("@")[2]
    body = urlencode(form).encode() if form is not None else b""
    head = [("Host", host), ("Accept", "application/json"), ("Connection", "close")]
    head += list((headers or {}).items())
    if form is not None:
        head += [
            ("Content-Type", "application/x-www-form-urlencoded"),
            ("Content-Length", str(len(body))),
        ]
    try:
        with trio.fail_after(timeout):
            if parts.scheme == "https":
                stream: trio.abc.Stream = await trio.open_ssl_over_tcp_stream(
                    parts.hostname, port, ssl_context=_tls()
                )
            else:
                stream = await trio.open_tcp_stream(parts.hostname, port)
            async with stream:
                return await _exchange(stream, method, target, head, body)
    except trio.TooSlowError:
        raise HttpClientError(f"{method} {url}: no answer within {timeout:g} s") from None
    except (OSError, ssl.SSLError, trio.BrokenResourceError) as e:
        raise HttpClientError(f"{method} {url}: {e}") from None
    except h11.ProtocolError as e:
        raise HttpClientError(f"{method} {url}: malformed HTTP answer ({e})") from None


async def _exchange(
    stream: trio.abc.Stream,
    method: str,
    target: str,
    head: list[tuple[str, str]],
    body: bytes,
) -> HttpAnswer:
    conn = h11.Connection(h11.CLIENT)
    data = conn.send(h11.Request(method=method, target=target, headers=head))
    if body:
        data += conn.send(h11.Data(data=body))
    data += conn.send(h11.EndOfMessage())
    await stream.send_all(data)
    status = 0
    headers: dict[str, str] = {}
    out = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(65536)))
            continue
        if isinstance(event, h11.Response):
            status = event.status_code
            headers = {k.decode().lower(): v.decode("latin-1") for k, v in event.headers}
        elif isinstance(event, h11.Data):
            out += event.data
            if len(out) > MAX_ANSWER:
                raise HttpClientError(f"answer larger than {MAX_ANSWER} bytes")
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            if not status:
                raise HttpClientError("the connection closed before an answer")
            return HttpAnswer(status, headers, bytes(out))
