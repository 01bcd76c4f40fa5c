"""Defaults that work behind NAT: the shipped config runs the embedded DERP relay and
STUN (certificate made on first start, pinned by clients), and a server with an
empty DERP map refuses to start, as headscale does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from appliance.config import load_config
from appliance.serve import ServeError, serve
from appliance.setup import example_config
from appliance.tlscerts import cert_name_pin
from tests.realclient import free_port

from .conftest import LOG, START_TIMEOUT


def shipped_config(tmp_path: Path) -> Path:
    """The example config as the .deb ships it, its state and ports moved into the test."""
    state = tmp_path / "state"
    text = example_config().replace("/var/lib/homescale/", f"{state}/")
    port = free_port()
    for old, new in [
        ("/var/run/homescale/homescale.sock", f"{tmp_path}/hs.sock"),
        ("listen_addr: 127.0.0.1:8080", f"listen_addr: 127.0.0.1:{port}"),
        ("server_url: http://127.0.0.1:8080", f"server_url: http://127.0.0.1:{port}"),
        ("metrics_listen_addr: 127.0.0.1:9090", f"metrics_listen_addr: 127.0.0.1:{free_port()}"),
        ('stun_listen_addr: "0.0.0.0:3478"', f'stun_listen_addr: "127.0.0.1:{free_port()}"'),
    ]:
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


async def test_shipped_config_serves_the_embedded_relay_with_a_pinned_cert(
    tmp_path: Path,
) -> None:
    config = load_config(shipped_config(tmp_path), {})
    assert config.derp.server_enabled
    assert config.derp.stun_listen_addr
    assert config.tls_cert_path is not None
    assert not config.tls_cert_path.exists()
    async with trio.open_nursery() as nursery:
        with trio.fail_after(START_TIMEOUT):
            server = await nursery.start(serve, config, LOG)
        derp_map = json.loads(server.tailnet.derp_map_json()[1])
        nursery.cancel_scope.cancel()
    # Made on first start, and what clients are told to pin.
    pin = cert_name_pin(config.tls_cert_path.read_bytes())
    (region,) = derp_map["Regions"].values()
    assert region["RegionID"] == 999
    (node,) = region["Nodes"]
    assert node["CertName"] == pin
    assert node["HostName"] == "127.0.0.1"
    assert node["STUNPort"] == int(config.derp.stun_listen_addr.rsplit(":", 1)[1])
    assert oct(config.tls_key_path.stat().st_mode & 0o777) == "0o600"  # type: ignore[union-attr]


async def test_an_empty_derp_map_refuses_to_start(tmp_path: Path) -> None:
    path = shipped_config(tmp_path)
    path.write_text(
        path.read_text().replace(
            "    enabled: true\n    region_id", "    enabled: false\n    region_id"
        )
    )
    config = load_config(path, {})
    assert not config.derp.server_enabled
    assert config.derp.urls == []
    with pytest.raises(ServeError, match="the DERP map is empty") as e, trio.fail_after(10):
        await serve(config, LOG)
    assert "derp.server.enabled: true" in str(e.value)
    assert not (tmp_path / "hs.sock").exists()
