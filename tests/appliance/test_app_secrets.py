"""Pre-auth and API keys: headscale's key shapes, stored only as prefix + SHA-256 of the secret."""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from appliance import secrets
from appliance.admin import Admin
from appliance.errors import InvalidInput
from appliance.store import ApiKeyRow, PreAuthKeyRow, Store, utcnow


@pytest.fixture
def admin(tmp_path: Path) -> Iterator[Admin]:
    s = Store(tmp_path / "db.sqlite")
    a = Admin(s)
    a.create_user("alice")
    try:
        yield a
    finally:
        s.close()


def db_bytes(path: Path) -> bytes:
    """Every byte homescale keeps for the database: the file, its WAL and shared memory."""
    return b"".join(p.read_bytes() for p in sorted(path.parent.glob(path.name + "*")))


def test_keys_are_never_stored_in_clear(admin: Admin) -> None:
    pak = admin.create_pre_auth_key(user="alice", reusable=True)["key"]
    api = admin.create_api_key(utcnow() + timedelta(days=1))
    for full in (pak, api):
        assert re.fullmatch(r"hskey-(auth|api)-[0-9a-f]{12}-[0-9a-f]{64}", full)
    raw = db_bytes(admin.store.path)
    admin.store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    raw += db_bytes(admin.store.path)
    for full in (pak, api):
        prefix, secret = full.rsplit("-", 2)[1:]
        assert prefix.encode() in raw  # the public part is what lists show
        assert secret.encode() not in raw
        assert full.encode() not in raw
        assert secret[:16].encode() not in raw
    rows: list[PreAuthKeyRow | ApiKeyRow] = [*admin.store.pre_auth_keys(), *admin.store.api_keys()]
    for row in rows:
        assert row.hash.startswith("sha256$")


def _scrypt_stored(secret: str) -> str:
    """The hash form earlier homescale versions stored (scrypt n=2^14, r=8, p=1)."""
    salt = b"0123456789abcdef"
    digest = hashlib.scrypt(secret.encode(), salt=salt, n=2**14, r=8, p=1, dklen=32)
    return f"scrypt${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def test_keys_stored_by_earlier_versions_work_and_are_rehashed_on_use(admin: Admin) -> None:
    pak = admin.create_pre_auth_key(user="alice", reusable=True)["key"]
    api = admin.create_api_key(None)
    pak_row = admin.store.pre_auth_keys()[0]
    api_row = admin.store.api_keys()[0]
    admin.store.update_pre_auth_key(pak_row.id, hash=_scrypt_stored(pak.rsplit("-", 1)[1]))
    admin.store.update_api_key(api_row.id, hash=_scrypt_stored(api.rsplit("-", 1)[1]))

    # A wrong secret for the same prefix is refused and leaves the old hash alone.
    with pytest.raises(InvalidInput, match=r"^authkey not found$"):
        admin.check_pre_auth_key(pak[:-64] + "0" * 64)
    assert not admin.check_api_key(api[:-64] + "0" * 64)
    assert admin.store.pre_auth_keys()[0].hash.startswith("scrypt$")

    assert admin.check_pre_auth_key(pak).id == pak_row.id
    assert admin.check_api_key(api)
    assert admin.store.pre_auth_keys()[0].hash.startswith("sha256$")
    assert admin.store.api_keys()[0].hash.startswith("sha256$")
    # ... and keep working in the new form.
    assert admin.check_pre_auth_key(pak).id == pak_row.id
    assert admin.check_api_key(api)


def test_prefix_visible_in_lists_secret_not(admin: Admin) -> None:
    pak = admin.create_pre_auth_key(user="alice")["key"]
    api = admin.create_api_key(None)
    listed_pak = admin.list_pre_auth_keys()[0]["key"]
    listed_api = admin.list_api_keys()[0]["prefix"]
    assert listed_pak == "hskey-auth-" + pak.split("-")[2] + "-***"
    assert listed_api == "hskey-api-" + api.split("-")[2] + "-***"


def test_valid_key_is_accepted(admin: Admin) -> None:
    key = admin.create_pre_auth_key(user="alice", expiration=utcnow() + timedelta(hours=1))["key"]
    row = admin.check_pre_auth_key(key)
    alice = admin.store.user_by_name("alice")
    assert alice is not None
    assert row.user_id == alice.id


def test_unknown_key_is_refused(admin: Admin) -> None:
    real = admin.create_pre_auth_key(user="alice")["key"]
    prefix = real.split("-")[2]
    unknown = secrets.new_key("auth").full
    wrong_secret = f"hskey-auth-{prefix}-" + "0" * 64
    for key in (unknown, wrong_secret):
        with pytest.raises(InvalidInput, match=r"^authkey not found$"):
            admin.check_pre_auth_key(key)


def test_expired_key_is_refused(admin: Admin) -> None:
    key = admin.create_pre_auth_key(user="alice")["key"]
    admin.expire_pre_auth_key(admin.list_pre_auth_keys()[0]["id"])
    with pytest.raises(InvalidInput, match=r"^authkey expired$"):
        admin.check_pre_auth_key(key)


def test_used_single_use_key_is_refused_reusable_is_not(admin: Admin) -> None:
    once = admin.create_pre_auth_key(user="alice")
    many = admin.create_pre_auth_key(user="alice", reusable=True)
    for k in (once, many):
        admin.store.update_pre_auth_key(int(k["id"]), used=1)
    with pytest.raises(InvalidInput, match=r"^authkey already used$"):
        admin.check_pre_auth_key(once["key"])
    assert admin.check_pre_auth_key(many["key"]).reusable


def test_malformed_key_is_refused(admin: Admin) -> None:
    with pytest.raises(InvalidInput, match="malformed pre-auth key"):
        admin.check_pre_auth_key("tskey-auth-abc")
    # an API key is not a pre-auth key
    with pytest.raises(InvalidInput, match="malformed pre-auth key"):
        admin.check_pre_auth_key(admin.create_api_key(None))


def test_api_key_checks(admin: Admin) -> None:
    good = admin.create_api_key(utcnow() + timedelta(days=1))
    assert admin.check_api_key(good)
    assert admin.list_api_keys()[0]["lastSeen"] is not None
    prefix = good.split("-")[2]
    assert not admin.check_api_key(f"hskey-api-{prefix}-" + "0" * 64)
    assert not admin.check_api_key(secrets.new_key("api").full)
    assert not admin.check_api_key("")
    admin.expire_api_key(prefix)
    assert not admin.check_api_key(good)


def test_expiration_in_the_past_is_refused(admin: Admin) -> None:
    with pytest.raises(InvalidInput, match="in the past"):
        admin.create_pre_auth_key(user="alice", expiration=utcnow() - timedelta(minutes=1))
    assert admin.list_pre_auth_keys() == []
