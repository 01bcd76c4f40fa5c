"""The fuzzing harness: one call turns a parser check into a fuzz test and a corpus replay.

A *target* is a name, a Hypothesis strategy producing ``bytes`` (what a peer
could send), a ``check(data)`` that feeds the bytes to the parser, and the
parser's documented error types. The property every target must hold:
``check`` returns, or raises one of the documented errors -- never anything
else, never a hang (an example running longer than ``HANG_SECONDS`` fails).

Two modes, picked by the environment (see tests/fuzz/README.md):

- short (default, part of ``make test``): ``SHORT_EXAMPLES`` examples per
  target, derandomized so the suite is repeatable, plus a replay of every
  file in ``tests/fuzz/corpus/<target>/``;
- long (``HOMESCALE_FUZZ_MINUTES=N``, what ``make fuzz`` sets): each target
  runs batches of random examples for N minutes (capped at ``MAX_MINUTES``).
  A failure found here is written to the corpus directory before the test
  fails, so committing it keeps the regression caught by the short run.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

CORPUS = Path(__file__).parent / "corpus"
MINUTES_ENV = "HOMESCALE_FUZZ_MINUTES"
# A bound on a long run, so a typo in the environment cannot fuzz for days.
MAX_MINUTES = 120.0
SHORT_EXAMPLES = 60
LONG_BATCH = 500  # small: the time budget is checked between batches
# A sans-IO parser has no reason to spend seconds on one input of a few KiB.
HANG_SECONDS = 10

# The two Hypothesis profiles are registered in tests/fuzz/conftest.py.
SHORT_PROFILE = "homescale-fuzz-short"
LONG_PROFILE = "homescale-fuzz-long"


def fuzz_minutes() -> float:
    """Minutes per target for a long run; 0 means the short run of ``make test``."""
    raw = os.environ.get(MINUTES_ENV, "").strip()
    if not raw:
        return 0.0
    try:
        minutes = float(raw)
    except ValueError:
        raise pytest.UsageError(f"{MINUTES_ENV}={raw!r} is not a number of minutes") from None
    return max(0.0, min(minutes, MAX_MINUTES))


def corpus_files(target: str) -> list[Path]:
    d = CORPUS / target
    return (
        sorted(p for p in d.iterdir() if p.is_file() and p.name != "README") if d.is_dir() else []
    )


def corpus_seeds(target: str) -> list[bytes]:
    return [p.read_bytes() for p in corpus_files(target)]


def save_to_corpus(target: str, data: bytes) -> Path:
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    p = d / f"found-{hashlib.sha256(data).hexdigest()[:16]}.bin"
    p.write_bytes(data)
    return p


class Hang(Exception):
    """An example ran longer than HANG_SECONDS."""


@contextmanager
def _hang_guard(seconds: int) -> Iterator[None]:
    # SIGALRM interrupts pure-Python loops; only available in the main thread (pytest's).
    def on_alarm(signum: int, frame: FrameType | None) -> None:
        raise Hang(f"no result after {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def run_check(
    check: Callable[[bytes], object], expected: tuple[type[BaseException], ...], data: bytes
) -> None:
    """The property: a value or a documented error; anything else fails with the input shown."""
    with _hang_guard(HANG_SECONDS):
        try:
            check(data)
        except expected:
            pass


def fuzz_tests(
    target: str,
    inputs: st.SearchStrategy[bytes],
    check: Callable[[bytes], object],
    *,
    expected: tuple[type[BaseException], ...],
) -> tuple[Callable[[], None], Callable[[Path], None]]:
    """``test_fuzz, test_corpus = fuzz_tests(...)`` in a test module: both are collected.

    ``inputs`` should mix well-formed messages with mutations of them and of the
    corpus (see tests/fuzz/strategies.py): pure random bytes rarely get past a
    parser's first check.
    """
    seeds = corpus_seeds(target)
    strategy = st.one_of(inputs, st.sampled_from(seeds)) if seeds else inputs
    last_failure: list[bytes] = []

    def prop(data: bytes) -> None:
        try:
            run_check(check, expected, data)
        except BaseException:
            last_failure[:] = [data]
            raise

    def test_fuzz() -> None:
        minutes = fuzz_minutes()
        if not minutes:
            given(strategy)(settings(settings.get_profile(SHORT_PROFILE))(prop))()
            return
        run = given(strategy)(settings(settings.get_profile(LONG_PROFILE))(prop))
        end = time.monotonic() + minutes * 60
        batches = 0
        while time.monotonic() < end:
            try:
                run()
            except BaseException:
                if last_failure:
                    path = save_to_corpus(target, last_failure[0])
                    print(f"fuzz {target}: failing input saved to {path} (commit it)")
                raise
            batches += 1
        print(f"fuzz {target}: {batches * LONG_BATCH} examples in {minutes:g} min, no failure")

    def test_corpus(path: Path) -> None:
        run_check(check, expected, path.read_bytes())

    files = corpus_files(target)
    # An empty corpus makes pytest skip the replay with "got empty parameter set".
    test_corpus = pytest.mark.parametrize("path", files, ids=[p.name for p in files])(test_corpus)
    test_fuzz.__name__ = f"test_fuzz_{target}"
    test_corpus.__name__ = f"test_corpus_{target}"
    return test_fuzz, test_corpus


def as_bytes(obj: Any) -> bytes:
    """Helper for strategies: JSON text of a value (bytes pass through)."""
    import json

    if isinstance(obj, bytes):
        return obj
    return json.dumps(obj, separators=(",", ":"), allow_nan=True).encode()
