"""Curve25519 key types and their Tailscale text forms.

Tailscale marshals every 32-byte key as ``<prefix>:<64 lowercase hex>``
(types/key/util.go appendHexKey/parseHex). Parsing accepts upper or lower hex
but insists on the exact prefix and exactly 64 hex digits; anything else makes
Go's JSON decoder fail the whole message, so we refuse it the same way.

An all-zero key still has a text form (``nodekey:000...``) and means "absent"
(e.g. ``OldNodeKey`` without a rotation); ``is_zero`` tells them apart.
"""

from __future__ import annotations

import base64
import os
import secrets
from dataclasses import dataclass
from typing import ClassVar, Self

from nacl.bindings import crypto_scalarmult_base

KEY_LEN = 32
_HEX_LEN = 2 * KEY_LEN


class KeyParseError(ValueError):
    """A key's text or bytes are malformed (the peer or a file sent a bad key)."""


@dataclass(frozen=True, slots=True)
class _Key32:
    """32 raw bytes plus the text prefix of its Go type."""

    raw: bytes
    PREFIX: ClassVar[str] = ""

    def __post_init__(self) -> None:
        if not isinstance(self.raw, bytes | bytearray) or len(self.raw) != KEY_LEN:
            raise KeyParseError(f"{type(self).__name__} needs {KEY_LEN} bytes")
        object.__setattr__(self, "raw", bytes(self.raw))

    @classmethod
    def zero(cls) -> Self:
        return cls(bytes(KEY_LEN))

    @classmethod
    def parse(cls, text: str) -> Self:
        """Parse ``<prefix><64 hex>``, upper or lower case hex (key/util.go parseHex)."""
        if not isinstance(text, str) or not text.startswith(cls.PREFIX):
            raise KeyParseError(f"key {text!r} lacks the {cls.PREFIX!r} prefix")
        hexpart = text[len(cls.PREFIX) :]
        if len(hexpart) != _HEX_LEN:
            raise KeyParseError(
                f"key {text!r} must have exactly {_HEX_LEN} hex digits after {cls.PREFIX!r}"
            )
        try:
            raw = bytes.fromhex(hexpart)
        except ValueError:
            raise KeyParseError(f"key {text!r} is not hex after {cls.PREFIX!r}") from None
        # bytes.fromhex skips ASCII whitespace; Go does not, so neither may we.
        if len(raw) != KEY_LEN:
            raise KeyParseError(f"key {text!r} is not hex after {cls.PREFIX!r}")
        return cls(raw)

    @classmethod
    def parse_untyped_hex(cls, text: str) -> Self:
        """Parse 64 hex digits without prefix (DERP's Derp-Public-Key header, legacy /key)."""
        return cls.parse(cls.PREFIX + text)

    def is_zero(self) -> bool:
        return self.raw == bytes(KEY_LEN)

    def __str__(self) -> str:
        return self.PREFIX + self.raw.hex()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.short()})"

    def short(self) -> str:
        """Log form ``[abcde]``: first 5 base64 chars, like Go's ShortString."""
        return "[" + base64.b64encode(self.raw).decode()[:5] + "]"

    def untyped_hex(self) -> str:
        return self.raw.hex()


class MachinePublic(_Key32):
    """A machine's long-term key; also the Noise static key of both ends (types/key/machine.go)."""

    PREFIX = "mkey:"


class NodePublic(_Key32):
    """A node's WireGuard public key; its DERP identity (types/key/node.go)."""

    PREFIX = "nodekey:"


class DiscoPublic(_Key32):
    """Key for magicsock's disco messages (types/key/disco.go)."""

    PREFIX = "discokey:"


class ChallengePublic(_Key32):
    """Key sent in the early Noise payload as a node-key challenge (types/key/chal.go)."""

    PREFIX = "chalpub:"


class NLPublic(_Key32):
    """Tailnet-lock key; we only carry it through (types/key/nl.go)."""

    PREFIX = "nlpub:"


class PrivateKey(_Key32):
    """An X25519 private key (``privkey:`` for both machine and node private keys).

    Clamped on generation as Go's key.NewMachine/NewNode do (types/key/util.go
    clamp25519Private), so the public key computed here matches Go's.
    """

    PREFIX = "privkey:"

    @classmethod
    def generate(cls) -> PrivateKey:
        return cls(_clamp(secrets.token_bytes(KEY_LEN)))

    def public_raw(self) -> bytes:
        # X25519 clamps the scalar itself, so an unclamped key from a file works too.
        return crypto_scalarmult_base(self.raw)

    def machine_public(self) -> MachinePublic:
        return MachinePublic(self.public_raw())

    def node_public(self) -> NodePublic:
        return NodePublic(self.public_raw())

    def disco_public(self) -> DiscoPublic:
        return DiscoPublic(self.public_raw())

    def challenge_public(self) -> ChallengePublic:
        return ChallengePublic(self.public_raw())

    def __repr__(self) -> str:
        # Never print private material in logs or tracebacks.
        return "PrivateKey(<redacted>)"


def _clamp(b: bytes) -> bytes:
    a = bytearray(b)
    a[0] &= 248
    a[31] = (a[31] & 127) | 64
    return bytes(a)


def read_private_key_file(path: str | os.PathLike[str]) -> PrivateKey:
    """Read headscale's ``noise.private_key_path`` format: ``privkey:<64 hex>``.

    Surrounding whitespace (a trailing newline) is tolerated, as headscale
    trims it (hscontrol/util/key.go readFullKey).
    """
    with open(path, encoding="ascii") as f:
        text = f.read().strip()
    try:
        return PrivateKey.parse(text)
    except KeyParseError as e:
        raise KeyParseError(
            f"{os.fspath(path)}: {e}; expected 'privkey:' + 64 hex digits"
        ) from None


def write_private_key_file(path: str | os.PathLike[str], key: PrivateKey) -> None:
    """Write a private key file readable only by its owner, atomically."""
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, str(key).encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def load_or_create_private_key(path: str | os.PathLike[str]) -> PrivateKey:
    """Load the key at ``path``, creating a fresh one on first start (headscale does)."""
    if os.path.exists(path):
        return read_private_key_file(path)
    key = PrivateKey.generate()
    write_private_key_file(path, key)
    return key
