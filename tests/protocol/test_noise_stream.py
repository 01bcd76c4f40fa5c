from __future__ import annotations

import pytest
import trio
import trio.testing
from trio.testing import check_two_way_stream, memory_stream_pair

from appliance.noise_stream import NoiseStream
from protocol import noise
from protocol.keys import PrivateKey


def _transports() -> tuple[noise.NoiseTransport, noise.NoiseTransport]:
    server = PrivateKey.generate()
    ini = noise.Initiator(PrivateKey.generate(), server.machine_public(), 130)
    acc = noise.respond(server, ini.initiation)
    client = ini.receive_data(acc.response)
    assert client is not None
    return client, acc.transport


async def _noise_pair() -> tuple[NoiseStream, NoiseStream]:
    a, b = memory_stream_pair()
    ct, st = _transports()
    return NoiseStream(a, ct), NoiseStream(b, st)


async def test_conforms_to_trio_stream_contract() -> None:
    with trio.fail_after(60):
        await check_two_way_stream(_noise_pair, None)  # NoiseStream has no clogged variant


async def test_large_transfer_crosses_records() -> None:
    a, b = await _noise_pair()
    payload = bytes(range(256)) * 4000  # ~1 MB, ~250 records
    got = bytearray()

    async def reader() -> None:
        while len(got) < len(payload):
            chunk = await b.receive_some()
            assert chunk
            got.extend(chunk)

    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            n.start_soon(reader)
            await a.send_all(payload)
    assert bytes(got) == payload


async def test_tampered_record_breaks_stream() -> None:
    left, right = memory_stream_pair()
    ct, st = _transports()
    server = NoiseStream(right, st)
    wire = bytearray(ct.send(b"hello"))
    wire[-1] ^= 1
    with trio.fail_after(5):
        await left.send_all(bytes(wire))
        with pytest.raises(trio.BrokenResourceError) as ei:
            await server.receive_some()
    assert isinstance(ei.value.__cause__, noise.RemoteNoiseError)


async def test_eof_mid_record_is_broken_not_clean() -> None:
    left, right = memory_stream_pair()
    ct, st = _transports()
    server = NoiseStream(right, st)
    wire = ct.send(b"hello")
    with trio.fail_after(5):
        await left.send_all(wire[:-2])
        await left.aclose()
        with pytest.raises(trio.BrokenResourceError):
            await server.receive_some()


async def test_initial_ciphertext_is_delivered_first() -> None:
    left, right = memory_stream_pair()
    ct, st = _transports()
    server = NoiseStream(right, st, initial_ciphertext=ct.send(b"early "))
    with trio.fail_after(5):
        await left.send_all(ct.send(b"later"))
        got = b""
        while len(got) < len(b"early later"):
            got += await server.receive_some()
    assert got == b"early later"
