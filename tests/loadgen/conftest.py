"""What the load generator's tests share: a real server that simulated nodes join."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from protocol.keys import MachinePublic
from tests.loadgen.fleet import fetch_server_key
from tests.realclient import HomescaleServer


@dataclass(frozen=True)
class OneUser:
    server: HomescaleServer
    key: str  # a reusable pre-auth key of the server's one user
    server_key: MachinePublic  # its Noise public key, as GET /key gives it


@pytest.fixture
async def one_user(tmp_path: Path) -> AsyncIterator[OneUser]:
    """A real ``homescale serve`` (info logging) with one user and a reusable key."""
    server = HomescaleServer(tmp_path, log_level="info")
    server.start()
    try:
        await server.acli("users", "create", "fleet")
        key = await trio.to_thread.run_sync(server.create_key, "fleet", "--reusable")
        yield OneUser(server, key, await fetch_server_key("127.0.0.1", server.port))
    finally:
        server.stop()
