"""Fuzz targets: the DERP frame codec (derp/codec.py), server and client sides.

Property: ``receive_data`` yields events or raises RemoteDerpError; never
anything else (a nacl RuntimeError or RecursionError here once took the whole
relay down). Inputs start with a valid handshake so the fuzzing reaches every
state; the sealed ClientInfo JSON is fuzzed too.
"""

from __future__ import annotations

from hypothesis import strategies as st
from nacl.public import Box, PrivateKey, PublicKey

from derp.codec import (
    DerpClientConnection,
    DerpServerConnection,
    FrameType,
    ServerState,
    encode_frame,
)
from derp.errors import RemoteDerpError
from tests.fuzz.harness import fuzz_tests
from tests.fuzz.strategies import json_documents, mutated

SERVER_PRIV = bytes(range(1, 33))
CLIENT_PRIV = bytes(range(33, 65))
SERVER_PUB = bytes(PrivateKey(SERVER_PRIV).public_key)
CLIENT_PUB = bytes(PrivateKey(CLIENT_PRIV).public_key)
MESH = bytes([7]) * 32


def _sealed_client_info(plaintext: bytes) -> bytes:
    # A fixed nonce keeps the fuzzer's inputs deterministic.
    box = Box(PrivateKey(CLIENT_PRIV), PublicKey(SERVER_PUB))
    return encode_frame(
        FrameType.CLIENT_INFO, CLIENT_PUB + bytes(box.encrypt(plaintext, bytes(24)))
    )


GOOD_INFO = _sealed_client_info(b'{"version":2,"CanAckPings":true}')
MESH_INFO = _sealed_client_info(b'{"version":2,"meshKey":"' + MESH.hex().encode() + b'"}')


def check_server(data: bytes) -> None:
    conn = DerpServerConnection(SERVER_PRIV, mesh_key=MESH)
    conn.start()
    for i in range(0, len(data), 61):  # in pieces, as reads arrive
        conn.receive_data(data[i : i + 61])
        if conn.state is ServerState.VERIFYING:
            conn.accept()
            conn.receive_data(b"")


def _client_frames() -> st.SearchStrategy[bytes]:
    c = DerpClientConnection(CLIENT_PRIV, server_key=SERVER_PUB)
    frames = [
        c.send_packet(SERVER_PUB, b"x" * 40),
        c.send_note_preferred(True),
        c.send_ping(b"12345678"),
        c.send_pong(b"12345678"),
        c.send_watch_conns(),
        c.send_close_peer(SERVER_PUB),
        c.send_forward_packet(SERVER_PUB, CLIENT_PUB, b"y" * 20),
        encode_frame(0x7F, b"unknown"),
    ]
    body = st.lists(st.sampled_from(frames), max_size=6).map(b"".join)
    return st.one_of(
        mutated(st.tuples(st.sampled_from([GOOD_INFO, MESH_INFO]), body).map(b"".join)),
        json_documents().map(_sealed_client_info),
        mutated(st.just(GOOD_INFO)),
    )


def _server_side() -> tuple[bytes, DerpServerConnection]:
    s = DerpServerConnection(SERVER_PRIV)
    hello = s.start()
    s.receive_data(GOOD_INFO)
    return hello + s.accept(), s


def check_client(data: bytes) -> None:
    c = DerpClientConnection(CLIENT_PRIV)
    sent = False
    for i in range(0, len(data), 61):
        c.receive_data(data[i : i + 61])
        if c.server_key is not None and not sent:
            c.send_client_info()  # as the real client does right after ServerKey
            sent = True


def _server_frames() -> st.SearchStrategy[bytes]:
    hello, s = _server_side()
    frames = [
        s.send_packet(CLIENT_PUB, b"z" * 30),
        s.send_keep_alive(),
        s.send_ping(b"abcdefgh"),
        s.send_peer_gone(CLIENT_PUB),
        s.send_peer_present(CLIENT_PUB),
        s.send_health("problem"),
        s.send_restarting(1, 2),
    ]
    # ServerInfo was sealed with a random nonce; any sealed box of ours opens.
    body = st.lists(st.sampled_from(frames), max_size=6).map(b"".join)
    return mutated(body.map(lambda b: hello + b))


test_fuzz_server, test_corpus_server = fuzz_tests(
    "derp_server", _client_frames(), check_server, expected=(RemoteDerpError,)
)
test_fuzz_client, test_corpus_client = fuzz_tests(
    "derp_client", _server_frames(), check_client, expected=(RemoteDerpError,)
)
