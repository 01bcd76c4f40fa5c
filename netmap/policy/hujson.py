"""HuJSON (JSON with comments and trailing commas) that remembers line numbers.

Tailscale policy files are HuJSON (github.com/tailscale/hujson): ``//`` and
``/* */`` comments and a trailing comma after the last array element or object
member. We parse it ourselves rather than stripping comments and handing the
rest to :mod:`json`, because a policy error must say on which line the
offending value sits: objects and arrays come back as :class:`LocDict` /
:class:`LocList`, which carry the line of each member.
"""

from __future__ import annotations

from typing import Any

from .errors import PolicyError


class LocDict(dict[str, Any]):
    """A JSON object with the line of the object and of each member's value."""

    line: int
    lines: dict[str, int]


class LocList(list[Any]):
    """A JSON array with the line of the array and of each element."""

    line: int
    lines: list[int]


_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_WS = " \t\r\n\ufeff"


# Deeper nesting than any policy needs is refused before Python's recursion
# limit is (found by tests/fuzz/test_fuzz_policy.py: 5,000 nested arrays in a
# grant's app values).
MAX_DEPTH = 64


class _Parser:
    def __init__(self, text: str, source: str) -> None:
        self.text = text
        self.source = source
        self.pos = 0
        self.line = 1
        self.depth = 0

    def fail(self, message: str) -> PolicyError:
        return PolicyError(f"invalid HuJSON: {message}", line=self.line, source=self.source)

    def skip(self) -> None:
        """Skip whitespace and comments, counting lines."""
        text, n = self.text, len(self.text)
        while self.pos < n:
            c = text[self.pos]
            if c in _WS:
                if c == "\n":
                    self.line += 1
                self.pos += 1
            elif text.startswith("//", self.pos):
                end = text.find("\n", self.pos)
                self.pos = n if end < 0 else end
            elif text.startswith("/*", self.pos):
                end = text.find("*/", self.pos + 2)
                if end < 0:
                    raise self.fail("unterminated /* comment")
                self.line += text.count("\n", self.pos, end)
                self.pos = end + 2
            else:
                return

    def value(self) -> Any:
        self.skip()
        if self.pos >= len(self.text):
            raise self.fail("unexpected end of input")
        c = self.text[self.pos]
        if c in "{[":
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise self.fail(f"nested deeper than {MAX_DEPTH} levels")
            out = self.obj() if c == "{" else self.arr()
            self.depth -= 1
            return out
        if c == '"':
            return self.string()
        for word, val in (("true", True), ("false", False), ("null", None)):
            if self.text.startswith(word, self.pos):
                self.pos += len(word)
                return val
        return self.number()

    def obj(self) -> LocDict:
        out = LocDict()
        out.line, out.lines = self.line, {}
        self.pos += 1
        while True:
            self.skip()
            if self.text.startswith("}", self.pos):
                self.pos += 1
                return out
            if not self.text.startswith('"', self.pos):
                raise self.fail("expected a quoted member name or '}'")
            key = self.string()
            if key in out:
                # Tailscale's HuJSON parser refuses duplicate names too: with
                # two values the intended one is ambiguous.
                raise self.fail(f"duplicate member name {key!r}")
            self.skip()
            if not self.text.startswith(":", self.pos):
                raise self.fail(f"expected ':' after {key!r}")
            self.pos += 1
            self.skip()
            out.lines[key] = self.line
            out[key] = self.value()
            self.skip()
            if self.text.startswith(",", self.pos):
                self.pos += 1  # a trailing comma is fine: the loop then meets '}'
            elif not self.text.startswith("}", self.pos):
                raise self.fail("expected ',' or '}' in object")

    def arr(self) -> LocList:
        out = LocList()
        out.line, out.lines = self.line, []
        self.pos += 1
        while True:
            self.skip()
            if self.text.startswith("]", self.pos):
                self.pos += 1
                return out
            out.lines.append(self.line)
            out.append(self.value())
            self.skip()
            if self.text.startswith(",", self.pos):
                self.pos += 1
            elif not self.text.startswith("]", self.pos):
                raise self.fail("expected ',' or ']' in array")

    def string(self) -> str:
        text, n = self.text, len(self.text)
        self.pos += 1
        parts: list[str] = []
        start = self.pos
        while True:
            if self.pos >= n:
                raise self.fail("unterminated string")
            c = text[self.pos]
            if c == '"':
                parts.append(text[start : self.pos])
                self.pos += 1
                return "".join(parts)
            if c == "\n":
                raise self.fail("newline inside a string")
            if c == "\\":
                parts.append(text[start : self.pos])
                esc = text[self.pos + 1 : self.pos + 2]
                if esc == "u":
                    parts.append(self.unicode_escape())
                elif esc in _ESCAPES:
                    parts.append(_ESCAPES[esc])
                    self.pos += 2
                else:
                    raise self.fail(f"invalid escape \\{esc}")
                start = self.pos
            else:
                self.pos += 1

    def unicode_escape(self) -> str:
        def four(at: int) -> int:
            digits = self.text[at : at + 4]
            if len(digits) != 4 or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise self.fail("invalid \\u escape")
            return int(digits, 16)

        code = four(self.pos + 2)
        self.pos += 6
        # A UTF-16 surrogate pair written as two escapes is one character.
        if 0xD800 <= code < 0xDC00 and self.text.startswith("\\u", self.pos):
            low = four(self.pos + 2)
            if 0xDC00 <= low < 0xE000:
                self.pos += 6
                return chr(0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00))
        return chr(code)

    def number(self) -> int | float:
        text, start = self.text, self.pos
        while self.pos < len(text) and text[self.pos] in "+-0123456789.eE":
            self.pos += 1
        token = text[start : self.pos]
        if not token:
            raise self.fail(f"unexpected character {text[start]!r}")
        try:
            return float(token) if any(c in token for c in ".eE") else int(token)
        except ValueError:
            raise self.fail(f"invalid number {token!r}") from None


def parse_hujson(text: str, source: str = "<policy>") -> Any:
    """Parse HuJSON text; objects/arrays come back as LocDict/LocList.

    Raises PolicyError (with the line) on malformed input.
    """
    parser = _Parser(text, source)
    value = parser.value()
    parser.skip()
    if parser.pos != len(text):
        raise parser.fail("unexpected content after the top-level value")
    return value
