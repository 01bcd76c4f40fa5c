"""The console's server health view: nodes, the database, DERP relays, STUN, certificate.

Read from the running server's own state (the tailnet coordinator, the `/metrics`
samples, the DERP map in force) at request time; nothing here is polled or stored.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from ..config import Config
from ..metrics import Metrics
from ..tailnet import Tailnet


@dataclass
class HealthSources:
    config: Config
    tailnet: Tailnet
    metrics: Metrics
    cert_not_after: Callable[[], dt.datetime | None] | None = None  # ACME's; else the file's


def _file_not_after(config: Config) -> dt.datetime | None:
    if config.tls_cert_path is None:
        return None
    try:
        return x509.load_pem_x509_certificate(config.tls_cert_path.read_bytes()).not_valid_after_utc
    except (OSError, ValueError):
        return None


def report(src: HealthSources) -> dict[str, Any]:
    config, tailnet = src.config, src.tailnet
    counters, gauges = src.metrics.samples()
    samples = {**counters, **gauges}
    try:
        derp_map = json.loads(tailnet.derp_map[1]) or {}
    except ValueError:
        derp_map = {}
    homes: dict[int, int] = {}
    for row in tailnet.nodes.values():
        net = row.hostinfo.get("NetInfo") or {}
        region = net.get("PreferredDERP") if isinstance(net, dict) else None
        if isinstance(region, int) and region:
            homes[region] = homes.get(region, 0) + 1
    regions = []
    for key, r in sorted((derp_map.get("Regions") or {}).items(), key=lambda kv: int(kv[0])):
        if not isinstance(r, dict):
            continue
        rid = int(r.get("RegionID") or key)
        regions.append(
            {
                "id": rid,
                "code": str(r.get("RegionCode") or ""),
                "name": str(r.get("RegionName") or ""),
                "relays": [str(n.get("HostName") or "") for n in r.get("Nodes") or []],
                "homeOf": homes.get(rid, 0),
            }
        )
    not_after = src.cert_not_after() if src.cert_not_after else _file_not_after(config)
    return {
        "nodes": len(tailnet.nodes),
        "online": len(tailnet.online),
        "quarantined": len(tailnet.quarantined),
        "policy": "set" if tailnet.policy_text is not None else "none (allow all)",
        "derp": {
            "embedded": config.derp.server_enabled,
            "region": config.derp.region_id if config.derp.server_enabled else None,
            "stun": config.derp.stun_listen_addr if config.derp.server_enabled else "",
            "regions": regions,
        },
        "certificate": {
            "path": str(config.tls_cert_path or ""),
            "notAfter": not_after.isoformat().replace("+00:00", "Z") if not_after else None,
            "daysLeft": (not_after - dt.datetime.now(dt.UTC)).days if not_after else None,
        },
        "metrics": {k: samples[k] for k in sorted(samples)},
    }
