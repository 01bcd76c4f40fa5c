"""Fuzz target: STUN datagrams (derp/stun.py), as anyone on the internet may send them.

Property: malformed packets are ignored (None) -- the documented contract --
so no exception of any kind is expected.
"""

from __future__ import annotations

from hypothesis import strategies as st

from derp import stun
from tests.fuzz.harness import fuzz_tests
from tests.fuzz.strategies import mutated

TXID = bytes(range(12))


def check(data: bytes) -> None:
    reply = stun.answer(data, "192.0.2.1", 41641)
    if reply is not None:
        parsed = stun.parse_binding_response(reply)
        assert parsed is not None
        assert (str(parsed.ip), parsed.port) == ("192.0.2.1", 41641)
    stun.parse_binding_request(data, require_tailscale=False)
    stun.parse_binding_response(data)


test_fuzz, test_corpus = fuzz_tests(
    "stun",
    st.one_of(
        mutated(st.just(stun.binding_request(TXID))),
        mutated(st.just(stun.binding_response(TXID, "2001:db8::1", 3478))),
        mutated(st.just(stun.binding_response(TXID, "192.0.2.7", 3478))),
        st.binary(max_size=128),
    ),
    check,
    expected=(),
)
