from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest

from protocol.gojson import ZERO_TIME, RemoteWireError, format_time, parse_time
from protocol.keys import NodePublic
from protocol.tailcfg import (
    DERPMap,
    DERPNode,
    DERPRegion,
    MapRequest,
    MapResponse,
    Node,
    OverTLSPublicKeyResponse,
    PeerChange,
    RegisterRequest,
    RegisterResponse,
    UserProfile,
    filter_allow_all,
)

NK = "nodekey:" + "ab" * 32


def test_decoder_matches_keys_case_insensitively_and_ignores_unknown() -> None:
    req = RegisterRequest.from_json(
        {"version": 130, "nodekey": NK, "AUTH": {"authkey": "hskey-1"}, "NewField": [1]}
    )
    assert req.Version == 130
    assert req.NodeKey == NodePublic.parse(NK)
    assert req.Auth is not None
    assert req.Auth.AuthKey == "hskey-1"
    assert req.extra == {"NewField": [1]}
    assert "NewField" not in req.to_json()


def test_duplicate_spellings_last_wins() -> None:
    # Go's decoder walks the object's keys in order, so the last spelling wins.
    assert RegisterRequest.from_json({"NodeKey": NK, "Version": 1, "version": 2}).Version == 2
    assert RegisterRequest.from_json({"NodeKey": NK, "version": 2, "Version": 1}).Version == 1


def test_empty_key_string_fails_whole_message() -> None:
    with pytest.raises(RemoteWireError, match="NodeKey"):
        RegisterRequest.from_json({"NodeKey": ""})


def test_wrong_json_types_are_refused() -> None:
    with pytest.raises(RemoteWireError):
        MapRequest.from_json({"Version": "130"})
    with pytest.raises(RemoteWireError):
        MapRequest.from_json({"Stream": 1})
    with pytest.raises(RemoteWireError):
        MapRequest.from_json(b"{not json")
    with pytest.raises(RemoteWireError):
        MapRequest.from_json([])


def test_null_leaves_zero_values() -> None:
    req = RegisterRequest.from_json({"Expiry": None, "NodeKey": NK, "Version": None})
    assert req.Expiry == ZERO_TIME
    assert req.Version == 0
    assert Node.from_json({"Key": None}).Key.is_zero()


def test_empty_time_string_is_an_error() -> None:
    with pytest.raises(RemoteWireError):
        RegisterRequest.from_json({"NodeKey": NK, "Expiry": ""})


def test_logout_expiry_with_offset() -> None:
    req = RegisterRequest.from_json({"NodeKey": NK, "Expiry": "1970-01-01T01:02:03+01:00"})
    assert req.Expiry.timestamp() == 123


def test_time_formats_like_go() -> None:
    assert format_time(ZERO_TIME) == "0001-01-01T00:00:00Z"
    assert format_time(datetime(2026, 4, 10, 15, 15, 53, 464877, tzinfo=UTC)) == (
        "2026-04-10T15:15:53.464877Z"
    )
    t = datetime(2026, 1, 2, 3, 4, 5, 500000, tzinfo=timezone(timedelta(hours=-5)))
    assert format_time(t) == "2026-01-02T03:04:05.5-05:00"
    assert parse_time("2026-04-10T15:15:53.464877073Z").microsecond == 464877
    with pytest.raises(RemoteWireError):
        parse_time("2026-04-10 15:15:53")


def test_node_always_emits_go_non_omitempty_fields() -> None:
    out = Node(ID=7, Name="a.example.").to_json()
    # time.Time and keys are structs/arrays: omitempty cannot drop them.
    assert out["KeyExpiry"] == "0001-01-01T00:00:00Z"
    assert out["Key"] == "nodekey:" + "0" * 64
    assert out["Addresses"] is None
    assert out["Hostinfo"] is None
    assert "Online" not in out
    assert "DERP" not in out


def test_legacy_derp_string_uses_go_tag() -> None:
    n = Node(LegacyDERPString="127.3.3.40:900", HomeDERP=900, Online=False)
    out = n.to_json()
    assert out["DERP"] == "127.3.3.40:900"
    assert out["Online"] is False  # *bool false is still sent
    assert Node.from_json(out) == n


def test_integer_map_keys_are_decimal_strings() -> None:
    dm = DERPMap(
        Regions={
            900: DERPRegion(
                RegionID=900,
                RegionCode="hs",
                RegionName="homescale",
                Nodes=[DERPNode(Name="900a", RegionID=900, HostName="127.0.0.1", IPv6="none")],
            )
        }
    )
    out = json.loads(json.dumps(dm.to_json()))
    assert list(out["Regions"]) == ["900"]
    assert DERPMap.from_json(out) == dm
    resp = MapResponse(OnlineChange={7: False}).to_json()
    assert resp == {"OnlineChange": {"7": False}}
    with pytest.raises(RemoteWireError):
        MapResponse.from_json({"OnlineChange": {"seven": True}})


def test_keepalive_message_is_exactly_keepalive() -> None:
    assert MapResponse(KeepAlive=True).to_json() == {"KeepAlive": True}


def test_packet_filter_empty_list_means_block_all_and_is_sent() -> None:
    assert MapResponse(PacketFilter=[]).to_json() == {"PacketFilter": []}
    assert MapResponse().to_json() == {}
    rules = MapResponse(PacketFilter=filter_allow_all()).to_json()["PacketFilter"]
    assert rules == [
        {"SrcIPs": ["*"], "DstPorts": [{"IP": "*", "Ports": {"First": 0, "Last": 65535}}]}
    ]


def test_peer_change_only_sends_set_fields() -> None:
    pc = PeerChange(NodeID=7, DERPRegion=900, Endpoints=["192.0.2.1:41641"])
    assert pc.to_json() == {"NodeID": 7, "DERPRegion": 900, "Endpoints": ["192.0.2.1:41641"]}


def test_register_response_shape() -> None:
    out = RegisterResponse(MachineAuthorized=True).to_json()
    assert set(out) == {
        "User",
        "Login",
        "NodeKeyExpired",
        "MachineAuthorized",
        "AuthURL",
        "NodeKeySignature",
        "Error",
    }
    assert out["User"]["Created"] == "0001-01-01T00:00:00Z"
    assert out["NodeKeySignature"] is None


def test_bytes_are_base64() -> None:
    req = RegisterRequest(NodeKeySignature=b"\x01\x02")
    assert req.to_json()["NodeKeySignature"] == "AQI="
    got = RegisterRequest.from_json({"NodeKey": NK, "NodeKeySignature": "AQI="})
    assert got.NodeKeySignature == b"\x01\x02"
    with pytest.raises(RemoteWireError, match="base64"):
        RegisterRequest.from_json({"NodeKey": NK, "NodeKeySignature": "!!"})


def test_over_tls_public_key_response() -> None:
    from protocol.keys import MachinePublic

    pub = MachinePublic(bytes(range(32)))
    out = OverTLSPublicKeyResponse(publicKey=pub).to_json()
    assert out == {"legacyPublicKey": "mkey:" + "0" * 64, "publicKey": str(pub)}


def test_user_profile_omits_empty_picture() -> None:
    assert UserProfile(ID=1, LoginName="a", DisplayName="A").to_json() == {
        "ID": 1,
        "LoginName": "a",
        "DisplayName": "A",
    }


def test_map_request_from_real_client_shape() -> None:
    raw = {
        "Version": 130,
        "Compress": "zstd",
        "KeepAlive": True,
        "NodeKey": NK,
        "DiscoKey": "discokey:" + "cd" * 32,
        "Stream": True,
        "Hostinfo": {"Hostname": "nodea", "NetInfo": {"PreferredDERP": 900, "WorkingUDP": True}},
        "Endpoints": ["127.0.0.1:41641"],
        "EndpointTypes": [1],
        "HardwareAttestationKey": None,
    }
    mr = MapRequest.from_json(raw)
    assert mr.Hostinfo is not None
    assert mr.Hostinfo.NetInfo is not None
    assert mr.Hostinfo.NetInfo.PreferredDERP == 900
    out = mr.to_json()
    assert "HardwareAttestationKey" not in out  # omitzero
    assert "HardwareAttestationKeySignatureTimestamp" not in out


@pytest.mark.parametrize(
    "text",
    [
        "9999-12-31T23:59:59-23:59",  # beyond year 9999 in UTC: would overflow when stored
        "0001-01-01T00:00:00+23:59",  # before year 1 in UTC
        "2026-01-01T00:00:00+24:00",  # Go: offset hours below 24
        "2026-01-01T00:00:00+01:60",
        "\uff12\uff10\uff12\uff16-01-01T00:00:00Z",  # full-width digits
    ],
)
def test_times_go_or_utc_cannot_hold_are_refused(text: str) -> None:
    with pytest.raises(RemoteWireError, match="time"):
        RegisterRequest.from_json({"NodeKey": NK, "Expiry": text})
