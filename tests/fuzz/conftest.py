"""Hypothesis profiles of the fuzz targets: short in ``make test``, long in ``make fuzz``."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

from tests.fuzz.harness import (
    LONG_BATCH,
    LONG_PROFILE,
    MINUTES_ENV,
    SHORT_EXAMPLES,
    SHORT_PROFILE,
    fuzz_minutes,
)

# Timing on a shared 2-core box is noise (deadline=None); a hang is caught by
# harness.HANG_SECONDS instead. print_blob: a failure prints how to reproduce it.
_COMMON = settings(deadline=None, suppress_health_check=list(HealthCheck), print_blob=True)
# Derandomized: the short run in `make test` is the same every time (new inputs come
# from the long run, which saves what it finds to the corpus).
settings.register_profile(
    SHORT_PROFILE, parent=_COMMON, max_examples=SHORT_EXAMPLES, derandomize=True
)
settings.register_profile(LONG_PROFILE, parent=_COMMON, max_examples=LONG_BATCH)


def pytest_report_header(config: pytest.Config) -> str:
    minutes = fuzz_minutes()
    if minutes:
        return f"fuzz: long run, {minutes:g} min per target ({MINUTES_ENV})"
    return f"fuzz: short run, {SHORT_EXAMPLES} examples per target + corpus replay"
