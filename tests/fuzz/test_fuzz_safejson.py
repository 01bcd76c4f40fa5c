"""Fuzz target: protocol.safejson.loads -- a value or JSONInputError, whatever the bytes."""

from __future__ import annotations

import json

from hypothesis import strategies as st

from protocol.safejson import JSONInputError, loads
from tests.fuzz.harness import fuzz_tests
from tests.fuzz.strategies import json_documents


def check(data: bytes) -> None:
    obj = loads(data)
    # Whatever it accepts, Python's own encoder can write back and Go could decode:
    # no NaN, no lone surrogate, no number Go's strconv refuses.
    json.dumps(obj, allow_nan=False).encode("utf-8")


test_fuzz, test_corpus = fuzz_tests(
    "safejson",
    st.one_of(json_documents(), st.binary(max_size=200)),
    check,
    expected=(JSONInputError,),
)
