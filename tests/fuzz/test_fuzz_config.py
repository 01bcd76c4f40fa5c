"""Fuzz target: the config file (appliance/config.py load_config).

A config comes from an admin, not a peer, but a typo must still end in a
ConfigError that names the file and line, never a traceback. Inputs: headscale's
own config-example.yaml mutated, and mappings of real keys (homescale's, the
unsupported ones, the removed ones) with hostile values (JSON is YAML 1.2).
Property: a Config comes out, or ConfigError.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from appliance.config import REMOVED, SCHEMA, UNSUPPORTED, load_config
from appliance.errors import ConfigError
from tests.fuzz.harness import fuzz_tests
from tests.fuzz.strategies import dumps, json_values, mutated

EXAMPLE = Path(__file__).parent.parent / "fixtures" / "headscale" / "config-example.yaml"
KEYS = sorted({*SCHEMA, *REMOVED, *(k.rstrip(".") for k in UNSUPPORTED)})


def check(data: bytes) -> None:
    with tempfile.TemporaryDirectory(prefix="hs-fuzz-config-") as d:
        path = Path(d) / "config.yaml"
        path.write_bytes(data)
        load_config(path, {})


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{"a.b": 1} -> {"a": {"b": 1}}; a key that is both a value and a section keeps one."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, last = key.split(".")
        for p in parents:
            child = node.get(p)
            if not isinstance(child, dict):
                child = node[p] = {}
            node = child
        node[last] = value
    return out


def _configs() -> st.SearchStrategy[bytes]:
    flat = st.dictionaries(st.sampled_from(KEYS), json_values(4), max_size=8)
    return st.one_of(
        mutated(st.just(EXAMPLE.read_bytes())),
        flat.map(lambda f: dumps(_nest(f))),
        json_values().map(dumps),
    )


test_fuzz, test_corpus = fuzz_tests("config", _configs(), check, expected=(ConfigError,))
