"""protocol.safejson: Go's JSON grammar with limits; every refusal names problem and byte."""

from __future__ import annotations

import json

import pytest

from protocol.safejson import JSONInputError, loads


@pytest.mark.parametrize(
    "doc",
    [
        b'{"a": [1, 2.5, -3e2, true, false, null, "x"]}',
        b'"\\ud83d\\ude00"',  # a proper surrogate pair is one emoji
        '{"name": "caf\u00e9"}',
        b'{"a": "[[[[[[[[[[[[[[[[[[[["}',  # brackets in strings do not count as depth
        b" [ ] ",
        b'"\\\\ud800"',  # an escaped backslash, not a surrogate escape
        b'{"k": 1, "k": 2}',  # Go and Python both keep the last
    ],
)
def test_accepts_what_go_accepts(doc: bytes | str) -> None:
    assert loads(doc) == json.loads(doc)


@pytest.mark.parametrize(
    ("doc", "reason", "pos"),
    [
        (b"[" * 100_000, "nested deeper than 64 levels", 64),
        (b'{"a":' * 100 + b"1" + b"}" * 100, "nested deeper", 320),
        (b"1" * 5000, "number literal of 5000 characters", 0),
        (b'{"v": -' + b"9" * 100 + b"}", "number literal of 101 characters", 6),
        (b"NaN", "NaN is not JSON", 0),
        (b"[1, Infinity]", "Infinity is not JSON", 4),
        (b'{"x": -Infinity}', "-Infinity is not JSON", 6),
        (b"[1e400]", "out of float64 range", 1),
        (b'{"a": "\xff"}', "invalid UTF-8", 7),
        (b'"\xed\xa0\x80"', "invalid UTF-8", 1),  # a surrogate encoded as UTF-8
        (b'["\\ud800"]', "lone UTF-16 surrogate", 2),
        (b'{"\\udc00": 1}', "lone UTF-16 surrogate", 2),
        (b"\xef\xbb\xbf{}", "BOM", 0),
        (b'{"a": 1} x', "Extra data", 9),
        (b'"caf\xc3\xa9\x01"', "Invalid control character", 6),
        ("\ud800", "lone surrogate in text", 0),
        (b"", "Expecting value", 0),
    ],
)
def test_refusals_name_problem_and_byte(doc: bytes | str, reason: str, pos: int) -> None:
    with pytest.raises(JSONInputError) as ei:
        loads(doc)
    assert reason in str(ei.value)
    assert ei.value.pos == pos
    assert f"at byte {pos}" in str(ei.value)


def test_size_limit_is_checked_before_parsing() -> None:
    with pytest.raises(JSONInputError, match="larger than 10 bytes"):
        loads(b'"' + b"a" * 20 + b'"', max_bytes=10)
    with pytest.raises(JSONInputError, match="larger than 10 bytes"):
        loads('"' + "a" * 20 + '"', max_bytes=10)


def test_limits_are_adjustable() -> None:
    assert loads(b"[[[1]]]", max_depth=3) == [[[1]]]
    with pytest.raises(JSONInputError, match="deeper than 2"):
        loads(b"[[[1]]]", max_depth=2)
    assert loads(b"12345", max_number_len=5) == 12345
    with pytest.raises(JSONInputError, match="number literal"):
        loads(b"123456", max_number_len=5)


def test_error_is_a_value_error() -> None:
    """Callers that already catch ValueError keep working."""
    with pytest.raises(ValueError, match="invalid JSON at byte"):
        loads(b"{")
