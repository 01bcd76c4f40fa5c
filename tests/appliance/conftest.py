"""Shared fixtures of the appliance tests: a data directory, a running server, the CLI.

Everything listens on loopback on free ports; the admin socket lives in a short
directory under /tmp (a unix socket path must fit in 108 bytes, pytest's tmp_path
often does not).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from appliance import cli
from appliance.config import load_config
from appliance.serve import Server, serve
from appliance.store import Store
from tests.realclient import free_port

LOG = logging.getLogger("homescale.test")
START_TIMEOUT = 20.0  # generous: the machine is shared
CALL_TIMEOUT = 20.0


# The server refuses an empty DERP map (as headscale); these tests need no relay.
DERP_MAP = Path(__file__).parent.parent / "fixtures" / "derpmap-loopback.json"


def site_config(port: int, metrics_port: int, sock: Path) -> str:
    return f"""\
server_url: http://127.0.0.1:{port}
derp:
  paths:
    - {DERP_MAP}
listen_addr: 127.0.0.1:{port}
metrics_listen_addr: 127.0.0.1:{metrics_port}
noise:
  private_key_path: noise_private.key
database:
  type: sqlite
  sqlite:
    path: db.sqlite
unix_socket: {sock}
unix_socket_permission: "0770"
policy:
  mode: database
dns:
  magic_dns: true
  base_domain: tailnet.internal
log:
  level: debug
"""


@dataclass
class Site:
    """A data directory with a config whose listeners are free loopback ports."""

    dir: Path
    port: int
    metrics_port: int

    @property
    def config_path(self) -> Path:
        return self.dir / "config.yaml"

    @property
    def socket(self) -> Path:
        return self.dir / "hs.sock"

    @property
    def db_path(self) -> Path:
        return self.dir / "db.sqlite"

    @property
    def key_path(self) -> Path:
        return self.dir / "noise_private.key"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def store(self) -> Store:
        return Store(self.db_path)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No HOMESCALE_* variable from the outside changes what a test sees."""
    for name in list(os.environ):
        if name.startswith("HOMESCALE_"):
            monkeypatch.delenv(name)


@pytest.fixture
def site() -> Iterator[Site]:
    d = Path(tempfile.mkdtemp(prefix="hs-", dir="/tmp"))
    s = Site(d, free_port(), free_port())
    s.config_path.write_text(site_config(s.port, s.metrics_port, s.socket))
    try:
        yield s
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
async def server(site: Site) -> AsyncIterator[Server]:
    """`serve` in this trio run (its signal watcher included), stopped after the test."""
    config = load_config(site.config_path, environ={})
    async with trio.open_nursery() as nursery:
        with trio.fail_after(START_TIMEOUT):
            srv = await nursery.start(serve, config, LOG)
        yield srv
        nursery.cancel_scope.cancel()


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def run_cli(capsys: pytest.CaptureFixture[str], site: Site, *args: str) -> CliResult:
    """One `homescale -c <site config> ...` in this process (synchronous)."""
    capsys.readouterr()
    code = cli.run(["-c", str(site.config_path), *args])
    out, err = capsys.readouterr()
    return CliResult(code, out, err)


async def arun_cli(capsys: pytest.CaptureFixture[str], site: Site, *args: str) -> CliResult:
    """`run_cli` from a trio test: the CLI blocks, so it runs in a worker thread."""
    with trio.fail_after(CALL_TIMEOUT):
        return await trio.to_thread.run_sync(lambda: run_cli(capsys, site, *args))


async def serve_with_key(
    site: Site,
    capsys: pytest.CaptureFixture[str],
    nursery: trio.Nursery,
    *,
    reusable: bool = False,
) -> str:
    """Start the site's server in `nursery` (after a test's monkeypatches, which a fixture
    would come before), make user alice, and return a pre-auth key of hers."""
    config = load_config(site.config_path, environ={})
    with trio.fail_after(START_TIMEOUT):
        await nursery.start(serve, config, LOG)
    assert (await arun_cli(capsys, site, "users", "create", "alice")).code == 0
    args = ["preauthkeys", "create", "--user", "alice", *(["--reusable"] if reusable else [])]
    made = await arun_cli(capsys, site, *args)
    assert made.code == 0, made.err
    return made.out.strip().splitlines()[-1]
