"""The one JSON parser for bytes from the network: Go's JSON grammar, with limits.

Every JSON document a peer, an admin client or a file hands homescale goes
through ``loads``. It is ``json.loads`` behind checks that make it safe on
hostile input and strict where Python is laxer than Go's ``encoding/json``:

- total size is capped (``max_bytes``) before anything is parsed;
- nesting depth is capped (``max_depth``) by a flat scan *before* the
  recursive parser runs, so ``[`` x 100 000 is a clean error, never a
  ``RecursionError``;
- a number literal longer than ``max_number_len`` characters is refused (a
  5000-digit integer costs quadratic time to convert and no Go field holds
  it: int64 has 19 digits, Go marshals float64 in at most 24 characters);
- ``NaN``, ``Infinity``, ``-Infinity`` are refused (Go's grammar has no such
  literals), and so is a float literal that overflows to infinity (``1e400``:
  Go's ``strconv.ParseFloat`` fails with "value out of range");
- input must be UTF-8 (no BOM, no UTF-16/32 guessing as ``json.loads`` does
  for bytes). Go's decoder would silently replace invalid UTF-8 with U+FFFD;
  we refuse it instead, so what we store is what the sender sent;
- a ``\\uD800``-style escape that is not part of a surrogate pair is refused.
  Go decodes it to U+FFFD (so a peer would see a different string than we
  stored), and Python would keep a lone surrogate that cannot be encoded back
  to UTF-8 -- a crash later, far from the input. Refusing it is the only
  choice that keeps both sides agreeing. Proper pairs (emoji) are accepted.

What stays as Go has it: whitespace, escapes, control characters in strings
refused, trailing data refused, duplicate keys (the last one wins).

The error, ``JSONInputError``, names the problem and its byte offset.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

# Defaults sized for what homescale decodes: Tailscale's control messages
# (MapRequest with Hostinfo) are a few KiB, policies and REST bodies small.
# Callers with bigger documents pass their own max_bytes.
DEFAULT_MAX_BYTES = 1 << 20
# tailcfg's deepest legitimate nesting is under 10; policies about the same.
DEFAULT_MAX_DEPTH = 64
DEFAULT_MAX_NUMBER_LEN = 64

# One JSON string (unrolled: linear on long strings), a bracket, or a number-ish run.
# Strings are matched first so brackets and digits inside them do not count.
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]|-?[0-9][0-9.eE+\-]*')
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
# An escape of a high or low surrogate; only a candidate (it could follow a "\\").
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


class JSONInputError(ValueError):
    """JSON refused: the message names the problem and the byte offset."""

    def __init__(self, reason: str, pos: int) -> None:
        super().__init__(f"invalid JSON at byte {pos}: {reason}")
        self.reason = reason
        self.pos = pos


def loads(
    data: bytes | bytearray | memoryview | str,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_number_len: int = DEFAULT_MAX_NUMBER_LEN,
) -> Any:
    """Parse one JSON document under Go's grammar and the given limits."""
    if isinstance(data, str):
        if len(data) > max_bytes:  # each character is at least one byte
            raise JSONInputError(f"document larger than {max_bytes} bytes", max_bytes)
        try:
            raw = data.encode("utf-8")
        except UnicodeEncodeError as e:
            raise JSONInputError("lone surrogate in text (not valid Unicode)", e.start) from None
    else:
        raw = bytes(data)
    if len(raw) > max_bytes:
        raise JSONInputError(f"document larger than {max_bytes} bytes", max_bytes)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JSONInputError("invalid UTF-8", e.start) from None
    _check_structure(raw, max_depth, max_number_len)
    try:
        obj = json.loads(
            text,
            parse_constant=_refuse_constant,
            parse_float=_parse_float,
            parse_int=_parse_int,
        )
    except _LiteralRefused as e:
        raise JSONInputError(str(e), _literal_pos(raw, e.literal)) from None
    except json.JSONDecodeError as e:
        raise JSONInputError(e.msg, len(text[: e.pos].encode("utf-8"))) from None
    except RecursionError:  # pragma: no cover - the depth scan makes this unreachable
        raise JSONInputError("nested too deeply", 0) from None
    if _SURROGATE_ESCAPE.search(raw) is not None:
        _check_surrogates(obj, raw)
    return obj


def _check_structure(raw: bytes, max_depth: int, max_number_len: int) -> None:
    """Depth and number length, found by a flat scan (no recursion, C-speed regexes)."""
    deep = raw.count(b"[") + raw.count(b"{") > max_depth and _exceeds_depth(raw, max_depth)
    # Cheap pre-check: an over-long run of number characters anywhere (maybe in a string).
    long_num = re.search(rb"[0-9.eE+\-]{%d}" % (max_number_len + 1), raw) is not None
    if not deep and not long_num:
        return
    depth = 0
    for m in _TOKEN.finditer(raw):
        c = raw[m.start()]
        if c in b"[{":
            depth += 1
            if depth > max_depth:
                raise JSONInputError(f"nested deeper than {max_depth} levels", m.start())
        elif c in b"]}":
            depth -= 1
        elif c != 0x22 and m.end() - m.start() > max_number_len:  # a number, not a string
            raise JSONInputError(
                f"number literal of {m.end() - m.start()} characters (limit {max_number_len})",
                m.start(),
            )


def _exceeds_depth(raw: bytes, max_depth: int) -> bool:
    """Quick answer, looping over the brackets only (strings removed at C speed)."""
    depth = 0
    for c in _STRING.sub(b"", raw).translate(None, _NOT_BRACKET):
        if c in b"[{":
            depth += 1
            if depth > max_depth:
                return True
        else:
            depth -= 1
    return False


class _LiteralRefused(ValueError):
    def __init__(self, reason: str, literal: str) -> None:
        super().__init__(reason)
        self.literal = literal


def _refuse_constant(name: str) -> Any:
    raise _LiteralRefused(f"{name} is not JSON (Go refuses it)", name)


def _parse_float(s: str) -> float:
    v = float(s)
    if not math.isfinite(v):
        raise _LiteralRefused(f"number {s} is out of float64 range", s)
    return v


def _parse_int(s: str) -> int:
    # Length was checked by the scan; int() of <= max_number_len digits is cheap.
    return int(s)


def _literal_pos(raw: bytes, literal: str) -> int:
    # The hooks do not get a position; the first occurrence outside a string is close enough.
    needle = literal.encode()
    for m in re.finditer(rb'"[^"\\]*(?:\\.[^"\\]*)*"|' + re.escape(needle), raw):
        if raw[m.start()] != 0x22:
            return m.start()
    return 0


def _has_surrogate(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _check_surrogates(obj: Any, raw: bytes) -> None:
    """Refuse lone surrogates from escapes; walks the value iteratively."""
    stack = [obj]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            bad = _has_surrogate(v)
        elif isinstance(v, dict):
            bad = any(_has_surrogate(k) for k in v)
            stack.extend(v.values())
        elif isinstance(v, list):
            bad = False
            stack.extend(v)
        else:
            bad = False
        if bad:
            m = _SURROGATE_ESCAPE.search(raw)
            raise JSONInputError(
                "\\u escape of a lone UTF-16 surrogate (Go would turn it into U+FFFD)",
                m.start() if m else 0,
            )
