"""homescale's log lines as tests read them, in both `log.format`s (text and json).

A check that a line is *absent* passes vacuously if it looks in the wrong place
(the json format keeps the text under "message", the traceback under "error").
So such checks first render the line they look for with the server's own
formatter (``render``) and prove their predicate finds it (``assert_findable``);
``parse_line`` is the one reader of log lines for both formats.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterable
from typing import Any

from appliance.logs import make_formatter

LinePredicate = Callable[[dict[str, Any]], bool]


def parse_line(text: str) -> dict[str, Any]:
    """One log line as a dict whose ``msg`` holds its text, whatever the format.

    JSON objects are kept (caddy's lines have ``msg``; homescale's json format has
    ``message`` and, after an exception, ``error``, both joined into ``msg``);
    anything else (the text format) is ``{"msg": the whole line}``.
    """
    try:
        obj = json.loads(text)
    except ValueError:
        obj = None
    if not isinstance(obj, dict):
        return {"msg": text}
    if "msg" not in obj and "message" in obj:
        obj["msg"] = "\n".join(str(obj[k]) for k in ("message", "error") if k in obj)
    return obj


def render(
    fmt: str,
    message: str,
    *,
    level: int = logging.INFO,
    logger: str = "homescale",
    with_traceback: bool = False,
) -> list[str]:
    """The physical lines homescale writes for ``message`` in log format ``fmt``."""
    exc_info = None
    if with_traceback:
        try:
            raise RuntimeError("rendered for a log check")
        except RuntimeError:
            exc_info = sys.exc_info()
    record = logging.LogRecord(logger, level, __file__, 0, message, None, exc_info)
    return make_formatter(fmt).format(record).splitlines()


def assert_findable(predicate: LinePredicate, lines: Iterable[str], what: str) -> None:
    """Fail unless ``predicate`` matches one of ``lines`` (raw, as written): the proof
    that a check for the absence of ``what`` could have seen it."""
    raw = list(lines)
    if not any(predicate(parse_line(ln)) for ln in raw):
        raise AssertionError(
            f"the check for {what!r} could never find it in this log format; "
            f"a rendered line: {raw[:3]}"
        )


def assert_no_traceback(log: str, fmt: str) -> None:
    """``log`` (raw text of a homescale log in format ``fmt``) holds no traceback;
    first proves a traceback in that format would show the word looked for."""
    rendered = "\n".join(render(fmt, "handler failed", with_traceback=True))
    assert "Traceback (most recent call last)" in rendered, rendered
    assert "Traceback (most recent call last)" not in log, log
