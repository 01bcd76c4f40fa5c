"""Local CA + server certificate generation and the DERP CertName pin."""

from __future__ import annotations

import hashlib
import ssl
from functools import partial
from pathlib import Path

import pytest
import trio

from appliance.tlscerts import TLSCertError, cert_name_pin, generate_local_tls, make_server_cert


def test_files_are_written_once_with_private_keys_0600(tmp_path: Path) -> None:
    paths = generate_local_tls(tmp_path / "tls", ["127.0.0.1", "localhost"])
    assert paths.ca_key is not None
    assert paths.ca_cert is not None
    for key in (paths.key, paths.ca_key):
        assert key.stat().st_mode & 0o777 == 0o600
    before = paths.cert.read_bytes()
    with pytest.raises(TLSCertError, match="refusing to overwrite"):
        generate_local_tls(tmp_path / "tls", ["127.0.0.1"])
    assert paths.cert.read_bytes() == before
    # The server file holds the leaf only: a pinned client accepts exactly one cert.
    assert before.count(b"BEGIN CERTIFICATE") == 1


def test_cert_name_pin_is_sha256_of_the_der() -> None:
    cert, _ = make_server_cert(["10.0.0.1"])
    der = ssl.PEM_cert_to_DER_cert(cert.decode())
    assert cert_name_pin(cert) == "sha256-raw:" + hashlib.sha256(der).hexdigest()
    with pytest.raises(TLSCertError):
        cert_name_pin(b"not a cert")


@pytest.mark.parametrize("server_name", ["127.0.0.1", "localhost"])
async def test_a_client_trusting_the_ca_verifies_the_server(
    tmp_path: Path, server_name: str
) -> None:
    paths = generate_local_tls(tmp_path, ["127.0.0.1", "localhost"])
    assert paths.ca_cert is not None
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(paths.cert, paths.key)
    client_ctx = ssl.create_default_context(cafile=str(paths.ca_cert))

    async def serve(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, server_ctx, server_side=True)
        await tls.send_all(b"ok")
        await tls.aclose()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            raw = await trio.open_tcp_stream("127.0.0.1", port)
            tls = trio.SSLStream(raw, client_ctx, server_hostname=server_name)
            assert await tls.receive_some() == b"ok"
            # What a pinned client compares (net/tlsdial SetConfigExpectedCertHash).
            presented = tls.getpeercert(binary_form=True)
            assert "sha256-raw:" + hashlib.sha256(presented).hexdigest() == cert_name_pin(
                paths.cert.read_bytes()
            )
            await tls.aclose()
            nursery.cancel_scope.cancel()


def test_certificate_without_hosts_is_refused() -> None:
    with pytest.raises(TLSCertError, match="at least one"):
        make_server_cert([" "])
