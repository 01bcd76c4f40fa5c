"""A real tsnet 1.90.9 node completes the ts2021 handshake with our server.

Proves against the real client what the in-memory tests prove against our own:
``/key`` is understood, the Noise IK handshake and controlbase framing match,
the early payload parses, HTTP/2 runs over Noise, and the node's
``/machine/register`` JSON decodes into our RegisterRequest.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio

from appliance.control_conn import ControlRequest, ControlResponse, serve_ts2021
from appliance.httpserver import HttpServer, Request, Response
from protocol.keys import MachinePublic, PrivateKey
from protocol.tailcfg import OverTLSPublicKeyResponse, RegisterRequest
from tests import realclient

pytestmark = [pytest.mark.realclient, pytest.mark.usefixtures("realclient_ready")]

LOG = logging.getLogger("test.ts2021_realclient")
AUTH_KEY = "hskey-auth-e2etestkey0123456789"


async def test_real_client_handshake_and_register(tmp_path: Path) -> None:
    server_key = PrivateKey.generate()
    key_requests: list[str] = []
    machine_keys: list[MachinePublic] = []
    registers: list[RegisterRequest] = []
    got_register = trio.Event()

    async def key_route(req: Request) -> Response:
        key_requests.append(req.arg("v"))
        body = OverTLSPublicKeyResponse(publicKey=server_key.machine_public()).to_json()
        return Response.json(body)

    async def control(req: ControlRequest, resp: ControlResponse) -> None:
        machine_keys.append(req.machine_key)
        if req.method == "POST" and req.path == "/machine/register":
            registers.append(RegisterRequest.from_json(req.body))
            got_register.set()
        # Answering is the registration layer's job; any refusal is fine here.
        await resp.respond(501, b"not implemented in this test\n")

    async def ts2021(upgrade) -> None:
        await serve_ts2021(upgrade, server_key, control, logger=LOG)

    http = HttpServer(routes={"/key": key_route}, upgrades={"/ts2021": ts2021}, logger=LOG)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    caddyfile = realclient.write_caddyfile(
        tmp_path / "Caddyfile",
        control_url=f"http://127.0.0.1:{port}",
        state_dir=tmp_path / "ts",
        nodes=[realclient.TsnetNode("nodea", auth_key=AUTH_KEY, port=18080)],
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(http.serve, listeners)
        caddy = await realclient.start_caddy(nursery, caddyfile, tmp_path)
        try:
            with trio.fail_after(25):
                await got_register.wait()
        except trio.TooSlowError:
            pytest.fail(f"no /machine/register within 25 s; client log:\n{caddy.text()[-4000:]}")
        finally:
            await realclient.stop_caddy(caddy)
            nursery.cancel_scope.cancel()

    assert key_requests
    assert key_requests[0] == "130"
    reg = registers[0]
    assert reg.Version == 130
    assert not reg.NodeKey.is_zero()
    assert reg.Auth is not None
    assert reg.Auth.AuthKey == AUTH_KEY
    assert reg.Hostinfo is not None
    assert reg.Hostinfo.Hostname == "nodea"
    # Every request on the connection carried the same (client's) machine key.
    assert len(set(machine_keys)) == 1
    assert not machine_keys[0].is_zero()
    assert machine_keys[0] != server_key.machine_public()
