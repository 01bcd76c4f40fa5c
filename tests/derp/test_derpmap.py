"""DERPMap building: embedded region, files (YAML/JSON, null removes), URLs with fallback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from derp.derpmap import (
    DerpMapBuilder,
    embedded_region,
    http_get,
    load_derp_map_file,
    merge_regions,
    stun_port_of,
)
from derp.errors import DerpConfigError

# headscale's derp-example.yaml, as operators have it.
HEADSCALE_YAML = """\
regions:
  1: null # Disable DERP region with ID 1
  900:
    regionid: 900
    regioncode: custom
    regionname: My Region
    nodes:
      - name: 900a
        regionid: 900
        hostname: myderp.example.com
        ipv4: 198.51.100.1
        ipv6: 2001:db8::1
        stunport: 0
        stunonly: false
        derpport: 0
"""


def test_embedded_region_from_config_values() -> None:
    region = embedded_region(
        server_url="https://hs.example.com:8443",
        ipv4="192.0.2.5",
        ipv6="none",
        stun_port=stun_port_of("0.0.0.0:3478"),
        cert_name="sha256-raw:ab",
    )
    assert region == {
        "RegionID": 999,
        "RegionCode": "headscale",
        "RegionName": "Headscale Embedded DERP",
        "Nodes": [
            {
                "Name": "999",
                "RegionID": 999,
                "HostName": "hs.example.com",
                "CertName": "sha256-raw:ab",
                "IPv4": "192.0.2.5",
                "IPv6": "none",
                "STUNPort": 3478,
                "DERPPort": 8443,
            }
        ],
    }


@pytest.mark.parametrize(
    ("url", "host", "port"),
    [("https://hs.example.com", "hs.example.com", 443), ("http://[::1]:8080", "::1", 8080)],
)
def test_embedded_region_host_and_default_ports(url: str, host: str, port: int) -> None:
    node = embedded_region(server_url=url)["Nodes"][0]
    assert (node["HostName"], node["DERPPort"]) == (host, port)


def test_bad_server_url_is_named() -> None:
    with pytest.raises(DerpConfigError, match="server_url"):
        embedded_region(server_url="hs.example.com")


def test_headscale_yaml_file_is_read_with_go_field_names(tmp_path: Path) -> None:
    f = tmp_path / "derp.yaml"
    f.write_text(HEADSCALE_YAML)
    regions = load_derp_map_file(f)
    assert regions[1] is None
    assert regions[900] == {
        "RegionID": 900,
        "RegionCode": "custom",
        "RegionName": "My Region",
        "Nodes": [
            {
                "Name": "900a",
                "RegionID": 900,
                "HostName": "myderp.example.com",
                "IPv4": "198.51.100.1",
                "IPv6": "2001:db8::1",
            }
        ],
    }


def test_merge_order_null_removes_and_embedded_wins(tmp_path: Path) -> None:
    base = {
        "Regions": {
            "1": {
                "RegionID": 1,
                "RegionCode": "a",
                "RegionName": "A",
                "Nodes": [{"HostName": "a"}],
            },
            "999": {
                "RegionID": 999,
                "RegionCode": "x",
                "RegionName": "X",
                "Nodes": [{"HostName": "x"}],
            },
        }
    }
    f1 = tmp_path / "base.json"
    f1.write_text(json.dumps(base))
    f2 = tmp_path / "overlay.yaml"
    f2.write_text(HEADSCALE_YAML)
    dm = merge_regions(
        [load_derp_map_file(f1), load_derp_map_file(f2)],
        embedded=embedded_region(server_url="https://hs.example.com"),
    )
    assert list(dm["Regions"]) == ["900", "999"]
    assert dm["Regions"]["999"]["RegionCode"] == "headscale"
    # Nodes without a name get Go-style ones; RegionID is filled from the region.
    region = load_derp_map_file(f1)[1]
    assert region is not None
    assert region["Nodes"][0] == {"Name": "1a", "RegionID": 1, "HostName": "a"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("regions: [1, 2]", "must map region IDs"),
        ("nothing: here", "no 'regions'"),
        ("regions:\n  5:\n    regionid: 6\n    nodes: [{hostname: h}]", "differs from its key 5"),
        (
            "regions:\n  5:\n    nodes: [{hostname: h, derpport: '443'}]",
            "DERPPort must be an integer",
        ),
        ("regions:\n  5:\n    nodes: [{name: x}]", "HostName is required"),
        ("regions:\n  5:\n    regioncode: c\n    nodes: []", "at least one node"),
        ("regions: {", "not valid YAML"),
    ],
)
def test_file_errors_name_the_file_and_the_problem(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(DerpConfigError, match=message) as info:
        load_derp_map_file(f)
    assert str(f) in str(info.value)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DerpConfigError, match=r"cannot read .*nope\.yaml"):
        load_derp_map_file(tmp_path / "nope.yaml")


URL_MAP = json.dumps(
    {
        "Regions": {
            "7": {
                "RegionID": 7,
                "RegionCode": "u",
                "RegionName": "U",
                "Nodes": [{"Name": "7a", "RegionID": 7, "HostName": "u.example"}],
            }
        }
    }
).encode()


async def test_url_failure_keeps_the_last_good_map(autojump_clock) -> None:
    answers: list[object] = [URL_MAP, OSError("connection refused"), "hang", b"not json"]

    async def fetch(url: str) -> bytes:
        a = answers.pop(0)
        if a == "hang":
            await trio.sleep_forever()
        if isinstance(a, Exception):
            raise a
        assert isinstance(a, bytes)
        return a

    b = DerpMapBuilder(urls=["https://maps.example/derp.json"], fetch=fetch, fetch_timeout=5)
    good = await b.refresh()
    assert list(good["Regions"]) == ["7"]
    for expected in ("connection refused", "did not answer within 5 s", "did not return JSON"):
        assert await b.refresh() == good
        assert expected in b.errors["https://maps.example/derp.json"]


async def test_run_reports_only_changed_maps(autojump_clock, tmp_path: Path) -> None:
    f = tmp_path / "m.yaml"
    f.write_text(HEADSCALE_YAML)
    b = DerpMapBuilder(paths=[f])
    await b.refresh()
    seen: list[dict] = []

    async def on_change(dm: dict) -> None:
        seen.append(dm)

    with trio.move_on_after(35):
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: b.run(on_change, update_frequency=10, task_status=task_status)
            )
            await trio.sleep(15)  # one unchanged refresh
            f.write_text(HEADSCALE_YAML.replace("My Region", "Renamed"))
    assert len(seen) == 1
    assert seen[0]["Regions"]["900"]["RegionName"] == "Renamed"


async def test_http_get_reads_a_loopback_server() -> None:
    async def serve(stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some()
        assert data.startswith(b"GET /derp.json HTTP/1.1")
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(URL_MAP), URL_MAP)
        )
        await stream.aclose()

    from functools import partial

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            assert await http_get(f"http://127.0.0.1:{port}/derp.json") == URL_MAP
            nursery.cancel_scope.cancel()
