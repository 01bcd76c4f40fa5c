"""`homescale serve` as a real process: clean exit on SIGTERM/SIGINT, one server per socket."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio

from appliance.config import load_config
from appliance.store import SCHEMA_VERSION
from tests import logformat

from .conftest import CALL_TIMEOUT, START_TIMEOUT, Site, arun_cli

REPO = Path(__file__).resolve().parents[2]
STOP_TIMEOUT = 10.0  # "exits within a few seconds", with room for a busy machine


def site_log_format(site: Site) -> str:
    return load_config(site.config_path, environ={}).log_format


HOMESCALE = [sys.executable, "-c", "import sys; from appliance.cli import main; main()"]


class ServeProcess:
    """A `homescale serve` child; its stderr (the log) is collected as it runs."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.log = bytearray()
        self.changed = trio.Event()

    async def collect(self) -> None:
        assert self.proc.stderr is not None
        while chunk := await self.proc.stderr.receive_some(65536):
            self.log += chunk
            self.changed.set()
            self.changed = trio.Event()
        self.changed.set()

    async def wait_for_log(self, text: bytes) -> None:
        with trio.fail_after(START_TIMEOUT):
            while text not in self.log:
                if self.proc.returncode is not None:
                    raise AssertionError(
                        f"server exited {self.proc.returncode}:\n{self.log.decode()}"
                    )
                await self.changed.wait()

    async def wait(self) -> int:
        with trio.fail_after(STOP_TIMEOUT):
            return await self.proc.wait()


async def start_serve(nursery: trio.Nursery, site: Site) -> ServeProcess:
    proc = await trio.lowlevel.open_process(
        [*HOMESCALE, "-c", str(site.config_path), "serve"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    sp = ServeProcess(proc)
    nursery.start_soon(sp.collect)
    return sp


def integrity(db: Path) -> tuple[str, int, list[str]]:
    conn = sqlite3.connect(db)
    try:
        return (
            conn.execute("PRAGMA integrity_check").fetchone()[0],
            conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()[0],
            [r[0] for r in conn.execute("SELECT name FROM users ORDER BY id")],
        )
    finally:
        conn.close()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_signal_stops_cleanly(
    site: Site, capsys: pytest.CaptureFixture[str], signum: signal.Signals
) -> None:
    async with trio.open_nursery() as nursery:
        sp = await start_serve(nursery, site)
        try:
            await sp.wait_for_log(b"listening on")
            assert site.socket.is_socket()
            res = await arun_cli(capsys, site, "-v", "users", "create", "alice")
            assert res.code == 0, res.err
            assert "running server" in res.err
            with trio.fail_after(CALL_TIMEOUT):
                async with httpx.AsyncClient() as client:
                    assert (await client.get(f"{site.url}/health")).status_code == 200
            sp.proc.send_signal(signum)
            assert await sp.wait() == 0, sp.log.decode()
        finally:
            if sp.proc.returncode is None:
                sp.proc.kill()
                await sp.proc.wait()
    assert not site.socket.exists()
    assert b"shutting down" in sp.log
    logformat.assert_no_traceback(sp.log.decode(), site_log_format(site))
    assert integrity(site.db_path) == ("ok", SCHEMA_VERSION, ["alice"])
    # and the next start works on the same files
    res = await arun_cli(capsys, site, "-v", "-o", "json", "users", "list")
    assert [u["name"] for u in res.json()] == ["alice"]


async def run_second_server(
    site: Site, capsys: pytest.CaptureFixture[str], check_first: bool
) -> None:
    async with trio.open_nursery() as nursery:
        first = await start_serve(nursery, site)
        second = None
        try:
            await first.wait_for_log(b"listening on")
            second = await start_serve(nursery, site)
            assert await second.wait() == 2
            log = second.log.decode()
            assert str(site.socket) in log
            assert "another homescale server is already running" in log
            logformat.assert_no_traceback(log, site_log_format(site))
            if check_first:
                # the first server is unharmed: its admin socket is still there and answers
                assert site.socket.is_socket()
                res = await arun_cli(capsys, site, "-v", "health")
                assert res.code == 0, res.err
                assert "running server" in res.err
            first.proc.send_signal(signal.SIGTERM)
            assert await first.wait() == 0
        finally:
            for sp in (first, second):
                if sp is not None and sp.proc.returncode is None:
                    sp.proc.kill()
                    await sp.proc.wait()


async def test_second_server_on_the_same_socket_refuses(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    await run_second_server(site, capsys, check_first=False)


async def test_refused_second_server_leaves_the_first_alone(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    await run_second_server(site, capsys, check_first=True)


def test_serve_lifts_the_open_files_limit_to_the_hard_limit() -> None:
    """Two sockets per node: a soft limit of 1024 would cap the tailnet near 500 nodes."""
    import logging
    import resource

    from appliance.serve import raise_open_files_limit

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowered = min(256, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
    try:
        assert raise_open_files_limit(logging.getLogger("test")) == hard
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
