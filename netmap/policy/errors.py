"""The policy engine's single error type."""

from __future__ import annotations


class PolicyError(Exception):
    """A policy that cannot be used, located by JSON path and line.

    ``str()`` gives the full located message, e.g.
    ``acls[2].src[0]: group "group:nosuch" is not defined (line 14)``, so the
    CLI (`policy check`) and the server's startup refusal can print it as is.
    Validation collects every problem it finds; the first is this error and
    the rest are in ``others`` so a user fixes them in one round.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str = "",
        line: int | None = None,
        source: str = "<policy>",
        others: list[PolicyError] | None = None,
    ) -> None:
        self.message = message
        self.path = path
        self.line = line
        self.source = source
        self.others = list(others or [])
        super().__init__(self.located())

    def located(self) -> str:
        """The message with its path, line and (non-default) source."""
        text = f"{self.path}: {self.message}" if self.path else self.message
        if self.line is not None:
            text = f"{text} (line {self.line})"
        if self.source and self.source != "<policy>":
            text = f"{self.source}: {text}"
        return text

    def __str__(self) -> str:
        if not self.others:
            return self.located()
        rest = "\n".join(f"  {e.located()}" for e in self.others)
        return f"{self.located()}\nand {len(self.others)} more problem(s):\n{rest}"
