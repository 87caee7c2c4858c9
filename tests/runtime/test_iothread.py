"""broker/runtime/iothread.py: the log writer's thread.  It must keep trio.to_thread.run_sync's
promises the writer relies on: the call runs off the event loop, its value or exception comes
back, calls run one at a time in order, a cancel never abandons a call half-way, and an idle
thread leaves (and comes back when needed) instead of leaking."""

from __future__ import annotations

import threading
import time

import pytest
import trio

from broker.runtime.iothread import IoThread


async def test_the_call_runs_in_another_thread_and_its_value_comes_back():
    io = IoThread()
    loop_thread = threading.get_ident()
    ident, value = await io.run(lambda x: (threading.get_ident(), x * 2), 21)
    assert value == 42
    assert ident != loop_thread


async def test_an_exception_in_the_call_is_raised_to_the_caller_and_the_thread_goes_on():
    io = IoThread()

    def boom():
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        await io.run(boom)
    assert await io.run(lambda: "still here") == "still here"


async def test_the_event_loop_runs_while_the_call_blocks():
    io = IoThread()
    release = threading.Event()
    ticks = []

    async def ticker():
        while not release.is_set():
            ticks.append(1)
            await trio.sleep(0.005)

    async with trio.open_nursery() as n:
        n.start_soon(ticker)
        n.start_soon(trio.to_thread.run_sync, lambda: (time.sleep(0.1), release.set()))
        assert await io.run(release.wait, 5.0) is True
    assert len(ticks) >= 5  # the loop was not blocked by the waiting call


async def test_calls_from_several_tasks_run_one_at_a_time_in_the_order_made():
    io = IoThread()
    running, seen, overlap = [0], [], []

    def call(i):
        running[0] += 1
        if running[0] > 1:
            overlap.append(i)
        time.sleep(0.002)
        seen.append(i)
        running[0] -= 1

    async with trio.open_nursery() as n:
        for i in range(20):
            n.start_soon(io.run, call, i)
            await trio.lowlevel.checkpoint()  # each task makes its call before the next starts
    assert overlap == []
    assert seen == list(range(20))


async def test_a_cancel_waits_for_the_call_it_cannot_abandon():
    io = IoThread()
    finished = []

    def slow():
        time.sleep(0.2)
        finished.append(True)

    with trio.move_on_after(0.01) as cs:
        await io.run(slow)
    # The cancel came while the call ran: the caller got back only after it finished, and the
    # cancel was then delivered (the scope caught it at the next checkpoint, or reports it).
    assert finished == [True]
    assert cs.cancel_called


async def test_an_idle_thread_leaves_and_the_next_call_starts_another():
    io = IoThread(idle=0.05)
    first = await io.run(threading.get_ident)
    deadline = time.monotonic() + 5
    while io._thread is not None and time.monotonic() < deadline:
        await trio.sleep(0.01)
    assert io._thread is None, "the idle thread did not leave"
    assert not any(t.ident == first and t.is_alive() for t in threading.enumerate())
    second = await io.run(threading.get_ident)
    assert await io.run(lambda: 7) == 7
    assert second is not None


def test_one_thread_serves_a_later_trio_run_too():
    io = IoThread()
    gate = threading.Event()

    async def leave_early():
        with trio.move_on_after(0.01):
            await io.run(gate.wait, 5.0)

    # The cancel cannot abandon the call, so the run waits for it: open the gate from outside.
    # The answer of each call goes back to the loop that made it.
    threading.Timer(0.1, gate.set).start()
    trio.run(leave_early)
    assert trio.run(io.run, lambda: "next run") == "next run"
