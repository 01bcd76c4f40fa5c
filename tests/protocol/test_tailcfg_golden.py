"""The wire types against what Tailscale's own service sent real clients.

Every SelfNode, Peer, DNS config, DERP map, user profile, filter rule and SSH
policy in the golden captures must decode without unknown fields and re-encode
with the same field names and values (our output may add only fields Go always
emits, at their zero value).
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from protocol.gojson import Wire, is_zero_time, parse_time
from protocol.tailcfg import (
    DERPMap,
    DisplayMessage,
    DNSConfig,
    FilterRule,
    Node,
    SSHPolicy,
    UserProfile,
)
from tests import tiers

GOLDEN = Path(__file__).resolve().parents[2] / ".." / "shared" / "golden" / "tailscale-saas"

pytestmark = tiers.mark(
    "shared",
    GOLDEN.is_dir(),
    f"golden netmaps not present at {GOLDEN} (CI has ../shared; a plain clone does not)",
)


def _load_hujson(path: Path) -> Any:
    text = "\n".join(
        line for line in path.read_text().splitlines() if not line.lstrip().startswith("//")
    )
    return json.loads(re.sub(r",(\s*[}\]])", r"\1", text))


def _golden_objects() -> dict[str, list[tuple[type[Wire], Any]]]:
    """Unique JSON shapes per file, deduplicated by their text to keep the test quick."""
    seen: set[str] = set()
    out: dict[str, list[tuple[type[Wire], Any]]] = {}

    def add(file: str, cls: type[Wire], obj: Any) -> None:
        if obj is None:
            return
        key = cls.__name__ + json.dumps(obj, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.setdefault(file, []).append((cls, obj))

    for path in sorted(GOLDEN.glob("*/*.hujson")):
        doc = _load_hujson(path)
        for capture in (doc.get("captures") or {}).values():
            nm = capture.get("netmap")
            if not nm:
                continue
            add(path.name, Node, nm["SelfNode"])
            for peer in nm.get("Peers") or []:
                add(path.name, Node, peer)
            add(path.name, DNSConfig, nm.get("DNS"))
            add(path.name, DERPMap, nm.get("DERPMap"))
            add(path.name, SSHPolicy, nm.get("SSHPolicy"))
            for prof in (nm.get("UserProfiles") or {}).values():
                add(path.name, UserProfile, prof)
            for rule in nm.get("PacketFilterRules") or []:
                add(path.name, FilterRule, rule)
            for msg in (nm.get("DisplayMessages") or {}).values():
                add(path.name, DisplayMessage, msg)
    return out


def _no_unknown_fields(obj: Any, path: str) -> list[str]:
    found: list[str] = []
    if isinstance(obj, Wire):
        found += [f"{path}.{k}" for k in obj.extra]
        for name in obj.__dataclass_fields__:
            if name != "extra":
                found += _no_unknown_fields(getattr(obj, name), f"{path}.{name}")
    elif isinstance(obj, list):
        for i, x in enumerate(obj):
            found += _no_unknown_fields(x, f"{path}[{i}]")
    elif isinstance(obj, dict):
        for k, x in obj.items():
            found += _no_unknown_fields(x, f"{path}[{k}]")
    return found


def _is_zeroish(v: Any) -> bool:
    if v in (None, 0, "", False, [], {}):
        return True
    if isinstance(v, str) and re.fullmatch(r"[a-z]+:0{64}", v):
        return True  # zero key
    return isinstance(v, str) and v.startswith("0001-01-01T00:00:00")


def _same(golden: Any, ours: Any, path: str) -> list[str]:
    if isinstance(golden, dict):
        if not isinstance(ours, dict):
            return [f"{path}: {ours!r} is not an object"]
        diffs = []
        for k, v in golden.items():
            if k not in ours:
                if not _is_zeroish(v):
                    diffs.append(f"{path}.{k} dropped")
                continue
            diffs += _same(v, ours[k], f"{path}.{k}")
        diffs += [
            f"{path}.{k} = {v!r} added"
            for k, v in ours.items()
            if k not in golden and not _is_zeroish(v)
        ]
        return diffs
    if isinstance(golden, list):
        if not isinstance(ours, list) or len(ours) != len(golden):
            return [f"{path}: list differs"]
        return [
            d
            for i, (g, o) in enumerate(zip(golden, ours, strict=True))
            for d in _same(g, o, f"{path}[{i}]")
        ]
    if isinstance(golden, str) and re.match(r"\d{4}-\d\d-\d\dT", golden):
        # Go keeps nanoseconds; we keep microseconds.
        g, o = parse_time(golden), parse_time(ours)
        return [] if g == o or (is_zero_time(g) and is_zero_time(o)) else [f"{path}: time differs"]
    if golden != ours:
        return [f"{path}: {golden!r} != {ours!r}"]
    return []


@pytest.fixture(scope="module")
def golden() -> dict[str, list[tuple[type[Wire], Any]]]:
    return _golden_objects()


def test_golden_shapes_round_trip(golden) -> None:
    objs = golden
    assert sum(len(v) for v in objs.values()) > 100, "golden captures unexpectedly empty"
    problems: list[str] = []
    kinds: set[str] = set()
    for file, items in objs.items():
        for cls, raw in items:
            kinds.add(cls.__name__)
            decoded = cls.from_json(raw)
            problems += [f"{file}: unknown {p}" for p in _no_unknown_fields(decoded, cls.__name__)]
            problems += [f"{file}: {p}" for p in _same(raw, decoded.to_json(), cls.__name__)]
            # Encoding is stable: decode(encode(x)) == x.
            assert cls.from_json(decoded.to_json()) == decoded
            if len(problems) > 20:
                break
    assert problems == []
    assert {"Node", "DERPMap", "DNSConfig", "UserProfile", "FilterRule", "SSHPolicy"} <= kinds


def test_golden_node_fields_keep_types(golden) -> None:
    first = next(iter(golden.values()))
    node = next(Node.from_json(raw) for cls, raw in first if cls is Node)
    assert str(node.Key).startswith("nodekey:")
    assert node.Name.endswith(".")
    assert isinstance(node.Created, datetime)
    assert node.Addresses
