from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import noise
from protocol.keys import PrivateKey


def _pair(version: int = 130):
    server = PrivateKey.generate()
    machine = PrivateKey.generate()
    ini = noise.Initiator(machine, server.machine_public(), version)
    acc = noise.respond(server, ini.initiation)
    client_t = ini.receive_data(acc.response)
    assert client_t is not None
    return server, machine, ini, acc, client_t


def test_initiation_layout() -> None:
    _, _, ini, _, _ = _pair(130)
    msg = ini.initiation
    assert len(msg) == 101
    assert msg[:5] == b"\x00\x82\x01\x00\x60"


def test_handshake_recovers_machine_key_and_version() -> None:
    _, machine, _, acc, _ = _pair(82)
    assert len(acc.response) == 51
    assert acc.response[:3] == b"\x02\x00\x30"
    assert acc.machine_key == machine.machine_public()
    assert acc.version == 82
    assert acc.transport.peer == machine.machine_public()


def test_both_directions_carry_bytes() -> None:
    _, _, _, acc, client = _pair()
    acc.transport.receive_data(client.send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"))
    assert acc.transport.read() == b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    client.receive_data(acc.transport.send(b"hello"))
    assert client.read() == b"hello"


def test_record_layout_and_big_endian_nonce() -> None:
    _, _, _, acc, client = _pair()
    rec0 = client.send(b"a")
    rec1 = client.send(b"b")
    assert rec0[:3] == b"\x04\x00\x11"  # 1 byte + 16-byte tag
    # Feeding the second record first must fail: nonces are sequential.
    with pytest.raises(noise.RemoteNoiseError):
        acc.transport.receive_data(rec1)


def test_records_in_order_decrypt() -> None:
    _, _, _, acc, client = _pair()
    acc.transport.receive_data(client.send(b"a") + client.send(b"b"))
    assert acc.transport.read() == b"ab"


def test_big_write_splits_at_4077() -> None:
    _, _, _, acc, client = _pair()
    data = bytes(range(256)) * 40  # 10240 bytes
    wire = client.send(data)
    lengths = []
    pos = 0
    while pos < len(wire):
        assert wire[pos] == 4
        (n,) = struct.unpack_from(">H", wire, pos + 1)
        lengths.append(n)
        pos += 3 + n
    assert [n - 16 for n in lengths] == [4077, 4077, 10240 - 2 * 4077]
    assert max(lengths) + 3 <= 4096
    acc.transport.receive_data(wire)
    assert acc.transport.read() == data


@settings(max_examples=30, deadline=None)
@given(st.binary(max_size=9000), st.integers(min_value=1, max_value=700))
def test_byte_by_byte_and_chunked_delivery(data: bytes, chunk: int) -> None:
    _, _, _, acc, client = _pair()
    wire = client.send(data)
    got = bytearray()
    for i in range(0, len(wire), chunk):
        acc.transport.receive_data(wire[i : i + chunk])
        got += acc.transport.read()
    assert bytes(got) == data
    assert not acc.transport.has_partial_record


def test_tampering_is_rejected_and_sticky() -> None:
    _, _, _, acc, client = _pair()
    wire = bytearray(client.send(b"secret"))
    wire[5] ^= 1
    with pytest.raises(noise.RemoteNoiseError, match="decrypt"):
        acc.transport.receive_data(bytes(wire))
    assert acc.transport.read() == b""
    with pytest.raises(noise.RemoteNoiseError):
        acc.transport.receive_data(client.send(b"more"))


def test_oversized_record_rejected() -> None:
    _, _, _, acc, _ = _pair()
    with pytest.raises(noise.RemoteNoiseError, match="exceeds"):
        acc.transport.receive_data(b"\x04" + struct.pack(">H", 4094))


def test_wrong_record_type_rejected() -> None:
    _, _, _, acc, _ = _pair()
    with pytest.raises(noise.RemoteNoiseError, match="unexpected type"):
        acc.transport.receive_data(b"\x02\x00\x00")


def test_wrong_server_key_closes_without_error_frame() -> None:
    server = PrivateKey.generate()
    other = PrivateKey.generate()
    ini = noise.Initiator(PrivateKey.generate(), other.machine_public(), 130)
    with pytest.raises(noise.HandshakeRejected) as ei:
        noise.respond(server, ini.initiation)
    assert ei.value.refusal is None


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda m: m[:100], "wrong handshake initiation size"),
        (lambda m: m[:2] + b"\x07" + m[3:], "unexpected handshake message type"),
        (lambda m: m[:3] + b"\x00\x61" + m[5:], "wrong handshake initiation length"),
    ],
)
def test_malformed_initiation_gets_error_frame(mutate, reason: str) -> None:
    server = PrivateKey.generate()
    ini = noise.Initiator(PrivateKey.generate(), server.machine_public(), 130)
    with pytest.raises(noise.HandshakeRejected) as ei:
        noise.respond(server, mutate(ini.initiation))
    assert ei.value.refusal == noise.error_frame(reason)
    # ...and the client reports it as the server's message.
    with pytest.raises(noise.HandshakeRefused, match=reason):
        ini.receive_data(ei.value.refusal)


@settings(max_examples=50, deadline=None)
@given(st.binary(min_size=101, max_size=101))
def test_random_initiation_is_rejected_not_crashed(garbage: bytes) -> None:
    with pytest.raises(noise.HandshakeRejected):
        noise.respond(PrivateKey.generate(), garbage)


def test_tampered_response_fails_client() -> None:
    server = PrivateKey.generate()
    ini = noise.Initiator(PrivateKey.generate(), server.machine_public(), 130)
    acc = noise.respond(server, ini.initiation)
    bad = bytearray(acc.response)
    bad[40] ^= 0x80
    with pytest.raises(noise.RemoteNoiseError):
        ini.receive_data(bytes(bad))
    assert ini.state is noise.InitiatorState.FAILED


def test_response_split_and_trailing_records_reach_transport() -> None:
    server = PrivateKey.generate()
    ini = noise.Initiator(PrivateKey.generate(), server.machine_public(), 130)
    acc = noise.respond(server, ini.initiation)
    wire = acc.response + acc.transport.send(b"early")
    assert ini.receive_data(wire[:10]) is None
    t = ini.receive_data(wire[10:])
    assert t is not None
    assert t.read() == b"early"


def test_early_payload_round_trip() -> None:
    chal = PrivateKey.generate().challenge_public()
    blob = noise.encode_early_payload(chal)
    assert blob.startswith(b"\xff\xff\xffTS")
    assert b'{"nodeKeyChallenge":"chalpub:' in blob
    for cut in range(len(blob)):
        assert noise.parse_early_payload(blob[:cut]) is None
    parsed = noise.parse_early_payload(blob + b"PRI")
    assert parsed is not None
    payload, used = parsed
    assert used == len(blob)
    assert payload is not None
    assert payload.node_key_challenge == chal


def test_no_early_payload_means_http2_starts_at_once() -> None:
    assert noise.parse_early_payload(b"PRI * HTTP/2.0\r\n") == (None, 0)


def test_early_payload_bad_json_is_remote_error() -> None:
    body = b'{"nodeKeyChallenge":"chalpub:zz"}'
    blob = noise.EARLY_PAYLOAD_MAGIC + struct.pack(">I", len(body)) + body
    with pytest.raises(noise.RemoteNoiseError):
        noise.parse_early_payload(blob)


def test_error_hierarchy() -> None:
    assert issubclass(noise.HandshakeRefused, noise.RemoteNoiseError)
    assert issubclass(noise.LocalNoiseError, noise.NoiseError)
    assert issubclass(noise.RemoteNoiseError, noise.NoiseError)
