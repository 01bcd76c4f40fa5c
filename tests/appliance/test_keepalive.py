"""A map stream with nothing to say still hears from the server (issue 10).

The Go client cancels a map poll after 120 s without a message (controlclient), so the
server sends a KeepAlive after 50-59 s of silence. Since issue 10 that comes from one
sweep over the sessions (`ControlService._keepalives`), not a timeout around every wait;
here the intervals are shortened and a real ts2021 client over the wire counts them.
"""

from __future__ import annotations

import pytest
import trio

import appliance.control as control
from tests.appliance.conftest import Site, serve_with_key
from tests.e2e.conftest import connect_peer


async def test_a_silent_map_stream_gets_a_keepalive_after_each_silence(
    site: Site, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control, "KEEPALIVE_BASE", 0.6)
    monkeypatch.setattr(control, "KEEPALIVE_JITTER", 0.0)
    monkeypatch.setattr(control, "KEEPALIVE_SWEEP", 0.1)
    async with trio.open_nursery() as nursery:
        auth_key = await serve_with_key(site, capsys, nursery)
        peer = await connect_peer(site, nursery, "quiet")
        await peer.register(auth_key)
        stream = await peer.open_stream()
        arrivals: list[tuple[float, bool]] = []  # (when, is a keep-alive)
        with trio.move_on_after(3.0):
            while True:
                _, msg = await stream.next(skip_keepalive=False)
                arrivals.append((trio.current_time(), bool(msg.get("KeepAlive"))))
        nursery.cancel_scope.cancel()
    assert arrivals
    assert not arrivals[0][1], "the first message is the map"
    keepalives = [t for t, ka in arrivals if ka]
    # 3 s at 0.6 s of silence each (swept every 0.1 s): about four, and none before a
    # whole silence (one per sweep would be dozens).
    assert len(keepalives) >= 2, arrivals
    gaps = [b - a for a, b in zip([arrivals[0][0], *keepalives], keepalives, strict=False)]
    assert min(gaps) >= 0.55, gaps
