"""A small codec that maps dataclasses to JSON the way Go's encoding/json does.

Why not plain ``asdict``: the Tailscale client is strict in ways that matter.
A key-typed field must be a valid ``<prefix>:<hex>`` (``""`` fails the whole
message), ``time.Time`` is RFC 3339 and ``null`` leaves it zero, integer map
keys are decimal strings, ``[]byte`` is base64, and ``omitempty`` only omits
false/0/""/nil/empty -- never a struct, so a zero ``time.Time`` or key is
still emitted. Input is read as Go reads it: keys match case-insensitively
(exact match first) and unknown keys are ignored (kept in ``extra``).

Field names are the Python attribute names, spelled exactly as the Go JSON
names; ``wire_field(json=...)`` overrides where Go's tag differs (``DERP``).

Decoding validates what Go's decoder would refuse, so nothing a peer cannot
decode is ever stored or passed on: ``int`` is Go's 64-bit ``int``, floats are
finite, and ``Annotated[...]`` adds the rest per field -- ``ADDR_PORT``
(``netip.AddrPort``), ``PREFIX``/``ROUTE`` (``netip.Prefix``), ``IntRange``
(sized ints such as uint16, or the sensible range of a field) and
``MaxItems`` (list/map length). Strings and byte fields are capped at
``MAX_STRING_LEN``/``MAX_BYTES_LEN``: bigger than anything a client sends.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
import re
import types
import typing
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, ClassVar, Self

from protocol import netip, safejson
from protocol.keys import KeyParseError, _Key32

# Go's zero time.Time, which marshals as "0001-01-01T00:00:00Z".
ZERO_TIME = datetime(1, 1, 1, tzinfo=UTC)


class WireError(ValueError):
    """Root of wire-type errors."""


class RemoteWireError(WireError):
    """JSON from a peer that Go's decoder would also refuse (the whole message fails)."""


class LocalWireError(WireError):
    """A value we were asked to send cannot be encoded (a bug on our side)."""


# omit modes, named after Go's struct tag options
NEVER = "never"  # no omit option: always emitted (nil -> null)
EMPTY = "omitempty"  # omit false, 0, "", nil, empty list/map/bytes
ZERO = "omitzero"  # omit the type's zero value (also zero keys, zero times)
NIL = "nil"  # omit only None: for lists where [] has a meaning of its own


def wire_field(
    *,
    default: Any = dataclasses.MISSING,
    omit: str = EMPTY,
    json: str | None = None,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
) -> Any:
    """Declare a field's Go tag options (``omit``) and JSON name if not the attribute's.

    Keyword-only, like ``dataclasses.field``: type checkers (PEP 681) see a field
    specifier's default only when it is passed as ``default=``/``default_factory=``.
    """
    md = {"omit": omit, "json": json}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=md)
    return dataclasses.field(default=default, metadata=md)


# --- time ----------------------------------------------------------------------

_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]+))?(?:([Zz])|([+-])([0-9]{2}):([0-9]{2}))"
)


def parse_time(text: str) -> datetime:
    """RFC 3339 with any fraction length (Go emits nanoseconds; we keep microseconds).

    ASCII digits only (``\\d`` would take any Unicode digit; Go's parser does not).
    """
    m = _RFC3339.fullmatch(text)
    if not m:
        raise RemoteWireError(f"time {text!r} is not RFC 3339")
    y, mo, d, h, mi, s, frac, z, sign, oh, om = m.groups()
    us = int((frac or "0")[:6].ljust(6, "0"))
    try:
        if z:
            tz: timezone = UTC
        else:
            # Go's time.Parse: offset hours below 24, minutes below 60.
            if int(om) > 59:
                raise ValueError("offset minutes out of range")
            off = timedelta(hours=int(oh), minutes=int(om))
            tz = timezone(-off if sign == "-" else off)
        t = datetime(int(y), int(mo), int(d), int(h), int(mi), int(s), us, tzinfo=tz)
        # Every stored time must convert to UTC (the store and comparisons do);
        # "9999-12-31T23:59:59-23:59" would overflow there, far from the input.
        t.astimezone(UTC)
    except (ValueError, OverflowError) as e:
        raise RemoteWireError(f"time {text!r}: {e}") from None
    return t


def format_time(t: datetime) -> str:
    """Go's RFC3339Nano: fraction without trailing zeros, ``Z`` for UTC."""
    if t.tzinfo is None:
        raise LocalWireError(f"naive datetime {t!r}: times on the wire need a timezone")
    base = t.strftime("%Y-%m-%dT%H:%M:%S")
    # strftime pads years below 1000 inconsistently across platforms; Go always uses 4 digits.
    base = f"{t.year:04d}" + base[base.index("-") :]
    if t.microsecond:
        base += "." + f"{t.microsecond:06d}".rstrip("0")
    off = t.utcoffset() or timedelta(0)
    if off == timedelta(0):
        return base + "Z"
    sign = "-" if off < timedelta(0) else "+"
    mins = abs(int(off.total_seconds())) // 60
    return f"{base}{sign}{mins // 60:02d}:{mins % 60:02d}"


def is_zero_time(t: datetime) -> bool:
    return (
        t.year == 1
        and t.month == 1
        and t.day == 1
        and t.hour == 0
        and t.minute == 0
        and t.second == 0
        and t.microsecond == 0
        and not t.utcoffset()
    )


# --- limits and constraints ------------------------------------------------------

# Go's int and int64 (the clients are 64-bit builds).
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
# The longest strings real clients send are ssh host keys (~750 characters for
# RSA 4096) and push tokens; 4 KiB leaves room and caps what one field can store.
MAX_STRING_LEN = 4096
# NodeKeySignature and friends are a few hundred bytes.
MAX_BYTES_LEN = 16 << 10


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


class Check:
    """A constraint on a decoded value, attached with ``Annotated[T, check]``."""

    def check(self, v: Any, path: str) -> None:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class IntRange(Check):
    """Sized Go ints (uint16, int32...) or a field's sensible range."""

    lo: int
    hi: int

    def check(self, v: Any, path: str) -> None:
        if not self.lo <= v <= self.hi:
            raise RemoteWireError(f"{path}: {_short(v)} is out of range [{self.lo}, {self.hi}]")


@dataclasses.dataclass(frozen=True)
class MaxItems(Check):
    """A cap on a list's or map's length."""

    n: int

    def check(self, v: Any, path: str) -> None:
        if len(v) > self.n:
            raise RemoteWireError(f"{path}: {len(v)} items, more than the limit of {self.n}")


@dataclasses.dataclass(frozen=True)
class NetipText(Check):
    """A string that must parse with Go's net/netip (``kind``: addrport, prefix, route)."""

    kind: str

    def check(self, v: Any, path: str) -> None:
        try:
            if self.kind == "addrport":
                netip.parse_addr_port(v)
            elif self.kind == "addr":
                netip.parse_addr(v)
            else:
                netip.parse_prefix(v, masked=self.kind == "route")
        except netip.NetipError as e:
            raise RemoteWireError(f"{path}: {_short(v)} is not a valid {self._go}: {e}") from None

    @property
    def _go(self) -> str:
        return {"addrport": "netip.AddrPort", "addr": "netip.Addr"}.get(self.kind, "netip.Prefix")


ADDR_PORT = NetipText("addrport")
ADDR = NetipText("addr")
PREFIX = NetipText("prefix")
# A route a node advertises: a prefix without host bits (the CLI refuses others too).
ROUTE = NetipText("route")
UINT8 = IntRange(0, 0xFF)
UINT16 = IntRange(0, 0xFFFF)
INT32 = IntRange(-(1 << 31), (1 << 31) - 1)
UINT64 = IntRange(0, (1 << 64) - 1)


# --- codecs per type ------------------------------------------------------------


class _Codec:
    """How one Python type reads and writes its JSON form."""

    def decode(self, v: Any, path: str) -> Any:
        raise NotImplementedError

    def encode(self, v: Any) -> Any:
        raise NotImplementedError

    def is_empty(self, v: Any) -> bool:
        return v is None

    def is_zero(self, v: Any) -> bool:
        return self.is_empty(v)

    nullable = False
    zero_value: Any = None


class _Scalar(_Codec):
    # uint64 fields (IntRange up to 2**64-1) lift the int64 check.
    wide = False

    def __init__(self, typ: type) -> None:
        self.typ = typ
        self.zero_value = typ()

    def decode(self, v: Any, path: str) -> Any:
        if self.typ is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, self.typ) or (self.typ is int and isinstance(v, bool)):
            raise RemoteWireError(f"{path}: expected {self.typ.__name__}, got {type(v).__name__}")
        value: Any = v  # narrowed by the isinstance check above, which mypy cannot see
        if isinstance(value, int) and not self.wide and not INT64_MIN <= value <= INT64_MAX:
            raise RemoteWireError(f"{path}: {_short(value)} is out of Go's int64 range")
        if isinstance(value, float) and not math.isfinite(value):
            raise RemoteWireError(f"{path}: {value} is not a finite number")
        if isinstance(value, str) and len(value) > MAX_STRING_LEN:
            raise RemoteWireError(
                f"{path}: string of {len(value)} characters exceeds the limit of {MAX_STRING_LEN}"
            )
        return value

    def encode(self, v: Any) -> Any:
        return v

    def is_empty(self, v: Any) -> bool:
        return v is None or v == self.zero_value


class _Any(_Codec):
    nullable = True

    def decode(self, v: Any, path: str) -> Any:
        return v

    def encode(self, v: Any) -> Any:
        return v

    def is_empty(self, v: Any) -> bool:
        return v is None or (isinstance(v, list | dict | str) and not v)


class _Bytes(_Codec):
    nullable = True

    def decode(self, v: Any, path: str) -> Any:
        if not isinstance(v, str):
            raise RemoteWireError(f"{path}: expected base64 string")
        if len(v) > MAX_BYTES_LEN * 4 // 3 + 4:
            raise RemoteWireError(f"{path}: more than {MAX_BYTES_LEN} bytes")
        try:
            return base64.b64decode(v, validate=True)
        except (binascii.Error, ValueError):
            raise RemoteWireError(f"{path}: invalid base64") from None

    def encode(self, v: Any) -> Any:
        return base64.b64encode(v).decode("ascii")

    def is_empty(self, v: Any) -> bool:
        return not v


class _Key(_Codec):
    def __init__(self, typ: type[_Key32]) -> None:
        self.typ = typ
        self.zero_value = typ.zero()

    def decode(self, v: Any, path: str) -> Any:
        try:
            return self.typ.parse(v)
        except KeyParseError as e:
            raise RemoteWireError(f"{path}: {e}") from None

    def encode(self, v: Any) -> Any:
        return str(v)

    def is_empty(self, v: Any) -> bool:
        # A key is a Go array inside a struct: omitempty never omits it.
        return v is None

    def is_zero(self, v: Any) -> bool:
        return v is None or v.is_zero()


class _Time(_Codec):
    zero_value = ZERO_TIME

    def decode(self, v: Any, path: str) -> Any:
        if not isinstance(v, str):
            raise RemoteWireError(f"{path}: expected RFC 3339 string")
        return parse_time(v)

    def encode(self, v: Any) -> Any:
        return format_time(v)

    def is_empty(self, v: Any) -> bool:
        return v is None  # time.Time is a struct: omitempty keeps it

    def is_zero(self, v: Any) -> bool:
        return v is None or is_zero_time(v)


class _Optional(_Codec):
    """``X | None``: Go pointer (or nil slice/map); None is null."""

    nullable = True

    def __init__(self, inner: _Codec) -> None:
        self.inner = inner

    def decode(self, v: Any, path: str) -> Any:
        return self.inner.decode(v, path)

    def encode(self, v: Any) -> Any:
        return self.inner.encode(v)

    def is_empty(self, v: Any) -> bool:
        if v is None:
            return True
        # A pointer is never "empty" under omitempty, but a nil-able slice/map is.
        inner = _unwrap(self.inner)
        return isinstance(inner, _List | _Dict | _Bytes | _Any) and inner.is_empty(v)

    def is_zero(self, v: Any) -> bool:
        return v is None


class _List(_Codec):
    nullable = True

    def __init__(self, item: _Codec) -> None:
        self.item = item

    def decode(self, v: Any, path: str) -> Any:
        if not isinstance(v, list):
            raise RemoteWireError(f"{path}: expected list, got {type(v).__name__}")
        return [_decode_nullable(self.item, x, f"{path}[{i}]") for i, x in enumerate(v)]

    def encode(self, v: Any) -> Any:
        return [None if x is None else self.item.encode(x) for x in v]

    def is_empty(self, v: Any) -> bool:
        return not v


class _Dict(_Codec):
    nullable = True

    def __init__(self, key: type, value: _Codec) -> None:
        self.key = key
        self.value = value

    def decode(self, v: Any, path: str) -> Any:
        if not isinstance(v, dict):
            raise RemoteWireError(f"{path}: expected object, got {type(v).__name__}")
        out: dict[Any, Any] = {}
        for k, x in v.items():
            if self.key is int:
                # strconv.ParseInt: ASCII digits and an optional sign, int64 range;
                # Python's int() would also take "1_000", " 7" or Arabic-Indic digits.
                digits = k[1:] if k[:1] in ("-", "+") else k
                if not digits.isascii() or not digits.isdigit():
                    raise RemoteWireError(f"{path}: map key {_short(k)} is not an integer")
                kk: Any = int(k)
                if not INT64_MIN <= kk <= INT64_MAX:
                    raise RemoteWireError(f"{path}: map key {_short(k)} is out of int64 range")
            else:
                kk = k
            out[kk] = _decode_nullable(self.value, x, f"{path}[{k!r}]")
        return out

    def encode(self, v: Any) -> Any:
        return {str(k): (None if x is None else self.value.encode(x)) for k, x in v.items()}

    def is_empty(self, v: Any) -> bool:
        return not v


class _Struct(_Codec):
    def __init__(self, cls: type[Wire]) -> None:
        self.cls = cls

    @property
    def zero_value(self) -> Any:
        return self.cls()

    def decode(self, v: Any, path: str) -> Any:
        return self.cls._decode(v, path)

    def encode(self, v: Any) -> Any:
        return v.to_json()

    def is_empty(self, v: Any) -> bool:
        return v is None  # structs are never omitted by omitempty

    def is_zero(self, v: Any) -> bool:
        return v is None or v == self.cls()


class _Constrained(_Codec):
    """``Annotated[T, Check...]``: T's codec, then the checks on the decoded value."""

    def __init__(self, inner: _Codec, checks: list[Check]) -> None:
        self.inner = inner
        self.checks = checks
        self.nullable = inner.nullable

    @property
    def zero_value(self) -> Any:
        return self.inner.zero_value

    def decode(self, v: Any, path: str) -> Any:
        out = self.inner.decode(v, path)
        for c in self.checks:
            c.check(out, path)
        return out

    def encode(self, v: Any) -> Any:
        return self.inner.encode(v)

    def is_empty(self, v: Any) -> bool:
        return self.inner.is_empty(v)

    def is_zero(self, v: Any) -> bool:
        return self.inner.is_zero(v)


def _unwrap(codec: _Codec) -> _Codec:
    return codec.inner if isinstance(codec, _Constrained) else codec


def _decode_nullable(codec: _Codec, v: Any, path: str) -> Any:
    if v is None:
        # null in a list/map element: a nil pointer, or the zero value for a value type.
        if codec.nullable or isinstance(_unwrap(codec), _Struct):
            return None
        if isinstance(codec, _Constrained):
            # The zero value must pass too: a null endpoint is Go's zero AddrPort, "".
            for c in codec.checks:
                c.check(codec.zero_value, path)
        return codec.zero_value
    return codec.decode(v, path)


def _codec_for(tp: Any, owner: str) -> _Codec:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return _Any()
    if origin is typing.Annotated:
        inner = _codec_for(args[0], owner)
        checks = [m for m in tp.__metadata__ if isinstance(m, Check)]
        if isinstance(inner, _Scalar) and any(
            isinstance(c, IntRange) and c.hi > INT64_MAX for c in checks
        ):
            inner.wide = True
        return _Constrained(inner, checks) if checks else inner
    if origin in (types.UnionType, typing.Union):
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"{owner}: only 'X | None' unions are supported, not {tp}")
        return _Optional(_codec_for(rest[0], owner))
    if origin is list:
        return _List(_codec_for(args[0], owner))
    if origin is dict:
        if args[0] not in (str, int):
            raise TypeError(f"{owner}: map keys must be str or int")
        return _Dict(args[0], _codec_for(args[1], owner))
    if tp is bytes:
        return _Bytes()
    if tp is datetime:
        return _Time()
    if tp in (int, float, str, bool):
        return _Scalar(tp)
    if isinstance(tp, type) and issubclass(tp, _Key32):
        return _Key(tp)
    if isinstance(tp, type) and issubclass(tp, Wire):
        return _Struct(tp)
    raise TypeError(f"{owner}: no JSON codec for {tp!r}")


@dataclasses.dataclass(frozen=True)
class _FieldSpec:
    attr: str
    json: str
    omit: str
    codec: _Codec


@typing.dataclass_transform(kw_only_default=True, field_specifiers=(wire_field, dataclasses.field))
@dataclasses.dataclass(kw_only=True)
class Wire:
    """Base of all wire types: ``from_json(obj)``, ``to_json()``; unknown keys in ``extra``.

    Subclasses become keyword-only dataclasses automatically.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        dataclasses.dataclass(kw_only=True)(cls)

    # Keys Go's decoder would ignore; kept for logging and debugging, never re-sent.
    extra: dict[str, Any] = dataclasses.field(
        default_factory=dict, repr=False, compare=False, metadata={"skip": True}
    )
    _specs: ClassVar[list[_FieldSpec] | None] = None
    _by_name: ClassVar[dict[str, _FieldSpec]]
    _by_fold: ClassVar[dict[str, _FieldSpec]]

    @classmethod
    def _fields(cls) -> list[_FieldSpec]:
        # Built on first use and kept on the class: derived from the type hints only.
        specs = cls.__dict__.get("_specs")
        if specs is None:
            hints = typing.get_type_hints(cls, include_extras=True)
            specs = []
            for f in dataclasses.fields(cls):
                if f.metadata.get("skip"):
                    continue
                specs.append(
                    _FieldSpec(
                        attr=f.name,
                        json=f.metadata.get("json") or f.name,
                        omit=f.metadata.get("omit", EMPTY),
                        codec=_codec_for(hints[f.name], f"{cls.__name__}.{f.name}"),
                    )
                )
            cls._specs = specs
            cls._by_name = {s.json: s for s in specs}
            cls._by_fold = {s.json.casefold(): s for s in specs}
        return specs

    @classmethod
    def from_json(cls, obj: Any) -> Self:
        """Decode a parsed JSON object (dict) as Go would; bytes/str are parsed first."""
        if isinstance(obj, bytes | str):
            try:
                obj = safejson.loads(obj)
            except safejson.JSONInputError as e:
                raise RemoteWireError(f"{cls.__name__}: invalid JSON: {e}") from None
        return cls._decode(obj, cls.__name__)

    @classmethod
    def _decode(cls, obj: Any, path: str) -> Self:
        if not isinstance(obj, dict):
            raise RemoteWireError(f"{path}: expected object, got {type(obj).__name__}")
        cls._fields()
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for k, v in obj.items():
            spec = cls._by_name.get(k) or cls._by_fold.get(k.casefold())
            if spec is None:
                extra[k] = v
                continue
            if v is None:
                # Go: null into a non-pointer leaves the zero value; into a pointer, nil.
                kwargs[spec.attr] = None if spec.codec.nullable else spec.codec.zero_value
                continue
            kwargs[spec.attr] = spec.codec.decode(v, f"{path}.{spec.json}")
        inst = cls(**kwargs)
        if extra:
            inst.extra = extra
        inst._validate(path)
        return inst

    def _validate(self, path: str) -> None:
        """Checks across fields after decoding (a subclass's own rules); raise RemoteWireError."""

    def to_json(self) -> dict[str, Any]:
        """The JSON object Go would marshal, honouring each field's omit option."""
        out: dict[str, Any] = {}
        for spec in self._fields():
            v = getattr(self, spec.attr)
            c = spec.codec
            if spec.omit == EMPTY and c.is_empty(v):
                continue
            if spec.omit == ZERO and c.is_zero(v):
                continue
            if spec.omit == NIL and v is None:
                continue
            out[spec.json] = None if v is None else c.encode(v)
        return out

    def to_json_bytes(self) -> bytes:
        return json.dumps(self.to_json(), separators=(",", ":"), ensure_ascii=False).encode()
