"""Writes the packaged /etc/homescale/config.yaml from the project's example config.

Usage: deb-config.py EXAMPLE OUT

The example may use paths relative to its own folder (good for `make run`); the
package needs them where the unit puts its directories: files under
/var/lib/homescale (StateDirectory=), the admin socket under /var/run/homescale
(RuntimeDirectory=). Comments and layout are kept (ruamel.yaml round trip).
Fails if any path setting would still be relative afterwards.
"""

from __future__ import annotations

import sys
from pathlib import PurePosixPath
from typing import Any

from ruamel.yaml import YAML

STATE = PurePosixPath("/var/lib/homescale")
RUNTIME = PurePosixPath("/var/run/homescale")
# Keys whose value is a file the server reads or writes; empty means "unset"
# (tls_*, policy.path) and stays empty.
RUNTIME_KEYS = {"unix_socket"}


def is_path_key(key: str) -> bool:
    last = key.rsplit(".", 1)[-1]
    return last == "path" or last.endswith("_path") or key in RUNTIME_KEYS


def rewrite(node: Any, prefix: str, changed: list[str]) -> None:
    if not hasattr(node, "items"):
        return
    for k, v in list(node.items()):
        key = f"{prefix}{k}"
        if hasattr(v, "items"):
            rewrite(v, key + ".", changed)
        elif isinstance(v, str) and v and is_path_key(key) and not v.startswith("/"):
            base = RUNTIME if key in RUNTIME_KEYS else STATE
            node[k] = str(base / PurePosixPath(v).name)
            changed.append(f"{key}: {v} -> {node[k]}")


def relative_left(node: Any, prefix: str = "") -> list[str]:
    out: list[str] = []
    if hasattr(node, "items"):
        for k, v in node.items():
            key = f"{prefix}{k}"
            if hasattr(v, "items"):
                out += relative_left(v, key + ".")
            elif isinstance(v, str) and v and is_path_key(key) and not v.startswith("/"):
                out.append(key)
    return out


def main(argv: list[str]) -> int:
    src, dst = argv[1], argv[2]
    yaml = YAML()
    yaml.preserve_quotes = True
    with open(src) as f:
        doc = yaml.load(f)
    changed: list[str] = []
    rewrite(doc, "", changed)
    left = relative_left(doc)
    if left:
        print(f"deb-config: relative paths left in {src}: {', '.join(left)}", file=sys.stderr)
        return 1
    if not changed:
        # Already package-shaped: ship the example byte for byte.
        with open(src) as f_in, open(dst, "w") as f_out:
            f_out.write(f_in.read())
        return 0
    # The layout of the example (document marker, indented lists).
    yaml.explicit_start = True
    yaml.indent(mapping=2, sequence=4, offset=2)
    with open(dst, "w") as f:
        yaml.dump(doc, f)
    for line in changed:
        print(f"deb-config: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
