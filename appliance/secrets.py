"""Pre-auth and API keys: headscale's `hskey-<kind>-<prefix>-<secret>` shape, stored hashed.

Only the public prefix and a SHA-256 digest of the secret are stored; the full key
is shown once, at creation. The secret is 256 random bits, so a fast hash is as safe
as a slow one: a slow KDF (scrypt, bcrypt) only helps against guessing low-entropy
passwords, and nobody can enumerate 2^256 candidates. SHA-256 needs no server secret
(nothing to lose or rotate) and costs about a microsecond, so a burst of registrations
never queues behind key checks. Older scrypt and imported bcrypt hashes still verify
and are replaced by the SHA-256 form on their first successful use.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets as _random
from dataclasses import dataclass

from .errors import InvalidInput

PREFIX_LEN = 12  # hex characters of the public part (headscale: 12)
SECRET_LEN = 64  # hex characters of the secret part (headscale: 64)
SHA256_SCHEME = "sha256"
# Earlier homescale versions stored scrypt hashes (about 60 ms a check); still accepted.
_SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32}

# Hashes imported from headscale (`homescale migrate headscale`): bcrypt, as headscale
# stores them; verified as they are and replaced by a SHA-256 hash on first use.
BCRYPT_SCHEME = "bcrypt"

_KEY = re.compile(r"^hskey-(auth|api)-([0-9a-f]{12})-([0-9a-f]{64})$")
# A pending interactive login's or SSH check's ID, as headscale's (types.AuthID): its
# admin commands (`auth register/approve/reject`) answer 400 to any other shape.
AUTH_ID_PREFIX = "hskey-authreq-"
_AUTH_ID = re.compile(r"^hskey-authreq-[0-9a-f]{24}$")


@dataclass(frozen=True)
class NewKey:
    full: str  # shown once
    prefix: str  # stored, shown in lists
    hash: str  # stored


def new_key(kind: str) -> NewKey:
    """A fresh key of `kind` ("auth" or "api")."""
    prefix = _random.token_hex(PREFIX_LEN // 2)
    secret = _random.token_hex(SECRET_LEN // 2)
    return NewKey(full=f"hskey-{kind}-{prefix}-{secret}", prefix=prefix, hash=hash_secret(secret))


def hash_secret(secret: str) -> str:
    return f"{SHA256_SCHEME}${hashlib.sha256(secret.encode()).hexdigest()}"


def verify_secret(secret: str, stored: str) -> bool:
    if stored.startswith(SHA256_SCHEME + "$"):
        return hmac.compare_digest(hash_secret(secret), stored)
    if stored.startswith(BCRYPT_SCHEME + "$"):
        import bcrypt

        try:
            return bcrypt.checkpw(secret.encode(), stored.split("$", 1)[1].encode())
        except ValueError:  # not a bcrypt hash after all
            return False
    try:
        scheme, salt_b64, digest_b64 = stored.split("$")
    except ValueError:
        return False
    if scheme != "scrypt":
        return False
    digest = hashlib.scrypt(secret.encode(), salt=base64.b64decode(salt_b64), **_SCRYPT)
    return hmac.compare_digest(digest, base64.b64decode(digest_b64))


def needs_rehash(stored: str) -> bool:
    """True for a slow (scrypt, imported bcrypt) hash: after a successful check, store
    `hash_secret`'s."""
    return not stored.startswith(SHA256_SCHEME + "$")


def split_key(kind: str, key: str) -> tuple[str, str]:
    """`hskey-<kind>-<prefix>-<secret>` -> (prefix, secret); InvalidInput names the problem."""
    m = _KEY.match(key.strip())
    if not m or m.group(1) != kind:
        raise InvalidInput(
            f"malformed {'pre-auth' if kind == 'auth' else 'API'} key: expected "
            f"hskey-{kind}-<12 hex>-<64 hex>"
        )
    return m.group(2), m.group(3)


def display_prefix(kind: str, prefix: str) -> str:
    """How a stored key appears in lists (its secret never does)."""
    return f"hskey-{kind}-{prefix}-***"


def names_a_key_id(ref: str) -> bool:
    """Whether `ref`, a pre-auth key's numeric ID or its prefix as typed, is the ID. A
    prefix is 12 hex digits, and about one in 280 is all decimal: 12 digits are a prefix
    (no tailnet has 10^11 keys)."""
    return ref.isascii() and ref.isdigit() and len(ref) != PREFIX_LEN


def parse_prefix(kind: str, text: str) -> str:
    """Accept `abcdef012345`, `hskey-api-abcdef012345` or the displayed `...-***` form."""
    t = text.strip().removeprefix(f"hskey-{kind}-")
    t = t.split("-", 1)[0]
    if not re.fullmatch(r"[0-9a-f]{12}", t):
        raise InvalidInput(f"malformed key prefix {text!r}: expected 12 hex characters")
    return t


def new_auth_id() -> str:
    """A fresh `hskey-authreq-<24 hex>` ID (96 random bits) for a login or SSH check."""
    return AUTH_ID_PREFIX + _random.token_hex(12)


def parse_auth_id(text: str, field: str = "authId") -> str:
    """An auth ID as sent (also the tail of its /register/<id> or /auth/<id> URL)."""
    t = text.strip().rsplit("/", 1)[-1]
    if not _AUTH_ID.match(t):
        shown = text if len(text) <= 60 else text[:57] + "..."
        raise InvalidInput(f"{field}: malformed auth ID {shown!r}: expected hskey-authreq-<24 hex>")
    return t
