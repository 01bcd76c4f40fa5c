"""Strict fields of admin requests (REST bodies, paths and queries; CLI arguments).

headscale's REST API is grpc-gateway over protobuf, so its requests are decoded
by protojson: a field has one JSON type, `null` means "not set", unknown fields
are ignored, 64-bit integers come as numbers or decimal strings, times are RFC
3339 with a timezone. These helpers do the same and coerce nothing: a wrong type
is an `InvalidInput` (HTTP 400) that names the field, so `{"reusable": "false"}`
can never create a reusable key.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from protocol import safejson
from protocol.gojson import ZERO_TIME, WireError, is_zero_time
from protocol.gojson import parse_time as parse_wire_time

from .errors import InvalidInput

INT64_MAX = (1 << 63) - 1  # SQLite's INTEGER and Go's int64: no ID is larger


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def is_numeric_id(text: str) -> bool:
    """ASCII digits only: `str.isdigit` also accepts "²" and other scripts' digits."""
    return text.isascii() and text.isdigit()


def parse_id(value: Any, field: str) -> int:
    """A row ID: a JSON number or a string of ASCII digits, from 0 to 2^63-1."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif isinstance(value, str) and is_numeric_id(value.strip()) and len(value.strip()) <= 30:
        n = int(value.strip())
    else:
        raise InvalidInput(f"{field}: expected a numeric ID, got {_shown(value)}")
    if not 0 <= n <= INT64_MAX:
        raise InvalidInput(f"{field}: ID {n} is out of range (0 to {INT64_MAX})")
    return n


def parse_time(value: Any, field: str) -> datetime | None:
    """An RFC 3339 time with its timezone, in UTC; None when absent (null or "").

    Go's zero time (0001-01-01T00:00:00Z, what Go clients send for "unset") is
    returned as is: each caller gives it headscale's meaning for its field.
    """
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InvalidInput(f"{field}: expected an RFC 3339 time string, got {_type_name(value)}")
    try:
        t = parse_wire_time(value)
    except WireError:
        raise InvalidInput(
            f"{field}: expected an RFC 3339 time with a timezone like "
            f"2026-01-02T15:04:05Z, got {_shown(value)}"
        ) from None
    if is_zero_time(t):
        return ZERO_TIME
    try:
        return t.astimezone(UTC).replace(microsecond=0)
    except OverflowError:
        raise InvalidInput(f"{field}: {value!r} is outside the years 1 to 9999 in UTC") from None


def parse_flag(value: str, field: str) -> bool:
    """A boolean from a query string: `true` or `false` (also 1/0), nothing else."""
    v = value.strip().lower()
    if v in ("true", "1"):
        return True
    if v in ("false", "0", ""):
        return False
    raise InvalidInput(f"{field}: expected true or false, got {_shown(value)}")


class Body:
    """A request's JSON object body, read field by field with the type each must have.

    A field that is absent or `null` reads as its type's zero value, as protojson does.
    """

    def __init__(self, raw: bytes, *, max_bytes: int = safejson.DEFAULT_MAX_BYTES) -> None:
        obj: Any = {}
        if raw.strip():
            try:
                obj = safejson.loads(raw, max_bytes=max_bytes)
            except safejson.JSONInputError as e:
                raise InvalidInput(f"request body is not valid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise InvalidInput(f"request body must be a JSON object, got {_type_name(obj)}")
        self.obj: dict[str, Any] = obj

    def has(self, name: str) -> bool:
        return self.obj.get(name) is not None

    def string(self, name: str) -> str:
        v = self.obj.get(name)
        if v is None:
            return ""
        if not isinstance(v, str):
            raise InvalidInput(f"{name}: expected a string, got {_type_name(v)}")
        return v

    def required_str(self, *names: str) -> str:
        """The first of `names` that is set (and a string); one of them must be."""
        for name in names:
            if self.has(name):
                value = self.string(name)
                if value.strip():
                    return value
        raise InvalidInput(f"request body needs {' or '.join(repr(n) for n in names)}")

    def boolean(self, name: str) -> bool:
        v = self.obj.get(name)
        if v is None:
            return False
        if not isinstance(v, bool):
            raise InvalidInput(f"{name}: expected true or false, got {_type_name(v)}")
        return v

    def strings(self, name: str) -> list[str]:
        v = self.obj.get(name)
        if v is None:
            return []
        if not isinstance(v, list):
            raise InvalidInput(f"{name}: expected a list of strings, got {_type_name(v)}")
        for i, item in enumerate(v):
            if not isinstance(item, str):
                raise InvalidInput(f"{name}[{i}]: expected a string, got {_type_name(item)}")
        return list(v)

    def time(self, name: str) -> datetime | None:
        return parse_time(self.obj.get(name), name)

    def ref(self, *names: str) -> str | int | None:
        """An ID (number or digits) or a name/prefix (string) in the first set field of `names`."""
        for name in names:
            v = self.obj.get(name)
            if v is None or v == "":
                continue
            if isinstance(v, int) and not isinstance(v, bool):
                return parse_id(v, name)
            if isinstance(v, str):
                return v
            raise InvalidInput(f"{name}: expected an ID or a name, got {_type_name(v)}")
        return None
