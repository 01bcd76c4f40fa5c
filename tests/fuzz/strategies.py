"""Input strategies shared by the fuzz targets: hostile JSON values and byte mutations.

Random bytes alone rarely pass a parser's first check, so targets combine
well-formed messages (built from the wire types) with ``mutated`` copies of
them: bit flips, truncations, insertions, duplicated ranges.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

from protocol.gojson import Wire, _FieldSpec

# Values that broke or nearly broke something once, or that sit on Go's limits.
HOSTILE_STRINGS = [
    "",
    "not-an-endpoint",
    "1.2.3.4:70000",
    "[::1]",
    "[::1]:41641",
    "1.2.3.4:41641",
    "1.2.3.4",
    "1.2.3.4:",
    ":80",
    "[fe80::1%eth0]:1",
    "01.2.3.4:1",
    "10.0.0.0/8",
    "10.0.0.1/8",
    "10.0.0.0/33",
    "::/0",
    "not-a-prefix",
    "1.2.3.4/-1",
    "1.2.3.4/08",
    "nodekey:" + "0" * 64,
    "nodekey:" + "ab" * 32,
    "nodekey:" + "ab" * 31,
    "discokey:" + "cd" * 32,
    "mkey:" + "ef" * 32,
    "0001-01-01T00:00:00Z",
    "9999-12-31T23:59:59.999999999Z",
    "2024-02-30T00:00:00Z",
    "2026-01-01T00:00:00+24:00",
    "2026-01-01T00:00:00+01:60",
    "9999-12-31T23:59:59-23:59",
    "\uff12\uff10\uff12\uff16-01-01T00:00:00Z",
    "\u0000",
    "\ud800",
    "\u00b2",
    "x" * 5000,
]
HOSTILE_INTS = [0, -1, 1, 2**31, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64, 2**70, 10**30]


def json_scalars() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.none(),
        st.booleans(),
        st.sampled_from(HOSTILE_INTS),
        st.integers(),
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from(HOSTILE_STRINGS),
        st.text(max_size=40),
    )


def json_values(max_leaves: int = 20) -> st.SearchStrategy[Any]:
    """Any JSON-ish value (NaN, huge ints, lone surrogates included)."""
    return st.recursive(
        json_scalars(),
        lambda inner: st.one_of(
            st.lists(inner, max_size=5),
            st.dictionaries(st.text(max_size=12), inner, max_size=5),
        ),
        max_leaves=max_leaves,
    )


def dumps(obj: Any) -> bytes:
    """JSON text as a sloppy sender would write it: NaN and lone surrogates allowed."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=True).encode()


def _field_value(spec: _FieldSpec, depth: int) -> st.SearchStrategy[Any]:
    from protocol import gojson

    codec = spec.codec
    inner = codec.inner if isinstance(codec, gojson._Optional) else codec
    if isinstance(inner, gojson._Struct) and depth < 3:
        return st.one_of(wire_objects(inner.cls, depth + 1), json_values(5))
    if isinstance(inner, gojson._List):
        item = inner.item
        if isinstance(item, gojson._Struct) and depth < 3:
            return st.lists(
                st.one_of(wire_objects(item.cls, depth + 1), json_scalars()), max_size=4
            )
        return st.one_of(st.lists(json_scalars(), max_size=6), json_values(5))
    return st.one_of(json_scalars(), json_values(5))


def wire_objects(cls: type[Wire], depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    """Objects shaped like ``cls`` (its real field names) with hostile values."""
    specs = cls._fields()
    return st.lists(
        st.sampled_from(specs), max_size=min(8, len(specs)), unique_by=lambda s: s.json
    ).flatmap(
        lambda chosen: st.fixed_dictionaries({s.json: _field_value(s, depth) for s in chosen})
    )


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[bytes]) -> bytes:
    """``base`` with a few random edits; sometimes unchanged."""
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "dup", "truncate", "set"]))
        n = len(data)
        if op == "insert" or n == 0:
            at = draw(st.integers(0, n))
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
            continue
        at = draw(st.integers(0, n - 1))
        if op == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[at] = draw(st.sampled_from([0, 0x22, 0x5B, 0x5C, 0x7B, 0x7F, 0x80, 0xFF]))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        elif op == "dup":
            chunk = data[at : at + draw(st.integers(1, 32))]
            data[at:at] = chunk * draw(st.integers(1, 50))
        else:
            del data[at:]
    return bytes(data)


def json_documents(cls: type[Wire] | None = None) -> st.SearchStrategy[bytes]:
    """JSON text for a parser: shaped like ``cls`` if given, then possibly mutated."""
    shaped = wire_objects(cls) if cls is not None else json_values()
    return mutated(shaped.map(dumps))
