from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.keys import (
    ChallengePublic,
    DiscoPublic,
    KeyParseError,
    MachinePublic,
    NodePublic,
    PrivateKey,
    load_or_create_private_key,
    read_private_key_file,
)

HEX = "3f649bfcbe8233388a4d91affe62fe8da66ab92f3e8ae70c1d4064b47f160b2d"


def test_text_forms_use_go_prefixes() -> None:
    raw = bytes.fromhex(HEX)
    assert str(MachinePublic(raw)) == "mkey:" + HEX
    assert str(NodePublic(raw)) == "nodekey:" + HEX
    assert str(DiscoPublic(raw)) == "discokey:" + HEX
    assert str(ChallengePublic(raw)) == "chalpub:" + HEX
    assert str(PrivateKey(raw)) == "privkey:" + HEX


def test_parse_accepts_upper_hex_and_emits_lower() -> None:
    k = NodePublic.parse("nodekey:" + HEX.upper())
    assert str(k) == "nodekey:" + HEX


@pytest.mark.parametrize(
    "text",
    [
        "",
        HEX,  # untyped
        "mkey:" + HEX,  # wrong prefix for a node key
        "NODEKEY:" + HEX,  # prefix is case-sensitive
        "nodekey:" + HEX[:-2],  # too short
        "nodekey:" + HEX + "00",  # too long
        "nodekey:" + HEX[:-1] + "g",  # not hex
        "nodekey:" + HEX[:-2] + " 0",  # whitespace bytes.fromhex would skip
    ],
)
def test_parse_rejects_malformed(text: str) -> None:
    with pytest.raises(KeyParseError):
        NodePublic.parse(text)


def test_zero_key_is_absent_but_still_prefixed() -> None:
    z = NodePublic.zero()
    assert z.is_zero()
    assert str(z) == "nodekey:" + "0" * 64
    assert not NodePublic(bytes.fromhex(HEX)).is_zero()


@given(st.binary(min_size=32, max_size=32))
def test_round_trip(raw: bytes) -> None:
    for cls in (MachinePublic, NodePublic, DiscoPublic, ChallengePublic, PrivateKey):
        assert cls.parse(str(cls(raw))) == cls(raw)


def test_public_from_private_matches_rfc7748_vector() -> None:
    # RFC 7748 section 6.1, Alice's key pair.
    priv = PrivateKey(
        bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    )
    assert priv.machine_public().raw.hex() == (
        "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    )


def test_generated_keys_are_distinct_and_clamped() -> None:
    a, b = PrivateKey.generate(), PrivateKey.generate()
    assert a != b
    assert a.raw[0] & 7 == 0
    assert a.raw[31] & 0xC0 == 0x40


def test_private_key_never_printed() -> None:
    k = PrivateKey.generate()
    assert k.raw.hex() not in repr(k)


def test_private_key_file_round_trip(tmp_path) -> None:
    path = tmp_path / "noise_private.key"
    k = load_or_create_private_key(path)
    assert path.read_text().startswith("privkey:")
    assert os.stat(path).st_mode & 0o077 == 0
    assert load_or_create_private_key(path) == k
    path.write_text(str(k) + "\n")  # headscale trims the trailing newline
    assert read_private_key_file(path) == k


def test_private_key_file_garbage_names_the_file(tmp_path) -> None:
    path = tmp_path / "bad.key"
    path.write_text("not a key")
    with pytest.raises(KeyParseError, match=r"bad\.key"):
        read_private_key_file(path)
