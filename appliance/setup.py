"""`homescale init`: a data directory with a commented config and the server's keys."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

from .errors import HomescaleError
from .store import STATE_DIR_MODE

EXAMPLE = "config-example.yaml"
TLS_DIR = "tls"


def example_config() -> str:
    return resources.files("appliance").joinpath(EXAMPLE).read_text()


def render_config(server_url: str) -> str:
    """The example config for a data directory: paths relative to the config's folder."""
    parts = urlsplit(server_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise HomescaleError(
            f"--server-url {server_url!r}: expected a URL like http://127.0.0.1:8080"
        )
    port = parts.port or (443 if parts.scheme == "https" else 80)
    text = example_config()
    text = text.replace("/var/lib/homescale/", "")
    text = text.replace("/var/run/homescale/homescale.sock", "homescale.sock")
    text = text.replace(
        "server_url: http://127.0.0.1:8080", f"server_url: {server_url.rstrip('/')}"
    )
    loopback = parts.hostname in ("127.0.0.1", "localhost", "::1")
    text = text.replace(
        "listen_addr: 127.0.0.1:8080",
        f"listen_addr: 127.0.0.1:{port}" if loopback else f"listen_addr: 0.0.0.0:{port}",
    )
    if loopback:
        text = text.replace(
            'stun_listen_addr: "0.0.0.0:3478"', 'stun_listen_addr: "127.0.0.1:3478"'
        )
    return text


def init_data_dir(data_dir: Path, server_url: str) -> list[str]:
    """Create what is missing in `data_dir`; never overwrite. Returns what it did, line by line."""
    from protocol.keys import load_or_create_private_key

    data_dir.mkdir(mode=STATE_DIR_MODE, parents=True, exist_ok=True)
    done: list[str] = []
    config = data_dir / "config.yaml"
    if config.exists():
        done.append(f"{config}: exists, left as it is")
    else:
        tmp = config.with_suffix(".tmp")
        # Group-readable (the CLI's users), never world-readable: it may hold secrets.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        with os.fdopen(fd, "w") as f:
            f.write(render_config(server_url))
        tmp.replace(config)
        done.append(f"{config}: written (server_url {server_url})")
    noise = data_dir / "noise_private.key"
    existed = noise.exists()
    load_or_create_private_key(noise)
    done.append(f"{noise}: {'exists, left as it is' if existed else 'generated'}")
    tls = data_dir / TLS_DIR
    if (tls / "server.pem").exists():
        done.append(f"{tls}/server.pem: exists, left as it is")
    else:
        from .tlscerts import generate_local_tls

        host = urlsplit(server_url).hostname or "localhost"
        paths = generate_local_tls(tls, sorted({host, "localhost", "127.0.0.1"}))
        done.append(
            f"{paths.cert}: generated (TLS for the embedded DERP relay; clients pin it "
            f"while server_url is plain http)"
        )
        done.append(
            f"{paths.ca_cert}: the local CA; for an https server_url, trust it on "
            f"clients (Debian: copy to /usr/local/share/ca-certificates/homescale.crt "
            f"and run update-ca-certificates)"
        )
    done.append(f"start the server with: homescale -c {config} serve")
    return done
