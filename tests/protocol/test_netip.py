"""protocol.netip follows Go's net/netip parsers; gojson applies them (and ranges) on decode."""

from __future__ import annotations

import pytest

from protocol.gojson import RemoteWireError
from protocol.netip import NetipError, parse_addr_port, parse_prefix
from protocol.tailcfg import Hostinfo, MapRequest, NetInfo, Node

NK = "nodekey:" + "ab" * 32


@pytest.mark.parametrize(
    "text",
    ["1.2.3.4:41641", "[::1]:41641", "[fe80::1%eth0]:1", "1.2.3.4:080", "[::ffff:1.2.3.4]:5"],
)
def test_addr_ports_go_accepts(text: str) -> None:
    parse_addr_port(text)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("not-an-endpoint", "not an ip:port"),
        ("1.2.3.4:70000", "invalid port"),
        ("[::1]", "missing ]"),
        ("::1:80", "must be surrounded by square brackets"),
        ("[1.2.3.4]:80", "square brackets can only be used with IPv6"),
        ("01.2.3.4:1", "Leading zeros"),
        ("1.2.3.4:+80", "invalid port"),
        ("1.2.3.4:", "invalid port"),
        ("1.2.3.4:\u0661", "invalid port"),  # an Arabic-Indic digit: int() takes it, Go not
        ("[::1%]:1", "Invalid IPv6"),
        ("1.2.3.4:1" + " " * 200, "too long"),
    ],
)
def test_addr_ports_go_refuses(text: str, why: str) -> None:
    with pytest.raises(NetipError, match=why):
        parse_addr_port(text)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("not-a-prefix", "no '/'"),
        ("10.0.0.0/33", "out of range"),
        ("::/129", "out of range"),
        ("10.0.0.0/08", "bad bits"),
        ("10.0.0.0/-1", "bad bits"),
        ("10.0.0.0/", "bad bits"),
        ("10.0.0.0/\u00b2", "bad bits"),
        ("fe80::1%eth0/64", "zones cannot be present"),
    ],
)
def test_prefixes_go_refuses(text: str, why: str) -> None:
    with pytest.raises(NetipError, match=why):
        parse_prefix(text)


def test_unmasked_prefix_is_go_valid_but_not_a_route() -> None:
    assert str(parse_prefix("10.0.0.1/8")) == "10.0.0.0/8"
    with pytest.raises(NetipError, match=r"host bits set; the prefix is 10\.0\.0\.0/8"):
        parse_prefix("10.0.0.1/8", masked=True)


def test_decode_names_field_and_value() -> None:
    with pytest.raises(RemoteWireError) as ei:
        MapRequest.from_json({"NodeKey": NK, "Endpoints": ["1.2.3.4:1", "[::1]"]})
    assert "MapRequest.Endpoints[1]" in str(ei.value)
    assert "'[::1]'" in str(ei.value)
    with pytest.raises(RemoteWireError, match=r"Hostinfo.RoutableIPs\[0\]: 'x' is not a valid"):
        Hostinfo.from_json({"RoutableIPs": ["x"]})


@pytest.mark.parametrize(
    ("obj", "why"),
    [
        ({"PreferredDERP": 2**70}, "PreferredDERP: 1180591620717411303424 is out of"),
        ({"PreferredDERP": -1}, "out of range"),
        ({"DERPLatency": {"1-v4": float("nan")}}, "not a finite number"),
        ({"DERPLatency": {str(i): 0.1 for i in range(300)}}, "300 items"),
        ({"LinkType": "x" * 5000}, "5000 characters"),
    ],
)
def test_netinfo_ranges(obj: dict[str, object], why: str) -> None:
    with pytest.raises(RemoteWireError, match=why):
        NetInfo.from_json(obj)


def test_int64_everywhere_and_uint64_where_go_has_it() -> None:
    with pytest.raises(RemoteWireError, match="int64 range"):
        MapRequest.from_json({"NodeKey": NK, "MapSessionSeq": 2**63})
    assert Hostinfo.from_json({"TPM": {"FirmwareVersion": 2**64 - 1}}).TPM is not None
    with pytest.raises(RemoteWireError, match="out of range"):
        Hostinfo.from_json({"TPM": {"FirmwareVersion": 2**64}})


def test_null_in_an_endpoint_list_is_refused() -> None:
    """null is Go's zero AddrPort (""), which is no endpoint at all."""
    with pytest.raises(RemoteWireError, match=r"Endpoints\[0\]"):
        MapRequest.from_json({"NodeKey": NK, "Endpoints": [None]})


def test_integer_map_keys_are_go_integers() -> None:
    from protocol.tailcfg import DERPMap

    assert DERPMap.from_json({"Regions": {"900": {"RegionID": 900}}}).Regions
    for bad in ["1_000", " 7", "\u0661", "99999999999999999999"]:
        with pytest.raises(RemoteWireError, match="map key"):
            DERPMap.from_json({"Regions": {bad: {"RegionID": 1}}})


def test_zero_node_key_names_nobody() -> None:
    with pytest.raises(RemoteWireError, match=r"MapRequest\.NodeKey: the zero key"):
        MapRequest.from_json({"NodeKey": "nodekey:" + "0" * 64})
    # Elsewhere the zero key is Go's "unset" and stays allowed.
    assert Node.from_json({"Key": "nodekey:" + "0" * 64}).Key.is_zero()
