"""The .deb, installed the way a user installs it: `apt-get install ./homescale_*.deb`
into a clean Debian bookworm root (debootstrap minbase, cached by
packaging/prepare-testroot.sh), running the real maintainer scripts in a chroot.

Each test gets its own copy of the cached root (under a second to copy), so
they do not depend on each other's order. Nothing here touches the network:
the root is made before the suite enters its network namespace.

What cannot be checked in a chroot (no systemd running): that systemd starts
the unit and restarts it on upgrade. The unit is instead emulated from its own
lines (user, environment, directories, working directory, ExecStartPre,
ExecStart) and `systemd-analyze verify` checks it (test_unit.py).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from tests import tiers
from tests.realclient import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
UNIT_NAME = "homescale.service"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The files the package promises (issue: "Contents").
PACKAGED_FILES = {
    "/usr/bin/homescale",
    "/lib/systemd/system/homescale.service",
    "/etc/homescale/config.yaml",
    "/usr/share/doc/homescale/copyright",
    "/usr/share/doc/homescale/changelog.Debian.gz",
}
# lintian warnings kept on purpose (listed with their reason in
# packaging/README-install.md). Anything else fails the test.
LINTIAN_WARNINGS_KEPT = {"hardening-no-pie"}


class DebianRoot:
    """A throwaway copy of the cached bookworm root, with /proc mounted."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.mounts: list[Path] = []
        self.procs: list[subprocess.Popen[str]] = []

    def mount(self, *args: str, target: str) -> None:
        where = self.path / target.lstrip("/")
        subprocess.run(["mount", *args, str(where)], check=True, timeout=30)
        self.mounts.append(where)

    def run(
        self,
        *cmd: str,
        user: str | None = None,
        env: dict[str, str] | None = None,
        check: bool = True,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            self.argv(cmd, user=user, env=env),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            pytest.fail(
                f"in chroot: {shlex.join(cmd)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def argv(
        self,
        cmd: Sequence[str],
        *,
        user: str | None = None,
        env: dict[str, str] | None = None,
        cwd: str = "/",
    ) -> list[str]:
        # A clean environment: nothing of the host's (venv, PYTHONPATH, TMPDIR)
        # leaks into what the package sees.
        full_env = {
            "PATH": PATH,
            "LANG": "C.UTF-8",
            "HOME": "/root",
            "DEBIAN_FRONTEND": "noninteractive",
            **(env or {}),
        }
        prefix = ["chroot", str(self.path)]
        if user is not None:
            prefix += ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups"]
            full_env["HOME"] = "/nonexistent"
        return [*prefix, "env", "-i", "-C", cwd, *(f"{k}={v}" for k, v in full_env.items()), *cmd]

    def apt(self, *args: str) -> subprocess.CompletedProcess[str]:
        # Use-Pty=0: there is no /dev/pts in the chroot; apt would complain.
        return self.run("apt-get", "-y", "-o", "Dpkg::Use-Pty=0", *args, timeout=300)

    def install(self, deb: Path) -> subprocess.CompletedProcess[str]:
        inside = self.path / "tmp" / deb.name
        shutil.copy2(deb, inside)
        try:
            return self.apt("install", f"/tmp/{deb.name}")
        finally:
            inside.unlink()

    def file(self, path: str) -> Path:
        return self.path / path.lstrip("/")

    def passwd(self, name: str) -> list[str] | None:
        for line in self.file("/etc/passwd").read_text().splitlines():
            fields = line.split(":")
            if fields[0] == name:
                return fields
        return None

    def group(self, name: str) -> list[str] | None:
        for line in self.file("/etc/group").read_text().splitlines():
            fields = line.split(":")
            if fields[0] == name:
                return fields
        return None

    def package_status(self) -> str:
        proc = self.run(
            "dpkg-query", "-W", "-f", "${db:Status-Abbrev}${Version}", "homescale", check=False
        )
        return proc.stdout.strip() if proc.returncode == 0 else "not-installed"

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        for m in reversed(self.mounts):
            subprocess.run(["umount", "-l", str(m)], check=False, timeout=30)
        mounted = Path("/proc/mounts").read_text()
        if f" {self.path} " in mounted or f" {self.path}/" in mounted:
            # Never rm -rf through a live mount (it would empty the real /proc
            # or a bind mount); leave the copy for a human to look at.
            raise RuntimeError(f"still mounted below {self.path}; not removing it")
        # The whole per-test directory: the root (or overlay) and its upper/work.
        shutil.rmtree(self.path.parent, ignore_errors=True)


@pytest.fixture
def debroot(testroot: Path, tmp_path: Path) -> Iterator[DebianRoot]:
    merged = tmp_path / "root"
    merged.mkdir()
    root = DebianRoot(merged)
    try:
        # An overlay on the cached root: instant, and the cache stays pristine
        # (every write lands in `upper`). A plain copy where overlayfs is not
        # allowed (about 5 s).
        upper, work = tmp_path / "upper", tmp_path / "work"
        upper.mkdir()
        work.mkdir()
        overlay = subprocess.run(
            [
                "mount",
                "-t",
                "overlay",
                "overlay",
                "-o",
                f"lowerdir={testroot},upperdir={upper},workdir={work}",
                str(merged),
            ],
            capture_output=True,
            check=False,
            timeout=30,
        )
        if overlay.returncode == 0:
            root.mounts.append(merged)
        else:
            subprocess.run(["cp", "-a", f"{testroot}/.", str(merged)], check=True, timeout=300)
        root.mount("-t", "proc", "proc", target="/proc")
        yield root
    finally:
        root.close()


@pytest.fixture(scope="session")
def upgrade_deb(deb_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same build under a newer version: what an upgrade installs."""
    version = subprocess.run(
        ["dpkg-deb", "-f", str(deb_file), "Version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    out = tmp_path_factory.mktemp("upgrade")
    env = {
        **os.environ,
        "DEB_VERSION": f"{version}+test1",
        "DEB_OUTDIR": str(out),
        "DEB_USE_BUILT_BINARY": "1",
    }
    proc = subprocess.run(
        [str(REPO / "packaging" / "build-deb.sh")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (deb,) = out.glob("homescale_*.deb")
    return deb


def children(pid: int) -> list[int]:
    """PIDs whose parent is `pid` (from /proc/*/stat; no psutil here)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited while we looked
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def load_yaml(path: Path) -> dict[str, object]:
    data = YAML(typ="safe").load(path.read_text())
    assert isinstance(data, dict)
    return data


# ---------------------------------------------------------------- the package file


def test_package_contents_and_metadata(deb_file: Path) -> None:
    listing = subprocess.run(
        ["dpkg-deb", "-c", str(deb_file)], capture_output=True, text=True, check=True
    ).stdout
    files = {
        line.split()[-1].removeprefix(".")
        for line in listing.splitlines()
        if not line.startswith("d")
    }
    assert files >= PACKAGED_FILES
    # root-owned whoever built it (--root-owner-group).
    assert all(" root/root " in line for line in listing.splitlines()), listing
    info = subprocess.run(
        ["dpkg-deb", "-I", str(deb_file)], capture_output=True, text=True, check=True
    ).stdout
    for member in ("postinst", "prerm", "postrm", "conffiles", "md5sums"):
        assert re.search(rf"\s{member}\s", info), f"no DEBIAN/{member}:\n{info}"
    fields = {
        k: subprocess.run(
            ["dpkg-deb", "-f", str(deb_file), k], capture_output=True, text=True, check=True
        ).stdout.strip()
        for k in ("Package", "Architecture", "Depends", "Version")
    }
    assert fields["Package"] == "homescale"
    assert fields["Architecture"] == "amd64"
    assert deb_file.name == f"homescale_{fields['Version']}_amd64.deb"
    assert "libc6" in fields["Depends"]


def test_packaged_config_uses_package_paths(deb_file: Path, tmp_path: Path) -> None:
    subprocess.run(["dpkg-deb", "-x", str(deb_file), str(tmp_path)], check=True)
    cfg = load_yaml(tmp_path / "etc/homescale/config.yaml")
    noise = cfg["noise"]
    database = cfg["database"]
    assert isinstance(noise, dict)
    assert isinstance(database, dict)
    assert noise["private_key_path"].startswith("/var/lib/homescale/")
    assert database["sqlite"]["path"].startswith("/var/lib/homescale/")
    assert cfg["unix_socket"] == "/var/run/homescale/homescale.sock"


def test_lintian_reports_no_errors(deb_file: Path) -> None:
    tiers.require_tier(
        "packaging",
        shutil.which("lintian") is not None,
        "lintian missing (apt-get install lintian; `make sysdeps` does)",
    )
    proc = subprocess.run(
        ["lintian", "--no-tag-display-limit", str(deb_file)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    tags = [line for line in proc.stdout.splitlines() if re.match(r"^[EWIXOP]: ", line)]
    errors = [t for t in tags if t.startswith("E: ")]
    assert not errors, proc.stdout
    warnings = {t.split()[2] for t in tags if t.startswith("W: ")}
    assert warnings <= LINTIAN_WARNINGS_KEPT, proc.stdout


# ---------------------------------------------------------------- installed


def test_install_creates_user_state_and_enables_unit(debroot: DebianRoot, deb_file: Path) -> None:
    out = debroot.install(deb_file)
    # Nothing had to come from a mirror: the package's Depends are in minbase.
    assert "Need to get 0 B" in out.stdout or "Get:1 /tmp/" in out.stdout, out.stdout
    assert debroot.package_status().startswith("ii ")

    user = debroot.passwd("homescale")
    group = debroot.group("homescale")
    assert user is not None
    assert group is not None
    uid, gid = int(user[2]), int(user[3])
    assert uid < 1000, "a system user"
    assert gid == int(group[2])
    assert user[5] == "/var/lib/homescale"
    assert user[6] == "/usr/sbin/nologin"

    for path in PACKAGED_FILES:
        assert debroot.file(path).is_file(), path
    assert os.access(debroot.file("/usr/bin/homescale"), os.X_OK)
    conffiles = debroot.run("dpkg-query", "-W", "-f", "${Conffiles}", "homescale").stdout
    assert "/etc/homescale/config.yaml" in conffiles

    state = debroot.file("/var/lib/homescale").stat()
    assert (state.st_uid, state.st_gid) == (uid, gid)
    assert state.st_mode & 0o777 == 0o750
    # The service reads its config through its group; others cannot read it.
    cfg = debroot.file("/etc/homescale/config.yaml").stat()
    assert cfg.st_uid == 0
    assert cfg.st_gid == gid
    assert cfg.st_mode & 0o007 == 0

    # Enabled (starts at next boot) but, per headscale's practice, not started
    # now: server_url must be edited first, and postinst says so.
    wants = debroot.file(f"/etc/systemd/system/multi-user.target.wants/{UNIT_NAME}")
    assert wants.is_symlink()
    assert os.readlink(wants) == f"/lib/systemd/system/{UNIT_NAME}"
    assert "server_url" in out.stdout


def test_installed_binary_runs_and_config_passes_configtest(
    debroot: DebianRoot, deb_file: Path
) -> None:
    debroot.install(deb_file)
    helptext = debroot.run("homescale", "--help").stdout
    assert "serve" in helptext
    assert "configtest" in helptext
    # Found at its default place (/etc/homescale/config.yaml), and explicitly.
    debroot.run("homescale", "configtest")
    debroot.run("homescale", "configtest", "-c", "/etc/homescale/config.yaml")
    # The service user can read it too (through the homescale group).
    debroot.run("homescale", "configtest", "-c", "/etc/homescale/config.yaml", user="homescale")


def test_serve_runs_as_unit_describes_and_answers_health(
    debroot: DebianRoot, deb_file: Path, unit_service: dict[str, list[str]]
) -> None:
    debroot.install(deb_file)
    user = unit_service["User"][0]
    uid = int(debroot.passwd(user)[2])  # type: ignore[index]

    # What systemd does before ExecStart: create the unit's directories owned
    # by User= with their *DirectoryMode=, and give it a private /tmp -- here a
    # noexec one, the case the CacheDirectory unpacking exists for.
    for kind, base in (("State", "/var/lib"), ("Cache", "/var/cache"), ("Runtime", "/run")):
        d = debroot.file(f"{base}/{unit_service[f'{kind}Directory'][0]}")
        d.mkdir(exist_ok=True)
        os.chown(d, uid, uid)
        d.chmod(int(unit_service.get(f"{kind}DirectoryMode", ["0755"])[0], 8))
    debroot.mount("-t", "tmpfs", "-o", "noexec,nosuid,nodev", "tmpfs", target="/tmp")
    env = dict(e.split("=", 1) for v in unit_service["Environment"] for e in shlex.split(v))

    # ExecStartPre clears an unpack directory a killed instance left behind.
    stale = debroot.file(f"{env['TMPDIR']}/_MEIstale0")
    stale.mkdir()
    os.chown(stale, uid, uid)
    for pre in unit_service.get("ExecStartPre", []):
        debroot.run(*shlex.split(pre.lstrip("-")), user=user)
    assert not stale.exists()

    port, metrics_port = free_port(), free_port()
    env |= {
        "HOMESCALE_LISTEN_ADDR": f"127.0.0.1:{port}",
        "HOMESCALE_METRICS_LISTEN_ADDR": f"127.0.0.1:{metrics_port}",
    }
    cmd = debroot.argv(
        shlex.split(unit_service["ExecStart"][0]),
        user=user,
        env=env,
        cwd=unit_service["WorkingDirectory"][0],
    )
    log_path = debroot.path.parent / "serve.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    debroot.procs.append(server)

    deadline = time.monotonic() + 30
    status = None
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"homescale serve exited {server.returncode}:\n{log_path.read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                status = r.status
                break
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.2)
    assert status == 200, f"no answer on /health within 30 s:\n{log_path.read_text()}"
    # The web console's assets are package data the binary carries (issue 15).
    for path, needle in [
        ("/admin/", b"homescale console"),
        ("/admin/assets/console.js", b"EventSource"),
    ]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            assert r.status == 200, path
            assert needle in r.read(), path

    # The chroot/setpriv/env chain execs, so this PID is the server's
    # bootloader; it and the Python process it unpacked run as the user.
    pids = [server.pid, *children(server.pid)]
    assert len(pids) == 2, "the one-file bootloader and the server it started"
    for pid in pids:
        uids = re.search(r"^Uid:\s+(.*)$", Path(f"/proc/{pid}/status").read_text(), re.M)
        assert uids
        assert {int(u) for u in uids.group(1).split()} == {uid}
    # It unpacked into the cache directory (not the noexec /tmp), and wrote its
    # state where the config says, as the service user.
    assert any(p.name.startswith("_MEI") for p in debroot.file(env["TMPDIR"]).iterdir())
    cfg = load_yaml(debroot.file("/etc/homescale/config.yaml"))
    db = debroot.file(cfg["database"]["sqlite"]["path"])  # type: ignore[index]
    assert db.exists()
    assert db.stat().st_uid == uid

    # The README's first-run steps, as root, while the service runs: they go
    # through its admin socket (/var/run/homescale/homescale.sock). Root's /tmp
    # here is the noexec one, so the CLI unpacks into /root instead (README:
    # set TMPDIR when /tmp is noexec).
    admin_env = {"TMPDIR": "/root"}
    debroot.run("homescale", "users", "create", "alice", env=admin_env)
    key = debroot.run("homescale", "preauthkeys", "create", "--user", "alice", env=admin_env).stdout
    assert key.strip(), "preauthkeys create printed no key"
    # Through the server, not by opening the database as root: nothing in the
    # state directory became root's (the service could not write it anymore).
    state_dir = debroot.file(f"/var/lib/{unit_service['StateDirectory'][0]}")
    root_owned = [p for p in state_dir.rglob("*") if p.stat().st_uid != uid]
    assert not root_owned, root_owned

    # systemctl stop: SIGTERM to the main PID. It exits and removes its unpack
    # directory (the cache does not grow with every restart).
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=20)
    assert not [p for p in debroot.file(env["TMPDIR"]).iterdir() if p.name.startswith("_MEI")]


def test_upgrade_keeps_config_database_and_admin_choices(
    debroot: DebianRoot, deb_file: Path, upgrade_deb: Path
) -> None:
    debroot.install(deb_file)
    uid = debroot.passwd("homescale")[2]  # type: ignore[index]
    # The admin edits server_url and the server has written its database.
    cfg_path = debroot.file("/etc/homescale/config.yaml")
    edited = re.sub(
        r"(?m)^server_url: .*$", "server_url: https://hs.example.com", cfg_path.read_text()
    )
    assert edited != cfg_path.read_text()
    cfg_path.write_text(edited)
    db_path = debroot.file(load_yaml(cfg_path)["database"]["sqlite"]["path"])  # type: ignore[index]
    db_bytes = os.urandom(4096)
    db_path.write_bytes(db_bytes)
    # ... and disabled the unit (systemctl disable removes the wants link).
    wants = debroot.file(f"/etc/systemd/system/multi-user.target.wants/{UNIT_NAME}")
    wants.unlink()

    out = debroot.install(upgrade_deb)
    new_version = subprocess.run(
        ["dpkg-deb", "-f", str(upgrade_deb), "Version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert debroot.package_status() == f"ii {new_version}"
    # dpkg took the upgrade path ("Unpacking homescale (new) over (old)").
    assert re.search(r"Unpacking homescale \(.*\) over \(", out.stdout), out.stdout

    assert cfg_path.read_text() == edited
    assert not list(debroot.file("/etc/homescale").glob("*.dpkg-*"))
    assert db_path.read_bytes() == db_bytes
    assert debroot.passwd("homescale")[2] == uid  # type: ignore[index]
    assert not wants.exists(), "the admin's disable survives the upgrade"
    debroot.run("homescale", "configtest")


def test_remove_keeps_state_and_purge_removes_it(debroot: DebianRoot, deb_file: Path) -> None:
    debroot.install(deb_file)
    state_file = debroot.file("/var/lib/homescale/db.sqlite")
    state_file.write_bytes(b"database")

    debroot.apt("remove", "homescale")
    assert debroot.package_status().startswith("rc ")
    assert not debroot.file("/usr/bin/homescale").exists()
    assert not debroot.file(f"/lib/systemd/system/{UNIT_NAME}").exists()
    # Removed, not purged: config and state stay for a reinstall.
    assert debroot.file("/etc/homescale/config.yaml").is_file()
    assert state_file.read_bytes() == b"database"

    debroot.apt("purge", "homescale")
    status = debroot.package_status()
    assert status == "not-installed" or status.startswith("un"), status
    for gone in (
        "/etc/homescale",
        "/var/lib/homescale",
        "/var/cache/homescale",
        f"/etc/systemd/system/multi-user.target.wants/{UNIT_NAME}",
        f"/etc/systemd/system/{UNIT_NAME}",
    ):
        assert not os.path.lexists(debroot.file(gone)), gone
    # The user stays (Debian practice: files it owns may remain elsewhere), so
    # a later install reuses the same uid.
    assert debroot.passwd("homescale") is not None

    # And the package installs again cleanly after a purge.
    debroot.install(deb_file)
    assert debroot.package_status().startswith("ii ")
    debroot.run("homescale", "configtest")


def test_scripts_drive_systemd_when_it_runs(
    debroot: DebianRoot, deb_file: Path, upgrade_deb: Path
) -> None:
    # A chroot has no systemd: pretend it runs (/run/systemd/system is what
    # the scripts test) and record what they ask of it through a recording
    # systemctl (minbase has none; the real deb-systemd-invoke calls it).
    debroot.file("/run/systemd/system").mkdir(parents=True)
    log = debroot.file("/systemctl-calls.log")
    stub = debroot.file("/usr/bin/systemctl")
    stub.write_text('#!/bin/sh\necho "$*" >>/systemctl-calls.log\n')
    stub.chmod(0o755)

    def calls() -> list[str]:
        lines = log.read_text().splitlines() if log.exists() else []
        log.unlink(missing_ok=True)
        return lines

    def asked(lines: list[str], verb: str) -> bool:
        return any(verb in line.split() and UNIT_NAME in line for line in lines)

    debroot.install(deb_file)
    # First install: enabled, but not started (server_url is not set yet).
    first = calls()
    assert not asked(first, "start"), first
    assert not asked(first, "restart"), first
    assert not asked(first, "try-restart"), first

    debroot.install(upgrade_deb)
    # Upgrade: restarted if (and only if) it was running: try-restart.
    upgrade = calls()
    assert asked(upgrade, "try-restart"), upgrade

    debroot.apt("remove", "homescale")
    remove = calls()
    assert asked(remove, "stop"), remove
