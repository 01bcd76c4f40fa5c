"""Prometheus text exposition for `/metrics` (no client library: a few gauges and counters)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Metrics:
    """Named samples: counters are incremented in place (or read, when another part keeps
    the count: `counter`), gauges are read at scrape time."""

    counters: dict[str, float] = field(default_factory=dict)
    read_counters: dict[str, Callable[[], float]] = field(default_factory=dict)
    gauges: dict[str, Callable[[], float]] = field(default_factory=dict)
    help: dict[str, str] = field(default_factory=dict)

    def inc(self, name: str, by: float = 1.0) -> None:
        self.counters[name] = self.counters.get(name, 0.0) + by

    def counter(self, name: str, read: Callable[[], float], help: str = "") -> None:
        """A counter another part keeps (the DERP relay's totals), read at scrape time."""
        self.read_counters[name] = read
        if help:
            self.help[name] = help

    def gauge(self, name: str, read: Callable[[], float], help: str = "") -> None:
        self.gauges[name] = read
        if help:
            self.help[name] = help

    def samples(self) -> tuple[dict[str, float], dict[str, float]]:
        """Every sample's value now: (counters, gauges). One that cannot be read is left out.
        Copies first: this may run in a worker thread while the trio thread counts."""
        counters, gauges = dict(self.counters), {}
        for name, read in list(self.read_counters.items()):
            try:
                counters[name] = float(read())
            except Exception:
                continue
        for name, read in list(self.gauges.items()):
            try:
                gauges[name] = float(read())
            except Exception:
                continue
        return counters, gauges

    def render(self) -> str:
        """The text format: each family's HELP and TYPE once, then its samples."""
        counters, gauges = self.samples()
        lines: list[str] = []
        seen: set[str] = set()

        def family(name: str, kind: str) -> None:
            base = name.split("{")[0]
            if base in seen:
                return
            seen.add(base)
            if base in self.help:
                lines.append(f"# HELP {base} {self.help[base]}")
            lines.append(f"# TYPE {base} {kind}")

        for name in sorted(counters):
            family(name, "counter")
            lines.append(f"{name} {counters[name]:g}")
        for name in sorted(gauges):
            family(name, "gauge")
            lines.append(f"{name} {gauges[name]:g}")
        return "\n".join(lines) + "\n"
