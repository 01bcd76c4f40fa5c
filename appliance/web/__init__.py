"""The built-in web console (issue 15): served by homescale at `server_url/admin`."""

from .console import Console

__all__ = ["Console"]
