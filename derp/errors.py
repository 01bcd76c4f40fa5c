"""The one error root of the ``derp`` package.

Like h11: ``LocalDerpError`` means our own caller misused an API (a bug here),
``RemoteDerpError`` means the peer broke the protocol (log it, drop the
connection, carry on serving everyone else).
"""

from __future__ import annotations


class DerpError(Exception):
    """Anything that goes wrong in the DERP relay, its codec or STUN."""


class LocalDerpError(DerpError):
    """The caller used the API wrongly (wrong state, bad argument)."""


class RemoteDerpError(DerpError):
    """The peer sent something the protocol does not allow."""


class FrameStalled(RemoteDerpError):
    """A DERP or WebSocket frame started and then stopped arriving (a timeout)."""


class DerpConfigError(DerpError):
    """A DERP map source (file, URL, config value) is unusable; the message names it."""
