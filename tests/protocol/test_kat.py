"""Known-answer vectors from a real client (tsnet v1.90.9): our code must read what Go wrote.

The fixtures in tests/protocol/kat/ were captured at a homescale server while
real tsnet nodes registered, streamed their maps and talked over the embedded
DERP relay (how: kat/README.md; re-record with kat/record.sh). The client's
keys in them come from the client's own state file, so none of these checks
compares our code with itself: a wire bug shared by our client and our server
fails here. They need no real client, network or Go toolchain.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from derp.codec import (
    PROTOCOL_VERSION,
    ClientInfo,
    DerpServerConnection,
    NotePreferred,
    SendPacket,
    UnknownFrame,
)
from derp.errors import RemoteDerpError
from protocol import noise
from protocol.keys import MachinePublic, NodePublic, PrivateKey
from protocol.tailcfg import MapRequest, RegisterRequest
from tests.protocol.kat_record import H2Requests, split_records

KAT = Path(__file__).resolve().parent / "kat"
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
CAPVER = 130  # tailscale v1.90.9


def load(name: str) -> dict[str, Any]:
    return dict(json.loads((KAT / name).read_text()))


def key(obj: dict[str, Any], name: str) -> PrivateKey:
    return PrivateKey(bytes.fromhex(obj[name]))


# --- ts2021: Noise and HTTP/2 ----------------------------------------------------------


def accept(ts: dict[str, Any], server: PrivateKey | None = None) -> noise.Accepted:
    """Our responder on the recorded initiation, with the recorded server-side keys."""
    return noise.respond(
        server or key(ts, "server_noise_private"),
        bytes.fromhex(ts["initiation"]),
        ephemeral=key(ts, "responder_ephemeral_private"),
    )


def client_bytes(obj: dict[str, Any]) -> bytes:
    return base64.b64decode(obj["client_to_server"])


def test_real_initiation_yields_the_clients_machine_key_and_capver() -> None:
    ts = load("ts2021.json")
    accepted = accept(ts)
    assert accepted.machine_key == MachinePublic.parse(ts["machine_key"])
    assert accepted.version == CAPVER


def test_real_initiation_under_another_server_key_is_rejected_without_error_frame() -> None:
    ts = load("ts2021.json")
    with pytest.raises(noise.HandshakeRejected) as e:
        accept(ts, server=PrivateKey.generate())
    assert e.value.refusal is None  # Go closes silently on a decryption failure


def test_real_records_decrypt_to_http2_with_the_register_and_map_requests() -> None:
    ts = load("ts2021.json")
    transport = accept(ts).transport
    records = split_records(client_bytes(ts))
    assert b"".join(records) == client_bytes(ts), "the capture ends inside a record"
    assert all(len(r) <= noise.MAX_MESSAGE_SIZE for r in records)
    plain = b""
    for r in records:
        transport.receive_data(r)
        plain += transport.read()
    assert plain.startswith(H2_PREFACE)

    reqs = H2Requests()
    reqs.feed(plain)
    assert reqs.preface_ok
    register = reqs.bodies("/machine/register")
    maps = reqs.bodies("/machine/map")
    assert register[0] == (KAT / "register_request.json").read_bytes()
    assert (KAT / "map_request.json").read_bytes() in maps
    methods = {r["headers"][":method"] for r in reqs.requests.values()}
    assert methods == {"POST"}


def test_tampered_real_record_is_refused() -> None:
    ts = load("ts2021.json")
    data = bytearray(client_bytes(ts))
    data[40] ^= 0x01  # inside the first record's ciphertext
    with pytest.raises(noise.RemoteNoiseError):
        accept(ts).transport.receive_data(bytes(data))


@pytest.mark.parametrize(
    ("cls", "name"), [(RegisterRequest, "register_request.json"), (MapRequest, "map_request.json")]
)
def test_real_request_bodies_decode_completely_and_reencode_identically(
    cls: type[RegisterRequest] | type[MapRequest], name: str
) -> None:
    ts = load("ts2021.json")
    raw = (KAT / name).read_bytes()
    req = cls.from_json(raw)
    assert not req.extra, f"fields our {cls.__name__} lacks: {sorted(req.extra)}"
    assert req.Hostinfo is not None
    assert not req.Hostinfo.extra, f"fields our Hostinfo lacks: {sorted(req.Hostinfo.extra)}"
    assert req.Version == CAPVER
    assert req.NodeKey == NodePublic.parse(ts["node_key"])
    assert req.Hostinfo.Hostname == ts["hostname"]
    # Every field Go wrote comes back with the same name and value.
    assert req.to_json() == json.loads(raw)


def test_real_map_request_is_a_zstd_stream() -> None:
    req = MapRequest.from_json((KAT / "map_request.json").read_bytes())
    assert req.Stream is True
    assert req.Compress == "zstd"
    assert not req.DiscoKey.is_zero()


# --- DERP ------------------------------------------------------------------------------


def test_real_derp_client_frames_parse() -> None:
    d = load("derp.json")
    conn = DerpServerConnection(bytes.fromhex(d["server_derp_private"]))
    conn.start()
    events = conn.receive_data(client_bytes(d))
    assert len(events) == 1
    info = events[0]
    assert isinstance(info, ClientInfo)
    # Sealed with the key from our ServerKey frame, opened with the recorded private key.
    assert info.key == NodePublic.parse(d["node_key"]).raw
    assert info.version == PROTOCOL_VERSION
    assert info.mesh_key is None
    conn.accept()
    later = conn.receive_data(b"")
    assert not [e for e in later if isinstance(e, UnknownFrame)], later
    assert any(isinstance(e, NotePreferred) for e in later), later
    sends = [e for e in later if isinstance(e, SendPacket)]
    assert sends, later
    assert sends[-1].dst == NodePublic.parse(d["peer_node_key"]).raw
    assert sends[-1].data


def test_real_derp_client_info_under_another_server_key_is_refused() -> None:
    d = load("derp.json")
    conn = DerpServerConnection(PrivateKey.generate().raw)
    conn.start()
    with pytest.raises(RemoteDerpError):
        conn.receive_data(client_bytes(d))
