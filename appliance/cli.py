"""The `homescale` command line: headscale's command tree, flags and aliases.

Admin commands are REST calls (so the JSON is the API's, one shape everywhere) sent
to the running server over its unix socket -- or to a remote server with
HOMESCALE_CLI_ADDRESS + HOMESCALE_CLI_API_KEY -- so the server applies and announces
every change itself. With no server running they run in-process on the database.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlencode, urlsplit

from cyclopts import App, Parameter

from .config import Config, env_lookup, find_config, load_config
from .durations import parse_duration
from .errors import HomescaleError
from .secrets import names_a_key_id
from .version import commit, version

CLI_TIMEOUT = 10.0


class CliError(HomescaleError):
    exit_code = 1


@dataclass
class Options:
    """Global flags (`-c`, `-o`, `--force`, `-v`), set by the meta app before a command runs."""

    config: str | None = None
    output: str = ""
    force: bool = False
    verbose: bool = False


OPTS = Options()


# ---------------------------------------------------------------- config + transport


def _config() -> Config:
    path = find_config(OPTS.config, os.environ)
    if path is None:
        raise HomescaleError(
            "no config file found: pass -c FILE, set HOMESCALE_CONFIG, or create "
            "/etc/homescale/config.yaml (`homescale init` writes one)"
        )
    return load_config(path)


def _say(msg: str) -> None:
    if OPTS.verbose:
        print(msg, file=sys.stderr)


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=CLI_TIMEOUT)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(CLI_TIMEOUT)
        s.connect(self._path)
        self.sock = s


class Transport:
    """Sends one API call; returns the decoded JSON body or raises CliError with the detail."""

    def call(
        self,
        method: str,
        path: str,
        query: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
    ) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the transport holds (the direct path's database connection)."""

    @staticmethod
    def _result(status: int, data: bytes) -> Any:
        try:
            obj = json.loads(data) if data else {}
        except json.JSONDecodeError:
            obj = {"detail": data.decode(errors="replace").strip()}
        if status >= 400:
            detail = obj.get("detail") or obj.get("message") or str(obj)
            raise CliError(f"{detail} (HTTP {status})")
        return obj


class HttpTransport(Transport):
    def __init__(self, conn_factory: Any, headers: dict[str, str]) -> None:
        self.conn_factory = conn_factory
        self.headers = headers

    def call(
        self,
        method: str,
        path: str,
        query: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
    ) -> Any:
        url = path + ("?" + urlencode(query) if query else "")
        data = json.dumps(body).encode() if body is not None else None
        conn = self.conn_factory()
        try:
            conn.request(
                method, url, body=data, headers={**self.headers, "Content-Type": "application/json"}
            )
            resp = conn.getresponse()
            return self._result(resp.status, resp.read())
        except OSError as e:
            raise CliError(f"cannot reach the homescale server: {e}") from None
        finally:
            conn.close()


class DirectTransport(Transport):
    """The API routes run in this process on the database (no server running)."""

    def __init__(self, config: Config) -> None:
        from .admin import Admin, tailnet_routes
        from .api import AdminApi
        from .policies import check_policy_text
        from .store import Store
        from .storethread import run_inline
        from .tailnet import Tailnet, offline_tailnet

        self.store = Store(config.database_path, wal=config.write_ahead_log)

        # The server's rules, including policy.mode: in file mode a stored policy would be
        # ignored, so `policy set` is refused here as the running server refuses it.
        store = self.store
        offline: list[Tailnet] = []  # built on first use: most commands show no routes

        def routes(node_id: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
            # With no server, the routes are those it would serve on start (nobody online).
            if not offline:
                offline.append(offline_tailnet(config, store))
            return tailnet_routes(offline[0])(node_id)

        self.api = AdminApi(
            Admin(store, config=config, routes=routes),
            run_inline,
            require_auth=False,
            policy_check=lambda text: check_policy_text(text, "policy", store),
            policy_mode=config.policy_mode,
        )

    def close(self) -> None:
        self.store.close()

    def call(
        self,
        method: str,
        path: str,
        query: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
    ) -> Any:
        import trio

        from .api import ApiRequest

        q = ApiRequest(
            method,
            path,
            {k: [v] for k, v in (query or {}).items()},
            {},
            json.dumps(body).encode() if body is not None else b"",
        )
        status, obj = trio.run(self.api.handle, q)
        return self._result(status, json.dumps(obj).encode())


def _socket_answers(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(2)
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def transport() -> Transport:
    path = find_config(OPTS.config, os.environ)
    config = load_config(path) if path is not None else None
    if config is not None:
        cli = config.cli  # the `cli:` section, with HOMESCALE_CLI_* / HEADSCALE_CLI_* over it
        address, api_key, insecure = cli.address, cli.api_key, cli.insecure
        timeout = cli.timeout.total_seconds() or CLI_TIMEOUT
    else:  # no config file: the environment alone can name a remote server

        def env(key: str) -> str:
            found = env_lookup(os.environ, key)
            return found[1] if found else ""

        address, api_key = env("cli.address"), env("cli.api_key")
        insecure, timeout = env("cli.insecure").lower() in ("1", "true"), CLI_TIMEOUT
    if address:
        if not api_key:
            raise HomescaleError(
                "cli.address (HOMESCALE_CLI_ADDRESS) is set but cli.api_key "
                "(HOMESCALE_CLI_API_KEY) is not (create one with `homescale apikeys create` "
                "on the server)"
            )
        url = address if "://" in address else f"https://{address}"
        parts = urlsplit(url)

        def factory() -> http.client.HTTPConnection:
            if parts.scheme == "https":
                ctx = ssl.create_default_context()
                if insecure:
                    ctx.check_hostname = False
                    ctx.verify_mode = ssl.CERT_NONE
                return http.client.HTTPSConnection(
                    parts.hostname or "", parts.port or 443, timeout=timeout, context=ctx
                )
            return http.client.HTTPConnection(
                parts.hostname or "", parts.port or 80, timeout=timeout
            )

        _say(f"using the remote API at {url}")
        return HttpTransport(factory, {"Authorization": f"Bearer {api_key}"})
    if config is None:
        config = _config()  # says that no config file was found
    if _socket_answers(config.unix_socket):
        _say(f"using the running server's admin socket {config.unix_socket}")
        return HttpTransport(lambda: _UnixHTTPConnection(str(config.unix_socket)), {})
    _say(
        f"no server answers on {config.unix_socket}; using the database {config.database_path} directly"
    )
    _refuse_foreign_state(config)
    return DirectTransport(config)


def _refuse_foreign_state(config: Config) -> None:
    """Root must not create files in a state directory owned by the service user: the
    service could no longer open its own database (WAL and journal files would be root's)."""
    if os.geteuid() != 0:
        return
    try:
        owner = config.database_path.parent.stat().st_uid
    except OSError:
        return
    if owner != 0:
        import pwd

        try:
            name = pwd.getpwuid(owner).pw_name
        except KeyError:
            name = str(owner)
        raise HomescaleError(
            f"the server is not running and {config.database_path.parent} belongs "
            f"to {name!r}: run the command as that user so the database stays "
            f"theirs, e.g. sudo -u {name} homescale ..."
        )


def seg(value: object) -> str:
    """A name as one URL path segment: `/`, `?`, `#`, `%` and spaces arrive as typed."""
    return quote(str(value), safe="")


def api(
    method: str, path: str, query: dict[str, str] | None = None, body: dict[str, Any] | None = None
) -> Any:
    t = transport()
    try:
        return t.call(method, path, query, body)
    finally:
        t.close()


# ---------------------------------------------------------------- output


def emit(obj: Any, table: Sequence[Column] | None = None, message: str | None = None) -> None:
    """Print per `-o`: json, json-line, yaml, or (default) a table / message."""
    fmt = OPTS.output
    if fmt == "json":
        print(json.dumps(obj, indent=2))
    elif fmt == "json-line":
        print(json.dumps(obj))
    elif fmt == "yaml":
        from ruamel.yaml import YAML

        YAML(typ="safe", pure=True).dump(obj, sys.stdout)
    elif fmt:
        raise HomescaleError(f"-o {fmt}: unknown output format; use json, json-line or yaml")
    elif table is not None:
        rows = obj if isinstance(obj, list) else [obj]
        print_table(rows, table)
    elif message is not None:
        print(message)
    else:
        print(json.dumps(obj, indent=2))


# A table column: a title, and the (dotted) field it shows or how to compute the cell.
Column = tuple[str, str | Callable[[dict[str, Any]], str]]


def _cell(row: dict[str, Any], key: str | Callable[[dict[str, Any]], str]) -> str:
    if callable(key):
        return key(row)
    v: Any = row
    for part in key.split("."):
        v = v.get(part) if isinstance(v, dict) else None
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return ", ".join(str(x) for x in v)
    return str(v)


def print_table(rows: list[dict[str, Any]], columns: Sequence[Column]) -> None:
    cells = [[title for title, _ in columns]] + [[_cell(r, k) for _, k in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for row in cells:
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _confirm(what: str) -> None:
    if OPTS.force:
        return
    if not sys.stdin.isatty():
        raise CliError(f"refusing to {what} without confirmation: pass --force")
    answer = input(f"Do you want to {what}? [y/N] ")
    if answer.strip().lower() not in ("y", "yes"):
        raise CliError("aborted")


def _future(duration: str, flag: str) -> str | None:
    try:
        d = parse_duration(duration)
    except ValueError as e:
        raise HomescaleError(f"{flag}: {e}, got {duration!r}") from None
    if not d.total_seconds():
        return None
    return (datetime.now(UTC) + d).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------- the app

app = App(
    name="homescale",
    version=version,
    help="homescale: a self-hosted control server for Tailscale networks.",
)

USER_COLS = [
    ("ID", "id"),
    ("Name", "name"),
    ("Username", "displayName"),
    ("Email", "email"),
    ("Created", "createdAt"),
]
KEY_COLS = [
    ("ID", "id"),
    ("Key", "key"),
    ("User", "user.name"),
    ("Reusable", "reusable"),
    ("Ephemeral", "ephemeral"),
    ("Used", "used"),
    ("Expiration", "expiration"),
    ("Created", "createdAt"),
    ("Tags", "aclTags"),
]
APIKEY_COLS = [
    ("ID", "id"),
    ("Prefix", "prefix"),
    ("Expiration", "expiration"),
    ("Created", "createdAt"),
    ("Last seen", "lastSeen"),
]


def _short_key(field: str) -> Callable[[dict[str, Any]], str]:
    """A key as headscale's table shows it: Go's ShortString, `[abcde]`."""
    from protocol.keys import KeyParseError, MachinePublic, NodePublic

    cls = MachinePublic if field == "machineKey" else NodePublic

    def cell(row: dict[str, Any]) -> str:
        try:
            return cls.parse(str(row.get(field) or "")).short()
        except KeyParseError:
            return str(row.get(field) or "")

    return cell


def _table_time(value: Any, none: str = "") -> str:
    """headscale's table time format (HeadscaleDateTimeFormat), in UTC."""
    from protocol.gojson import WireError, parse_time

    if not value:
        return none
    try:
        return parse_time(str(value)).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    except WireError:
        return str(value)


def _expired(row: dict[str, Any]) -> str:
    from protocol.gojson import WireError, parse_time

    try:
        expired = bool(row.get("expiry")) and parse_time(str(row["expiry"])) < datetime.now(UTC)
    except WireError:
        expired = False
    return "yes" if expired else "no"


# headscale's `nodes list` columns, then homescale's device approval.
NODE_COLS: list[Column] = [
    ("ID", "id"),
    ("Hostname", "name"),
    ("Name", "givenName"),
    ("MachineKey", _short_key("machineKey")),
    ("NodeKey", _short_key("nodeKey")),
    ("User", "user.name"),
    ("Tags", "tags"),
    ("IP addresses", "ipAddresses"),
    ("Ephemeral", lambda n: "true" if (n.get("preAuthKey") or {}).get("ephemeral") else "false"),
    ("Last seen", lambda n: _table_time(n.get("lastSeen"))),
    ("Expiration", lambda n: _table_time(n.get("expiry"), "N/A")),
    ("Connected", lambda n: "online" if n.get("online") else "offline"),
    ("Expired", _expired),
    ("Approved", "approved"),
]


@app.command
def serve() -> None:
    """Run the server."""
    import trio

    from .logs import setup_logging
    from .serve import serve as run

    config = _config()
    log = setup_logging(config.log_level, config.log_format)
    trio.run(run, config, log)


@app.command(name="version")
def version_cmd() -> None:
    """Print the version."""
    emit({"version": version(), "commit": commit()}, message=f"{version()} (commit {commit()})")


@app.command
def configtest() -> None:
    """Check the configuration file; exit 0 when it is usable, 2 when not."""
    config = _config()
    for w in config.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if config.oidc is not None:
        from .oidc import provider_report

        print(provider_report(config.oidc), file=sys.stderr)
    emit({"config": str(config.source), "ok": True}, message=f"{config.source}: configuration OK")


@app.command
def init(
    *,
    data_dir: Annotated[str, Parameter(name=["--data-dir"])] = "data",
    server_url: Annotated[str, Parameter(name=["--server-url"])] = "http://127.0.0.1:8080",
) -> None:
    """Write a commented config and the server keys into a data directory (never overwrites)."""
    from .setup import init_data_dir

    for line in init_data_dir(Path(data_dir), server_url):
        print(line)


generate = App(name="generate", alias="gen", help="Generate keys.")
app.command(generate)


@generate.command(name="private-key")
def generate_private_key() -> None:
    """Print a new private key (headscale's `privkey:<hex>` format)."""
    from protocol.keys import PrivateKey

    key = str(PrivateKey.generate())
    emit({"private_key": key}, message=key)


@app.command
def health() -> None:
    """Check the server's health (database connectivity)."""
    obj = api("GET", "/api/v1/health")
    emit(obj, message="healthy" if obj.get("databaseConnectivity") else "unhealthy")


# -- users

users = App(name="users", alias="user", help="Manage users.")
app.command(users)

Identifier = Annotated[
    int | None, Parameter(name=["--identifier", "-i"], help="User identifier (ID)")
]
UserName = Annotated[str, Parameter(name=["--name", "-n"], help="Username")]


def _user_ref(identifier: int | None, name: str) -> str:
    if identifier is not None and identifier >= 0:
        return str(identifier)
    if name:
        return name
    raise CliError("name the user: --identifier ID or --name NAME")


@users.command(name="create", alias=["c", "new"])
def users_create(
    name: str,
    *,
    display_name: Annotated[str, Parameter(name=["--display-name", "-d"])] = "",
    email: Annotated[str, Parameter(name=["--email", "-e"])] = "",
    picture_url: Annotated[str, Parameter(name=["--picture-url", "-p"])] = "",
) -> None:
    """Create a user."""
    obj = api(
        "POST",
        "/api/v1/user",
        body={"name": name, "displayName": display_name, "email": email, "pictureUrl": picture_url},
    )
    emit(obj["user"], message="User created")


@users.command(name="list", alias=["ls", "show"])
def users_list(
    *,
    identifier: Identifier = None,
    name: UserName = "",
    email: Annotated[str, Parameter(name=["--email", "-e"])] = "",
) -> None:
    """List users."""
    query = {
        k: v
        for k, v in (
            ("id", "" if identifier is None else str(identifier)),
            ("name", name),
            ("email", email),
        )
        if v
    }
    emit(api("GET", "/api/v1/user", query=query)["users"], table=USER_COLS)


@users.command(name="rename", alias=["mv"])
def users_rename(
    *,
    identifier: Identifier = None,
    name: UserName = "",
    new_name: Annotated[str, Parameter(name=["--new-name", "-r"])] = "",
) -> None:
    """Rename a user."""
    if not new_name:
        raise CliError("--new-name is required")
    ref = _user_ref(identifier, name)
    uid = _resolve_user_id(ref)
    obj = api("POST", f"/api/v1/user/{seg(uid)}/rename/{seg(new_name)}")
    emit(obj["user"], message="User renamed")


@users.command(name="destroy", alias=["delete"])
def users_destroy(*, identifier: Identifier = None, name: UserName = "") -> None:
    """Delete a user (it must own no nodes)."""
    uid = _resolve_user_id(_user_ref(identifier, name))
    _confirm(f"destroy user {name or uid}")
    api("DELETE", f"/api/v1/user/{seg(uid)}")
    emit({}, message="User destroyed")


def _resolve_user_id(ref: str) -> str:
    if ref.isdigit():
        return ref
    found = api("GET", "/api/v1/user", query={"name": ref})["users"]
    if not found:
        raise CliError(f"no user named {ref!r} (see `homescale users list`)")
    return str(found[0]["id"])


# -- pre-auth keys

preauthkeys = App(
    name="preauthkeys", alias=["preauthkey", "authkey", "pre"], help="Manage pre-auth keys."
)
app.command(preauthkeys)


@preauthkeys.command(name="create", alias=["c", "new"])
def preauthkeys_create(
    *,
    user: Annotated[str, Parameter(name=["--user", "-u"], help="User ID or name")] = "",
    reusable: bool = False,
    ephemeral: bool = False,
    expiration: Annotated[str, Parameter(name=["--expiration", "-e"])] = "1h",
    tags: Annotated[str, Parameter(name=["--tags"], help="tag:a,tag:b")] = "",
) -> None:
    """Create a pre-auth key."""
    uid = _resolve_user_id(user) if user else None
    tag_list = [t.strip() for t in tags.split(",") if t.strip()]
    obj = api(
        "POST",
        "/api/v1/preauthkey",
        body={
            "user": uid,
            "reusable": reusable,
            "ephemeral": ephemeral,
            "expiration": _future(expiration, "--expiration"),
            "aclTags": tag_list,
        },
    )
    emit(obj["preAuthKey"], message=obj["preAuthKey"]["key"])


@preauthkeys.command(name="list", alias=["ls", "show"])
def preauthkeys_list(*, user: Annotated[str, Parameter(name=["--user", "-u"])] = "") -> None:
    """List pre-auth keys."""
    query = {"user": _resolve_user_id(user)} if user else None
    emit(api("GET", "/api/v1/preauthkey", query=query)["preAuthKeys"], table=KEY_COLS)


def _pak_ref(ref: str) -> dict[str, str]:
    """A key by its numeric ID (headscale's `id`) or by its prefix (homescale's `key`)."""
    ref = ref.strip()
    return {"id": ref} if names_a_key_id(ref) else {"key": ref}


@preauthkeys.command(name="expire", alias=["revoke", "exp", "e"])
def preauthkeys_expire(
    *, id: Annotated[str, Parameter(name=["--id", "-i"], help="Key ID or prefix")]
) -> None:
    """Expire a pre-auth key."""
    api("POST", "/api/v1/preauthkey/expire", body=_pak_ref(id))
    emit({}, message="Key expired")


@preauthkeys.command(name="delete", alias=["del", "rm", "d"])
def preauthkeys_delete(
    *, id: Annotated[str, Parameter(name=["--id", "-i"], help="Key ID or prefix")]
) -> None:
    """Delete a pre-auth key."""
    api("DELETE", "/api/v1/preauthkey", query=_pak_ref(id))
    emit({}, message="Key deleted")


# -- API keys

apikeys = App(name="apikeys", alias=["apikey", "api"], help="Manage API keys.")
app.command(apikeys)


@apikeys.command(name="create", alias=["c", "new"])
def apikeys_create(
    *, expiration: Annotated[str, Parameter(name=["--expiration", "-e"])] = "90d"
) -> None:
    """Create an API key (shown once)."""
    obj = api("POST", "/api/v1/apikey", body={"expiration": _future(expiration, "--expiration")})
    emit(obj["apiKey"], message=obj["apiKey"])


@apikeys.command(name="list", alias=["ls", "show"])
def apikeys_list() -> None:
    """List API keys."""
    emit(api("GET", "/api/v1/apikey")["apiKeys"], table=APIKEY_COLS)


def _apikey_ref(prefix: str, id: int | None) -> dict[str, str]:
    """The key as the API names it: by prefix or by ID, exactly one."""
    if prefix and id is not None:
        raise CliError("name the key by --prefix or by --id, not both")
    if prefix:
        return {"prefix": prefix}
    if id is not None:
        return {"id": str(id)}
    raise CliError("name the key: --prefix PREFIX or --id ID")


@apikeys.command(name="expire", alias=["revoke", "exp", "e"])
def apikeys_expire(
    *,
    prefix: Annotated[str, Parameter(name=["--prefix", "-p"])] = "",
    id: Annotated[int | None, Parameter(name=["--id", "-i"])] = None,
) -> None:
    """Expire an API key."""
    api("POST", "/api/v1/apikey/expire", body=_apikey_ref(prefix, id))
    emit({}, message="Key expired")


@apikeys.command(name="delete", alias=["remove", "del"])
def apikeys_delete(
    *,
    prefix: Annotated[str, Parameter(name=["--prefix", "-p"])] = "",
    id: Annotated[int | None, Parameter(name=["--id", "-i"])] = None,
) -> None:
    """Delete an API key."""
    ref = _apikey_ref(prefix, id)
    api(
        "DELETE",
        f"/api/v1/apikey/{seg(ref.get('prefix', ''))}",
        query={"id": ref["id"]} if "id" in ref else None,
    )
    emit({}, message="Key deleted")


# -- web console

web = App(name="web", help="The web console at server_url/admin.")
app.command(web)


@web.command(name="login-url")
def web_login_url() -> None:
    """Print a sign-in link for the web console: valid 10 minutes, opens one session."""
    t = transport()
    try:
        if isinstance(t, DirectTransport):
            raise CliError(
                "the web console runs in the server: start it (homescale serve), then "
                "run this again"
            )
        obj = t.call("POST", "/api/v1/web/loginurl")
    finally:
        t.close()
    emit(obj, message=f"{obj['url']}\n(valid until {obj['expiration']}, opens one session)")


# -- nodes

nodes = App(name="nodes", alias="node", help="Manage nodes.")
app.command(nodes)
NodeId = Annotated[int, Parameter(name=["--identifier", "-i"], help="Node identifier (ID)")]


@nodes.command(name="list", alias=["ls", "show"])
def nodes_list(*, user: Annotated[str, Parameter(name=["--user", "-u"])] = "") -> None:
    """List nodes."""
    emit(
        api("GET", "/api/v1/node", query={"user": user} if user else None)["nodes"], table=NODE_COLS
    )


@nodes.command(name="register")
def nodes_register(
    *,
    user: Annotated[str, Parameter(name=["--user", "-u"])],
    key: Annotated[str, Parameter(name=["--key", "-k"])],
) -> None:
    """Complete an interactive login (the id shown on the client's /register page)."""
    obj = api("POST", "/api/v1/node/register", query={"user": user, "key": key})
    emit(obj["node"], message=f"Node {obj['node']['givenName']} registered")


@nodes.command(name="backfillips")
def nodes_backfillips() -> None:
    """Give nodes the addresses they lack from the configured prefixes, and take away
    those of a prefix no longer configured."""
    _confirm("assign/remove IPs to/from nodes")
    obj = api("POST", "/api/v1/node/backfillips", query={"confirmed": "true"})
    emit(obj, message="\n".join(obj["changes"]) or "Every node has its addresses")


@nodes.command(name="delete", alias=["del"])
def nodes_delete(*, identifier: NodeId) -> None:
    """Delete a node."""
    _confirm(f"delete node {identifier}")
    api("DELETE", f"/api/v1/node/{identifier}")
    emit({}, message="Node deleted")


@nodes.command(name="approve")
def nodes_approve(*, identifier: NodeId) -> None:
    """Let a node waiting for device approval into the tailnet (node.require_approval)."""
    obj = api("POST", f"/api/v1/node/{identifier}/approve")
    emit(obj["node"], message=f"Node {obj['node']['givenName']} approved")


@nodes.command(name="reject")
def nodes_reject(*, identifier: NodeId) -> None:
    """Refuse a node waiting for device approval (it is deleted)."""
    api("POST", f"/api/v1/node/{identifier}/reject")
    emit({}, message="Node rejected")


@nodes.command(name="expire", alias=["logout", "exp", "e"])
def nodes_expire(
    *,
    identifier: NodeId,
    expiry: Annotated[str, Parameter(name=["--expiry", "-e"])] = "",
    disable: Annotated[bool, Parameter(name=["--disable", "-d"])] = False,
) -> None:
    """Expire a node's key now (or at --expiry), or --disable its expiry."""
    body: dict[str, Any] = {}
    if expiry:
        body["expiry"] = expiry
    if disable:
        body["disableExpiry"] = True
    obj = api("POST", f"/api/v1/node/{identifier}/expire", body=body)
    emit(obj["node"], message="Node expired" if not disable else "Node expiry disabled")


@nodes.command(name="rename")
def nodes_rename(new_name: str, *, identifier: NodeId) -> None:
    """Rename a node (its MagicDNS name)."""
    obj = api("POST", f"/api/v1/node/{identifier}/rename/{seg(new_name)}")
    emit(obj["node"], message="Node renamed")


@nodes.command(name="tag", alias=["tags", "t"])
def nodes_tag(
    *,
    identifier: NodeId,
    tags: Annotated[str, Parameter(name=["--tags", "-t"], help="tag:a,tag:b")] = "",
) -> None:
    """Set a node's tags."""
    tag_list = [t.strip() for t in tags.split(",") if t.strip()]
    obj = api("POST", f"/api/v1/node/{identifier}/tags", body={"tags": tag_list})
    emit(obj["node"], message="Node updated")


@nodes.command(name="approve-routes")
def nodes_approve_routes(
    *, identifier: NodeId, routes: Annotated[str, Parameter(name=["--routes", "-r"])] = ""
) -> None:
    """Set a node's approved routes."""
    obj = api(
        "POST",
        f"/api/v1/node/{identifier}/approve_routes",
        body={"routes": [r.strip() for r in routes.split(",") if r.strip()]},
    )
    emit(obj["node"], message="Node updated")


@nodes.command(name="list-routes", alias=["lsr", "routes"])
def nodes_list_routes(
    *, identifier: Annotated[int | None, Parameter(name=["--identifier", "-i"])] = None
) -> None:
    """List nodes' routes."""
    found = api("GET", "/api/v1/node")["nodes"]
    if identifier is not None:
        found = [n for n in found if n["id"] == str(identifier)]
    emit(
        found,
        table=[
            ("ID", "id"),
            ("Hostname", "givenName"),
            ("Approved", "approvedRoutes"),
            ("Available", "availableRoutes"),
            ("Serving", "subnetRoutes"),
        ],
    )


# -- auth (headscale's newer spelling of interactive registration)

auth = App(name="auth", help="Interactive logins.")
app.command(auth)


@auth.command(name="register")
def auth_register(
    *,
    user: Annotated[str, Parameter(name=["--user", "-u"])],
    auth_id: Annotated[str, Parameter(name=["--auth-id", "--key", "-k"])],
) -> None:
    """Complete an interactive login (alias of `nodes register`)."""
    nodes_register(user=user, key=auth_id)


@auth.command(name="list", alias=["ls"])
def auth_list() -> None:
    """What waits for someone: logins, SSH checks, nodes awaiting device approval."""
    emit(
        api("GET", "/api/v1/auth")["pending"],
        table=[
            ("Kind", "kind"),
            ("Auth ID", "authId"),
            ("Node ID", "nodeId"),
            ("Machine", "hostname"),
            ("User", "user"),
            ("Since", "createdAt"),
        ],
    )


@auth.command(name="approve")
def auth_approve(*, auth_id: Annotated[str, Parameter(name=["--auth-id"])]) -> None:
    """Pass a pending SSH check (`action: check`); the waiting connection goes on."""
    api("POST", "/api/v1/auth/approve", body={"authId": auth_id})
    emit({}, message="Auth request approved")


@auth.command(name="reject")
def auth_reject(*, auth_id: Annotated[str, Parameter(name=["--auth-id", "--key", "-k"])]) -> None:
    """Refuse a pending interactive login or SSH check; the waiting client is told so."""
    api("POST", "/api/v1/auth/reject", body={"authId": auth_id})
    emit({}, message="Login rejected")


# -- debug (headscale's testing commands)

debug = App(name="debug", help="Debugging and testing commands.")
app.command(debug)


@debug.command(name="create-node")
def debug_create_node(
    *,
    name: Annotated[str, Parameter(name=["--name"])],
    user: Annotated[str, Parameter(name=["--user", "-u"])],
    key: Annotated[str, Parameter(name=["--key", "-k"], help="hskey-authreq-<24 hex>")] = "",
    route: Annotated[list[str] | None, Parameter(name=["--route", "-r"])] = None,
) -> None:
    """Make a machine wait in an interactive login, to register with `auth register`."""
    from .secrets import new_auth_id

    key = key or new_auth_id()
    routes = [r.strip() for item in route or [] for r in item.split(",") if r.strip()]
    body = {"user": user, "key": key, "name": name, "routes": routes}
    obj = api("POST", "/api/v1/debug/node", body=body)
    emit(
        obj["node"], message=f"Node {name} waits: homescale auth register -u {user} --auth-id {key}"
    )


# -- policy

policy = App(name="policy", help="Manage the policy.")
app.command(policy)
PolicyFile = Annotated[str, Parameter(name=["--file", "-f"], help="Path to a HuJSON policy")]


@policy.command(name="get", alias=["show", "view", "fetch"])
def policy_get() -> None:
    """Print the policy stored in the database."""
    obj = api("GET", "/api/v1/policy")
    emit(obj, message=obj["policy"])


@policy.command(name="set", alias=["put", "update"])
def policy_set(*, file: PolicyFile) -> None:
    """Check and store a policy (policy.mode: database)."""
    text = _read(file)
    api("PUT", "/api/v1/policy", body={"policy": text})
    emit({}, message="Policy updated.")


@policy.command(name="check")
def policy_check(*, file: PolicyFile) -> None:
    """Check a policy file; exit 0 when valid, 1 with the located error when not."""
    from .policies import check_policy_text
    from .store import Store

    text = _read(file)
    # Users, tags and hosts resolve against the tailnet when its database is at hand
    # (server running or not); without one the policy is checked on its own.
    store = None
    try:
        config = _config()
        if config.database_path.exists():
            store = Store(config.database_path, wal=config.write_ahead_log)
    except HomescaleError as e:
        _say(f"checking without a tailnet: {e}")
    try:
        check_policy_text(text, file, store)
    finally:
        if store is not None:
            store.close()
    emit({"ok": True}, message=f"{file}: policy OK")


@app.command
def doctor(*, fix: Annotated[bool, Parameter(name=["--fix"], negative="")] = False) -> None:
    """List stored nodes the server cannot serve (it quarantines them); --fix repairs them.

    Works on the database directly, with the server running or stopped; a running server
    serves repaired nodes after a restart (or the node's next change).
    """
    from .quarantine import doctor as diagnose
    from .store import Store

    config = _config()
    if fix:
        _refuse_foreign_state(config)
    store = Store(config.database_path, wal=config.write_ahead_log)
    try:
        report = diagnose(store, config, fix=fix)
    finally:
        store.close()
    rows = [
        {
            "id": p.node_id,
            "name": p.node_name,
            "field": p.field,
            "value": p.value,
            "problem": p.reason,
        }
        for p in report.problems
    ]
    if OPTS.output:
        emit({"problems": rows, "repaired": report.repaired, "unrepaired": report.left})
    elif not rows:
        print(f"{config.database_path}: every stored node can be served")
    else:
        print_table(
            rows,
            [
                ("ID", "id"),
                ("Name", "name"),
                ("Field", "field"),
                ("Value", "value"),
                ("Problem", "problem"),
            ],
        )
        if fix:
            print(f"repaired nodes: {', '.join(map(str, report.repaired)) or 'none'}")
            if report.repaired and _socket_answers(config.unix_socket):
                print("the server is running: restart it to serve the repaired nodes")
        else:
            print("run `homescale doctor --fix` to repair them")
    for note in report.left:
        print(f"not repaired: {note}", file=sys.stderr)
    if report.left or (rows and not fix):
        raise SystemExit(1)


def _read(file: str) -> str:
    try:
        return Path(file).read_text()
    except OSError as e:
        raise CliError(f"{file}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise CliError(f"{file}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None


# -- migrate

migrate = App(name="migrate", help="Move another control server's state into homescale.")
app.command(migrate)


@migrate.command(name="headscale")
def migrate_headscale(
    *,
    db: Annotated[str, Parameter(name=["--db"], help="headscale's db.sqlite")] = "",
    headscale_config: Annotated[
        str,
        Parameter(
            name=["--headscale-config"],
            help="headscale's config.yaml (`--config` after `migrate headscale` means this)",
        ),
    ] = "",
    noise_key: Annotated[
        str, Parameter(name=["--noise-key"], help="headscale's noise_private.key")
    ] = "",
    derp_key: Annotated[
        str, Parameter(name=["--derp-key"], help="headscale's derp_server_private.key")
    ] = "",
    dry_run: Annotated[
        bool, Parameter(name=["--dry-run"], negative="", help="Check and report; write nothing")
    ] = False,
) -> None:
    """Import a stopped headscale (users, nodes, keys, policy, Noise key): devices keep
    working without logging in again. The headscale database is only read.

    homescale -c /etc/homescale/config.yaml migrate headscale --config /etc/headscale/config.yaml
    (after `migrate headscale`, --config and -c name headscale's config)."""
    from .migrate_headscale import import_headscale, source_from_headscale_config

    config = _config()
    if _socket_answers(config.unix_socket):
        raise CliError(
            f"homescale is running ({config.unix_socket} answers): stop it first "
            f"(systemctl stop homescale), import, then start it"
        )
    if not dry_run:
        _refuse_foreign_state(config)
    source = source_from_headscale_config(
        Path(headscale_config) if headscale_config else None,
        db=Path(db) if db else None,
        noise_key=Path(noise_key) if noise_key else None,
        derp_key=Path(derp_key) if derp_key else None,
    )
    report = import_headscale(source, config, dry_run=dry_run)
    emit(
        {
            "dryRun": report.dry_run,
            "counts": report.counts,
            "notCarriedOver": report.not_carried,
            "notes": report.notes,
        },
        message="\n".join(report.lines()),
    )


def _migrate_args(argv: Sequence[str]) -> list[str]:
    """After `migrate headscale`, `--config`/`-c` name headscale's config (the issue's
    `homescale migrate headscale --db F --config F`); homescale's own goes before the
    command."""
    out = list(argv)
    for i in range(len(out) - 1):
        if out[i] == "migrate" and out[i + 1] == "headscale":
            tail = [
                "--headscale-config"
                if t in ("--config", "-c")
                else "--headscale-config=" + t.split("=", 1)[1]
                if t.startswith("--config=")
                else t
                for t in out[i + 2 :]
            ]
            return out[: i + 2] + tail
    return out


# ---------------------------------------------------------------- entry point


@app.meta.default
def _meta(
    *tokens: Annotated[str, Parameter(show=False, allow_leading_hyphen=True)],
    config: Annotated[str | None, Parameter(name=["--config", "-c"], help="Config file")] = None,
    output: Annotated[
        str, Parameter(name=["--output", "-o"], help="json, json-line or yaml (default: human)")
    ] = "",
    force: Annotated[bool, Parameter(name=["--force"], help="Skip confirmations")] = False,
    verbose: Annotated[bool, Parameter(name=["--verbose", "-v"], help="Say what is done")] = False,
) -> Any:
    OPTS.config, OPTS.output, OPTS.force, OPTS.verbose = config, output, force, verbose
    return app(tokens, result_action="return_value")


def run(argv: Sequence[str]) -> int:
    """Run one command line; returns the exit code (errors printed to stderr)."""
    global OPTS
    OPTS = Options()
    try:
        app.meta(_migrate_args(argv), result_action="return_value")
    except HomescaleError as e:
        print(f"Error: {e}", file=sys.stderr)
        return e.exit_code
    except SystemExit as e:  # cyclopts: --help, --version, usage errors
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    except KeyboardInterrupt:
        return 130
    return 0


def main() -> None:
    try:
        code = run(sys.argv[1:])
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader left early (`homescale nodes list | head -1`): no traceback. Point stdout
        # at /dev/null so the interpreter's final flush does not fail again (Python docs,
        # "Note on SIGPIPE"); 128 + SIGPIPE is what a shell reports for such a writer.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = 141
    sys.exit(code)
