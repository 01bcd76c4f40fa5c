"""appliance.storethread.StoreThread: store calls run in order in one thread, results and
errors come back to the caller, and a call once queued runs to its end."""

from __future__ import annotations

import threading

import pytest
import trio

from appliance.storethread import StoreThread


async def test_calls_run_in_order_in_one_thread_and_return_their_results() -> None:
    st = StoreThread()
    seen: list[tuple[int, str]] = []

    def call(i: int) -> int:
        seen.append((i, threading.current_thread().name))
        return i * i

    try:
        results: dict[int, int] = {}

        async def one(i: int) -> None:
            results[i] = await st.run(call, i)

        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(one, i)
                await trio.lowlevel.checkpoint()  # queued in this order
    finally:
        st.stop()
    assert results == {i: i * i for i in range(50)}
    assert [i for i, _ in seen] == list(range(50))
    assert {name for _, name in seen} == {"homescale-store"}
    assert threading.main_thread().name not in {name for _, name in seen}


async def test_an_error_reaches_the_caller_and_the_thread_goes_on() -> None:
    st = StoreThread()

    def boom() -> None:
        raise ValueError("constraint failed")

    try:
        with pytest.raises(ValueError, match="constraint failed"):
            await st.run(boom)
        assert await st.run(lambda: 7) == 7
    finally:
        st.stop()


async def test_a_queued_call_runs_to_its_end_even_when_cancelled() -> None:
    """A write that was queued commits; its caller must take the result (the changes it
    committed are announced by the caller), so a cancel waits for it."""
    st = StoreThread()
    release = threading.Event()
    done: list[str] = []

    def slow_write() -> str:
        release.wait(5)
        done.append("written")
        return "ok"

    try:
        with trio.CancelScope() as scope:
            scope.cancel()
            await st.run(lambda: done.append("never"))  # cancelled before it is queued
        assert done == []
        got: list[str] = []
        with trio.move_on_after(0.05) as scope:
            trio.lowlevel.current_trio_token().run_sync_soon(
                lambda: threading.Timer(0.2, release.set).start()
            )
            got.append(await st.run(slow_write))
        assert got == ["ok"]
        assert done == ["written"]
        assert not scope.cancelled_caught  # the deadline passed, yet the call completed
    finally:
        st.stop()
