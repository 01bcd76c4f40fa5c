"""headscale's TaggedDevices pseudo-user: the owner shown for nodes owned by their tags.

A tagged node belongs to no user; peers, the node itself and the REST API see it
owned by this user (hscontrol/types/users.go TaggedDevices), defined once here in
each shape it is shown in.
"""

from __future__ import annotations

from typing import Any

from protocol.gojson import ZERO_TIME

from .store import to_iso

TAGGED_USER_ID = 2147455555
TAGGED_USER_NAME = "tagged-devices"
TAGGED_USER_DISPLAY_NAME = "Tagged Devices"


def tagged_devices_profile() -> dict[str, Any]:
    """As a tailcfg.UserProfile in map responses."""
    return {
        "ID": TAGGED_USER_ID,
        "LoginName": TAGGED_USER_NAME,
        "DisplayName": TAGGED_USER_DISPLAY_NAME,
    }


def tagged_devices_json() -> dict[str, Any]:
    """As a user in headscale's REST v1 JSON (64-bit IDs as decimal strings): `GET /node`
    shows it as a tagged node's owner (a single node's answer has `user: null`)."""
    return {
        "id": str(TAGGED_USER_ID),
        "name": TAGGED_USER_NAME,
        "createdAt": to_iso(ZERO_TIME),
        "displayName": TAGGED_USER_DISPLAY_NAME,
        "email": "",
        "providerId": "",
        "provider": "",
        "profilePicUrl": "",
    }
