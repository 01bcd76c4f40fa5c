"""The log reader the absence checks rely on sees homescale's lines in both formats."""

from __future__ import annotations

import logging

import pytest

from tests import logformat, realclient
from tests.realclient import msg_has

FORMATS = ["text", "json"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_message_and_traceback_are_found_in_either_format(fmt: str) -> None:
    lines = logformat.render(fmt, "policy loaded from /x", with_traceback=True)
    logformat.assert_findable(msg_has("policy loaded from /x"), lines, "the message")
    logformat.assert_findable(msg_has("Traceback"), lines, "the traceback")


@pytest.mark.parametrize("fmt", FORMATS)
def test_sent_map_lines_are_read_in_either_format(fmt: str) -> None:
    lines = logformat.render(
        fmt, 'node 12 <- 30 bytes: {"PeersRemoved":[3]}', level=logging.DEBUG, logger="x.control"
    )
    parsed = [logformat.parse_line(ln) for ln in lines]
    assert realclient.sent_maps(parsed, 12) == [{"PeersRemoved": [3]}]
    assert realclient.sent_maps(parsed, 2) == []


def test_a_check_that_cannot_see_the_line_is_refused() -> None:
    # The json format keeps the text under "message": reading another key sees nothing.
    lines = logformat.render("json", "policy loaded")
    with pytest.raises(AssertionError, match="could never find it"):
        logformat.assert_findable(lambda ln: "policy" in str(ln.get("text", "")), lines, "x")
