"""Fuzz targets: the Noise IK handshake (both sides), transport records, early payload.

Property: each parser returns or raises RemoteNoiseError (HandshakeRejected and
HandshakeRefused are kinds of it); nothing else, whatever the peer sends.
"""

from __future__ import annotations

from hypothesis import strategies as st

from protocol.keys import PrivateKey
from protocol.noise import (
    EARLY_PAYLOAD_HEADER_LEN,
    Initiator,
    NoiseTransport,
    RemoteNoiseError,
    encode_early_payload,
    parse_early_payload,
    respond,
)
from tests.fuzz.harness import fuzz_tests
from tests.fuzz.strategies import mutated

# Fixed keys: the fuzzer mutates bytes, not key choices (and runs stay repeatable).
SERVER = PrivateKey(bytes(range(1, 33)))
MACHINE = PrivateKey(bytes(range(33, 65)))
EPHEMERAL = PrivateKey(bytes(range(65, 97)))


def _initiator() -> Initiator:
    return Initiator(MACHINE, SERVER.machine_public(), 130, ephemeral=EPHEMERAL)


INITIATION = _initiator().initiation
RESPONSE = respond(SERVER, INITIATION, ephemeral=PrivateKey(bytes(range(97, 129)))).response


def _pair() -> tuple[NoiseTransport, NoiseTransport]:
    """A client and a server transport with the same keys every time."""
    init = _initiator()
    accepted = respond(SERVER, init.initiation, ephemeral=PrivateKey(bytes(range(97, 129))))
    client = init.receive_data(accepted.response)
    assert client is not None
    return client, accepted.transport


def check_initiation(data: bytes) -> None:
    respond(SERVER, data)


def check_response(data: bytes) -> None:
    _initiator().receive_data(data)


def check_records(data: bytes) -> None:
    _, server = _pair()
    # Fed in two pieces: a record split across reads must behave the same.
    server.receive_data(data[: len(data) // 2])
    server.receive_data(data[len(data) // 2 :])
    server.read()


def _records() -> st.SearchStrategy[bytes]:
    def build(chunks: list[bytes]) -> bytes:
        client, _ = _pair()
        return b"".join(client.send(c) for c in chunks)

    return mutated(st.lists(st.binary(max_size=300), min_size=1, max_size=4).map(build))


def check_early_payload(data: bytes) -> None:
    parse_early_payload(data)


_early = encode_early_payload(PrivateKey(bytes(range(2, 34))).challenge_public())

test_fuzz_initiation, test_corpus_initiation = fuzz_tests(
    "noise_initiation",
    st.one_of(mutated(st.just(INITIATION)), st.binary(min_size=101, max_size=101)),
    check_initiation,
    expected=(RemoteNoiseError,),
)
test_fuzz_response, test_corpus_response = fuzz_tests(
    "noise_response",
    st.one_of(mutated(st.just(RESPONSE)), st.binary(max_size=80)),
    check_response,
    expected=(RemoteNoiseError,),
)
test_fuzz_records, test_corpus_records = fuzz_tests(
    "noise_records", _records(), check_records, expected=(RemoteNoiseError,)
)
test_fuzz_early_payload, test_corpus_early_payload = fuzz_tests(
    "noise_early_payload",
    st.one_of(
        mutated(st.just(_early)),
        st.binary(max_size=64).map(lambda b: b"\xff\xff\xffTS" + len(b).to_bytes(4, "big") + b),
        st.binary(max_size=EARLY_PAYLOAD_HEADER_LEN + 8),
    ),
    check_early_payload,
    expected=(RemoteNoiseError,),
)
