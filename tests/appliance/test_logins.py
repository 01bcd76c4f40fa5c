"""Pending interactive logins on trio's clock: a 15-minute expiry runs in virtual time."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from appliance.errors import NotFound
from appliance.logins import REGISTRATION_TTL, PendingLogins
from appliance.store import NodeRow


async def test_a_login_nobody_completes_expires_after_its_ttl(
    autojump_clock: trio.testing.MockClock,
) -> None:
    logins = PendingLogins()
    reg = logins.start("mkey:1", "nodekey:1", {"Hostname": "laptop"}, False)
    assert logins.start("mkey:1", "nodekey:1", {}, False) is reg  # asking again: same URL
    assert logins.hostname(reg.id) == "laptop"
    started = trio.current_time()
    await logins.wait(reg)  # the client's long poll: nobody answers
    assert trio.current_time() - started == pytest.approx(REGISTRATION_TTL.total_seconds())
    assert reg.node is None
    assert logins.get(reg.id) is None
    with pytest.raises(NotFound, match="expired after 15 minutes"):
        logins.require(reg.id)


async def test_completion_and_rejection_release_the_waiting_client(
    autojump_clock: trio.testing.MockClock,
) -> None:
    logins = PendingLogins()
    done = logins.start("mkey:1", "nodekey:1", {}, False)
    refused = logins.start("mkey:2", "nodekey:2", {}, False)
    node = NodeRow(id=7, machine_key="mkey:1", node_key="nodekey:1", given_name="n")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(logins.wait, done)
        nursery.start_soon(logins.wait, refused)
        await trio.sleep(60)
        logins.complete(done, node)
        logins.reject(refused, "not today")
    assert trio.current_time() < REGISTRATION_TTL.total_seconds()
    assert done.node is node
    assert (refused.rejected, refused.reason) == (True, "not today")
    assert logins.listing() == []
