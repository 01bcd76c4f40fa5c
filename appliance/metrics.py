"""Prometheus text exposition for `/metrics` (no client library: a few gauges and counters)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Metrics:
    """Named samples: counters are incremented in place, gauges are read at scrape time."""

    counters: dict[str, float] = field(default_factory=dict)
    gauges: dict[str, Callable[[], float]] = field(default_factory=dict)
    help: dict[str, str] = field(default_factory=dict)

    def inc(self, name: str, by: float = 1.0) -> None:
        self.counters[name] = self.counters.get(name, 0.0) + by

    def gauge(self, name: str, read: Callable[[], float], help: str = "") -> None:
        self.gauges[name] = read
        if help:
            self.help[name] = help

    def render(self) -> str:
        lines: list[str] = []
        for name in sorted(self.counters):
            base = name.split("{")[0]
            if base in self.help:
                lines.append(f"# HELP {base} {self.help[base]}")
            lines.append(f"# TYPE {base} counter")
            lines.append(f"{name} {self.counters[name]:g}")
        for name in sorted(self.gauges):
            base = name.split("{")[0]
            if base in self.help:
                lines.append(f"# HELP {base} {self.help[base]}")
            lines.append(f"# TYPE {base} gauge")
            try:
                value = float(self.gauges[name]())
            except Exception:
                continue
            lines.append(f"{name} {value:g}")
        return "\n".join(lines) + "\n"
