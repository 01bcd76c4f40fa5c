"""Fuzz targets: the tailcfg wire types a node sends us, decoded as Go would.

Property: ``from_json`` returns a value or raises RemoteWireError; a value it
returns re-encodes to JSON that decodes again (so nothing we accept and pass on
is refused by the next decoder, ours or a Go peer's).
"""

from __future__ import annotations

import json
from collections.abc import Callable

from hypothesis import strategies as st

from protocol.gojson import RemoteWireError, Wire
from protocol.tailcfg import Hostinfo, MapRequest, NetInfo, RegisterRequest
from tests.fuzz.harness import fuzz_tests
from tests.fuzz.strategies import dumps, json_documents, mutated, wire_objects

NK = "nodekey:" + "ab" * 32


def _check(cls: type[Wire]) -> Callable[[bytes], None]:
    def check(data: bytes) -> None:
        value = cls.from_json(data)
        again = cls.from_json(value.to_json_bytes())
        assert again.to_json() == value.to_json()
        json.dumps(value.to_json(), allow_nan=False)  # finite, encodable

    return check


def _with_node_key(cls: type[Wire]) -> st.SearchStrategy[bytes]:
    """Messages that pass the NodeKey check, so the fuzzing reaches the other fields."""
    return mutated(wire_objects(cls).map(lambda o: {"NodeKey": NK, **o}).map(dumps))


test_fuzz_maprequest, test_corpus_maprequest = fuzz_tests(
    "tailcfg_maprequest",
    st.one_of(_with_node_key(MapRequest), json_documents(MapRequest)),
    _check(MapRequest),
    expected=(RemoteWireError,),
)
test_fuzz_registerrequest, test_corpus_registerrequest = fuzz_tests(
    "tailcfg_registerrequest",
    st.one_of(_with_node_key(RegisterRequest), json_documents(RegisterRequest)),
    _check(RegisterRequest),
    expected=(RemoteWireError,),
)
test_fuzz_hostinfo, test_corpus_hostinfo = fuzz_tests(
    "tailcfg_hostinfo", json_documents(Hostinfo), _check(Hostinfo), expected=(RemoteWireError,)
)
test_fuzz_netinfo, test_corpus_netinfo = fuzz_tests(
    "tailcfg_netinfo", json_documents(NetInfo), _check(NetInfo), expected=(RemoteWireError,)
)
