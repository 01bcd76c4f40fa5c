"""The version string: package metadata, plus the commit recorded at build time."""

from __future__ import annotations

from importlib import metadata


def version() -> str:
    try:
        from . import _build  # type: ignore[attr-defined]  # written by packaging/build-binary.sh

        return str(_build.VERSION)
    except ImportError:
        pass
    try:
        return metadata.version("homescale")
    except metadata.PackageNotFoundError:
        return "0.0.0+unknown"


def commit() -> str:
    try:
        from . import _build  # type: ignore[attr-defined]

        return str(_build.COMMIT)
    except ImportError:
        return "unknown"
