"""Auxiliary DERP endpoints answer as the Go server does."""

from __future__ import annotations

import json

import pytest

from derp import endpoints


@pytest.mark.parametrize("method", ["GET", "HEAD", "get"])
def test_probe_accepts_get_and_head_with_cors(method: str) -> None:
    status, headers, body = endpoints.probe(method)
    assert (status, body) == (200, b"")
    assert ("Access-Control-Allow-Origin", "*") in headers


def test_probe_refuses_other_methods() -> None:
    assert endpoints.probe("POST")[0] == 405


def test_generate_204_echoes_a_valid_challenge() -> None:
    status, headers, body = endpoints.generate_204("ts_derp.example.com:443")
    assert (status, body) == (204, b"")
    assert ("X-Tailscale-Response", "response ts_derp.example.com:443") in headers
    assert dict(headers)["Cache-Control"].startswith("no-cache, no-store")


@pytest.mark.parametrize("challenge", [None, "", "x" * 65, "bad char!", "new\nline"])
def test_generate_204_ignores_bad_challenges(challenge: str | None) -> None:
    status, headers, _ = endpoints.generate_204(challenge)
    assert status == 204
    assert "X-Tailscale-Response" not in dict(headers)


def test_bootstrap_dns_returns_the_published_map() -> None:
    names = {"derp.example.com": ["192.0.2.1", "2001:db8::1"], "other.example": ["192.0.2.2"]}
    status, headers, body = endpoints.bootstrap_dns(names, "derp.example.com")
    assert status == 200
    assert ("Content-Type", "application/json") in headers
    assert ("Connection", "close") in headers
    assert json.loads(body) == names
    assert json.loads(endpoints.bootstrap_dns({}, None)[2]) == {}
