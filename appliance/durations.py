"""Durations as headscale writes them: Go's `1h30m` plus Prometheus' `d`, `w`, `y`."""

from __future__ import annotations

import re
from datetime import timedelta

_UNITS = {
    "ms": 0.001,
    "s": 1,
    "m": 60,
    "h": 3600,
    "d": 86400,
    "w": 7 * 86400,
    "y": 365 * 86400,
}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w|y)")


def parse_duration(text: str | int | float) -> timedelta:
    """Parse `30m`, `1h30m`, `90d`, `0`; raise ValueError naming the expected form.

    The message does not repeat the value: every caller adds it (", got ...") with
    the key or flag it came from.
    """
    if isinstance(text, bool):
        raise ValueError("expected a duration like 30m, 24h or 90d")
    if isinstance(text, int | float):
        if text == 0:
            return timedelta(0)
        raise ValueError("expected a duration with a unit, like 30m, 24h or 90d")
    s = str(text).strip()
    if s in ("0", ""):
        if s == "":
            raise ValueError("expected a duration like 30m, 24h or 90d")
        return timedelta(0)
    pos = 0
    total = 0.0
    for m in _PART.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(s) or pos == 0:
        raise ValueError("expected a duration like 30m, 24h or 90d")
    return timedelta(seconds=total)
