"""The small HTTP endpoints a DERP server answers besides ``/derp`` itself.

Pure functions: request facts in, ``(status, headers, body)`` out, so the
front end can serve them on any listener. Facts from tailscale v1.90.9
``derp/derpserver/handler.go`` (ProbeHandler, ServeNoContent) and
``cmd/derper/bootstrap_dns.go``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence

Headers = list[tuple[str, str]]
Response = tuple[int, Headers, bytes]

# handler.go NoContentChallengeHeader / NoContentResponseHeader.
CHALLENGE_HEADER = "X-Tailscale-Challenge"
RESPONSE_HEADER = "X-Tailscale-Response"
# handler.go isChallengeChar; at most 64 of them, else the header is not echoed.
_CHALLENGE = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_NO_CACHE = "no-cache, no-store, must-revalidate, no-transform, max-age=0"


def _text(status: int, text: str) -> Response:
    body = (text + "\n").encode()
    return status, [("Content-Type", "text/plain; charset=utf-8")], body


def probe(method: str) -> Response:
    """``/derp/probe`` and ``/derp/latency-check``: netcheck's HTTPS latency fallback.

    GET/HEAD -> 200 with an open CORS header (js/wasm clients probe from a page);
    anything else 405 (handler.go ProbeHandler).
    """
    if method.upper() in ("GET", "HEAD"):
        return 200, [("Access-Control-Allow-Origin", "*")], b""
    return _text(405, "bogus probe method")


def generate_204(challenge: str | None) -> Response:
    """``/generate_204``: captive-portal check (handler.go ServeNoContent).

    A well-formed challenge is echoed as ``response <challenge>``; the client
    sends ``ts_<host>`` and treats a missing or wrong echo as a captive portal.
    """
    headers: Headers = []
    if challenge and _CHALLENGE.fullmatch(challenge):
        headers.append((RESPONSE_HEADER, "response " + challenge))
    headers.append(("Cache-Control", _NO_CACHE))
    return 204, headers, b""


def bootstrap_dns(names: Mapping[str, Sequence[str]], query: str | None = None) -> Response:
    """``/bootstrap-dns[?q=name]``: addresses for names, used when a client's DNS is broken.

    Like cmd/derper handleBootstrapDNS, the answer is the whole published
    ``{"name": ["ip", ...]}`` map whatever ``q`` asks (the client picks its
    name out of it; ``q`` only feeds derper's hit statistics).
    ``Connection: close`` because derper sets it: these requests are rare and
    randomized across regions, so keeping the connection is wasted.
    """
    del query  # accepted for the signature's sake; see above
    body = json.dumps({k: list(v) for k, v in names.items()}, separators=(",", ":")).encode()
    return 200, [("Content-Type", "application/json"), ("Connection", "close")], body
