"""Small log writes are made on the event loop (broker/runtime/durability.py INLINE_WRITE_BYTES):
one os.write to the page cache, without the hand-off to a worker thread and back that cost a
sequential publish ~0.2 ms, and in ``submit``'s own step when the writer task is idle, so a
batch's deliveries go out without waiting a round for the writer task.  A big batch, or one that fills the segment (a rotation), still
goes to a thread.  Durability over a real log, driven by hand."""

import trio

from broker.config import Config
from broker.runtime.durability import Durability
from broker.runtime.iothread import IoThread
from broker.state.core import BrokerState
from broker.wal.log import WriteAheadLog


def durability(tmp_path, **wal_options):
    wal = WriteAheadLog(str(tmp_path), fsync="never", **wal_options)
    list(wal.open())
    state = BrokerState()
    state.enable_log()
    state.connect(1)
    return wal, state, Durability(wal, state, Config(port=0, data_dir=str(tmp_path)))


def count_thread_hops(monkeypatch) -> list:
    """The calls the log writer hands to a thread (its IoThread, or trio's threads), by name."""
    hops = []
    real = trio.to_thread.run_sync
    real_io = IoThread.run

    async def counting(fn, *args, **kw):
        hops.append(getattr(fn, "__name__", fn))
        return await real(fn, *args, **kw)

    async def counting_io(self, fn, *args):
        hops.append(getattr(fn, "__name__", fn))
        return await real_io(self, fn, *args)

    monkeypatch.setattr(trio.to_thread, "run_sync", counting)
    monkeypatch.setattr(IoThread, "run", counting_io)
    return hops


async def test_a_small_write_is_made_in_submit_without_a_thread_and_is_on_disk(tmp_path, monkeypatch):
    wal, state, dur = durability(tmp_path)
    hops = count_thread_hops(monkeypatch)
    released = []
    state.publish(1, "q", b"small", None, 0, 1.0)
    dur.submit(state.take_records(), {}, released.append, early={1: ["delivery"]})
    # written in submit's own step: no writer-task round, no thread; what waited only for the
    # write (deliveries) is out at once
    assert hops == [] and wal.written_lsn == state.last_lsn
    assert released == [{1: ["delivery"]}]
    wal.close()
    reopened = WriteAheadLog(str(tmp_path), fsync="never")
    assert [r.lsn for r in reopened.open()][-1] == state.last_lsn
    reopened.close()


async def test_under_always_an_inline_write_holds_the_confirms_for_the_writers_fsync(tmp_path):
    wal, state, dur = durability(tmp_path)
    assert dur.policy == "always"
    released = []
    state.publish(1, "q", b"small", None, 0, 1.0)
    dur.submit(state.take_records(), {1: ["confirm"]}, released.append, early={1: ["delivery"]})
    assert wal.written_lsn == state.last_lsn and wal.synced_lsn < state.last_lsn
    assert released == [{1: ["delivery"]}]  # the confirm waits for the fsync
    async with trio.open_nursery() as nursery:
        await nursery.start(dur.run)
        with trio.fail_after(10):
            while len(released) < 2:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert released[1] == {1: ["confirm"]} and wal.synced_lsn >= state.last_lsn
    wal.close()


async def test_no_inline_write_while_the_writer_holds_the_log(tmp_path, monkeypatch):
    wal, state, dur = durability(tmp_path)
    hops = count_thread_hops(monkeypatch)
    released = []
    async with dur._write_lock:  # the writer task inside a write or fsync of its own
        state.publish(1, "q", b"small", None, 0, 1.0)
        dur.submit(state.take_records(), {}, released.append, early={1: ["delivery"]})
        assert wal.written_lsn < state.last_lsn and released == []
    await dur._locked(dur._write_pending)  # the writer's turn: in order after its own
    assert hops == [] and wal.written_lsn == state.last_lsn and released == [{1: ["delivery"]}]
    wal.close()


async def test_a_big_batch_or_a_rotation_still_goes_to_a_thread(tmp_path, monkeypatch):
    wal, state, dur = durability(tmp_path, segment_bytes=64 * 1024)
    hops = count_thread_hops(monkeypatch)
    for i in range(3):  # ~96 KiB: past the segment, so this write rotates
        state.publish(1, "q", bytes([i]) * 32 * 1024, None, 0, 1.0)
    dur.submit(state.take_records(), {}, lambda box: None)
    await dur._locked(dur._write_pending)
    assert hops == ["_write_pending"] and wal.written_lsn == state.last_lsn
    monkeypatch.setattr(Durability, "INLINE_WRITE_BYTES", 100)
    hops.clear()
    state.publish(1, "q", b"x" * 200, None, 0, 1.0)  # a small segment left, but past the limit
    dur.submit(state.take_records(), {}, lambda box: None)
    await dur._locked(dur._write_pending)
    assert hops == ["_write_pending"] and wal.written_lsn == state.last_lsn
    wal.close()
