"""Building the DERPMap clients receive, as a JSON-ready dict with Go's field names.

Sources, merged in headscale's order (hscontrol/derp/derp.go GetDERPMap, then
app.go adding the embedded region): every ``derp.urls`` map, then every
``derp.paths`` file (a later source replaces a region of the same ID, a
region given as ``null`` removes it), then the embedded region.

Field spelling follows tailcfg/derpmap.go at v1.90.9. headscale's YAML files
use lower-case keys (``regionid``, ``hostname``: yaml.v3 lower-cases Go field
names) while JSON uses Go's names; Go's decoders match either, so we read
keys case-insensitively and always write the canonical spelling.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import h11
import trio
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from derp.errors import DerpConfigError
from protocol import safejson
from protocol.gojson import RemoteWireError
from protocol.tailcfg import DERPRegion

DERPMap = dict[str, Any]
Region = dict[str, Any]

# Canonical names and types (tailcfg DERPRegion / DERPNode); the bool says
# whether Go always emits the field (no omitempty).
_REGION_FIELDS: dict[str, tuple[type | tuple[type, ...], bool]] = {
    "RegionID": (int, True),
    "RegionCode": (str, True),
    "RegionName": (str, True),
    "Latitude": ((int, float), False),
    "Longitude": ((int, float), False),
    "Avoid": (bool, False),
    "NoMeasureNoHome": (bool, False),
    "Nodes": (list, True),
}
_NODE_FIELDS: dict[str, tuple[type | tuple[type, ...], bool]] = {
    "Name": (str, True),
    "RegionID": (int, True),
    "HostName": (str, True),
    "CertName": (str, False),
    "IPv4": (str, False),
    "IPv6": (str, False),
    "STUNPort": (int, False),
    "STUNOnly": (bool, False),
    "DERPPort": (int, False),
    "InsecureForTests": (bool, False),
    "STUNTestIP": (str, False),
    "CanPort80": (bool, False),
}
_LOWER_REGION = {k.lower(): k for k in _REGION_FIELDS}
_LOWER_NODE = {k.lower(): k for k in _NODE_FIELDS}
_DEFAULT_FETCH_TIMEOUT = 10.0  # headscale types.HTTPTimeout
_MAX_MAP_BYTES = 4 << 20


# ---------------------------------------------------------------- embedded region


def split_server_url(server_url: str) -> tuple[str, int]:
    """HostName and DERPPort from ``server_url`` (headscale GenerateRegion)."""
    parts = urlsplit(server_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DerpConfigError(
            f"server_url {server_url!r}: want http(s)://host[:port], e.g. https://hs.example.com"
        )
    try:
        port = parts.port
    except ValueError:
        raise DerpConfigError(f"server_url {server_url!r}: bad port") from None
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    return parts.hostname, port


def stun_port_of(stun_listen_addr: str) -> int:
    """STUNPort from ``derp.server.stun_listen_addr`` ("0.0.0.0:3478", "[::]:3478")."""
    _, sep, port = stun_listen_addr.rpartition(":")
    if not sep or not port.isdigit():
        raise DerpConfigError(
            f"derp.server.stun_listen_addr {stun_listen_addr!r}: want host:port, e.g. 0.0.0.0:3478"
        )
    return int(port)


def embedded_region(
    *,
    server_url: str,
    region_id: int = 999,
    region_code: str = "headscale",
    region_name: str = "Headscale Embedded DERP",
    ipv4: str = "",
    ipv6: str = "",
    stun_port: int = 3478,
    cert_name: str = "",
) -> Region:
    """The region describing homescale's own relay (one node named after the region).

    ``cert_name`` (``sha256-raw:<hex>``) pins a self-signed certificate so
    clients need no CA installed; ``stun_port`` -1 tells clients not to STUN.
    """
    if not 0 < region_id:
        raise DerpConfigError(f"derp.server.region_id {region_id}: must be > 0 (900-999 are free)")
    host, port = split_server_url(server_url)
    node: dict[str, Any] = {
        "Name": str(region_id),
        "RegionID": region_id,
        "HostName": host,
    }
    if cert_name:
        node["CertName"] = cert_name
    if ipv4:
        node["IPv4"] = ipv4
    if ipv6:
        node["IPv6"] = ipv6
    if stun_port:
        node["STUNPort"] = stun_port
    node["DERPPort"] = port
    return {
        "RegionID": region_id,
        "RegionCode": region_code,
        "RegionName": region_name,
        "Nodes": [node],
    }


# ---------------------------------------------------------------- parsing


def _get_ci(obj: Mapping[str, Any], name: str) -> tuple[bool, Any]:
    for k, v in obj.items():
        if isinstance(k, str) and k.lower() == name.lower():
            return True, v
    return False, None


def _canon(
    obj: Any,
    fields: dict[str, tuple[type | tuple[type, ...], bool]],
    lower: dict[str, str],
    where: str,
    log: logging.Logger | None,
) -> dict[str, Any]:
    if not isinstance(obj, Mapping):
        raise DerpConfigError(f"{where}: expected a mapping, got {type(obj).__name__}")
    out: dict[str, Any] = {}
    for k, v in obj.items():
        name = lower.get(str(k).lower())
        if name is None:
            # Go's decoders ignore unknown fields; say so rather than fail.
            if log:
                log.warning("%s: ignoring unknown field %r", where, k)
            continue
        want, _ = fields[name]
        if v is None:
            continue
        if isinstance(v, bool) and want is not bool:
            raise DerpConfigError(f"{where}: {name} must be {_tname(want)}, got {v!r}")
        if not isinstance(v, want):
            raise DerpConfigError(f"{where}: {name} must be {_tname(want)}, got {v!r}")
        out[name] = v
    return out


def _tname(t: type | tuple[type, ...]) -> str:
    if isinstance(t, tuple):
        return "a number"
    return {int: "an integer", str: "a string", bool: "true or false", list: "a list"}[t]


def _emit(obj: dict[str, Any], fields: dict[str, tuple[Any, bool]]) -> dict[str, Any]:
    """Go's field order, omitempty fields left out when zero."""
    out: dict[str, Any] = {}
    for name, (want, always) in fields.items():
        if name in obj:
            v = obj[name]
            if always or v:
                out[name] = v
        elif always:
            out[name] = [] if want is list else (0 if want is int else "")
    return out


def normalize_regions(
    doc: Any, source: str, *, log: logging.Logger | None = None
) -> dict[int, Region | None]:
    """The regions of one DERPMap document; ``None`` marks a removal."""
    if not isinstance(doc, Mapping):
        raise DerpConfigError(f"{source}: a DERP map must be a mapping with 'regions'")
    found, regions = _get_ci(doc, "Regions")
    if not found or regions is None:
        raise DerpConfigError(f"{source}: no 'regions' in this DERP map")
    if not isinstance(regions, Mapping):
        raise DerpConfigError(f"{source}: 'regions' must map region IDs to regions")
    out: dict[int, Region | None] = {}
    for raw_id, raw in regions.items():
        text_id = str(raw_id)
        if not (text_id.isascii() and text_id.lstrip("-").isdigit()):
            raise DerpConfigError(f"{source}: region key {raw_id!r} is not a number")
        rid = int(text_id)
        where = f"{source}: region {rid}"
        if rid <= 0:
            raise DerpConfigError(f"{where}: region IDs must be > 0")
        if raw is None:
            out[rid] = None
            continue
        region = _canon(raw, _REGION_FIELDS, _LOWER_REGION, where, log)
        region.setdefault("RegionID", rid)
        if region["RegionID"] != rid:
            raise DerpConfigError(
                f"{where}: RegionID {region['RegionID']} differs from its key {rid}"
            )
        nodes = []
        for i, raw_node in enumerate(region.get("Nodes", [])):
            nwhere = f"{where} node {i}"
            node = _canon(raw_node, _NODE_FIELDS, _LOWER_NODE, nwhere, log)
            node.setdefault("RegionID", rid)
            if node["RegionID"] != rid:
                raise DerpConfigError(f"{nwhere}: RegionID {node['RegionID']} is not {rid}")
            if not node.get("HostName"):
                raise DerpConfigError(f"{nwhere}: HostName is required")
            node.setdefault("Name", f"{rid}{chr(ord('a') + i) if i < 26 else i}")
            nodes.append(_emit(node, _NODE_FIELDS))
        if not nodes:
            raise DerpConfigError(f"{where}: a region needs at least one node")
        region["Nodes"] = nodes
        out[rid] = _emit(region, _REGION_FIELDS)
        try:
            # What every client decodes: the tailcfg type says what Go accepts
            # (int ranges, ports), so no URL or file can hand peers a map they refuse.
            DERPRegion.from_json(out[rid])
        except RemoteWireError as e:
            raise DerpConfigError(f"{where}: {e}") from None
    return out


def load_derp_map_file(
    path: str | Path, *, log: logging.Logger | None = None
) -> dict[int, Region | None]:
    """Regions from a ``derp.paths`` file: YAML (headscale's format) or JSON."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise DerpConfigError(f"derp.paths: cannot read {p}: {e.strerror or e}") from None
    try:
        if p.suffix.lower() == ".json":
            doc = safejson.loads(text, max_bytes=_MAX_MAP_BYTES)
        else:
            doc = YAML(typ="safe").load(text)  # JSON is YAML too
    except (ValueError, YAMLError) as e:
        raise DerpConfigError(f"derp.paths: {p} is not valid YAML/JSON: {e}") from None
    return normalize_regions(doc, str(p), log=log)


def parse_derp_map_json(
    body: bytes, source: str, *, log: logging.Logger | None = None
) -> dict[int, Region | None]:
    try:
        doc = safejson.loads(body, max_bytes=_MAX_MAP_BYTES)
    except ValueError as e:
        raise DerpConfigError(f"derp.urls: {source} did not return JSON: {e}") from None
    return normalize_regions(doc, source, log=log)


def merge_regions(
    sources: Sequence[Mapping[int, Region | None]],
    *,
    embedded: Region | None = None,
) -> DERPMap:
    """One DERPMap from ordered sources (later wins; ``None`` removes), embedded last."""
    regions: dict[int, Region] = {}
    for src in sources:
        for rid, region in src.items():
            if region is None:
                regions.pop(rid, None)
            else:
                regions[rid] = region
    if embedded is not None:
        regions[embedded["RegionID"]] = embedded
    # Go marshals map[int] keys as sorted decimal strings.
    return {"Regions": {str(rid): regions[rid] for rid in sorted(regions)}}


# ---------------------------------------------------------------- URLs

Fetch = Callable[[str], Awaitable[bytes]]


async def http_get(url: str, *, ssl_context: ssl.SSLContext | None = None) -> bytes:
    """A minimal HTTP/1.1 GET (h11 over trio) returning the body of a 200.

    The runtime has no HTTP client dependency; this is all ``derp.urls`` needs.
    Callers bound it with a timeout.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DerpConfigError(f"derp.urls: {url!r} is not an http(s) URL")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    stream: trio.abc.Stream = await trio.open_tcp_stream(parts.hostname, port)
    try:
        if parts.scheme == "https":
            ctx = ssl_context or ssl.create_default_context()
            stream = trio.SSLStream(stream, ctx, server_hostname=parts.hostname)
        conn = h11.Connection(h11.CLIENT)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host = parts.netloc.rpartition("@")[2]
        req = h11.Request(
            method="GET",
            target=target,
            headers=[("Host", host), ("User-Agent", "homescale"), ("Connection", "close")],
        )
        await stream.send_all(conn.send(req) + conn.send(h11.EndOfMessage()))
        body = bytearray()
        status = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await stream.receive_some(65536)))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > _MAX_MAP_BYTES:
                    raise DerpConfigError(f"derp.urls: {url} answered more than 4 MiB")
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
        if status != 200:
            raise DerpConfigError(f"derp.urls: {url} answered HTTP {status}")
        return bytes(body)
    except h11.RemoteProtocolError as e:
        raise DerpConfigError(f"derp.urls: {url}: bad HTTP response: {e}") from None
    finally:
        await trio.aclose_forcefully(stream)


@dataclass
class DerpMapBuilder:
    """Keeps the current DERPMap; ``refresh()`` re-reads files and URLs.

    A URL that fails (timeout, HTTP error, bad JSON) keeps its last good
    regions, so one flaky source never empties the map (issue 4). A file that
    fails raises: files are the operator's own config and deserve a loud error.
    """

    paths: Sequence[str | Path] = ()
    urls: Sequence[str] = ()
    embedded: Region | None = None
    fetch: Fetch = http_get
    fetch_timeout: float = _DEFAULT_FETCH_TIMEOUT
    log: logging.Logger | None = None

    def __post_init__(self) -> None:
        self._last_good: dict[str, dict[int, Region | None]] = {}
        self.current: DERPMap = merge_regions([], embedded=self.embedded)
        self.errors: dict[str, str] = {}

    async def refresh(self) -> DERPMap:
        sources: list[Mapping[int, Region | None]] = []
        for url in self.urls:
            try:
                with trio.fail_after(self.fetch_timeout):
                    body = await self.fetch(url)
                self._last_good[url] = parse_derp_map_json(body, url, log=self.log)
                self.errors.pop(url, None)
            except (DerpConfigError, OSError, trio.TooSlowError, ssl.SSLError) as e:
                msg = str(e) or type(e).__name__
                if isinstance(e, trio.TooSlowError):
                    msg = f"derp.urls: {url} did not answer within {self.fetch_timeout:g} s"
                self.errors[url] = msg
                if self.log:
                    kept = (
                        "keeping its last good regions" if url in self._last_good else "no map yet"
                    )
                    self.log.warning("%s (%s)", msg, kept)
            if url in self._last_good:
                sources.append(self._last_good[url])
        for path in self.paths:
            sources.append(load_derp_map_file(path, log=self.log))
        self.current = merge_regions(sources, embedded=self.embedded)
        return self.current

    async def run(
        self,
        on_change: Callable[[DERPMap], Awaitable[None]],
        *,
        update_frequency: float,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Refresh every ``update_frequency`` seconds; report changed maps only."""
        task_status.started()
        while True:
            await trio.sleep(update_frequency)
            before = self.current
            try:
                after = await self.refresh()
            except DerpConfigError as e:
                # A file broke at runtime: keep serving the map we have.
                if self.log:
                    self.log.error("DERP map not updated: %s", e)
                continue
            if after != before:
                await on_change(after)
